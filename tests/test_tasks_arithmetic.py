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
