"""Tests of mirrorlab.divergences: closed forms, stability of the neural map against an
independent scipy oracle, gradients, the full estimator, persistence, registry and plots."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra.numpy import arrays
from scipy.integrate import quad

import mirrorlab.divergences as dv
from mirrorlab.divergences import NeuralMirrorMap, get

BUILTIN = ["kl_k1", "kl_k2", "kl_k3", "prob_l2", "neg_entropy"]  # those with closed forms below
# Contract tests run over the registry, so a newly registered divergence is tested automatically
# (one whose factory needs arguments gets them in `_make`).
REGISTERED = dv.names()


def _make(name: str, picklable: bool = False) -> dv.Divergence:
    if name == "custom":
        return get("custom", h="torch:exp" if picklable else (lambda y: y * y * y / 6 + y * torch.log(y)))
    if name == "neural":
        return get("neural", seed=3, scale=0.5)
    if name == "mixture":
        return get("mixture", weight=0.3)
    return get(name)


@pytest.mark.parametrize("name", REGISTERED)
def test_contract_zero_at_the_reference_and_non_negative_exact_divergence(name):
    """D(y, y) = 0 for the sampled estimator; the exact (`full`) divergence is >= 0 and 0 at the
    reference."""
    d = _make(name)
    g = torch.Generator().manual_seed(5)
    lp = torch.log_softmax(torch.randn(4, 30, generator=g, dtype=torch.float64), -1)
    torch.testing.assert_close(d.sampled(lp, lp), torch.zeros_like(lp), rtol=0, atol=1e-12)
    logits = torch.randn(6, 30, generator=g, dtype=torch.float64) * 2
    ref = torch.randn(6, 30, generator=g, dtype=torch.float64) * 2
    assert bool((d.full(logits, ref) >= -1e-12).all())
    zero = torch.zeros(6, dtype=torch.float64)
    torch.testing.assert_close(d.full(logits, logits), zero, rtol=0, atol=1e-12)


# --------------------------------------------------------------------------- oracle
_ACTS = [
    lambda u: u**3,
    lambda u: u**2,
    lambda u: np.sqrt(np.maximum(u, 0.0)),
    lambda u: np.cbrt(np.maximum(u, 0.0)),
    lambda u: np.log(np.maximum(u, 0.0) + 1e-3),
    np.exp,
]


def _np_phi_inv(raw: np.ndarray):
    """phi_inv written independently in numpy float64 from the flat [v, w, b, a, c] layout."""
    v, w, b, a, c = raw[:126], raw[126:252], raw[252:378], raw[378], raw[379]

    def f(t: float) -> float:
        u = w * t + b
        s = sum(v[i * 21 : (i + 1) * 21] @ _ACTS[i](u[i * 21 : (i + 1) * 21]) for i in range(6))
        return float(s + a * t + c * math.log(t))

    return f


def _oracle(raw: np.ndarray, y: float, y0: float) -> float:
    """D = integral_{y0}^{y} (phi_inv(t) - phi_inv(y0)) dt by adaptive quadrature (float64)."""
    if y == y0:
        return 0.0
    f = _np_phi_inv(raw)
    f0 = f(y0)
    lo, hi = min(y, y0), max(y, y0)
    pts = [lo * 10**k for k in range(1, 9) if lo * 10**k < hi] or None
    val, _ = quad(lambda t: f(t) - f0, lo, hi, epsabs=0.0, epsrel=1e-11, limit=400, points=pts)
    return val if y > y0 else -val


def _raw_cases() -> list[tuple[str, np.ndarray]]:
    rng = np.random.default_rng(1234)
    cases = []
    for scale in (1e-6, 1e-2, 1.0, 4.0):
        cases.append((f"scale{scale:g}", rng.uniform(0, scale, 380)))
    r = rng.uniform(0, 1.0, 380)
    r[126:252] = rng.uniform(0, 1e-9, 126)  # w near 0
    cases.append(("w_tiny", r))
    r = rng.uniform(0, 1.0, 380)
    r[126:252:2] = 0.0  # w exactly 0 for half the units
    r[252:378:3] = 0.0  # and some b = 0 (u = w y, the sqrt/cbrt/log kinks at y -> 0)
    cases.append(("w_zero_b_zero", r))
    r = rng.uniform(0, 0.1, 380)
    r[126:252] = rng.uniform(0, 30.0, 126)  # large slopes: exp(30 y) ~ 1e13, u^3 ~ 3e4
    cases.append(("w_large", r))
    r = np.zeros(380)
    r[379] = 0.7  # c log y only
    cases.append(("c_only", r))
    r = rng.uniform(0, 0.01, 380)  # paper init with b = 0: u = w y tiny near y = 1e-8
    r[252:378] = 0.0
    cases.append(("b_zero", r))
    return cases


_PROBS = [1e-8, 3.7e-7, 1e-4, 0.02, 0.3, 0.999, 1.0]


def _pairs() -> list[tuple[float, float]]:
    """(logp, ref_logp) pairs over [1e-8, 1]: far apart, equal, and very close."""
    out = []
    for p in _PROBS:
        for q in _PROBS:
            out.append((math.log(p), math.log(q)))
        for eps in (1e-6, -3e-5, 2e-3, -0.05, 0.4):
            out.append((min(math.log(p) + eps, 0.0), math.log(p)))
    return out


@pytest.mark.filterwarnings("ignore::scipy.integrate.IntegrationWarning")
@pytest.mark.parametrize("case", _raw_cases(), ids=lambda c: c[0])
def test_neural_matches_quadrature_oracle(case):
    """float32: D >= -1e-7, D(y, y) == 0 exactly, rel err <= 1e-4 against a float64 quad oracle."""
    _, raw = case
    m = NeuralMirrorMap.from_raw(raw)
    pairs = _pairs()
    lp = torch.tensor([p[0] for p in pairs], dtype=torch.float32)
    rp = torch.tensor([p[1] for p in pairs], dtype=torch.float32)
    d = m.sampled(lp, rp)
    assert d.dtype == torch.float32
    assert bool(torch.isfinite(d).all())
    assert float(d.min()) >= -1e-7
    same = lp == rp
    assert bool((d[same] == 0).all())
    # the oracle sees the same float32-rounded inputs
    ref = np.array(
        [_oracle(raw, math.exp(float(a)), math.exp(float(b))) for a, b in zip(lp, rp, strict=True)]
    )
    dd = d.double().numpy()
    rel = np.abs(dd - ref) / np.maximum(np.abs(ref), 1e-300)
    rel[ref == 0] = np.abs(dd[ref == 0])
    assert rel.max() <= 1e-4, (rel.max(), pairs[int(rel.argmax())])
    # float64 inputs are computed in float64 and are tighter still
    d64 = m.sampled(lp.double(), rp.double()).numpy()
    rel64 = np.abs(d64 - ref) / np.maximum(np.abs(ref), 1e-300)
    assert rel64[ref != 0].max() <= 1e-6, (rel64.max(), pairs[int(rel64.argmax())])


def test_neural_bf16_inputs_are_upcast():
    m = get("neural", seed=0)
    lp = torch.log(torch.rand(64)).to(torch.bfloat16)
    rp = torch.log(torch.rand(64)).to(torch.bfloat16)
    d = m.sampled(lp, rp)
    assert d.dtype == torch.float32
    torch.testing.assert_close(d, m.sampled(lp.float(), rp.float()), rtol=0, atol=0)
    assert float(d.min()) >= 0


def test_neural_h_is_consistent_with_phi_inv_and_D():
    """h' (autograd) equals phi_inv, and h(y) - h(y0) - h'(y0)(y - y0) matches D (float64)."""
    m = get("neural", seed=5, scale=0.8)
    y = torch.linspace(0.05, 1.0, 40, dtype=torch.float64, requires_grad=True)
    (g,) = torch.autograd.grad(m.h(y).sum(), y)
    torch.testing.assert_close(g, m.phi_inv(y.detach()), rtol=1e-9, atol=1e-9)
    y, y0 = y.detach()[::2], y.detach()[1::2].flip(0)
    breg = m.h(y) - m.h(y0) - m.phi_inv(y0) * (y - y0)
    torch.testing.assert_close(m.sampled(y.log(), y0.log()), breg, rtol=1e-7, atol=1e-12)


# --------------------------------------------------------------------------- closed forms
def _closed(name: str, y: torch.Tensor, y0: torch.Tensor) -> torch.Tensor:
    L = torch.log(y) - torch.log(y0)
    return {
        "kl_k1": L,
        "kl_k2": L * L / 2,
        "kl_k3": y0 / y - torch.log(y0 / y) - 1,
        "prob_l2": (y - y0) ** 2 / 2,
        "neg_entropy": y * torch.log(y / y0) - y + y0,
    }[name]


@pytest.mark.parametrize("name", BUILTIN)
def test_builtin_closed_forms(name):
    g = torch.Generator().manual_seed(0)
    y = torch.rand(500, generator=g, dtype=torch.float64).clamp_min(1e-8)
    y0 = torch.rand(500, generator=g, dtype=torch.float64).clamp_min(1e-8)
    d = get(name)
    torch.testing.assert_close(d.sampled(y.log(), y0.log()), _closed(name, y, y0), rtol=1e-10, atol=1e-14)
    d32 = d.sampled(y.log().float(), y0.log().float())
    assert d32.dtype == torch.float32
    torch.testing.assert_close(d32.double(), _closed(name, y, y0), rtol=2e-5, atol=1e-6)
    assert bool((d.sampled(y0.log().float(), y0.log().float()) == 0).all())
    if name != "kl_k1":
        assert float(d32.min()) >= 0


@pytest.mark.parametrize("name", ["kl_k3", "neg_entropy"])
def test_close_y_relative_accuracy_float32(name):
    """Near y = y0 the float32 value keeps full relative accuracy (no cancellation)."""
    y0 = torch.tensor([0.3, 1e-6, 0.9], dtype=torch.float64)
    lp0 = y0.log().float()
    lp = lp0 + torch.tensor([1e-5, -2e-4, 3e-3])
    yy0 = lp0.double().exp()
    L = lp.double() - lp0.double()
    exact = L * L / 2 * (1 - L / 3) if name == "kl_k3" else yy0 * (L * L / 2 + L**3 / 3)
    got = get(name).sampled(lp, lp0).double()
    torch.testing.assert_close(got, exact, rtol=1e-4, atol=0)


@pytest.fixture
def scratch_registry(monkeypatch):
    """Names registered during a test are removed afterwards (the registry is global)."""
    monkeypatch.setattr(dv.registry, "_factories", dict(dv.registry._factories))


def test_custom_potential_matches_prob_l2_and_registers(scratch_registry):
    lp = torch.log(torch.rand(100, dtype=torch.float64))
    rp = torch.log(torch.rand(100, dtype=torch.float64))
    c = get("custom", h=lambda y: 0.5 * y * y)
    torch.testing.assert_close(c.sampled(lp, rp), get("prob_l2").sampled(lp, rp), rtol=1e-9, atol=1e-15)
    torch.testing.assert_close(c.phi_inv(lp.exp()), lp.exp())
    dv.register_potential("test_negent", lambda y: y * torch.log(y) - y, overwrite=True)
    d = get("test_negent")
    assert d.name == "test_negent"
    torch.testing.assert_close(d.sampled(lp, rp), get("neg_entropy").sampled(lp, rp), rtol=1e-8, atol=1e-12)
    assert c.sampled(lp.float(), rp.float()).dtype == torch.float32
    # import-path form, usable from YAML
    s = get("custom", h="torch:exp")
    torch.testing.assert_close(s.phi_inv(lp.exp()), lp.exp().exp())


# --------------------------------------------------------------------------- gradients
@pytest.mark.parametrize("name", REGISTERED)
def test_gradient_wrt_logp_matches_finite_differences(name):
    d = _make(name)
    g = torch.Generator().manual_seed(7)
    lp = torch.log(torch.rand(12, generator=g, dtype=torch.float64).clamp_min(1e-6))
    rp = torch.log(torch.rand(12, generator=g, dtype=torch.float64).clamp_min(1e-6))
    rp[:3] = lp[:3] + torch.tensor([1e-3, -2e-2, 0.0], dtype=torch.float64)  # close pairs
    lp.requires_grad_(True)
    if isinstance(d, dv.StraightThrough):  # by design: the value of one estimator, the gradient of another
        torch.testing.assert_close(d.sampled(lp, rp), d.value.sampled(lp, rp), rtol=0, atol=0)
        (g,) = torch.autograd.grad(d.sampled(lp, rp).sum(), lp)
        (want,) = torch.autograd.grad(d.gradient.sampled(lp, rp).sum(), lp)
        torch.testing.assert_close(g, want, rtol=0, atol=0)
        d = d.gradient
    assert torch.autograd.gradcheck(lambda x: d.sampled(x, rp), (lp,), eps=1e-7, atol=1e-7, rtol=1e-5)


def test_mask_blocks_nan_values_and_gradients():
    d = get("neural", seed=1)
    lp = torch.tensor([-1.0, float("nan"), -float("inf")], requires_grad=True)
    rp = torch.tensor([-0.5, -1.0, 0.0])
    mask = torch.tensor([1, 0, 0])
    out = d.sampled(lp, rp, mask=mask)
    assert out[1:].eq(0).all() and out[0] > 0
    out.sum().backward()
    assert bool(torch.isfinite(lp.grad).all())


# --------------------------------------------------------------------------- full estimator
def _full_loop(d: dv.Divergence, logits: torch.Tensor, ref_logits: torch.Tensor) -> torch.Tensor:
    """float64 reference: loop over tokens and vocabulary entries, one scalar term at a time."""
    lp = torch.log_softmax(logits.double(), -1)
    rp = torch.log_softmax(ref_logits.double(), -1)
    out = torch.zeros(lp.shape[:-1], dtype=torch.float64)
    for i in range(lp.shape[0]):
        tot = 0.0
        for a in range(lp.shape[-1]):
            t = float(d.sampled(lp[i, a : a + 1], rp[i, a : a + 1])[0])
            tot += math.exp(float(lp[i, a])) * t if d.full_mode == "expectation" else t
        out[i] = tot
    return out


@pytest.mark.parametrize("name", REGISTERED)
def test_full_equals_vocabulary_loop_and_chunking_is_exact(name):
    d = _make(name)
    g = torch.Generator().manual_seed(11)
    logits = torch.randn(3, 37, generator=g) * 2
    ref = logits + torch.randn(3, 37, generator=g) * 0.5
    expect = _full_loop(d, logits, ref)
    got = d.full(logits, ref)
    assert got.shape == (3,) and got.dtype == torch.float32
    torch.testing.assert_close(got.double(), expect, rtol=2e-5, atol=1e-7)
    got64 = d.full(logits.double(), ref.double())
    torch.testing.assert_close(got64, expect, rtol=1e-10, atol=1e-14)
    for cs in (1, 5, 32 * 4):
        torch.testing.assert_close(
            d.full(logits.double(), ref.double(), chunk_size=cs), got64, rtol=1e-12, atol=1e-15
        )


@pytest.mark.parametrize("name", ["kl_k3", "neural", "custom"])
def test_full_gradient_through_chunks_matches_direct(name):
    """Chunked (checkpointed) `full` back-propagates the same gradient as a direct vocab sum."""
    d = _make(name)
    g = torch.Generator().manual_seed(4)
    logits = torch.randn(2, 3, 40, generator=g, dtype=torch.float64, requires_grad=True)
    ref = torch.randn(2, 3, 40, generator=g, dtype=torch.float64)
    (g1,) = torch.autograd.grad(d.full(logits, ref, chunk_size=32 * 3).sum(), logits)
    lp, rp = torch.log_softmax(logits, -1), torch.log_softmax(ref, -1)
    t = d.sampled(lp, rp)
    direct = (lp.exp() * t if d.full_mode == "expectation" else t).sum()
    (g2,) = torch.autograd.grad(direct, logits)
    torch.testing.assert_close(g1, g2, rtol=1e-9, atol=1e-12)


def test_full_kl_estimators_equal_exact_kl():
    g = torch.Generator().manual_seed(2)
    logits = torch.randn(2, 5, 50, generator=g, dtype=torch.float64)
    ref = torch.randn(2, 5, 50, generator=g, dtype=torch.float64)
    lp, rp = torch.log_softmax(logits, -1), torch.log_softmax(ref, -1)
    kl = (lp.exp() * (lp - rp)).sum(-1)
    for name in ("kl_k1", "kl_k3", "neg_entropy"):
        torch.testing.assert_close(get(name).full(logits, ref, chunk_size=7), kl, rtol=1e-10, atol=1e-12)
    half_l2 = 0.5 * ((lp.exp() - rp.exp()) ** 2).sum(-1)
    torch.testing.assert_close(get("prob_l2").full(logits, ref, chunk_size=16), half_l2)


def test_full_handles_masked_vocabulary_and_bf16():
    logits = torch.randn(4, 64)
    logits[:, :5] = -float("inf")  # vocabulary entries with pi = 0
    ref = torch.randn(4, 64)
    for name in BUILTIN + ["neural"]:
        d = _make(name)
        out = d.full(logits.clone().requires_grad_(True), ref, chunk_size=64)
        assert bool(torch.isfinite(out).all()), name
        assert d.full(logits.bfloat16(), ref.bfloat16()).dtype == torch.float32


# --------------------------------------------------------------------------- convexity
@settings(max_examples=40, deadline=None)
@given(arrays(np.float64, 380, elements=st.floats(-30, 8, allow_nan=False)))
def test_from_theta_phi_inv_is_non_decreasing(theta):
    m = NeuralMirrorMap.from_theta(theta)
    y = torch.cat(
        [torch.logspace(-8, -1, 60, dtype=torch.float64), torch.linspace(0.1, 1, 60, dtype=torch.float64)]
    )
    f = m.phi_inv(y)
    assert bool(torch.isfinite(f).all())
    diffs = f[1:] - f[:-1]
    assert float(diffs.min()) >= -1e-12 * float(f.abs().max() + 1)
    assert bool((torch.as_tensor(m.raw) > 0).all())


@settings(max_examples=25, deadline=None)
@given(
    arrays(np.float64, 380, elements=st.floats(-12, 3, allow_nan=False)),
    st.floats(-18.4, 0.0),
    st.floats(-18.4, 0.0),
)
def test_from_theta_divergence_non_negative(theta, lp, rp):
    m = NeuralMirrorMap.from_theta(theta)
    d = m.sampled(torch.tensor([lp, rp, lp]), torch.tensor([rp, lp, lp]))
    assert float(d.min()) >= -1e-7 and float(d[2]) == 0.0


# --------------------------------------------------------------------------- constructors & persistence
def test_random_init_is_seeded_and_in_range():
    a, b = NeuralMirrorMap.random_init(4, scale=0.01), NeuralMirrorMap.random_init(4, scale=0.01)
    assert np.array_equal(a.raw, b.raw) and a.sha == b.sha
    assert a.raw.min() >= 0 and a.raw.max() < 0.01 and a.raw.shape == (380,)
    assert NeuralMirrorMap.random_init(5).sha != a.sha


def test_from_raw_rejects_negative_entries():
    raw = np.full(380, 0.01)
    raw[126 + 3] = -0.5
    raw[379] = -1.0
    with pytest.raises(ValueError, match=r"w\[3\]=-0.5.*c=-1"):
        NeuralMirrorMap.from_raw(raw)
    with pytest.raises(ValueError, match="380"):
        NeuralMirrorMap.from_raw(np.zeros(10))


def test_theta_raw_views_and_sha():
    theta = np.linspace(-3, 3, 380)
    m = NeuralMirrorMap.from_theta(theta)
    assert np.array_equal(m.theta, theta)
    np.testing.assert_allclose(m.raw, np.log1p(np.exp(theta)), rtol=1e-14)
    assert m.sha == dv.theta_sha(theta) and len(m.sha) == 64
    m2 = NeuralMirrorMap.from_raw(m.raw)
    np.testing.assert_allclose(m2.theta, theta, rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("kind", ["theta", "raw", "random"])
def test_save_load_round_trip(tmp_path, kind):
    if kind == "theta":
        m = NeuralMirrorMap.from_theta(np.random.default_rng(0).normal(size=380))
    elif kind == "raw":
        m = NeuralMirrorMap.from_raw(np.random.default_rng(0).uniform(0, 1, 380))
    else:
        m = NeuralMirrorMap.random_init(9, 0.01)
    p = m.save(tmp_path / "map.safetensors")
    m2 = get("neural", path=p)
    assert m2.sha == m.sha and np.array_equal(m2.raw, m.raw) and np.array_equal(m2.theta, m.theta)
    lp, rp = torch.log(torch.rand(20)), torch.log(torch.rand(20))
    torch.testing.assert_close(m2.sampled(lp, rp), m.sampled(lp, rp), rtol=0, atol=0)
    h = m2.header()
    assert h["version"] == 1 and h["transform"] == "softplus" and h["layout"]["dim"] == 380


def test_divergences_pickle(tmp_path):
    """Executors ship divergences to worker processes: every built-in must pickle and agree."""
    import pickle

    lp, rp = torch.log(torch.rand(16)), torch.log(torch.rand(16))
    for name in REGISTERED:
        d = _make(name, picklable=True)
        d.sampled(lp, rp)  # fill the parameter cache first
        d2 = pickle.loads(pickle.dumps(d))
        torch.testing.assert_close(d2.sampled(lp, rp), d.sampled(lp, rp), rtol=0, atol=0)


def test_load_rejects_tampered_file(tmp_path):
    from safetensors.torch import load_file, save_file

    m = NeuralMirrorMap.random_init(1)
    p = m.save(tmp_path / "m.safetensors")
    from safetensors import safe_open

    with safe_open(str(p), framework="pt") as f:
        meta = f.metadata()
    t = load_file(str(p))
    t["raw"][0] += 1.0
    save_file(t, str(p), metadata=meta)
    with pytest.raises(ValueError, match="sha mismatch"):
        NeuralMirrorMap.load(p)
    save_file(t, str(tmp_path / "bare.safetensors"))
    with pytest.raises(ValueError, match="not a mirrorlab"):
        NeuralMirrorMap.load(tmp_path / "bare.safetensors")


def test_neural_factory_argument_errors():
    with pytest.raises(ValueError, match="at most one"):
        get("neural", theta=np.zeros(380), raw=np.zeros(380))
    m = get("neural", seed=2, scale=0.1)
    assert m.params()["seed"] == 2 and m.params()["scale"] == 0.1 and m.params()["sha"] == m.sha


# --------------------------------------------------------------------------- registry & config
def test_registry_errors_name_allowed_names():
    with pytest.raises(KeyError, match="allowed: .*kl_k3.*neural.*prob_l2"):
        get("kl_k4")
    with pytest.raises(TypeError, match="divergence 'kl_k3'"):
        get("kl_k3", bogus=1)
    assert set(BUILTIN + ["neural", "custom"]) <= set(dv.names())


def test_user_registered_divergence_is_accepted_by_config(scratch_registry):
    from mirrorlab.config import ConfigError, DivergenceConfig, config_from_dict

    class Half(dv.ProbL2):
        name = "half_l2_test"

    dv.register("half_l2_test", Half, overwrite=True)
    from mirrorlab.maps import build_divergence

    cfg = DivergenceConfig(name="half_l2_test")
    assert isinstance(build_divergence(cfg).divergence, Half)
    with pytest.raises(ConfigError, match="allowed:.*half_l2_test"):
        config_from_dict({"divergence": {"name": "nope"}})


def test_build_divergence_neural_params_and_map(tmp_path):
    from mirrorlab.config import DivergenceConfig
    from mirrorlab.maps import build_divergence

    p = NeuralMirrorMap.random_init(3).save(tmp_path / "m.safetensors")
    reg = build_divergence(DivergenceConfig(name="neural", map=str(p), coef=0.7))
    assert reg.divergence.sha == NeuralMirrorMap.random_init(3).sha and reg.coef == 0.7
    d = build_divergence(DivergenceConfig(name="neural", params={"seed": 3})).divergence
    assert d.sha == NeuralMirrorMap.random_init(3).sha


# --------------------------------------------------------------------------- plots
def test_plot_maps_writes_png(tmp_path):
    maps = {"KL": get("kl_k3"), "ProbL2": get("prob_l2"), "neural": get("neural", seed=0)}
    p = dv.plot_maps(maps, tmp_path / "maps.png", normalize=True)
    data = p.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 5000
    with pytest.raises(TypeError, match="no potential"):
        dv.plot_maps({"k2": get("kl_k2")}, tmp_path / "x.png")


# --------------------------------------------------------------------------- device
@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("name", BUILTIN + ["neural"])
def test_no_host_sync_on_cuda(name):
    d = _make(name)
    lp = torch.log(torch.rand(4096, device="cuda")).requires_grad_(True)
    rp = torch.log(torch.rand(4096, device="cuda"))
    logits = torch.randn(8, 1000, device="cuda", dtype=torch.bfloat16)
    d.sampled(lp, rp)  # warm the parameter cache (one host->device copy)
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        d.sampled(lp, rp, mask=torch.ones(4096, device="cuda", dtype=torch.bool)).sum().backward()
        d.full(logits, logits.flip(-1), chunk_size=256)
    finally:
        torch.cuda.set_sync_debug_mode(0)
    torch.testing.assert_close(d.sampled(lp, rp).cpu(), d.sampled(lp.cpu(), rp.cpu()), rtol=1e-5, atol=1e-7)
    on_gpu = d.full(logits, logits.flip(-1)).cpu()
    torch.testing.assert_close(on_gpu, d.full(logits.cpu(), logits.flip(-1).cpu()), rtol=1e-4, atol=1e-6)
