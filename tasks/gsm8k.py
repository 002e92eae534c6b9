"""GSM8K (Cobbe et al. 2021): grade-school maths word problems with a numeric final answer.

Gold = the text after `####` in the reference solution. Prediction = the number in the last
`\\boxed{...}`, else after the last `####`, else the last number in the completion; numbers
may carry thousands separators, `$`, units, `%`, trailing punctuation, signs, decimals or be
simple fractions (`3/4`, `\\frac{3}{4}`). Reward = 1 when prediction and gold agree within a
tolerance. Validation is carved deterministically from train (disjoint by construction).
"""

from __future__ import annotations

import math
import random
import re
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from .base import Example, Task, data_dir, load_rows

_MINUS = "\u2212\u2013\u2014"  # unicode minus and dashes used as minus signs
# A number: optional sign and $, digits with optional thousands groups, decimals, or a leading-dot decimal.
_NUM = r"[-+" + _MINUS + r"]?\$?\s?(?:\d{1,3}(?:,\d{3})+|\d+)(?:\.\d+)?|[-+" + _MINUS + r"]?\$?\.\d+"
_FRAC = re.compile(r"\\[dt]?frac\{\s*(" + _NUM + r")\s*\}\{\s*(" + _NUM + r")\s*\}")
_SLASH = re.compile(r"(?<![\d.,/])(" + _NUM + r")\s*/\s*(" + _NUM + r")(?![\d/]|\.\d)")
_NUMBER = re.compile(r"(?<![\w.])(?:" + _NUM + r")(?!\d)")


def parse_number(text: str) -> float | None:
    """A single number written as text (`1,234.5`, `$-3`, `\u22122`, `.5`); None if not a number."""
    t = text.strip()
    for c in _MINUS:
        t = t.replace(c, "-")
    t = t.replace("$", "").replace(",", "").replace(" ", "")
    t = t.rstrip(".")
    try:
        return float(t)
    except ValueError:
        return None


def _fraction(num: str, den: str) -> float | None:
    a, b = parse_number(num), parse_number(den)
    if a is None or b is None or b == 0:
        return None
    return a / b


def _boxed_contents(text: str) -> list[str]:
    """Contents of every `\\boxed{...}` / `\\fbox{...}`, braces balanced."""
    out = []
    for m in re.finditer(r"\\(?:boxed|fbox)\s*\{", text):
        depth, i = 1, m.end()
        while i < len(text) and depth:
            depth += {"{": 1, "}": -1}.get(text[i], 0)
            i += 1
        if depth == 0:
            out.append(text[m.end() : i - 1])
    return out


def last_number(text: str) -> float | None:
    """The last number in `text` (a fraction `a/b` or `\\frac{a}{b}` counts as one number)."""
    spans: list[tuple[int, float]] = []
    taken: list[tuple[int, int]] = []
    for pat in (_FRAC, _SLASH):
        for m in pat.finditer(text):
            v = _fraction(m.group(1), m.group(2))
            if v is not None and not any(s <= m.start() < e for s, e in taken):
                spans.append((m.end(), v))
                taken.append((m.start(), m.end()))
    for m in _NUMBER.finditer(text):
        if any(s <= m.start() < e for s, e in taken):
            continue
        v = parse_number(m.group(0))
        if v is not None:
            spans.append((m.end(), v))
    if not spans:
        return None
    return max(spans, key=lambda s: s[0])[1]


def first_number(text: str) -> float | None:
    """The first plain number in `text` (read as `parse_number` reads one), or None."""
    for m in _NUMBER.finditer(text):
        v = parse_number(m.group(0))
        if v is not None:
            return v
    return None


def extract_prediction(completion: str) -> float | None:
    """The predicted answer: last `\\boxed{}`, else after the last `####`, else the last number."""
    boxed = _boxed_contents(completion)
    if boxed:
        v = last_number(boxed[-1])
        if v is not None:
            return v
    if "####" in completion:
        tail = completion.rsplit("####", 1)[1]
        v = last_number(tail.split("\n", 1)[0]) if tail.strip() else None
        if v is not None:
            return v
    return last_number(completion)


_STRICT = re.compile(r"#### (\-?[0-9\.\,]+)")


def extract_strict(completion: str) -> float | None:
    """The strict reading papers report (lm-evaluation-harness `strict-match`): the number written
    right after the last `#### ` in the GSM8K answer format; None when the format is absent."""
    found = _STRICT.findall(completion)
    return parse_number(found[-1].rstrip(".,")) if found else None


def extract_flexible(completion: str) -> float | None:
    """The flexible reading (lm-evaluation-harness `flexible-extract`): the last number anywhere."""
    return last_number(completion)


#: how a completion's answer is read: `auto` (the last \boxed{}, else after the last ####, else the
#: last number), `strict` (`#### N` only) or `flexible` (the last number)
EXTRACTIONS = {"auto": extract_prediction, "strict": extract_strict, "flexible": extract_flexible}


def gold_answer(solution: str) -> float:
    """The gold number after `####` in a GSM8K reference solution."""
    if "####" not in solution:
        raise ValueError(f"no '####' in reference solution: {solution[-80:]!r}")
    v = parse_number(solution.rsplit("####", 1)[1])
    if v is None:
        raise ValueError(f"gold answer is not a number: {solution.rsplit('####', 1)[1]!r}")
    return v


def numbers_match(pred: float | None, gold: float, rel_tol: float = 1e-6, abs_tol: float = 1e-6) -> bool:
    """Numeric equality within a tolerance."""
    return pred is not None and math.isclose(pred, gold, rel_tol=rel_tol, abs_tol=abs_tol)


def load_gsm8k_rows(split: str, source: str = "auto", path: str | Path | None = None) -> list[dict[str, Any]]:
    """Rows {question, answer} of the `train` or `test` file (local JSONL, or the hub via datasets)."""
    root = Path(path) if path else data_dir() / "gsm8k"

    def hub() -> list[dict[str, Any]]:
        import datasets  # the hub path (not exercised offline)

        return [dict(r) for r in datasets.load_dataset("openai/gsm8k", "main", split=split)]

    return load_rows(root / f"{split}.jsonl", source, "GSM8K", hub)


class GSM8K(Task):
    """GSM8K with a numeric exact-match reward; `n_val` problems of train become validation."""

    name = "gsm8k"
    metric_name = "accuracy"
    stop_strings = ("\n\nQuestion:",)
    default_chat = True

    def __init__(
        self,
        source: str = "auto",
        path: str | None = None,
        n_val: int = 500,
        val_seed: int = 0,
        n_shots: int = 0,
        shot_seed: int = 0,
        rel_tol: float = 1e-6,
        abs_tol: float = 1e-6,
        chat: bool | None = None,
        reward_extraction: str = "auto",
    ) -> None:
        if reward_extraction not in EXTRACTIONS:
            raise ValueError(f"reward_extraction must be one of {', '.join(EXTRACTIONS)}, "
                             f"got {reward_extraction!r}")
        self.reward_extraction = reward_extraction
        train_rows = load_gsm8k_rows("train", source, path)
        test_rows = load_gsm8k_rows("test", source, path)
        if not 0 <= n_val < len(train_rows):
            raise ValueError(f"n_val must be in [0, {len(train_rows)}), got {n_val}")

        def ex(split: str, i: int, r: dict[str, Any]) -> Example:
            return Example(id=f"gsm8k-{split}-{i}", question=r["question"], answer=gold_answer(r["answer"]),
                           meta={"solution": r["answer"]})

        order = list(range(len(train_rows)))
        random.Random(f"mirrorlab.gsm8k.val:{val_seed}").shuffle(order)
        val_idx = set(order[:n_val])
        train = [ex("train", i, r) for i, r in enumerate(train_rows) if i not in val_idx]
        val = [ex("train", i, r) for i, r in enumerate(train_rows) if i in val_idx]
        test = [ex("test", i, r) for i, r in enumerate(test_rows)]
        self.rel_tol, self.abs_tol = rel_tol, abs_tol
        self.n_shots = n_shots
        if not 0 <= n_shots <= len(train):
            raise ValueError(f"n_shots must be in [0, {len(train)}], got {n_shots}")
        self.shots = random.Random(f"mirrorlab.gsm8k.shots:{shot_seed}").sample(train, n_shots)
        super().__init__(train, val, test, chat=chat)

    def format_prompt(self, example: Example) -> str:
        """`Question: ...\\nAnswer:` after `n_shots` solved train problems."""
        shots = "".join(f"Question: {s.question}\nAnswer: {s.meta['solution']}\n\n" for s in self.shots)
        return f"{shots}Question: {example.question}\nAnswer:"

    def reference_completion(self, example: Example) -> str:
        """The reference solution text (ends with `#### <answer>`)."""
        return " " + example.meta["solution"]

    def reward(self, completion: str, example: Example) -> float:
        """1.0 when the number read by `reward_extraction` equals the gold answer within tolerance."""
        pred = EXTRACTIONS[self.reward_extraction](completion)
        return 1.0 if numbers_match(pred, float(example.answer), self.rel_tol, self.abs_tol) else 0.0

    def extra_metrics(self, completions: Sequence[str],
                      examples: Sequence[Example]) -> dict[str, list[float]]:
        """Accuracy read both ways papers report it, per example: `strict` (#### N) and `flexible`
        (the last number), whichever `reward_extraction` the reward uses."""
        out: dict[str, list[float]] = {"strict": [], "flexible": []}
        for c, e in zip(completions, examples, strict=True):
            for name in out:
                ok = numbers_match(EXTRACTIONS[name](c), float(e.answer), self.rel_tol, self.abs_tol)
                out[name].append(1.0 if ok else 0.0)
        return out
