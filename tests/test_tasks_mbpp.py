"""MBPP: splits by task_id, prompts, code extraction, pass@k, the parent's side of the assert
harness (plans, record parsing, value decoding, verdicts), all reference solutions sandboxed."""

from __future__ import annotations

import collections
import math

import pytest
from hypothesis import given
from hypothesis import strategies as st

import mirrorlab.tasks as tasks
from mirrorlab.tasks.base import data_dir
from mirrorlab.tasks.mbpp import (
    MBPP,
    check_passed,
    decode_values,
    extract_code,
    holds,
    parse_report,
    pass_at_k,
    plan_check,
)

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


def test_check_splits_operands_by_who_evaluates_them() -> None:
    k = plan_check("assert f(x) == [1, 2] and g() < 3 + 4 or not h()")
    assert k is not None
    assert k.leaves == (("prog", 0), ("lit", [1, 2]), ("prog", 1), ("pure", 0), ("prog", 2))
    assert k.steps == (("e", "f(x)"), ("e", "g()"), ("e", "h()")) and k.pure == ("3 + 4",)
    seq = plan_check("x = f(3)\nassert x == 4")
    assert seq is not None and seq.steps == (("x", "x = f(3)"), ("e", "x"))
    assert plan_check("print(f(3))") is None  # no assert: nothing the parent could check
    assert plan_check("assert (") is None


def test_decode_values_accepts_only_plain_values() -> None:
    big = "-0x1" + "0" * 40
    payload = (f"[('n',), ('b', True), ('i', -5), ('x', '{big}'), ('f', 'nan'), ('c', '1.0', '-2.0'),"
               " ('s', 'a'), ('y', '00ff'), ('l', ('i', 1), ('t', ('s', 'b'))), ('S', ('i', 2)),"
               " ('F',), ('d', ('s', 'k'), ('l',)), ('C', ('s', 'a'), ('i', 2)),"
               " ('O', ('i', 2), ('i', 1), ('i', 1), ('i', 2)), ('q', ('i', 1))]")
    v = decode_values(payload, 15)
    assert v[:4] == [None, True, -5, -(16**40)] and math.isnan(v[4])
    assert v[5:] == [1 - 2j, "a", b"\x00\xff", [1, ("b",)], {2}, frozenset(), {"k": []},
                     collections.Counter(a=2), collections.OrderedDict([(2, 1), (1, 2)]),
                     collections.deque([1])]
    assert type(v[12]) is collections.Counter and type(v[14]) is collections.deque
    bad = ["[('i', 1)]", "[('i', True)]", "[('b', 1)]", "[('E',)]", "[('i', 1, 2)]", "[('d', ('i', 1))]",
           "[('S', ('l',))]", "[3]", "('i', 1)", "[('f', 'x')]", "[('y', 'zz')]", "__import__('os')",
           "[('l', " * 150 + "('n',)" + ")" * 150 + "]", "", "[('s', 'a')]\n[('s', 'b')]"]
    for b in bad:
        with pytest.raises(ValueError):
            decode_values(b, 2 if b == "[('i', 1)]" else 1)


def test_parse_report_frames_records() -> None:
    rec = "v 0 10\n[('i', 3)]\np 1 2\n[]\nv 1 10\n[('i', 4)]\nv 1 10\n[('i', 4)]\n"
    assert parse_report(rec, 2) == {("v", 0): "[('i', 3)]", ("p", 1): "[]", ("v", 1): None}
    assert parse_report("v 0 11\n[('i', 3)]\n", 2) == {}  # wrong length
    assert parse_report("v 2 10\n[('i', 3)]\n", 2) == {}  # no such test
    assert parse_report("x 0 2\n[]\nv 0 2\n[]\n", 1) == {}  # parsing stops at garbage
    assert parse_report("v 0 10\n[('i', 3)]", 1) == {}  # truncated


def test_verdicts_are_computed_from_data() -> None:
    k = plan_check("assert add(1, 2) == 3")
    assert check_passed(k, {("v", 0): "[('i', 3)]"}, 0)
    assert not check_passed(k, {("v", 0): "[('i', 4)]"}, 0)
    assert not check_passed(k, {("v", 0): "[('i', 3), ('i', 3)]"}, 0)
    assert not check_passed(k, {("v", 0): None}, 0) and not check_passed(k, {}, 0)
    assert not check_passed(None, {("v", 0): "[('i', 3)]"}, 0)
    lt = plan_check("assert f() < 3")
    assert not check_passed(lt, {("v", 0): "[('s', 'a')]"}, 0)  # TypeError in the comparison: fails
    assert holds(("or", (("val", 0), ("not", ("val", 1)))), [0, []])
    assert not holds(("cmp", (0, 1, 2), ("Lt", "Lt")), [1, 3, 2])


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
def test_all_reference_solutions() -> None:
    """Every reference solution passes its own tests but the three known bad ones. Run with 30 CPU
    seconds a test, not the task's default 5: this checks the harness judges correct code as
    correct, and task 123 (amicable numbers to 9999) needs 3.5-4.3 CPU s, which a loaded or slower
    machine pushes past 5 (seen on a 2-core AMD EPYC with four jobs running)."""
    mbpp = tasks.get("mbpp", workers=2, cpu_s=30)
    exs = mbpp.prompts + mbpp.test + mbpp.val + mbpp.train
    assert len(exs) == 974
    try:
        rewards = mbpp.rewards([e.answer for e in exs], exs)
    finally:
        mbpp.pool.close()
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
