"""`chat_order`: "Which is the largest of 14, 73 and 51? Answer with the number only." asked of a
chat model through its chat template (issue 19's testbed). Unlike one-digit arithmetic, which
SmolLM2-135M-Instruct mostly cannot do whatever it writes, the ordering is partly within its reach
(it names the right number in ~half of its greedy answers) and its failures are of a kind RL acts
on: it restates the question, names the last number listed, or lists instead of answering.

Problems are drawn with a seeded RNG (kind, how many numbers, the numbers themselves: distinct
integers in [lo, hi]); splits are disjoint by problem. The answer a user would accept, stated: the
last number in the completion ("The largest of 14, 73, and 51 is 73." reads 73; "73 is larger
than 51" reads 51, which is wrong, as a reader would take it as ambiguous at best).
"""

from __future__ import annotations

import random
from collections.abc import Sequence

from .base import Example, Task
from .gsm8k import last_number

KINDS = ("largest", "smallest")


def numbers_text(nums: Sequence[int]) -> str:
    """`[14, 73, 51]` -> "14, 73 and 51" (the list as a sentence writes it)."""
    return ", ".join(str(n) for n in nums[:-1]) + f" and {nums[-1]}"


class ChatOrder(Task):
    """Which number of a short list is the largest (or smallest), for chat models.

    Knobs: `kinds` ("largest", "smallest"), `counts` (how many numbers a problem lists, e.g. [3, 4]),
    the range `lo`..`hi` of the numbers, the `template` (with `{kind}` and `{numbers}`), split sizes.
    """

    name = "chat_order"
    metric_name = "accuracy"
    stop_strings = ()  # a chat turn ends at the model's end-of-turn token
    default_chat = True

    def __init__(
        self,
        seed: int = 0,
        n_train: int = 600,
        n_val: int = 200,
        n_test: int = 500,
        kinds: Sequence[str] = KINDS,
        counts: Sequence[int] = (3, 4),
        lo: int = 10,
        hi: int = 99,
        template: str = "Which is the {kind} of {numbers}? Answer with the number only.",
        chat: bool | None = None,
    ) -> None:
        if min(n_train, n_val, n_test) < 0:
            raise ValueError("split sizes must be >= 0")
        kinds, counts = tuple(kinds), tuple(int(c) for c in counts)
        bad = [k for k in kinds if k not in KINDS]
        if not kinds or bad:
            raise ValueError(f"kinds must be a non-empty subset of {list(KINDS)}, got {list(kinds)}")
        if lo < 0 or hi <= lo:
            raise ValueError(f"need 0 <= lo < hi, got lo={lo}, hi={hi}")
        if not counts or min(counts) < 2 or max(counts) > hi - lo + 1:
            raise ValueError(f"counts must be between 2 and hi - lo + 1 = {hi - lo + 1}, got {list(counts)}")
        if "{kind}" not in template or "{numbers}" not in template:
            raise ValueError(f"template must contain '{{kind}}' and '{{numbers}}', got {template!r}")
        self.seed, self.kinds, self.counts, self.lo, self.hi = seed, kinds, counts, lo, hi
        self.template = template
        rng = random.Random(f"mirrorlab.chat_order:{seed}")
        sizes = {"test": n_test, "val": n_val, "train": n_train}
        seen: set[tuple[str, tuple[int, ...]]] = set()
        pool: list[tuple[str, tuple[int, ...]]] = []  # (kind, numbers), in draw order
        misses = 0
        while len(pool) < sum(sizes.values()):
            kind, k = rng.choice(kinds), rng.choice(counts)
            nums = tuple(rng.sample(range(lo, hi + 1), k))
            if (kind, nums) in seen:
                misses += 1
                if misses > 10_000:
                    raise ValueError(f"too few distinct problems for {sum(sizes.values())} examples: widen "
                                     "lo..hi or add counts")
                continue
            seen.add((kind, nums))
            pool.append((kind, nums))
        splits: dict[str, list[Example]] = {}
        start = 0
        for split, n in sizes.items():
            splits[split] = [self._example(f"order-{split}-{i}", kind, nums)
                             for i, (kind, nums) in enumerate(pool[start:start + n])]
            start += n
        super().__init__(splits["train"], splits["val"], splits["test"], chat=chat)

    def _example(self, id_: str, kind: str, nums: tuple[int, ...]) -> Example:
        """One problem: the question in the template's words, the answer, what it was drawn from."""
        answer = max(nums) if kind == "largest" else min(nums)
        meta = {"kind": kind, "count": len(nums), "numbers": list(nums), "level": f"{kind}{len(nums)}"}
        return Example(id_, self.template.format(kind=kind, numbers=numbers_text(nums)), answer, meta)

    def format_prompt(self, example: Example) -> str:
        """The question itself: "Which is the largest of 14, 73 and 51? Answer with the number only."."""
        return example.question

    def reference_completion(self, example: Example) -> str:
        """The gold answer as a chat model would write it: the number alone."""
        return f"{example.answer}"

    def extract_number(self, completion: str) -> float | None:
        """The last number in the completion; None when there is none."""
        return last_number(completion)

    def reward(self, completion: str, example: Example) -> float:
        """1.0 when the last number of the completion is the answer, else 0.0."""
        got = self.extract_number(completion)
        return 1.0 if got is not None and got == float(example.answer) else 0.0
