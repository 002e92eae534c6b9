"""`chat_order` (issue 19's testbed task): the prompt, the stated extraction (the last number) on
hand-written completions, seeded and disjoint splits, the knobs' errors, the chat template."""

from __future__ import annotations

import pytest

from mirrorlab.tasks import get
from mirrorlab.tasks.order import ChatOrder, numbers_text


@pytest.fixture(scope="module")
def task() -> ChatOrder:
    return get("chat_order", n_train=600, n_val=200, n_test=500)


def test_problems_are_what_they_say(task: ChatOrder) -> None:
    for split in ("train", "val", "test"):
        for e in task.split(split):
            nums, kind = e.meta["numbers"], e.meta["kind"]
            assert len(set(nums)) == len(nums) == e.meta["count"] and all(10 <= n <= 99 for n in nums)
            assert e.answer == (max(nums) if kind == "largest" else min(nums))
            assert e.question == (f"Which is the {kind} of {numbers_text(nums)}? "
                                  "Answer with the number only.")
    levels = {e.meta["level"] for e in task.test}
    assert levels == {"largest3", "largest4", "smallest3", "smallest4"}  # the default mix, all drawn
    assert numbers_text([14, 73, 51]) == "14, 73 and 51"


def test_splits_disjoint_and_seeded(task: ChatOrder) -> None:
    keys = [{(e.meta["kind"], tuple(e.meta["numbers"])) for e in task.split(s)}
            for s in ("train", "val", "test")]
    assert [len(k) for k in keys] == [600, 200, 500]
    assert not (keys[0] & keys[1] or keys[0] & keys[2] or keys[1] & keys[2])
    again = get("chat_order", n_train=600, n_val=200, n_test=500)
    assert [e.question for e in again.test] == [e.question for e in task.test]
    other = get("chat_order", seed=1, n_train=600, n_val=200, n_test=500)
    assert [e.question for e in other.test] != [e.question for e in task.test]


def test_extraction_and_reward_on_hand_written_completions(task: ChatOrder) -> None:
    """The last number in the completion is the answer read."""
    ex = next(e for e in task.test if e.meta["kind"] == "largest" and e.meta["count"] == 3)
    a, b, c = ex.meta["numbers"]
    ans, wrong = ex.answer, min(ex.meta["numbers"])
    assert task.format_prompt(ex) == f"Which is the largest of {a}, {b} and {c}? Answer with the number only."
    assert task.chat and task.reference_completion(ex) == str(ans)
    cases = {
        f"{ans}": 1.0,                                               # correct, bare
        f"{wrong}": 0.0,                                             # wrong
        f"The largest of {a}, {b}, and {c} is {ans}.": 1.0,          # extra text, several numbers
        f"The largest is {ans}, not {wrong}": 0.0,                   # the last number is another
        f"{ans} is larger than {wrong}": 0.0,                        # ambiguous: the last is read
        f"{ans}.0": 1.0,                                             # a float that is the answer
        "To find the largest of these numbers, we need": 0.0,        # no number
        "": 0.0,
    }
    for completion, want in cases.items():
        assert task.reward(completion, ex) == want, completion
    assert task.extract_number("it is 42.") == 42.0 and task.extract_number("none") is None
    assert task.scores([f"{ans}", "no"], [ex, ex]) == [1.0, 0.0]


def test_knobs_and_errors() -> None:
    t = get("chat_order", n_train=20, n_val=10, n_test=10, kinds=["smallest"], counts=[5], lo=100, hi=999,
            template="Name the {kind} number among {numbers}.")
    e = t.test[0]
    assert e.meta["kind"] == "smallest" and len(e.meta["numbers"]) == 5 and e.answer == min(e.meta["numbers"])
    assert e.question.startswith("Name the smallest number among ")
    assert all(100 <= n <= 999 for n in e.meta["numbers"])
    with pytest.raises(ValueError, match="kinds"):
        get("chat_order", kinds=["middle"])
    with pytest.raises(ValueError, match="counts"):
        get("chat_order", counts=[1])
    with pytest.raises(ValueError, match="lo"):
        get("chat_order", lo=50, hi=20)
    with pytest.raises(ValueError, match="template"):
        get("chat_order", template="Which is it?")
    with pytest.raises(ValueError, match="too few distinct"):  # 2 kinds x 2 orders of 2 numbers: 4 problems
        get("chat_order", n_train=5, n_val=0, n_test=0, counts=[2], lo=1, hi=2)


def test_goes_through_the_chat_template(smollm2) -> None:
    _, tok = smollm2
    t = get("chat_order", n_train=10, n_val=5, n_test=5)
    p = t.prompt(t.test[0], tok)
    assert t.format_prompt(t.test[0]) in p and p != t.format_prompt(t.test[0])
    assert p.rstrip().endswith("assistant")
