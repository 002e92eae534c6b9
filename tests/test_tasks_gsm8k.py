"""GSM8K: loading, disjoint validation, answer extraction (tricky table), references score 1."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

import mirrorlab.tasks as tasks
from mirrorlab.tasks.base import data_dir
from mirrorlab.tasks.gsm8k import extract_prediction, gold_answer, last_number, parse_number

HAVE_DATA = (data_dir() / "gsm8k" / "test.jsonl").is_file()
needs_data = pytest.mark.skipif(not HAVE_DATA, reason=f"GSM8K data not found under {data_dir()}")

TRICKY = [
    ("The answer is 18.", 18),
    ("She makes $18 every day.", 18),
    ("Total: $1,234,567.", 1234567),
    ("It costs 1,000 dollars", 1000),
    ("so 3 + 4 = 7 apples", 7),
    ("#### 42", 42),
    ("Reasoning with 5 and 6.\n#### 1,250", 1250),
    ("#### 72\nSome trailing chatter with 9 items", 72),
    ("The final answer is \\boxed{35}.", 35),
    ("\\boxed{\\$1,200} is what he pays, not 5", 1200),
    ("Thus \\boxed{\\frac{3}{4}} of the cake", 0.75),
    ("He has -5 dollars left", -5),
    ("The temperature is \u22123 degrees", -3),
    ("It weighs 2.5 kg.", 2.5),
    ("Half is .5 of the pie", 0.5),
    ("She drinks 3/4 of a gallon", 0.75),
    ("The speed is 60km/h and it takes 12 minutes", 12),
    ("A 50% discount", 50),
    ("Answer: 7, not 8, I think it is 7", 7),
    ("Between 3-5 people, we pick 5", 5),
    ("1, 2, 3, 4", 4),
    ("The answer is 0.", 0),
    ("x = 10.00", 10),
    ("So the total is $ 15.50.", 15.5),
    ("It took 2 hours 30 minutes, i.e. 150 minutes!", 150),
]


@pytest.mark.parametrize(("text", "expected"), TRICKY)
def test_tricky_extraction(text: str, expected: float) -> None:
    assert extract_prediction(text) == pytest.approx(expected)


def test_table_is_large_enough() -> None:
    assert len(TRICKY) >= 20


def test_no_number() -> None:
    assert extract_prediction("I do not know.") is None
    assert last_number("") is None
    assert parse_number("abc") is None


def test_gold_answer() -> None:
    assert gold_answer("blah <<2*3=6>>6\n#### 1,234") == 1234
    with pytest.raises(ValueError, match="####"):
        gold_answer("no marker")


@given(st.integers(-10**9, 10**9))
def test_integers_roundtrip(n: int) -> None:
    assert extract_prediction(f"so we get {n:,} in total.") == n
    assert extract_prediction(f"#### {n}") == n


@given(st.decimals(min_value=-10**6, max_value=10**6, places=2, allow_nan=False, allow_infinity=False))
def test_decimals_roundtrip(d: object) -> None:
    assert extract_prediction(f"The value is {d}.") == pytest.approx(float(d), abs=1e-9)


@needs_data
def test_splits_and_references() -> None:
    t = tasks.get("gsm8k")
    assert (len(t.train), len(t.val), len(t.test)) == (7473 - 500, 500, 1319)
    assert not {e.id for e in t.train} & {e.id for e in t.val}
    again = tasks.get("gsm8k")
    assert [e.id for e in again.val] == [e.id for e in t.val]  # deterministic carve-out
    refs = [t.reference_completion(e) for e in t.test]
    assert t.rewards(refs, t.test) == [1.0] * 1319
    assert t.scores(refs[:50], t.test[:50]) == [1.0] * 50
    wrong = [f"#### {e.answer + 1}" for e in t.test[:200]]
    assert t.rewards(wrong, t.test[:200]) == [0.0] * 200
    assert t.rewards(["I cannot solve this."], t.test[:1]) == [0.0]


@needs_data
def test_prompts_and_few_shot() -> None:
    t = tasks.get("gsm8k", n_shots=3)
    e = t.test[0]
    p = t.prompt(e)
    assert p.endswith(f"Question: {e.question}\nAnswer:") and p.count("Question:") == 4
    train_q = {x.question for x in t.train}
    assert all(s.question in train_q for s in t.shots)  # shots come from train only
    assert t.metric_name == "accuracy"
    with pytest.raises(ValueError, match="n_val"):
        tasks.get("gsm8k", n_val=10**6)


# (completion, strict reading, flexible reading): the two ways papers score GSM8K
TWO_WAYS = [
    ("Natalia sold 48 / 2 = 24 clips in May.\n#### 72", 72, 72),
    # strict reads the format, flexible the last number
    ("She has 5 apples, then 3 more, so 8.\n#### 8\nThe end, 2 times.", 8, 2),
    ("The answer is 72.", None, 72),  # no `#### ` format: strict reads nothing
    ("#### 1,234.", 1234, 1234),
    ("####72", None, 72),  # strict needs the space, as lm-evaluation-harness's regex
    ("#### -3\n", -3, -3),
    ("no number at all", None, None),
    ("So \\boxed{12} and then 13", None, 13),
]


@pytest.mark.parametrize(("text", "strict", "flexible"), TWO_WAYS)
def test_strict_and_flexible_extraction(text: str, strict: float | None, flexible: float | None) -> None:
    from mirrorlab.tasks.gsm8k import extract_flexible, extract_strict

    assert extract_strict(text) == strict
    assert extract_flexible(text) == flexible


@needs_data
def test_both_readings_in_every_evaluation_and_the_reward_names_its_own() -> None:
    t = tasks.get("gsm8k", n_val=10)
    ex = t.test[0]
    a = int(ex.answer)
    comps = [f"so {a}.\n#### {a}", f"It is {a}.", f"#### {a}\nand {a + 1}", "nothing"]
    extra = t.extra_metrics(comps, [ex] * 4)
    assert extra == {"strict": [1.0, 0.0, 1.0, 0.0], "flexible": [1.0, 1.0, 0.0, 0.0]}
    assert t.rewards(comps, [ex] * 4) == [1.0, 1.0, 1.0, 0.0]  # auto: boxed, else ####, else last number
    for way in ("strict", "flexible"):
        assert tasks.get("gsm8k", n_val=10, reward_extraction=way).rewards(comps, [ex] * 4) == extra[way]
    with pytest.raises(ValueError, match="reward_extraction must be one of auto, strict, flexible"):
        tasks.get("gsm8k", n_val=10, reward_extraction="loose")


def test_every_evaluation_reports_the_task_extra_metrics(tiny) -> None:
    """`Task.extra_metrics` reaches EvalResult.extra as means (any task; here a stand-in that reads
    the arithmetic answer two ways)."""
    import copy

    from mirrorlab.config import TrainConfig
    from mirrorlab.gbmpo import GBMPOTrainer
    from mirrorlab.tasks.arithmetic import Arithmetic

    class TwoWays(Arithmetic):
        def extra_metrics(self, completions, examples):
            return {"ones": [1.0] * len(completions), "half": [float(i % 2) for i in range(len(completions))]}

    model, tok = tiny
    task = TwoWays(n_train=50, n_val=10, n_test=10)
    tr = GBMPOTrainer(copy.deepcopy(model), tok, task, None, TrainConfig())
    ev = tr.evaluate("val", n=10)
    assert ev.extra == {"ones": 1.0, "half": 0.5}
