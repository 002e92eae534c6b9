"""Generated integer arithmetic: the CPU quickstart task (DESIGN section 7).

Problems such as `12+7=` are drawn from a graded mix of difficulty levels with a seeded RNG;
the splits are disjoint by construction (a problem text is used at most once). The reward is
an exact match on the answer. An optional scratchpad format writes the intermediate steps and
then the answer after a marker (`12+7+5=` -> `12+7=19 19+5=24 ans 24`), so completion length
varies with difficulty. The character set stays small for a character-level tokenizer.
"""

from __future__ import annotations

import itertools
import random
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from .base import Example, Task
from .gsm8k import first_number, last_number

OPERATORS = "+-*"


@dataclass(frozen=True)
class Level:
    """One difficulty level: operand digits, number of terms and the operators drawn from."""

    digits: int = 1
    terms: int = 2
    operators: str = "+"

    def __post_init__(self) -> None:
        if self.digits < 1:
            raise ValueError(f"digits must be >= 1, got {self.digits}")
        if self.terms < 2:
            raise ValueError(f"terms must be >= 2, got {self.terms}")
        if not self.operators or any(o not in OPERATORS for o in self.operators):
            raise ValueError(f"operators must be a non-empty string of {OPERATORS!r}, got {self.operators!r}")

    @property
    def label(self) -> str:
        """A short name such as `2d3t+-`."""
        return f"{self.digits}d{self.terms}t{self.operators}"


# The measured graded mix (DESIGN section 7).
DEFAULT_LEVELS: tuple[Level, ...] = (
    Level(1, 2, "+"),
    Level(1, 3, "+"),
    Level(2, 2, "+"),
    Level(2, 2, "-"),
    Level(3, 2, "+"),
)


def evaluate_tokens(tokens: Sequence[int | str]) -> tuple[int, list[str]]:
    """Value of `[a, op, b, op, c, ...]` with usual precedence, and the scratchpad steps.

    `*` is reduced first (left to right), then `+`/`-` left to right; each reduction is one
    step written as `a op b=c`.
    """
    toks = list(tokens)
    steps: list[str] = []
    i = 1
    while i < len(toks):  # multiplications first
        if toks[i] == "*":
            a, b = int(toks[i - 1]), int(toks[i + 1])
            steps.append(f"{a}*{b}={a * b}")
            toks[i - 1 : i + 2] = [a * b]
        else:
            i += 2
    value = int(toks[0])
    for j in range(1, len(toks), 2):
        op, b = toks[j], int(toks[j + 1])
        new = value + b if op == "+" else value - b
        steps.append(f"{value}{op}{b}={new}")
        value = new
    return value, steps


def _operand(rng: random.Random, digits: int) -> int:
    lo = 0 if digits == 1 else 10 ** (digits - 1)
    return rng.randint(lo, 10**digits - 1)


def sample_problem(rng: random.Random, level: Level, allow_negative: bool = False) -> list[int | str]:
    """Draw one token list `[a, op, b, ...]` at `level` (resampled until non-negative if asked)."""
    for _ in range(1000):
        toks: list[int | str] = [_operand(rng, level.digits)]
        for _ in range(level.terms - 1):
            toks += [rng.choice(level.operators), _operand(rng, level.digits)]
        if allow_negative:
            return toks
        if level.terms == 2 and toks[1] == "-" and int(toks[0]) < int(toks[2]):
            toks[0], toks[2] = toks[2], toks[0]
        if _is_valid(toks, allow_negative):
            return toks
    raise RuntimeError(f"could not draw a non-negative problem at level {level}")


_ENUMERATE_MAX = 100_000


def level_capacity(level: Level) -> int:
    """Upper bound on the number of distinct problems at `level` (before the sign filter)."""
    r = 10 if level.digits == 1 else 9 * 10 ** (level.digits - 1)
    return r**level.terms * len(level.operators) ** (level.terms - 1)


def _is_valid(toks: Sequence[int | str], allow_negative: bool) -> bool:
    if allow_negative:
        return True
    return all(not s.split("=")[1].startswith("-") for s in evaluate_tokens(toks)[1])


def enumerate_level(level: Level, allow_negative: bool = False) -> list[list[int | str]]:
    """Every problem of a small level, in a fixed order."""
    lo = 0 if level.digits == 1 else 10 ** (level.digits - 1)
    nums = range(lo, 10**level.digits)
    out = []
    for operands in itertools.product(nums, repeat=level.terms):
        for ops in itertools.product(level.operators, repeat=level.terms - 1):
            toks: list[int | str] = [operands[0]]
            for op, b in zip(ops, operands[1:], strict=True):
                toks += [op, b]
            if _is_valid(toks, allow_negative):
                out.append(toks)
    return out


def generate_pool(
    rng: random.Random, levels: Sequence[Level], n: int, allow_negative: bool = False
) -> list[tuple[Level, list[int | str]]]:
    """`n` distinct problems spread as evenly as possible over `levels`.

    Small levels (<= 100k problems) are enumerated and contribute at most all their problems;
    the remainder is shared equally (water-filling) among the others, which are sampled.
    """
    small = {lv: enumerate_level(lv, allow_negative) for lv in levels if level_capacity(lv) <= _ENUMERATE_MAX}
    caps = {lv: (len(small[lv]) if lv in small else level_capacity(lv)) for lv in levels}
    if sum(caps.values()) < n:
        raise ValueError(f"the level mix has only {sum(caps.values())} distinct problems; {n} were asked for")
    quota: dict[Level, int] = {}
    remaining, order = n, sorted(levels, key=lambda lv: caps[lv])
    for k, lv in enumerate(order):
        left = len(order) - k
        share = remaining // left + (1 if remaining % left else 0)
        quota[lv] = min(caps[lv], share)
        remaining -= quota[lv]
    seen: set[str] = set()
    pool: list[tuple[Level, list[int | str]]] = []
    for lv in levels:
        if lv in small:
            cands = small[lv][:]
            rng.shuffle(cands)
            it = iter(cands)
        else:
            it = iter(lambda lv=lv: sample_problem(rng, lv, allow_negative), None)
        got = 0
        misses = 0
        for toks in it:
            if got >= quota[lv]:
                break
            key = "".join(str(t) for t in toks)
            if key in seen:
                misses += 1
                if misses > 10_000:
                    raise RuntimeError(f"level {lv.label}: too many duplicate draws")
                continue
            seen.add(key)
            pool.append((lv, toks))
            got += 1
        if got < quota[lv]:
            raise ValueError(f"level {lv.label} (shared with another level) has too few distinct problems")
    return pool


def _example(id_: str, lv: Level, toks: Sequence[int | str]) -> Example:
    value, steps = evaluate_tokens(toks)
    text = "".join(str(t) for t in toks) + "="
    meta = {"level": lv.label, "steps": steps, "digits": lv.digits, "terms": lv.terms}
    return Example(id_, text, value, meta)


def _levels_from(
    levels: Sequence[Level | dict[str, Any] | Sequence[Any]] | None,
    digits: int | None,
    operators: str | None,
    terms: int | None,
) -> tuple[Level, ...]:
    if levels is not None and any(v is not None for v in (digits, operators, terms)):
        raise ValueError("give either `levels` or the single-level knobs digits/operators/terms, not both")
    if levels is None:
        if all(v is None for v in (digits, operators, terms)):
            return DEFAULT_LEVELS
        return (Level(digits or 1, terms or 2, operators or "+"),)
    out = []
    for lv in levels:
        if isinstance(lv, Level):
            out.append(lv)
        elif isinstance(lv, dict):
            out.append(Level(**lv))
        else:
            out.append(Level(*lv))
    if not out:
        raise ValueError("levels must not be empty")
    return tuple(out)


class Arithmetic(Task):
    """Seeded integer arithmetic with a graded difficulty mix and exact-match reward.

    Knobs: `levels` (list of {digits, terms, operators}) or the single-level shortcut
    `digits`/`operators`/`terms`; `scratchpad` (steps then `marker` then the answer);
    split sizes; `allow_negative` (else every partial result is >= 0).
    """

    name = "arithmetic"
    metric_name = "accuracy"
    stop_strings = ("\n",)
    default_chat = False

    def __init__(
        self,
        seed: int = 0,
        n_train: int = 5000,
        n_val: int = 500,
        n_test: int = 500,
        levels: Sequence[Level | dict[str, Any] | Sequence[Any]] | None = None,
        digits: int | None = None,
        operators: str | None = None,
        terms: int | None = None,
        scratchpad: bool = False,
        marker: str = "ans",
        allow_negative: bool = False,
        chat: bool | None = None,
    ) -> None:
        if min(n_train, n_val, n_test) < 0:
            raise ValueError("split sizes must be >= 0")
        if not marker.strip() or "\n" in marker:
            raise ValueError(f"marker must be a non-empty single-line string, got {marker!r}")
        self.seed = seed
        self.levels = _levels_from(levels, digits, operators, terms)
        self.scratchpad = scratchpad
        self.marker = marker
        self.allow_negative = allow_negative
        rng = random.Random(f"mirrorlab.arithmetic:{seed}")
        sizes = {"test": n_test, "val": n_val, "train": n_train}
        pool = generate_pool(rng, self.levels, sum(sizes.values()), allow_negative)
        rng.shuffle(pool)  # every split gets the same level mix in expectation
        splits: dict[str, list[Example]] = {}
        start = 0
        for split, n in sizes.items():
            splits[split] = [_example(f"arith-{split}-{i}", lv, toks) for i, (lv, toks) in
                             enumerate(pool[start : start + n])]
            start += n
        super().__init__(splits["train"], splits["val"], splits["test"], chat=chat)

    # ------------------------------------------------------------------ prompts
    def format_prompt(self, example: Example) -> str:
        """The problem text itself, e.g. `12+7=`."""
        return example.question

    def reference_completion(self, example: Example) -> str:
        """Gold completion: `19\\n`, or with scratchpad `12+7=19 19+5=24 ans 24\\n`."""
        if self.scratchpad:
            return " ".join(example.meta["steps"]) + f" {self.marker} {example.answer}\n"
        return f"{example.answer}\n"

    @property
    def charset(self) -> str:
        """Every character that prompts and gold completions of this task use (sorted)."""
        chars = set("0123456789+-*= \n") | set(self.marker)
        return "".join(sorted(chars))

    # ------------------------------------------------------------------ rewards
    def extract_answer(self, completion: str) -> str | None:
        """The answer text: after the last marker (scratchpad) or the first line; None if absent."""
        text = completion
        if self.scratchpad:
            line = text.split("\n", 1)[0]
            k = line.rfind(self.marker)
            if k < 0:
                return None
            text = line[k + len(self.marker) :]
        return text.split("\n", 1)[0].strip()

    def reward(self, completion: str, example: Example) -> float:
        """1.0 when the extracted answer is exactly the gold integer, else 0.0."""
        got = self.extract_answer(completion)
        return 1.0 if got is not None and got == str(example.answer) else 0.0


class ChatArithmetic(Arithmetic):
    """Arithmetic phrased for a chat model (issue 19): "What is 37+48? Answer with the number only."
    through the tokenizer's chat template, for pretrained instruct models (SmolLM2-135M-Instruct)
    whose answers are free text, not the bare `85\\n` the `tiny` presets write.

    The answer a user would accept, stated: the first number after the last "=" when the
    completion has one ("37 + 48 = 85"), else the last number in it ("The answer is 85."), read
    as GSM8K reads numbers (thousands commas, `$`, a trailing period, unicode minus), compared
    numerically with the gold integer. Splits, levels and their disjointness are `arithmetic`'s.
    """

    name = "chat_arithmetic"
    default_chat = True
    stop_strings = ()  # a chat turn ends at the model's end-of-turn token

    def __init__(self, template: str = "What is {problem}? Answer with the number only.", **kw: Any) -> None:
        if "{problem}" not in template:
            raise ValueError(f"template must contain '{{problem}}', got {template!r}")
        if kw.get("scratchpad"):
            raise ValueError("chat_arithmetic has no scratchpad format (the model writes its own steps)")
        super().__init__(**kw)
        self.template = template

    def format_prompt(self, example: Example) -> str:
        """`12+7=` -> "What is 12+7? Answer with the number only." (the template's wording)."""
        return self.template.format(problem=example.question.rstrip("="))

    def reference_completion(self, example: Example) -> str:
        """The gold answer as a chat model would write it: the number alone."""
        return f"{example.answer}"

    def extract_number(self, completion: str) -> float | None:
        """The first number after the last '=', else the last number; None when there is none."""
        if "=" in completion:
            v = first_number(completion.rsplit("=", 1)[1])
            if v is not None:
                return v
        return last_number(completion)

    def reward(self, completion: str, example: Example) -> float:
        """1.0 when the extracted number equals the gold integer, else 0.0."""
        got = self.extract_number(completion)
        return 1.0 if got is not None and got == float(example.answer) else 0.0
