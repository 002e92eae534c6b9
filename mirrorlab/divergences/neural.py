"""The neural mirror map (omega-potential) of GBMPO: a 126-unit convex potential, 380 parameters.

phi_inv(y) = h'(y) = sum_j v_j sigma_j(w_j y + b_j) + a y + c log y, with 21 units of each of
u^3, u^2, sqrt(u+), cbrt(u+), log(u+ + 1e-3), exp(u) in that order (units 0-20 are u^3,
21-41 u^2, ...). Flat layout [v (126), w (126), b (126), a, c] = 380 values.

Convexity: h is convex when every raw parameter is >= 0, and then u = w y + b >= 0 on (0, 1],
so the u+ kinks are never inside the domain. `from_theta` maps an unconstrained vector
through softplus (raw = log(1 + e^theta) > 0), so any theta a search proposes is valid.

Stable divergence (DESIGN section 4): with L = logp - ref_logp and Delta = y - y0 =
y0 expm1(L), each unit contributes exactly v w Delta^2 K_j(u, u0) with a closed form K_j >= 0
that never subtracts large primitives (u = w y + b, u0 = w y0 + b; A = sqrt or cbrt of u):
  u^3   (2 u0^2 + (u + u0)^2) / 4
  u^2   (2 u0 + u) / 3
  sqrt  (2A + A0) / (3 (A + A0)^2)
  cbrt  (3A^2 + 2 A A0 + A0^2) / (4 q^2),  q = A^2 + A A0 + A0^2
  log   g2(x) / p0,   p0 = u0 + 1e-3, x = w Delta / p0, g2(x) = ((1+x) log1p(x) - x) / x^2
  exp   e^{u0} e2(w Delta),               e2(x) = (expm1(x) - x) / x^2
plus (a/2) Delta^2 and c (y log(y/y0) - y + y0); e2/g2 switch to Taylor series near 0. So D is
a sum of non-negative products: D >= 0, D(y, y) == 0 exactly, full relative accuracy for y
close to y0, tiny y or y0 (1e-8) and w -> 0. One tensor op per activation block over
[tokens, 21] (six blocks), never a loop per unit.

Why closed forms rather than Gauss-Legendre: each is the exact integral (D = (v/w) times the
Bregman gap of the activation's primitive, divided through by w analytically), costs fewer
operations than a quadrature over [tokens, 126, nodes], and has no quadrature error at the
sqrt/cbrt endpoint singularities (b = 0, y0 -> 0 puts u0 -> 0, where a fixed-order rule loses
digits). Tests check it against an independent adaptive-quadrature oracle.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor

from .base import Divergence, PotentialMixin, compute_dtype, e2, g2, kl_bregman, log_ratio_terms

N_UNITS = 126
ACTIVATIONS: tuple[str, ...] = ("cube", "square", "sqrt", "cbrt", "log", "exp")
UNITS_PER_ACTIVATION = 21
DIM = 3 * N_UNITS + 2  # 380
LOG_EPS = 1e-3
FORMAT_VERSION = 1
TRANSFORM = "softplus"
LAYOUT: dict[str, Any] = {
    "order": ["v", "w", "b", "a", "c"],
    "sizes": [N_UNITS, N_UNITS, N_UNITS, 1, 1],
    "dim": DIM,
    "activations": list(ACTIVATIONS),
    "units_per_activation": UNITS_PER_ACTIVATION,
    "unit_order": "blocked",
    "log_eps": LOG_EPS,
}

ArrayLike = Tensor | np.ndarray | Sequence[float]


def _as_f64(x: ArrayLike, what: str) -> Tensor:
    t = torch.as_tensor(np.asarray(x.detach().cpu() if isinstance(x, Tensor) else x, dtype=np.float64))
    t = t.reshape(-1).clone()
    if t.numel() != DIM:
        raise ValueError(f"{what} must have {DIM} entries (layout [v, w, b, a, c]), got {t.numel()}")
    return t


def _param_name(i: int) -> str:
    if i < 3 * N_UNITS:
        return f"{'vwb'[i // N_UNITS]}[{i % N_UNITS}]"
    return "a" if i == 3 * N_UNITS else "c"


def theta_sha(theta: ArrayLike) -> str:
    """sha256 (hex) of theta as little-endian float64: the identity of a map in runs and files."""
    t = _as_f64(theta, "theta").numpy().astype("<f8")
    return hashlib.sha256(t.tobytes()).hexdigest()


def inverse_softplus(raw: Tensor) -> Tensor:
    """theta with softplus(theta) = raw (float64); -inf where raw == 0."""
    raw = raw.to(torch.float64)
    return raw + torch.log(-torch.expm1(-raw))


def split_params(flat: ArrayLike) -> dict[str, Tensor]:
    """Split a flat 380-vector into v, w, b (126 each) and scalars a, c (float64)."""
    t = _as_f64(flat, "parameter vector")
    n = N_UNITS
    return {"v": t[:n], "w": t[n : 2 * n], "b": t[2 * n : 3 * n], "a": t[3 * n], "c": t[3 * n + 1]}


class NeuralMirrorMap(Divergence, PotentialMixin):
    """The GBMPO omega-potential mirror map as a Bregman divergence (see module docstring).

    Build with `from_theta` (unconstrained, softplus), `from_raw` (paper's non-negative
    layout) or `random_init` (paper's U[0, scale)); persist with `save` / `load`.
    """

    name = "neural"
    full_chunk_divisor = 32

    def __init__(self, raw: Tensor, theta: Tensor | None = None, source: dict[str, Any] | None = None):
        raw = _as_f64(raw, "raw")
        if not bool(torch.isfinite(raw).all()):
            raise ValueError("raw parameters must be finite")
        self._raw = raw
        self._theta = None if theta is None else _as_f64(theta, "theta")
        self.source: dict[str, Any] = dict(source or {})
        self._cache: dict[tuple[torch.dtype, torch.device], dict[str, Tensor]] = {}

    # ----------------------------------------------------------------- constructors
    @classmethod
    def from_theta(cls, theta: ArrayLike) -> NeuralMirrorMap:
        """Map from an unconstrained 380-vector: raw = softplus(theta) > 0, convex for any theta."""
        t = _as_f64(theta, "theta")
        if not bool(torch.isfinite(t).all()):
            raise ValueError("theta must be finite")
        return cls(torch.nn.functional.softplus(t), theta=t, source={"kind": "theta"})

    @classmethod
    def from_raw(cls, raw: ArrayLike) -> NeuralMirrorMap:
        """Map from the paper's non-negative layout [v, w, b, a, c]; negative entries are rejected."""
        r = _as_f64(raw, "raw")
        bad = torch.nonzero(~(r >= 0)).reshape(-1).tolist()
        if bad:
            names = ", ".join(f"{_param_name(i)}={r[i].item():.3g}" for i in bad[:8])
            more = f" (and {len(bad) - 8} more)" if len(bad) > 8 else ""
            raise ValueError(
                f"raw neural mirror-map parameters must be >= 0 (convexity); "
                f"{len(bad)} negative or NaN: {names}{more}. Use from_theta for unconstrained vectors."
            )
        return cls(r, source={"kind": "raw"})

    @classmethod
    def random_init(cls, seed: int, scale: float = 0.01) -> NeuralMirrorMap:
        """The paper's random init: every raw parameter ~ U[0, scale), seeded (CPU generator)."""
        if not scale > 0:
            raise ValueError(f"scale must be > 0, got {scale}")
        g = torch.Generator().manual_seed(int(seed))
        raw = torch.rand(DIM, generator=g, dtype=torch.float64) * float(scale)
        m = cls(raw, source={"kind": "random_init", "seed": int(seed), "scale": float(scale)})
        return m

    # ----------------------------------------------------------------- views
    @property
    def raw(self) -> np.ndarray:
        """The non-negative parameters [v, w, b, a, c] (float64 copy)."""
        return self._raw.numpy().copy()

    @property
    def theta(self) -> np.ndarray:
        """The unconstrained vector (float64 copy); inverse softplus of raw (-inf where raw == 0)
        when the map was not built from theta."""
        t = self._theta if self._theta is not None else inverse_softplus(self._raw)
        return t.numpy().copy()

    @property
    def sha(self) -> str:
        """sha256 of theta (see `theta_sha`)."""
        return theta_sha(self.theta)

    def params(self) -> dict[str, Any]:
        return {"sha": self.sha, "transform": TRANSFORM, **{k: v for k, v in self.source.items()}}

    def _p(self, dtype: torch.dtype, device: torch.device) -> dict[str, Tensor]:
        key = (dtype, device)
        if key not in self._cache:
            p = split_params(self._raw)
            n = UNITS_PER_ACTIVATION
            vw = p["v"] * p["w"]
            scale = torch.tensor([1 / 4, 1 / 3, 1 / 3, 1 / 4, 1.0, 1.0], dtype=torch.float64)
            coef = (vw.reshape(6, n) * scale[:, None]).reshape(-1)
            d = {"v": p["v"], "w": p["w"], "b": p["b"], "coef": coef, "a": p["a"], "c": p["c"]}
            d["w6"], d["b6"] = p["w"].reshape(6, n).clone(), p["b"].reshape(6, n).clone()
            self._cache[key] = {k: t.to(device=device, dtype=dtype) for k, t in d.items()}
        return self._cache[key]

    # ----------------------------------------------------------------- divergence
    def terms(self, logp: Tensor, ref_logp: Tensor) -> Tensor:
        """Per-token Bregman divergence D_h(y, y0) from log-probabilities (module docstring)."""
        logp, ref_logp = torch.broadcast_tensors(logp, ref_logp)
        dt = compute_dtype(logp, ref_logp)
        P = self._p(dt, logp.device)
        return neural_terms(logp, ref_logp, P["w6"], P["b6"], P["coef"], P["a"], P["c"])

    def compile(self, **kwargs: Any) -> NeuralMirrorMap:
        """Opt-in: evaluate `sampled` with one shared `torch.compile`d kernel graph (fuses the
        element-wise ops, about a hundred; worth it on GPUs). Parameters are inputs, so new maps of the
        same dtype reuse the compiled code."""
        fn = _compiled_neural_terms(**kwargs)

        def run(logp: Tensor, ref_logp: Tensor) -> Tensor:
            logp, ref_logp = torch.broadcast_tensors(logp, ref_logp)
            P = self._p(compute_dtype(logp, ref_logp), logp.device)
            return fn(logp, ref_logp, P["w6"], P["b6"], P["coef"], P["a"], P["c"])

        self._compiled_terms = run
        return self

    # ----------------------------------------------------------------- potential
    def _sigma(self, u: Tensor) -> Tensor:
        n = UNITS_PER_ACTIVATION
        up = u.clamp_min(0)
        return torch.cat(
            [
                u[..., :n] ** 3,
                u[..., n : 2 * n] ** 2,
                torch.sqrt(up[..., 2 * n : 3 * n]),
                torch.pow(up[..., 3 * n : 4 * n], 1.0 / 3.0),
                torch.log(up[..., 4 * n : 5 * n] + LOG_EPS),
                torch.exp(u[..., 5 * n :]),
            ],
            dim=-1,
        )

    def phi_inv(self, y: Tensor) -> Tensor:
        """The mirror map h'(y) = sum_j v_j sigma_j(w_j y + b_j) + a y + c log y (elementwise)."""
        dt = compute_dtype(y)
        y = y.to(dt)
        P = self._p(dt, y.device)
        u = y.unsqueeze(-1) * P["w"] + P["b"]
        return self._sigma(u) @ P["v"] + P["a"] * y + P["c"] * torch.log(y)

    def h(self, y: Tensor) -> Tensor:
        """The potential h(y) = integral_0^y phi_inv (h(0) = 0), via stable per-unit mean values."""
        dt = compute_dtype(y)
        y = y.to(dt)
        P = self._p(dt, y.device)
        n = UNITS_PER_ACTIVATION
        w, b = P["w"], P["b"]
        wy = y.unsqueeze(-1) * w
        u = wy + b
        tiny = torch.finfo(dt).tiny

        def sl(t: Tensor, i: int) -> Tensor:
            return t[..., i * n : (i + 1) * n]

        uu, bb = sl(u, 0), b[:n]
        m_cube = (uu + bb) * (uu * uu + bb * bb) / 4
        uu, bb = sl(u, 1), b[n : 2 * n]
        m_sq = (uu * uu + uu * bb + bb * bb) / 3
        ra, rb = torch.sqrt(sl(u, 2)), torch.sqrt(b[2 * n : 3 * n])
        m_sqrt = (2.0 / 3.0) * (ra * ra + ra * rb + rb * rb) / (ra + rb).clamp_min(tiny)
        ca, cb = torch.pow(sl(u, 3), 1 / 3), torch.pow(b[3 * n : 4 * n], 1 / 3)
        m_cbrt = 0.75 * (ca + cb) * (ca * ca + cb * cb) / (ca * ca + ca * cb + cb * cb).clamp_min(tiny)
        p, pb = sl(u, 4) + LOG_EPS, b[4 * n : 5 * n] + LOG_EPS
        x = (p - pb) / pb
        xs = torch.where(x == 0, torch.ones_like(x), x)
        m_log = torch.log(p) + torch.where(x == 0, torch.ones_like(x), torch.log1p(xs) / xs) - 1.0
        d = sl(wy, 5)
        ds = torch.where(d == 0, torch.ones_like(d), d)
        m_exp = torch.exp(b[5 * n :]) * torch.where(d == 0, torch.ones_like(d), torch.expm1(ds) / ds)
        m = torch.cat([m_cube, m_sq, m_sqrt, m_cbrt, m_log, m_exp], dim=-1)
        return y * (m @ P["v"]) + 0.5 * P["a"] * y * y + P["c"] * (torch.special.xlogy(y, y) - y)

    # ----------------------------------------------------------------- persistence
    def header(self) -> dict[str, Any]:
        """The JSON header stored with the tensors (version, layout, transform, sha, source)."""
        return {
            "format": "mirrorlab.neural_mirror_map",
            "version": FORMAT_VERSION,
            "layout": LAYOUT,
            "transform": TRANSFORM,
            "primary": "theta" if self._theta is not None else "raw",
            "sha": self.sha,
            "source": self.source,
        }

    def save(self, path: str | Path) -> Path:
        """Write safetensors (`theta`, `raw`, float64) with the JSON header in its metadata."""
        from safetensors.torch import save_file

        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        tensors = {"theta": torch.as_tensor(self.theta), "raw": self._raw.clone()}
        save_file(tensors, str(path), metadata={"mirrorlab": json.dumps(self.header(), sort_keys=True)})
        return path

    @classmethod
    def load(cls, path: str | Path) -> NeuralMirrorMap:
        """Read a map written by `save`; checks format, version, layout, transform and sha."""
        from safetensors import safe_open

        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"no mirror map at {path}")
        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata() or {}
            if "mirrorlab" not in meta:
                raise ValueError(f"{path}: not a mirrorlab mirror map (no 'mirrorlab' header)")
            header = json.loads(meta["mirrorlab"])
            tensors = {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118
        if header.get("format") != "mirrorlab.neural_mirror_map":
            raise ValueError(f"{path}: unknown format {header.get('format')!r}")
        if header.get("version") != FORMAT_VERSION:
            raise ValueError(f"{path}: version {header.get('version')} not supported (want {FORMAT_VERSION})")
        if header.get("layout") != json.loads(json.dumps(LAYOUT)):
            raise ValueError(f"{path}: layout {header.get('layout')} differs from {LAYOUT}")
        if header.get("transform") != TRANSFORM:
            raise ValueError(f"{path}: transform {header.get('transform')!r}, expected {TRANSFORM!r}")
        if header.get("primary") == "theta":
            m = cls.from_theta(tensors["theta"])
        else:
            m = cls.from_raw(tensors["raw"])
        if m.sha != header.get("sha"):
            raise ValueError(f"{path}: sha mismatch (file says {header.get('sha')}, content gives {m.sha})")
        m.source = {**header.get("source", {}), "path": str(path)}
        return m


def neural_terms(
    logp: Tensor, ref_logp: Tensor, w: Tensor, b: Tensor, coef: Tensor, a: Tensor, c: Tensor
) -> Tensor:
    """Pure per-token D of the omega-potential (see module docstring). `w`, `b`: [6, 21] (one row
    per activation block), `coef` = v*w/(4,3,3,4,1,1) flattened to [126]; inputs of equal shape.

    Tensors that depend on logp are built per block (never sliced), so backward stays cheap."""
    L, y, y0, delta = log_ratio_terms(logp, ref_logp)
    tiny = torch.finfo(L.dtype).tiny
    yf, df = y.reshape(-1, 1), delta.reshape(-1, 1)
    u0 = torch.addcmul(b.reshape(-1), y0.reshape(-1, 1), w.reshape(-1))  # [T, 126]
    n = UNITS_PER_ACTIVATION

    def blk(i: int) -> tuple[Tensor, Tensor]:
        return torch.addcmul(b[i], yf, w[i]), u0[:, i * n : (i + 1) * n]

    u, v0 = blk(0)
    s = u + v0
    k_cube = torch.addcmul(s * s, v0, v0, value=2.0)  # 2 u0^2 + (u + u0)^2
    u, v0 = blk(1)
    k_sq = torch.add(u, v0, alpha=2.0)  # u + 2 u0
    u, v0 = blk(2)
    a1, a0 = torch.sqrt(u.clamp_min(tiny)), torch.sqrt(v0.clamp_min(tiny))
    s = a1 + a0
    k_sqrt = (s + a1) / (s * s)  # s >= 2 sqrt(tiny): s*s stays a normal number
    u, v0 = blk(3)
    c1, c0 = torch.pow(u.clamp_min(tiny), 1.0 / 3.0), torch.pow(v0.clamp_min(tiny), 1.0 / 3.0)
    t = c1 + c0
    q = torch.addcmul(c1 * t, c0, c0)  # c1^2 + c1 c0 + c0^2
    k_cbrt = torch.addcmul(q, c1, c1 + t) / q / q  # (3c1^2 + 2c1c0 + c0^2) / q^2
    p0 = u0[:, 4 * n : 5 * n] + LOG_EPS
    k_log = g2(df * w[4] / p0) / p0
    k_exp = torch.exp(u0[:, 5 * n :]) * e2(df * w[5])
    k = torch.cat([k_cube, k_sq, k_sqrt, k_cbrt, k_log, k_exp], dim=1)  # [T, 126], all >= 0
    quad = (k @ coef).reshape(L.shape) + 0.5 * a
    return delta * delta * quad + c * kl_bregman(L, y, delta)


_COMPILED: dict[str, Any] = {}


def _compiled_neural_terms(**kwargs: Any) -> Any:
    key = json.dumps(kwargs, sort_keys=True, default=str)
    if key not in _COMPILED:
        _COMPILED[key] = torch.compile(neural_terms, dynamic=True, **kwargs)
    return _COMPILED[key]


def make_neural(
    theta: ArrayLike | None = None,
    raw: ArrayLike | None = None,
    seed: int | None = None,
    scale: float = 0.01,
    path: str | Path | None = None,
) -> NeuralMirrorMap:
    """Registry factory: from `path`, `theta` or `raw` (at most one), else `random_init(seed or 0, scale)`."""
    given = [k for k, v in (("theta", theta), ("raw", raw), ("path", path)) if v is not None]
    if len(given) > 1:
        raise ValueError(f"neural: give at most one of theta, raw, path (got {', '.join(given)})")
    if given and seed is not None:
        raise ValueError(f"neural: seed only applies to random init, not with {given[0]}")
    if path is not None:
        return NeuralMirrorMap.load(path)
    if theta is not None:
        return NeuralMirrorMap.from_theta(theta)
    if raw is not None:
        return NeuralMirrorMap.from_raw(raw)
    return NeuralMirrorMap.random_init(0 if seed is None else seed, scale)
