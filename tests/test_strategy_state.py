"""Strategy state as data: the generic codec (`encode_state` / `decode_state`) that writes every
strategy's state dataclass, and version-1 state dicts (hand-written `_state`, before the codec)
still resuming exactly."""

from __future__ import annotations

import base64
import copy
import dataclasses
import json
import math
import pickle
from dataclasses import dataclass, field
from typing import Annotated, Any

import numpy as np
import pytest

from mirrorlab import strategies as S
from mirrorlab.strategies import PICKLED, Candidate, decode_state, encode_state


# ------------------------------------------------------------------ the codec
@dataclass
class Inner:
    x: float
    tag: str | None = None
    blob: bytes = b""


@dataclass
class Everything:
    f64: np.ndarray
    f32: np.ndarray
    i64: np.ndarray
    u64: np.ndarray
    flags: np.ndarray
    scalar: np.ndarray
    empty: np.ndarray
    rng: np.random.Generator
    mt: np.random.Generator
    inner: Inner
    inners: list[Inner]
    floats: list[float]
    maybe_array: np.ndarray | None
    maybe_inner: Inner | None
    pair: tuple[int, str]
    names: tuple[str, ...]
    table: dict[str, np.ndarray]
    count: int
    on: bool
    cand: Candidate
    opaque: Annotated[set[int], PICKLED]
    later: int = field(default=0, init=False)


def _everything() -> Everything:
    r = np.random.default_rng(3)
    e = Everything(
        f64=r.standard_normal((3, 4)), f32=r.standard_normal(5).astype(np.float32),
        i64=np.array([-(2**62), 0, 2**62 + 7]), u64=np.array([0, 2**64 - 1], dtype=np.uint64),
        flags=np.array([[True, False]]), scalar=np.array(1 / 3), empty=np.zeros((0, 3), dtype=np.int32),
        rng=np.random.default_rng(11), mt=np.random.Generator(np.random.MT19937(5)),
        inner=Inner(math.inf, "a", b"\x00\xff"), inners=[Inner(-math.inf), Inner(math.nan, None, b"z")],
        floats=[math.inf, -math.inf, math.nan, 0.1, -0.0], maybe_array=None, maybe_inner=None,
        pair=(7, "seven"), names=("a", "b"), table={"k": np.arange(3.0)}, count=2**70, on=True,
        cand=Candidate(np.array([0.1, 0.2]), "g1-0", ("g0-3",), "elite"), opaque={1, 2, 3})
    e.rng.standard_normal(3)  # a Generator part-way through its stream
    e.later = 5
    return e


def _same_array(a: np.ndarray, b: np.ndarray) -> bool:
    return a.dtype == b.dtype and a.shape == b.shape and np.array_equal(a, b, equal_nan=a.dtype.kind == "f")


def test_codec_round_trip_is_exact_through_json_and_pickle():
    e = _everything()
    enc = encode_state(e)
    text = json.dumps(enc)
    assert encode_state(e) == enc  # encoding does not advance the Generators
    for d in (json.loads(text), pickle.loads(pickle.dumps(enc))):
        back = decode_state(Everything, d)
        for f in dataclasses.fields(Everything):
            a, b = getattr(e, f.name), getattr(back, f.name)
            if isinstance(a, np.ndarray):
                assert _same_array(a, b), f.name
        assert back.scalar.shape == () and back.empty.shape == (0, 3) and back.u64[1] == 2**64 - 1
        assert back.f64.tobytes() == e.f64.tobytes()  # float64 bit for bit
        for g, h in ((e.rng, back.rng), (e.mt, back.mt)):
            assert type(h.bit_generator) is type(g.bit_generator)
            assert np.array_equal(copy.deepcopy(g).random(8), h.random(8))
        assert back.inner == Inner(math.inf, "a", b"\x00\xff")
        assert back.inners[0].x == -math.inf and math.isnan(back.inners[1].x) and back.inners[1].blob == b"z"
        assert back.floats[:2] == [math.inf, -math.inf] and math.isnan(back.floats[2])
        assert back.floats[3:] == [0.1, -0.0] and math.copysign(1, back.floats[4]) == -1
        assert back.maybe_array is None and back.maybe_inner is None
        assert back.pair == (7, "seven") and back.names == ("a", "b")
        assert back.count == 2**70 and back.on is True
        assert _same_array(back.table["k"], np.arange(3.0))
        assert isinstance(back.cand, Candidate) and _same_array(back.cand.theta, e.cand.theta)
        assert (back.cand.id, back.cand.parent_ids, back.cand.note) == ("g1-0", ("g0-3",), "elite")
        assert back.opaque == {1, 2, 3} and back.later == 5
    assert enc["f32"]["dtype"] == "float32"
    assert enc["empty"] == {"dtype": "int32", "shape": [0, 3], "data": []}
    assert enc["opaque"] == base64.b64encode(pickle.dumps({1, 2, 3})).decode("ascii")


@dataclass
class WithSet:
    count: int
    seen: set[int]


@dataclass
class WithAny:
    payload: Any = None


@dataclass
class Outer:
    ok: int
    inner: WithSet | None = None


@pytest.mark.parametrize(("cls", "make", "field_name"), [
    (WithSet, lambda: WithSet(1, {2}), "WithSet.seen"),
    (WithAny, lambda: WithAny(3), "WithAny.payload"),
    (Outer, lambda: Outer(1), "WithSet.seen"),  # found in a nested dataclass's type even when None
])
def test_codec_names_the_field_of_an_unsupported_type(cls, make, field_name):
    with pytest.raises(TypeError, match=rf"state field {field_name}: type .* is not supported.*supported:"):
        encode_state(make())
    with pytest.raises(TypeError, match=rf"state field {field_name}: "):
        decode_state(cls, {})


def test_codec_names_the_field_of_a_bad_value():
    e = _everything()
    e.f64 = [1.0, 2.0]  # a list where an array is declared
    with pytest.raises(ValueError, match=r"state field Everything\.f64: expected a numpy array"):
        encode_state(e)
    e = _everything()
    e.inners[1].x = "big"
    with pytest.raises(ValueError, match=r"state field Everything\.inners\[1\]\.x: expected float, got str"):
        encode_state(e)
    e = _everything()
    e.count = True  # bool is not an int here
    with pytest.raises(ValueError, match=r"Everything\.count: expected int"):
        encode_state(e)
    e.count, e.f32 = 1, np.array(["a"])
    with pytest.raises(ValueError, match=r"Everything\.f32: .*bool, int, uint or float dtype"):
        encode_state(e)
    d = encode_state(_everything())
    with pytest.raises(ValueError, match=r"state Everything: missing field\(s\) \['count'\], "
                                         r"unknown field\(s\) \['extra'\]"):
        decode_state(Everything, {**{k: v for k, v in d.items() if k != "count"}, "extra": 1})
    with pytest.raises(ValueError, match=r"Everything\.inner\.x: expected float, got str"):
        decode_state(Everything, {**d, "inner": {**d["inner"], "x": "1.0"}})
    with pytest.raises(ValueError, match=r"Everything\.f64: not an encoded array"):
        decode_state(Everything, {**d, "f64": {"dtype": "float64", "shape": [7], "data": [1.0]}})
    with pytest.raises(TypeError, match="dataclass"):
        encode_state({"a": 1})


# ------------------------------------------------------------------ strategies on the codec
def sphere(x: np.ndarray) -> float:
    return -float(np.sum((x - 0.3) ** 2))


def rugged(x: np.ndarray) -> float:
    return float(np.sin(1000 * x).sum())


def _same(a: list[Candidate], b: list[Candidate]) -> bool:
    return len(a) == len(b) and all(
        np.array_equal(x.theta, y.theta) and (x.id, x.parent_ids, x.note) == (y.id, y.parent_ids, y.note)
        for x, y in zip(a, b, strict=True))


def _continue_both(live: S.Strategy, resumed: S.Strategy, f: Any, gens: int = 2) -> None:
    """Tell both the pending batch, then run `gens` generations side by side, asserting equal asks."""
    live.tell(live.pending, [f(c.theta) for c in live.pending])
    resumed.tell(resumed.pending, [f(c.theta) for c in resumed.pending])
    for _ in range(gens):
        a, b = live.ask(), resumed.ask()
        assert _same(a, b)
        live.tell(a, [f(c.theta) for c in a])
        resumed.tell(b, [f(c.theta) for c in b])
    assert np.array_equal(live.best[0], resumed.best[0]) and live.best[1] == resumed.best[1]
    assert np.array_equal(live.recommendation(), resumed.recommendation())
    a, b = live.state_dict(), resumed.state_dict()
    for d in (a, b):
        d["own"].pop("live", None)  # nevergrad's pickle need not be byte-identical; its asks were
    assert json.dumps(a) == json.dumps(b)


# state_dict()s written by the code before the state codec (version 1), mid-search with a pending ask:
# name, seed, population, fitness, generations told before the pending ask; the literal is the JSON
V1_CASES = {
    "openai_es": ("openai_es", 0, 4, sphere, 2),
    "gbmpo_es_elites": ("gbmpo_es", 2, 4, rugged, 2),  # elites in the pending batch
    "gbmpo_es_start": ("gbmpo_es", 0, 4, sphere, 0),  # best_mean -inf, written as null
    "random": ("random", 0, 2, sphere, 2),
}

V1_STATES = {
    "openai_es": (
        '{"strategy": "openai_es", "version": 1, "dim": 2, "population": 4, "seed": 0, "generations": 6, '
        '"generation": 2, "x0": [0.0, 0.0], "pending": [{"theta": [0.003629338492472642, -0.0262486752659'
        '09974], "id": "g2-0", "parent_ids": ["mean@g2"], "note": "mean@g2+eps[0]"}, {"theta": [0.0740028'
        '620731719, 0.10029347183869529], "id": "g2-1", "parent_ids": ["mean@g2"], "note": "mean@g2-eps[0'
        ']"}, {"theta": [0.007652377155954661, 0.039088697253754835], "id": "g2-2", "parent_ids": ["mean@'
        'g2"], "note": "mean@g2+eps[1]"}, {"theta": [0.06997982340968989, 0.03495609931903048], "id": "g2'
        '-3", "parent_ids": ["mean@g2"], "note": "mean@g2-eps[1]"}], "best_theta": [0.08520000014308271, '
        '0.06735403966342877], "best_fitness": -0.10026318279945712, "best_id": "g1-2", "own": {"mean": ['
        '0.03881610028282227, 0.03702239828639266], "sigma": 0.05, "rng": {"bit_generator": "PCG64", "sta'
        'te": {"state": 148750737412705336129496293679478976519, "inc": 871363725175829895554781594037838'
        '44777}, "has_uint32": 0, "uinteger": 0}, "eps": [[-0.7037352358069926, -1.2654214710460525], [-0'
        '.6232744625373522, 0.0413259793472436]], "rows": [[0, 1], [0, -1], [1, 1], [1, -1]], "slots": [0'
        ', 1, 2, 3], "m": [-1.0106089109607217, -0.48029542129227], "v": [0.06389582178405816, 0.01763357'
        '9577946888], "t": 2}}'),
    "gbmpo_es_elites": (
        '{"strategy": "gbmpo_es", "version": 1, "dim": 2, "population": 4, "seed": 2, "generations": 6, "'
        'generation": 2, "x0": [0.0, 0.0], "pending": [{"theta": [-0.154260696027245, -2.309995673728287]'
        ', "id": "g2-0", "parent_ids": ["g1-1"], "note": "elite"}, {"theta": [-0.1336874471636213, -2.304'
        '0964492149105], "id": "g2-1", "parent_ids": ["mean@g2"], "note": "mean@g2+eps[0]"}, {"theta": [-'
        '0.1391997387129948, -2.2932404139753264], "id": "g2-2", "parent_ids": ["mean@g2"], "note": "mean'
        '@g2-eps[0]"}, {"theta": [-0.12686245434982177, -2.301712196308925], "id": "g2-3", "parent_ids": '
        '["mean@g2"], "note": "mean@g2+eps[1]"}], "best_theta": [0.0018905338179353306, -0.00522748441480'
        '7474], "best_fitness": 1.819563675440166, "best_id": "g0-0", "own": {"mean": [-0.136443592938308'
        '04, -2.2986684315951185], "sigma": 0.009801, "rng": {"bit_generator": "PCG64", "state": {"state"'
        ': 255166590019696265081391875281153098552, "inc": 121863417007658695389390353187995180015}, "has'
        '_uint32": 0, "uinteger": 0}, "eps": [[0.28121066979764925, -0.5538228364240524], [0.977567451126'
        '0357, -0.31055654665915255]], "rows": [[0, 1], [0, -1], [1, 1]], "slots": [1, 2, 3], "best_mean"'
        ': 0.0, "elites": [{"theta": [-0.154260696027245, -2.309995673728287], "id": "g1-1", "parent_ids"'
        ': ["mean@g1"], "note": "mean@g1-eps[0]"}], "stepped": [true, false]}}'),
    "gbmpo_es_start": (
        '{"strategy": "gbmpo_es", "version": 1, "dim": 2, "population": 4, "seed": 0, "generations": 6, "'
        'generation": 0, "x0": [0.0, 0.0], "pending": [{"theta": [0.001257302210933933, -0.00132104863291'
        '30189], "id": "g0-0", "parent_ids": ["mean@g0"], "note": "mean@g0+eps[0]"}, {"theta": [-0.001257'
        '302210933933, 0.0013210486329130189], "id": "g0-1", "parent_ids": ["mean@g0"], "note": "mean@g0-'
        'eps[0]"}, {"theta": [0.006404226504432821, 0.001049001171530397], "id": "g0-2", "parent_ids": ["'
        'mean@g0"], "note": "mean@g0+eps[1]"}, {"theta": [-0.006404226504432821, -0.001049001171530397], '
        '"id": "g0-3", "parent_ids": ["mean@g0"], "note": "mean@g0-eps[1]"}], "best_theta": null, "best_f'
        'itness": null, "best_id": null, "own": {"mean": [0.0, 0.0], "sigma": 0.01, "rng": {"bit_generato'
        'r": "PCG64", "state": {"state": 45622952943019519016089485487844936367, "inc": 87136372517582989'
        '555478159403783844777}, "has_uint32": 0, "uinteger": 0}, "eps": [[0.1257302210933933, -0.1321048'
        '632913019], [0.6404226504432821, 0.10490011715303971]], "rows": [[0, 1], [0, -1], [1, 1], [1, -1'
        ']], "slots": [0, 1, 2, 3], "best_mean": null, "elites": [], "stepped": []}}'),
    "random": (
        '{"strategy": "random", "version": 1, "dim": 2, "population": 2, "seed": 0, "generations": 6, "ge'
        'neration": 2, "x0": [0.0, 0.0], "pending": [{"theta": [-0.019440108876447683, -0.013433842926111'
        '954], "id": "g2-0", "parent_ids": [], "note": "random_init:seed=4989270442267674624"}, {"theta":'
        ' [-0.010081344184803706, 0.007320428458967866], "id": "g2-1", "parent_ids": [], "note": "random_'
        'init:seed=2981407451974053888"}], "best_theta": [0.01923736738682945, -0.0052086080986039444], "'
        'best_fitness": -0.17197995032936536, "best_id": "g0-0", "own": {"count": 6, "sampler": "gaussian'
        '", "scale": 0.01}}'),
}


@pytest.mark.parametrize("case", sorted(V1_CASES))
def test_version1_state_dict_resumes_exactly(case):
    name, seed, pop, f, gens = V1_CASES[case]
    v1 = json.loads(V1_STATES[case])
    assert v1["version"] == 1 and v1["strategy"] == name
    live = S.get(name, dim=2, population=pop, seed=seed, generations=6)
    for _ in range(gens):
        c = live.ask()
        live.tell(c, [f(x.theta) for x in c])
    live.ask()
    now = live.state_dict()
    assert now["version"] == 2
    assert {k: v for k, v in now.items() if k not in ("version", "own")} == \
        {k: v for k, v in json.loads(json.dumps(v1)).items() if k not in ("version", "own")}
    resumed = S.get(name, dim=2, population=pop, seed=seed, generations=6)
    resumed.load_state_dict(v1)
    assert encode_state(resumed.state) == now["own"]  # the upgraded state is today's state
    if name == "gbmpo_es":
        assert resumed.best_mean == live.best_mean and len(resumed.elites) == len(live.elites)
    _continue_both(live, resumed, f)


@pytest.mark.parametrize("optimizer", ["OnePlusOne", "CMA"])
def test_version1_nevergrad_state_resumes_exactly(optimizer):
    """Version 1 pickled a bare (optimiser, pending, uid map, RNG states) tuple; built here from a
    live strategy (a literal pickle would tie the test to one nevergrad release)."""
    mk = lambda: S.get("nevergrad", dim=4, population=4, seed=1, generations=6,  # noqa: E731
                       optimizer=optimizer, sigma=0.1)
    live = mk()
    for _ in range(2):
        c = live.ask()
        live.tell(c, [sphere(x.theta) for x in c])
    live.ask()
    sd, objs = live.state_dict(), live.state.live
    blob = pickle.dumps((objs.opt, objs.pending, objs.uid_to_id, objs.rngs))
    v1 = {**sd, "version": 1,
          "own": {"optimizer": optimizer, "sigma": 0.1, "pickle": base64.b64encode(blob).decode("ascii")}}
    resumed = mk()
    resumed.load_state_dict(json.loads(json.dumps(v1)))
    assert _same(resumed.pending, live.pending)
    _continue_both(live, resumed, sphere)
    other = S.get("nevergrad", dim=4, population=4, seed=1, generations=6, optimizer="DE")
    for d in (v1, sd):
        with pytest.raises(ValueError, match=f"state is for optimizer '{optimizer}', not 'DE'"):
            other.load_state_dict(d)


def test_bad_own_state_leaves_the_strategy_untouched():
    s = S.get("openai_es", dim=3, population=4, seed=0)
    c = s.ask()
    s.tell(c, [sphere(x.theta) for x in c])
    sd = s.state_dict()
    fresh = S.get("openai_es", dim=3, population=4, seed=0)
    before = json.dumps(fresh.state_dict())
    with pytest.raises(ValueError, match=r"OpenAIESState\.t: expected int"):
        fresh.load_state_dict({**sd, "own": {**sd["own"], "t": "2"}})
    with pytest.raises(ValueError, match="unsupported strategy state version 3"):
        fresh.load_state_dict({**sd, "version": 3})
    assert json.dumps(fresh.state_dict()) == before


class HandWritten(S.Strategy):
    """A plugin written before state dataclasses: hand-written `_state` / `_load_state`."""

    name = "hand_written_test"

    def __init__(self, dim: int, population: int, seed: int, x0: Any = None, generations: int | None = None):
        super().__init__(dim, population, seed, x0, generations)
        self.rng = np.random.default_rng(self.seed)

    def _ask(self) -> list[Candidate]:
        return [Candidate(self.rng.standard_normal(self.dim), self._cid(i)) for i in range(self.population)]

    def _tell(self, candidates: list[Candidate], fitnesses: np.ndarray) -> None:
        pass

    def _state(self) -> dict[str, Any]:
        return {"rng": self.rng.bit_generator.state}

    def _load_state(self, d: dict[str, Any]) -> None:
        self.rng.bit_generator.state = d["rng"]


def test_hand_written_state_hooks_still_work():
    live = HandWritten(dim=3, population=2, seed=4)
    c = live.ask()
    live.tell(c, [sphere(x.theta) for x in c])
    live.ask()
    sd = json.loads(json.dumps(live.state_dict()))
    assert sd["own"] == {"rng": live.rng.bit_generator.state}
    resumed = HandWritten(dim=3, population=2, seed=0)
    resumed.load_state_dict(sd)
    _continue_both(live, resumed, sphere)
