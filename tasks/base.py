"""The task interface: splits, prompts, batched rewards and the evaluation metric.

A task is data (disjoint train/val/test lists of `Example`), a prompt builder, a reward used
for RL and a per-example score used for evaluation. Concrete tasks subclass `Task`.

A reward or score of NaN (`REWARD_ERROR`) is a typed outcome: the task could not judge the
completion (MBPP: the sandbox's harness could not start, was killed before it reported, or its
report is malformed), which is not the same as a wrong answer. Training excludes such samples
from the group advantage and the loss; evaluation leaves them out of the metric, counts them
(`reward_errors`) and fails when there are too many (`train.max_reward_error_rate`).
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

SPLITS = ("train", "val", "test")
REWARD_ERROR = math.nan  # "could not judge": excluded from advantages and metrics, never a 0


def is_reward_error(x: float) -> bool:
    """True for the typed "could not judge" outcome (`REWARD_ERROR`)."""
    return math.isnan(x)


def score_of_reward(reward: float) -> float:
    """The default evaluation score of a reward: 1 when it is full (>= 1), else 0; a reward the
    task could not judge stays `REWARD_ERROR`."""
    return reward if is_reward_error(reward) else (1.0 if reward >= 1.0 else 0.0)


class SplitOverlapError(ValueError):
    """Raised when two splits of a task share an example (same id or same problem text)."""


@dataclass
class Example:
    """One problem: a stable `id`, the `question` text, the gold `answer` and free-form `meta`."""

    id: str
    question: str
    answer: Any
    meta: dict[str, Any] = field(default_factory=dict)


def data_dir() -> Path:
    """Root of the local datasets: `$MIRRORLAB_DATA_DIR`, else `<repo>/../shared/data`."""
    env = os.environ.get("MIRRORLAB_DATA_DIR")
    if env:
        return Path(env)
    import mirrorlab

    return Path(mirrorlab.__file__).resolve().parents[1].parent / "shared" / "data"


def load_rows(local: Path, source: str, dataset: str,
              hub: Callable[[], list[dict[str, Any]]]) -> list[dict[str, Any]]:
    """Rows of a local JSONL file (`source` local, or auto when the file exists), else `hub()`.

    `source` is `auto`, `local` or `hub`; `dataset` names the data in the missing-file error."""
    if source == "local" or (source == "auto" and local.is_file()):
        if not local.is_file():
            raise FileNotFoundError(f"{dataset} data not found at {local} (set MIRRORLAB_DATA_DIR)")
        with open(local) as f:
            return [json.loads(line) for line in f if line.strip()]
    if source not in ("auto", "hub"):
        raise ValueError(f"source must be 'auto', 'local' or 'hub', got {source!r}")
    return hub()


def _normalise(text: str) -> str:
    """The dedupe key of a problem text: whitespace-collapsed and case-folded."""
    return " ".join(text.split()).casefold()


def check_disjoint(
    splits: dict[str, Sequence[Example]], key: Callable[[Example], str] | None = None
) -> None:
    """Raise SplitOverlapError if two splits share an example id or a dedupe `key` (problem text)."""
    key = key or (lambda ex: _normalise(ex.question))
    owner_id: dict[str, str] = {}
    owner_key: dict[str, str] = {}
    for split, examples in splits.items():
        for ex in examples:
            k = key(ex)
            if owner_id.setdefault(ex.id, split) != split:
                raise SplitOverlapError(
                    f"splits {owner_id[ex.id]!r} and {split!r} overlap: example id {ex.id!r} is in both"
                )
            if owner_key.setdefault(k, split) != split:
                raise SplitOverlapError(
                    f"splits {owner_key[k]!r} and {split!r} overlap: problem {ex.question[:80]!r} "
                    f"(id {ex.id!r}) is in both"
                )


class Task:
    """Base task: holds disjoint splits; subclasses define `format_prompt` and `reward`.

    `chat` decides whether `prompt` wraps the text in the tokenizer's chat template: True
    (always, when the tokenizer has one), False (never) or None (the task's default).
    """

    name: str = "task"
    metric_name: str = "accuracy"
    stop_strings: tuple[str, ...] = ()
    default_chat: bool = False

    def __init__(
        self,
        train: Sequence[Example],
        val: Sequence[Example],
        test: Sequence[Example],
        chat: bool | None = None,
    ) -> None:
        check_disjoint({"train": train, "val": val, "test": test}, key=self.dedupe_key)
        self.train: list[Example] = list(train)
        self.val: list[Example] = list(val)
        self.test: list[Example] = list(test)
        self.chat = self.default_chat if chat is None else bool(chat)

    # ------------------------------------------------------------------ data
    def split(self, name: str) -> list[Example]:
        """The examples of split `name` ("train", "val" or "test")."""
        if name not in SPLITS:
            raise ValueError(f"unknown split {name!r}; allowed: {', '.join(SPLITS)}")
        return getattr(self, name)

    def __repr__(self) -> str:
        return (
            f"{type(self).__name__}(name={self.name!r}, train={len(self.train)}, "
            f"val={len(self.val)}, test={len(self.test)})"
        )

    def dedupe_key(self, example: Example) -> str:
        """What makes two examples the same problem (default: normalised question text)."""
        return _normalise(example.question)

    # ------------------------------------------------------------------ prompts
    def format_prompt(self, example: Example) -> str:
        """The plain-text prompt of one example (no chat template)."""
        raise NotImplementedError

    def prompt(self, example: Example, tokenizer: Any = None) -> str:
        """The prompt text; wrapped in the tokenizer's chat template when `chat` and it has one."""
        text = self.format_prompt(example)
        if self.chat and tokenizer is not None and getattr(tokenizer, "chat_template", None):
            return tokenizer.apply_chat_template(
                [{"role": "user", "content": text}], tokenize=False, add_generation_prompt=True
            )
        return text

    def reference_completion(self, example: Example) -> str:
        """A gold completion for `example` (used for supervised warm-up and tests)."""
        raise NotImplementedError


    # ------------------------------------------------------------------ rewards
    def reward(self, completion: str, example: Example) -> float:
        """The RL reward of one completion."""
        raise NotImplementedError

    def rewards(self, completions: Sequence[str], examples: Sequence[Example]) -> list[float]:
        """Batched rewards, one per (completion, example) pair."""
        _check_lengths(completions, examples)
        return [float(self.reward(c, e)) for c, e in zip(completions, examples, strict=True)]

    def score(self, completion: str, example: Example) -> float:
        """The evaluation metric of one completion in [0, 1] (default: reward == 1; a reward the
        task could not judge stays `REWARD_ERROR`)."""
        return score_of_reward(self.reward(completion, example))

    def extra_metrics(self, completions: Sequence[str],
                      examples: Sequence[Example]) -> dict[str, list[float]]:
        """Further per-example evaluation metrics by name, reported beside the main one in every
        evaluation (GSM8K: strict and flexible answer extraction); none by default."""
        return {}

    def scores(self, completions: Sequence[str], examples: Sequence[Example]) -> list[float]:
        """Batched per-example evaluation scores in [0, 1]."""
        _check_lengths(completions, examples)
        return [float(self.score(c, e)) for c, e in zip(completions, examples, strict=True)]

    def judge(self, completions: Sequence[str],
              examples: Sequence[Example]) -> tuple[list[float], list[float]]:
        """Rewards and scores of a batch together (a task whose judging is costly, MBPP's
        sandbox, overrides this to judge each completion once)."""
        return self.rewards(completions, examples), self.scores(completions, examples)


def _check_lengths(completions: Sequence[str], examples: Sequence[Example]) -> None:
    if len(completions) != len(examples):
        raise ValueError(f"got {len(completions)} completions for {len(examples)} examples")
