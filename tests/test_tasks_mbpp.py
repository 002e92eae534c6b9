"""MBPP: splits by task_id, prompts, code extraction, pass@k, all reference solutions sandboxed."""

from __future__ import annotations

import math

import pytest
from hypothesis import given
from hypothesis import strategies as st

import mirrorlab.tasks as tasks
from mirrorlab.tasks.base import data_dir
from mirrorlab.tasks.mbpp import MBPP, extract_code, pass_at_k

HAVE_DATA = (data_dir() / "mbpp" / "mbpp.jsonl").is_file()
needs_data = pytest.mark.skipif(not HAVE_DATA, reason=f"MBPP data not found under {data_dir()}")
KNOWN_BAD = {341, 596, 642}  # expected output depends on set order / Python version


@pytest.fixture(scope="module")
def mbpp() -> MBPP:
    if not HAVE_DATA:
        pytest.skip(f"MBPP data not found under {data_dir()}")
    t = tasks.get("mbpp", workers=2)
    yield t
    t.pool.close()


CODE = "def f(x):\n    return x + 1"
EXTRACTION = [
    (f"```python\n{CODE}\n```", CODE),
    (f"Here you go:\n```py\n{CODE}\n```\nExplanation: adds one.", CODE),
    (f"```\n{CODE}\n```", CODE),
    (f"```python\n{CODE}\n", CODE),  # unclosed fence (stopped generation)
    (f"[BEGIN]\n{CODE}\n[DONE]", CODE),
    (f"{CODE}\n", CODE),
    (f"```python\n{CODE}\n```\n```python\nprint('second')\n```", CODE),
    (f"```Python3\n{CODE}\n```", CODE),
]


@pytest.mark.parametrize(("completion", "code"), EXTRACTION)
def test_extract_code(completion: str, code: str) -> None:
    assert extract_code(completion) == code


def test_pass_at_k_values() -> None:
    assert pass_at_k(10, 0, 1) == 0.0
    assert pass_at_k(10, 10, 5) == 1.0
    assert pass_at_k(10, 3, 1) == pytest.approx(0.3)
    assert pass_at_k(5, 1, 5) == 1.0
    with pytest.raises(ValueError):
        pass_at_k(3, 4, 1)
    with pytest.raises(ValueError):
        pass_at_k(3, 1, 4)


@given(st.integers(1, 40).flatmap(lambda n: st.tuples(st.just(n), st.integers(0, n), st.integers(1, n))))
def test_pass_at_k_matches_combinatorics(nck: tuple[int, int, int]) -> None:
    n, c, k = nck
    exact = 1.0 - math.comb(n - c, k) / math.comb(n, k)
    assert pass_at_k(n, c, k) == pytest.approx(exact, abs=1e-12)


@needs_data
def test_splits_by_task_id(mbpp: MBPP) -> None:
    ids = {s: [e.meta["task_id"] for e in getattr(mbpp, s)] for s in ("train", "val", "test")}
    assert ids["test"] == list(range(11, 511))
    assert ids["val"] == list(range(511, 601))
    assert ids["train"] == list(range(601, 975))
    assert [e.meta["task_id"] for e in mbpp.prompts] == list(range(1, 11))
    assert mbpp.metric_name == "pass@1"


@needs_data
def test_prompt_shows_problem_and_tests(mbpp: MBPP) -> None:
    e = mbpp.test[0]
    p = mbpp.prompt(e)
    assert e.question in p and all(t in p for t in e.meta["tests"])
    shot = tasks.get("mbpp", n_shots=3).prompt(e)
    assert shot.endswith(p) and shot.count("```python") == 4


@needs_data
def test_partial_and_wrong_rewards(mbpp: MBPP) -> None:
    e = next(x for x in mbpp.test if x.meta["task_id"] == 17)  # square perimeter: 4 * a
    assert e.meta["tests"] == ["assert square_perimeter(10)==40", "assert square_perimeter(5)==20",
                               "assert square_perimeter(4)==16"]
    comps = [
        mbpp.reference_completion(e),
        "```python\ndef square_perimeter(a):\n    return 40 if a == 10 else 4 * a + 1\n```",
        "def square_perimeter(a):\n    return 0",
        "I don't know",
    ]
    assert mbpp.rewards(comps, [e] * 4) == [1.0, pytest.approx(1 / 3), 0.0, 0.0]
    assert mbpp.scores(comps, [e] * 4) == [1.0, 0.0, 0.0, 0.0]
    assert mbpp.pass_at_k([comps], [e], k=1) == pytest.approx(0.25)
    assert mbpp.pass_at_k([comps], [e], k=4) == 1.0


@needs_data
@pytest.mark.slow
def test_all_reference_solutions(mbpp: MBPP) -> None:
    exs = mbpp.prompts + mbpp.test + mbpp.val + mbpp.train
    assert len(exs) == 974
    rewards = mbpp.rewards([e.answer for e in exs], exs)
    failing = {e.meta["task_id"] for e, r in zip(exs, rewards, strict=True) if r < 1.0}
    assert failing == KNOWN_BAD


@needs_data
def test_picklable(mbpp: MBPP) -> None:
    import pickle

    e = mbpp.test[0]
    _ = mbpp.pool  # make sure a live pool exists before pickling
    clone = pickle.loads(pickle.dumps(mbpp))
    assert clone.rewards([mbpp.reference_completion(e)], [e]) == [1.0]
    clone.pool.close()
