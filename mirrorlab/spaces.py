"""Search spaces: what a strategy's unconstrained vector theta means as a regulariser.

- `neural`: the 380-dim theta of `NeuralMirrorMap` (convex for any theta by construction).
- `neural_raw`: the same maps parametrised as the paper does (theta = raw >= 0, map = |theta|),
  for faithful `gbmpo_es` reproduction with the paper's sigma and step.
- `neural_coef`: `neural` plus log lambda as the last coordinate (map and strength searched together).
- `coef`: log lambda alone for one fixed divergence (the 1-D check: an interior optimum exists).
- `mixture`: a 2-dim space showing that any parametrised potential can be searched:
  theta = [logit w, log lambda], the Bregman divergence of h = w h_probl2 + (1-w) h_negent
  (Bregman divergences are linear in h, so D = w D_probl2 + (1-w) D_negent) with coefficient
  lambda = exp(theta[1]) (`divergences.MixtureDivergence`, so a found mixture also trains from
  a config).

A space builds the divergence (and optionally the coefficient) for a theta, hashes theta, saves
it as a map artifact (safetensors + `map.json` naming the space's kind) and plots it; its
`load` reads a saved one back as a `SavedMap`, and `load_space_map` dispatches on the kind
through the `spaces` registry, so a registered space's maps load in every command.
This module sits below the config (`make_space` takes the `search.space` section, duck-typed).
"""

from __future__ import annotations

import hashlib
import json
import math
from abc import ABC, abstractmethod
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from mirrorlab import divergences
from mirrorlab.divergences import MixtureDivergence
from mirrorlab.registry import Registry

MAP_JSON = "map.json"


def vector_sha(theta: np.ndarray) -> str:
    """Stable content hash of any theta vector (float64 little-endian bytes), 16 hex digits; a
    neural map's own hash is `divergences.theta_sha` (64 hex digits of the 380 parameters)."""
    a = np.ascontiguousarray(np.asarray(theta, dtype="<f8"))
    return hashlib.sha256(a.tobytes()).hexdigest()[:16]


def _sigmoid(x: float) -> float:
    return 1.0 / (1.0 + math.exp(-x)) if x >= 0 else math.exp(x) / (1.0 + math.exp(x))


@dataclass(frozen=True)
class SavedMap:
    """A map read back from disk: its divergence and, for spaces that search lambda too, the
    searched coefficient (None: the config's `divergence.coef` applies)."""

    divergence: divergences.Divergence
    coef: float | None
    kind: str


class SearchSpace(ABC):
    """A parametrised family of regularisers over an unconstrained float64 vector."""

    kind: str = "base"
    dim: int = 0

    @classmethod
    def from_config(cls, space: Any, base_coef: float) -> SearchSpace:
        """Build from a `search.space` section (`init`, `init_scale`) and `divergence.coef`."""
        return cls(init=space.init, init_scale=space.init_scale)

    @classmethod
    @abstractmethod
    def load(cls, directory: Path, meta: dict[str, Any]) -> SavedMap:
        """Read back a map this space saved into `directory` (`meta` = its map.json)."""

    @abstractmethod
    def initial(self, seed: int) -> np.ndarray:
        """The starting point x0 for the strategy."""

    @abstractmethod
    def divergence(self, theta: np.ndarray) -> Any:
        """The divergence that theta encodes."""

    def coef(self, theta: np.ndarray) -> float | None:
        """The regulariser coefficient theta encodes, or None to keep the configured one."""
        return None

    def sha(self, theta: np.ndarray) -> str:
        """Content hash of theta (the `mirrorlab.theta_sha` tag)."""
        return vector_sha(theta)

    def describe(self, theta: np.ndarray) -> dict[str, Any]:
        """Small JSON-able summary of theta (logged as a tag)."""
        t = np.asarray(theta, dtype=np.float64)
        return {"norm": float(np.linalg.norm(t)), "mean": float(t.mean()), "dim": int(t.size)}

    @abstractmethod
    def save(self, theta: np.ndarray, directory: str | Path) -> Path:
        """Write the map artifact (safetensors + JSON) into `directory`; returns it."""

    def plot(self, theta: np.ndarray, path: str | Path) -> Path:
        """PNG of phi_inv and h of this map beside KL's and ProbL2's."""
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        return divergences.plot_maps({"candidate": self.divergence(theta)}, path, baselines=True)


def _write_json(directory: Path, data: dict[str, Any]) -> None:
    (directory / MAP_JSON).write_text(json.dumps(data, indent=2))


class NeuralSpace(SearchSpace):
    """The 380-dim unconstrained theta of `NeuralMirrorMap`."""

    kind = "neural"

    def __init__(self, init: str = "random", init_scale: float = 0.01) -> None:
        self.init = init
        self.init_scale = init_scale
        self.dim = int(np.asarray(divergences.NeuralMirrorMap.random_init(0, scale=init_scale).theta).size)

    def initial(self, seed: int) -> np.ndarray:
        if self.init == "zeros":
            return np.zeros(self.dim)
        m = divergences.NeuralMirrorMap.random_init(seed, scale=self.init_scale)
        return _to_numpy(m.theta)

    def divergence(self, theta: np.ndarray) -> Any:
        return divergences.NeuralMirrorMap.from_theta(np.asarray(theta, dtype=np.float64))

    def sha(self, theta: np.ndarray) -> str:
        return str(self.divergence(theta).sha)

    def save(self, theta: np.ndarray, directory: str | Path) -> Path:
        d = Path(directory)
        d.mkdir(parents=True, exist_ok=True)
        m = self.divergence(theta)
        m.save(d / "map.safetensors")
        _write_json(d, {"kind": self.kind, "file": "map.safetensors", "theta_sha": self.sha(theta),
                        "map_sha": str(m.sha), **self._extra_meta(theta)})
        return d

    def _extra_meta(self, theta: np.ndarray) -> dict[str, Any]:
        """What a subclass adds to map.json (its searched coefficient)."""
        return {}

    @classmethod
    def load(cls, directory: Path, meta: dict[str, Any]) -> SavedMap:
        f = directory / meta.get("file", "map.safetensors")
        if not f.is_file():
            found = sorted(directory.glob("*.safetensors"))
            if not found:
                raise FileNotFoundError(f"no .safetensors map in {directory}")
            f = found[0]
        return SavedMap(divergences.NeuralMirrorMap.load(f), None, meta.get("kind", "neural"))


class NeuralRawSpace(NeuralSpace):
    """The paper's parametrisation: theta is the raw non-negative 380-vector, map = |theta|.

    For faithful `gbmpo_es` reproduction: the paper perturbs raw parameters initialised in
    [0, 0.01) with sigma 0.01 and step 0.01. In the softplus `neural` space the same sigma moves
    raw by about 1% of its value (at theta = -5.3, raw = softplus(theta) and d raw / d theta =
    sigmoid(theta) are both ~0.005, so d raw / raw ~ sigma), so its defaults would be inert there.
    The absolute value keeps every proposal convex (raw >= 0) and is the identity on the paper's
    non-negative orthant.
    """

    kind = "neural_raw"

    def initial(self, seed: int) -> np.ndarray:
        if self.init == "zeros":
            return np.zeros(self.dim)
        return divergences.NeuralMirrorMap.random_init(seed, scale=self.init_scale).raw.copy()

    def divergence(self, theta: np.ndarray) -> Any:
        raw = np.abs(np.asarray(theta, dtype=np.float64))
        m = divergences.NeuralMirrorMap.from_raw(raw)
        m.source = {"kind": "raw", "space": self.kind}
        return m


class MixtureSpace(SearchSpace):
    """theta = [logit of the prob_l2 weight, log lambda]; see the module docstring."""

    kind = "mixture"
    dim = 2

    def __init__(self, init: str = "random", init_scale: float = 0.5, base_coef: float = 0.04) -> None:
        self.init = init
        self.init_scale = init_scale
        self.base_coef = base_coef if base_coef > 0 else 1e-3

    @classmethod
    def from_config(cls, space: Any, base_coef: float) -> MixtureSpace:
        """The configured init around log(divergence.coef); init_scale at least 0.1 (the neural
        default 0.01 would barely move a 2-dim theta)."""
        return cls(init=space.init, init_scale=max(space.init_scale, 0.1), base_coef=base_coef)

    @classmethod
    def load(cls, directory: Path, meta: dict[str, Any]) -> SavedMap:
        theta = np.asarray(meta["theta"], dtype=np.float64)
        space = cls()
        return SavedMap(space.divergence(theta), space.coef(theta), cls.kind)

    def initial(self, seed: int) -> np.ndarray:
        x = np.array([0.0, math.log(self.base_coef)])
        if self.init == "random":
            x = x + np.random.default_rng(seed).normal(0.0, self.init_scale, size=2)
        return x

    def weight(self, theta: np.ndarray) -> float:
        """The prob_l2 weight w = sigmoid(theta[0])."""
        return _sigmoid(float(theta[0]))

    def divergence(self, theta: np.ndarray) -> MixtureDivergence:
        return MixtureDivergence(self.weight(theta))

    def coef(self, theta: np.ndarray) -> float:
        return math.exp(float(np.clip(theta[1], -30.0, 10.0)))

    def describe(self, theta: np.ndarray) -> dict[str, Any]:
        return {"weight": self.weight(theta), "coef": self.coef(theta)}

    def save(self, theta: np.ndarray, directory: str | Path) -> Path:
        from safetensors.numpy import save_file

        d = Path(directory)
        d.mkdir(parents=True, exist_ok=True)
        t = np.asarray(theta, dtype=np.float64)
        save_file({"theta": t}, str(d / "map.safetensors"), metadata={"kind": self.kind})
        _write_json(d, {"kind": self.kind, "file": "map.safetensors", "theta": t.tolist(),
                        "theta_sha": self.sha(t), **self.describe(t)})
        return d


def _log_coef(theta: np.ndarray) -> float:
    """lambda = exp(theta[-1]), clipped to [e^-30, e^10] so a wild proposal stays finite."""
    return math.exp(float(np.clip(theta[-1], -30.0, 10.0)))


class NeuralCoefSpace(NeuralSpace):
    """theta = [the 380 `neural` coordinates, log lambda]: the map and its strength searched together.

    Random init: the paper's random map and log lambda ~ N(log divergence.coef, coef_scale), so
    random search explores strength as well as shape (at a fixed lambda, random-init maps were
    found indistinguishable; strength moved test accuracy beyond seed noise, issue 22)."""

    kind = "neural_coef"

    def __init__(self, init: str = "random", init_scale: float = 0.01, base_coef: float = 10.0,
                 coef_scale: float = 1.0) -> None:
        super().__init__(init=init, init_scale=init_scale)
        self.map_dim = self.dim
        self.dim = self.map_dim + 1
        self.base_coef = base_coef if base_coef > 0 else 1.0
        self.coef_scale = coef_scale

    @classmethod
    def from_config(cls, space: Any, base_coef: float) -> NeuralCoefSpace:
        return cls(init=space.init, init_scale=space.init_scale, base_coef=base_coef,
                   coef_scale=getattr(space, "coef_scale", 1.0))

    def initial(self, seed: int) -> np.ndarray:
        log_c = math.log(self.base_coef)
        if self.init == "random":
            log_c += float(np.random.default_rng([int(seed), 0x10C0EF]).normal(0.0, self.coef_scale))
        return np.concatenate([super().initial(seed), [log_c]])

    def divergence(self, theta: np.ndarray) -> Any:
        return super().divergence(np.asarray(theta, dtype=np.float64)[: self.map_dim])

    def coef(self, theta: np.ndarray) -> float:
        return _log_coef(theta)

    def sha(self, theta: np.ndarray) -> str:
        return vector_sha(theta)

    def describe(self, theta: np.ndarray) -> dict[str, Any]:
        t = np.asarray(theta, dtype=np.float64)[: self.map_dim]
        return {"coef": self.coef(theta), "norm": float(np.linalg.norm(t)), "mean": float(t.mean()),
                "dim": int(self.dim)}

    def _extra_meta(self, theta: np.ndarray) -> dict[str, Any]:
        return {"coef": self.coef(theta)}

    @classmethod
    def load(cls, directory: Path, meta: dict[str, Any]) -> SavedMap:
        saved = NeuralSpace.load(directory, meta)
        return SavedMap(saved.divergence, float(meta["coef"]), cls.kind)


class CoefSpace(SearchSpace):
    """theta = [log lambda] for one fixed divergence (`search.space.params.divergence`, default
    prob_l2): the 1-D sanity check of a search (docs/testbed.md shows an interior optimum)."""

    kind = "coef"
    dim = 1

    def __init__(self, init: str = "random", base_coef: float = 1.0, coef_scale: float = 1.0,
                 divergence: str = "prob_l2", divergence_params: dict[str, Any] | None = None) -> None:
        self.init, self.coef_scale = init, coef_scale
        self.base_coef = base_coef if base_coef > 0 else 1.0
        self.div_name, self.div_params = divergence, dict(divergence_params or {})
        divergences.get(self.div_name, **self.div_params)  # fail early on a bad name or parameter

    @classmethod
    def from_config(cls, space: Any, base_coef: float) -> CoefSpace:
        params = dict(getattr(space, "params", {}) or {})
        unknown = set(params) - {"divergence", "divergence_params"}
        if unknown:
            raise ValueError(f"search.space.params: unknown keys {sorted(unknown)} for kind coef; allowed: "
                             "divergence, divergence_params")
        return cls(init=space.init, base_coef=base_coef, coef_scale=getattr(space, "coef_scale", 1.0),
                   divergence=params.get("divergence", "prob_l2"),
                   divergence_params=params.get("divergence_params"))

    def initial(self, seed: int) -> np.ndarray:
        x = np.array([math.log(self.base_coef)])
        if self.init == "random":
            x = x + np.random.default_rng([int(seed), 0x10C0EF]).normal(0.0, self.coef_scale, size=1)
        return x

    def divergence(self, theta: np.ndarray) -> Any:
        return divergences.get(self.div_name, **self.div_params)

    def coef(self, theta: np.ndarray) -> float:
        return _log_coef(theta)

    def describe(self, theta: np.ndarray) -> dict[str, Any]:
        return {"coef": self.coef(theta), "divergence": self.div_name}

    def plot(self, theta: np.ndarray, path: str | Path) -> Path:
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        label = f"{self.div_name} @ {self.coef(theta):.3g}"
        return divergences.plot_maps({label: self.divergence(theta)}, path, baselines=True)

    def save(self, theta: np.ndarray, directory: str | Path) -> Path:
        d = Path(directory)
        d.mkdir(parents=True, exist_ok=True)
        t = np.asarray(theta, dtype=np.float64)
        _write_json(d, {"kind": self.kind, "theta": t.tolist(), "theta_sha": self.sha(t),
                        "divergence": self.div_name, "divergence_params": self.div_params,
                        **self.describe(t)})
        return d

    @classmethod
    def load(cls, directory: Path, meta: dict[str, Any]) -> SavedMap:
        theta = np.asarray(meta["theta"], dtype=np.float64)
        space = cls(divergence=meta["divergence"], divergence_params=meta.get("divergence_params"))
        return SavedMap(space.divergence(theta), space.coef(theta), cls.kind)


spaces: Registry[SearchSpace] = Registry("search space")
spaces.register("neural", NeuralSpace)
spaces.register("neural_raw", NeuralRawSpace)
spaces.register("mixture", MixtureSpace)
spaces.register("neural_coef", NeuralCoefSpace)
spaces.register("coef", CoefSpace)


def make_space(space: Any, base_coef: float) -> SearchSpace:
    """The search space of a `search.space` section (`kind`, `init`, `init_scale`); `base_coef`
    is `divergence.coef` (where a space that searches lambda starts)."""
    return spaces.factory(space.kind).from_config(space, base_coef)


def _to_numpy(x: Any) -> np.ndarray:
    if isinstance(x, torch.Tensor):
        return x.detach().cpu().double().numpy().copy()
    return np.asarray(x, dtype=np.float64).copy()


def load_space_map(path: str | Path) -> SavedMap:
    """Read a map saved by `SearchSpace.save` (its directory, or a file in it), dispatching on the
    kind in `map.json` through the `spaces` registry; a bare `.safetensors` neural map (no
    map.json beside it) loads as `neural`."""
    p = Path(path)
    if not p.exists():
        raise FileNotFoundError(f"no map at {p}")
    d = p if p.is_dir() else p.parent
    meta_file = d / MAP_JSON
    meta = json.loads(meta_file.read_text()) if meta_file.is_file() else {}
    if p.is_file() and p.suffix in (".safetensors", ".json") and p.name != MAP_JSON:
        meta = {**meta, "file": p.with_suffix(".safetensors").name}  # that file, not the default
        meta.setdefault("kind", "neural")
    kind = meta.get("kind", "neural")
    return spaces.factory(kind).load(d, meta)
