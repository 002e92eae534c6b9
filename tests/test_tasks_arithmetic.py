"""Arithmetic task: seeded generation, disjoint splits, exact-match reward, scratchpad."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import mirrorlab.tasks as tasks
from mirrorlab.tasks.arithmetic import Arithmetic, Level, evaluate_tokens


@pytest.fixture(scope="module")
def task() -> Arithmetic:
    return tasks.get("arithmetic", n_train=600, n_val=100, n_test=100)


def test_registered_and_sizes(task: Arithmetic) -> None:
    assert "arithmetic" in tasks.names()
    assert (len(task.train), len(task.val), len(task.test)) == (600, 100, 100)
    assert task.metric_name == "accuracy"
    assert "\n" in task.stop_strings


def test_default_sizes_and_mix() -> None:
    t = tasks.get("arithmetic")
    assert (len(t.train), len(t.val), len(t.test)) == (5000, 500, 500)
    levels = {e.meta["level"] for e in t.train}
    assert levels == {"1d2t+", "1d3t+", "2d2t+", "2d2t-", "3d2t+"}
    assert {e.meta["level"] for e in t.test} == levels


def test_splits_disjoint_by_text(task: Arithmetic) -> None:
    texts = [set(e.question for e in s) for s in (task.train, task.val, task.test)]
    assert not (texts[0] & texts[1]) and not (texts[0] & texts[2]) and not (texts[1] & texts[2])
    assert sum(len(t) for t in texts) == 800  # no duplicates inside a split either


def test_seeded(task: Arithmetic) -> None:
    again = tasks.get("arithmetic", n_train=600, n_val=100, n_test=100)
    other = tasks.get("arithmetic", n_train=600, n_val=100, n_test=100, seed=1)
    assert [e.question for e in again.test] == [e.question for e in task.test]
    assert [e.question for e in other.test] != [e.question for e in task.test]


def test_answers_are_python_values(task: Arithmetic) -> None:
    for e in task.train + task.val + task.test:
        assert e.question.endswith("=")
        assert eval(e.question[:-1]) == e.answer  # noqa: S307 - digits and operators only
        assert e.answer >= 0


def test_prompt_and_reward(task: Arithmetic) -> None:
    e = task.test[0]
    assert task.prompt(e) == e.question
    gold = task.reference_completion(e)
    assert gold == f"{e.answer}\n" and task.reference_completion(e) == gold
    assert task.rewards([gold, f" {e.answer} \nrest", str(e.answer + 1), "", f"{e.answer}0"], [e] * 5) == [
        1.0, 1.0, 0.0, 0.0, 0.0
    ]
    assert task.scores([gold], [e]) == [1.0]
    with pytest.raises(ValueError, match="completions"):
        task.rewards([gold], [e, e])


def test_scratchpad_format() -> None:
    t = tasks.get("arithmetic", scratchpad=True, n_train=50, n_val=10, n_test=10, digits=2, terms=3,
                  operators="+-")
    for e in t.test:
        gold = t.reference_completion(e)
        assert gold.endswith(f" ans {e.answer}\n") and gold.count("=") == 2
        assert t.reward(gold, e) == 1.0
        assert t.reward(f"{e.answer}\n", e) == 0.0  # no marker, no reward
        assert t.reward(gold.replace(f"ans {e.answer}", f"ans {e.answer + 1}"), e) == 0.0
    assert set("".join(t.prompt(e) + t.reference_completion(e) for e in t.train)) <= set(t.charset)
    lengths = {len(t.reference_completion(e)) for e in t.train}
    assert len(lengths) > 3  # completion length varies


def test_charset_small(task: Arithmetic) -> None:
    exs = task.train + task.val + task.test
    used = set("".join(task.prompt(e) + task.reference_completion(e) for e in exs))
    assert used <= set(task.charset)
    assert len(task.charset) <= 24


def test_knobs_and_errors() -> None:
    t = tasks.get("arithmetic", digits=1, terms=2, operators="+", n_train=60, n_val=20, n_test=20)
    assert {e.meta["level"] for e in t.train} == {"1d2t+"}
    with pytest.raises(ValueError, match="distinct problems"):
        tasks.get("arithmetic", digits=1, terms=2, operators="+", n_train=100, n_val=10, n_test=10)
    with pytest.raises(ValueError, match="operators"):
        Level(1, 2, "/")
    with pytest.raises(ValueError, match="either"):
        tasks.get("arithmetic", levels=[{"digits": 1}], digits=2)
    neg = tasks.get("arithmetic", digits=1, terms=3, operators="-", allow_negative=True,
                    n_train=50, n_val=10, n_test=10)
    assert any(e.answer < 0 for e in neg.train)


@settings(max_examples=200, deadline=None)
@given(st.lists(st.integers(0, 999), min_size=2, max_size=5), st.data())
def test_evaluate_tokens_matches_python(nums: list[int], data: st.DataObject) -> None:
    toks: list[int | str] = [nums[0]]
    for n in nums[1:]:
        toks += [data.draw(st.sampled_from("+-*")), n]
    value, steps = evaluate_tokens(toks)
    assert value == eval("".join(map(str, toks)))  # noqa: S307
    assert len(steps) == len(nums) - 1
    assert steps[-1].endswith(f"={value}")


# --------------------------------------------------------------------------- chat arithmetic (issue 19)
def test_chat_arithmetic_prompt_extraction_and_reward() -> None:
    """The chat phrasing, and the stated extraction on hand-written completions: the number after the
    last '=', else the last number; commas, a trailing period and $ read as numbers; no number -> 0."""
    from mirrorlab.tasks import get

    t = get("chat_arithmetic", n_train=50, n_val=20, n_test=20)
    ex = next(e for e in t.test if e.question.count("+") == 1 and "-" not in e.question)
    a, b = (int(x) for x in ex.question.rstrip("=").split("+"))
    assert a + b == ex.answer
    assert t.format_prompt(ex) == f"What is {a}+{b}? Answer with the number only."
    assert t.chat and t.reference_completion(ex) == str(ex.answer)
    ans = ex.answer
    cases = {
        f"{ans}": 1.0,                                    # correct, bare
        f"{ans + 1}": 0.0,                                # wrong
        f"The answer is {ans}.": 1.0,                     # extra text, trailing period
        f"{a} + {b} = {ans}": 1.0,                        # several numbers: the one after '='
        f"{a} + {b} = {ans + 2}, so {ans}": 0.0,          # after the last '=' comes the wrong one
        f"{ans} (that is {a} plus {b})": 0.0,             # the last number is an operand: not accepted
        "I cannot compute that.": 0.0,                    # no number
        "": 0.0,
    }
    for completion, want in cases.items():
        assert t.reward(completion, ex) == want, completion
    assert t.extract_number("It is 1,085.") == 1085.0 and t.extract_number("= $42") == 42.0
    assert t.extract_number("x = -7") == -7.0 and t.extract_number("none") is None
    # splits are arithmetic's: disjoint by problem text
    texts = [{e.question for e in t.split(s)} for s in ("train", "val", "test")]
    assert not (texts[0] & texts[1] or texts[0] & texts[2] or texts[1] & texts[2])
    with pytest.raises(ValueError, match="problem"):
        get("chat_arithmetic", template="What is it?")


def test_chat_arithmetic_goes_through_the_chat_template(smollm2) -> None:
    from mirrorlab.tasks import get

    _, tok = smollm2
    t = get("chat_arithmetic", n_train=10, n_val=5, n_test=5)
    p = t.prompt(t.test[0], tok)
    assert t.format_prompt(t.test[0]) in p and p != t.format_prompt(t.test[0])
    assert p.rstrip().endswith("assistant")  # the generation prompt opens the assistant's turn
