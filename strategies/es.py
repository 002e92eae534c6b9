"""Gaussian evolution strategies: `openai_es` (centred ranks + Adam/SGD) and `gbmpo_es` (the
GBMPO paper's variant, for faithful reproduction). Both are dimension-agnostic and maximise."""

from __future__ import annotations

import math
from typing import Any

import numpy as np

from .base import Candidate, Strategy, centered_ranks, rng_from_state, rng_state


def antithetic_noise(rng: np.random.Generator, n: int, dim: int) -> tuple[np.ndarray, np.ndarray]:
    """`n` perturbation directions as antithetic pairs (+eps, -eps), interleaved.

    Returns (eps [n_pairs_plus_odd, dim], rows [n, 2]) where rows[i] = (pair index, sign); with
    odd `n` the last direction is unpaired (+eps only).
    """
    n_dirs = (n + 1) // 2
    eps = rng.standard_normal((n_dirs, dim))
    rows = np.array([(i // 2, 1 - 2 * (i % 2)) for i in range(n)], dtype=np.int64).reshape(n, 2)
    return eps, rows


def es_gradient(eps: np.ndarray, rows: np.ndarray, weights: np.ndarray, sigma: float) -> np.ndarray:
    """Gradient estimate of E[f(m + sigma eps)] w.r.t. m: sum_i w_i s_i eps_{k_i} / (n sigma)."""
    coeff = np.bincount(rows[:, 0], weights=weights * rows[:, 1], minlength=eps.shape[0])
    g = coeff @ eps
    return g / (max(len(weights), 1) * sigma)


class _GaussianES(Strategy):
    """Shared machinery: a mean, a sigma, a seeded Generator and the pending batch's noise."""

    def __init__(self, dim: int, population: int, seed: int, x0: Any = None,
                 generations: int | None = None, sigma: float = 0.05) -> None:
        super().__init__(dim, population, seed, x0, generations)
        if not sigma > 0:
            raise ValueError(f"sigma must be > 0, got {sigma}")
        self.mean = self.x0.copy()
        self.sigma = float(sigma)
        self._rng = np.random.default_rng(self.seed)
        self._eps: np.ndarray | None = None  # noise of the pending batch
        self._rows: np.ndarray | None = None
        self._slots: list[int] = []  # candidate slots that are perturbations (rows align)

    def recommendation(self) -> np.ndarray:
        """The current search mean."""
        return self.mean.copy()

    def _perturbations(self, n: int, first_slot: int) -> list[Candidate]:
        eps, rows = antithetic_noise(self._rng, n, self.dim)
        self._eps, self._rows = eps, rows
        self._slots = list(range(first_slot, first_slot + n))
        g = self._generation
        out = []
        for slot, (k, s) in zip(self._slots, rows, strict=True):
            theta = self.mean + s * self.sigma * eps[k]
            out.append(Candidate(theta, self._cid(slot), parent_ids=(f"mean@g{g}",),
                                 note=f"mean@g{g}{'+' if s > 0 else '-'}eps[{k}]"))
        return out

    def _base_state(self) -> dict[str, Any]:
        return {
            "mean": self.mean.tolist(),
            "sigma": self.sigma,
            "rng": rng_state(self._rng),
            "eps": None if self._eps is None else self._eps.tolist(),
            "rows": None if self._rows is None else self._rows.tolist(),
            "slots": list(self._slots),
        }

    def _load_base_state(self, d: dict[str, Any]) -> None:
        self.mean = np.asarray(d["mean"], dtype=np.float64)
        self.sigma = float(d["sigma"])
        self._rng = rng_from_state(d["rng"])
        self._eps = None if d["eps"] is None else np.asarray(d["eps"], dtype=np.float64).reshape(-1, self.dim)
        self._rows = None if d["rows"] is None else np.asarray(d["rows"], dtype=np.int64).reshape(-1, 2)
        self._slots = list(d["slots"])


class OpenAIES(_GaussianES):
    """OpenAI-style ES (Salimans et al. 2017): antithetic Gaussian perturbations of the mean,
    centred-rank fitness shaping, and an Adam or SGD(+momentum) ascent step with optional L2
    weight decay.

    Params: `sigma` (perturbation std, 0.05), `lr` (0.02), `optimizer` ("adam" | "sgd"),
    `momentum` (SGD, 0.9), `beta1`/`beta2` (Adam, 0.9/0.999), `weight_decay` (0: L2 pull of the
    mean towards zero, as in the paper's l2coeff), `sigma_decay` (1.0 per generation) and
    `sigma_min`, `eval_mean` (False): when True slot 0 of every batch is the current mean itself
    (parent "mean@gK"), evaluated so `best` can be the mean, but not used in the gradient. Each
    batch has exactly `population` candidates; an odd number of perturbation slots leaves the
    last one unpaired.
    """

    name = "openai_es"

    def __init__(self, dim: int, population: int, seed: int, x0: Any = None,
                 generations: int | None = None, sigma: float = 0.05, lr: float = 0.02,
                 optimizer: str = "adam", momentum: float = 0.9, beta1: float = 0.9,
                 beta2: float = 0.999, weight_decay: float = 0.0, sigma_decay: float = 1.0,
                 sigma_min: float = 0.0, eval_mean: bool = False) -> None:
        super().__init__(dim, population, seed, x0, generations, sigma)
        if optimizer not in ("adam", "sgd"):
            raise ValueError(f"openai_es optimizer must be 'adam' or 'sgd', got {optimizer!r}")
        if eval_mean and population < 3:
            raise ValueError("openai_es with eval_mean needs population >= 3 (mean + a pair)")
        if not eval_mean and population < 2:
            raise ValueError("openai_es needs population >= 2 (an antithetic pair)")
        if not lr > 0:
            raise ValueError(f"lr must be > 0, got {lr}")
        self.lr, self.optimizer = float(lr), optimizer
        self.momentum, self.beta1, self.beta2 = float(momentum), float(beta1), float(beta2)
        self.weight_decay = float(weight_decay)
        self.sigma_decay, self.sigma_min = float(sigma_decay), float(sigma_min)
        self.eval_mean = bool(eval_mean)
        self._m = np.zeros(self.dim)  # Adam first moment / SGD velocity
        self._v = np.zeros(self.dim)  # Adam second moment
        self._t = 0

    def _ask(self) -> list[Candidate]:
        out = []
        if self.eval_mean:
            out.append(Candidate(self.mean.copy(), self._cid(0), note=f"mean@g{self._generation}"))
        out += self._perturbations(self.population - len(out), len(out))
        return out

    def _tell(self, candidates: list[Candidate], fitnesses: np.ndarray) -> None:
        assert self._eps is not None and self._rows is not None
        u = centered_ranks(fitnesses[self._slots])
        g = es_gradient(self._eps, self._rows, u, self.sigma)  # ascent direction
        grad = -g + self.weight_decay * self.mean  # descent form, as for a loss
        self.mean = self.mean + self._step(grad)
        self.sigma = max(self.sigma * self.sigma_decay, self.sigma_min)
        self._eps = self._rows = None
        self._slots = []

    def _step(self, grad: np.ndarray) -> np.ndarray:
        if self.optimizer == "sgd":
            self._m = self.momentum * self._m + (1.0 - self.momentum) * grad
            return -self.lr * self._m
        self._t += 1
        a = self.lr * math.sqrt(1 - self.beta2**self._t) / (1 - self.beta1**self._t)
        self._m = self.beta1 * self._m + (1 - self.beta1) * grad
        self._v = self.beta2 * self._v + (1 - self.beta2) * grad * grad
        return -a * self._m / (np.sqrt(self._v) + 1e-8)

    def _state(self) -> dict[str, Any]:
        return {**self._base_state(), "m": self._m.tolist(), "v": self._v.tolist(), "t": self._t}

    def _load_state(self, d: dict[str, Any]) -> None:
        self._load_base_state(d)
        self._m = np.asarray(d["m"], dtype=np.float64)
        self._v = np.asarray(d["v"], dtype=np.float64)
        self._t = int(d["t"])


class GBMPOES(_GaussianES):
    """The GBMPO paper's ES (DESIGN section 5), for faithful reproduction: antithetic pairs,
    raw fitness, sigma decayed by 0.99 per iteration, a step only when the population mean beats
    the best so far, otherwise the top 25% are kept as elites. Defaults: sigma 0.01, step 0.01
    (population 10 and 15 iterations are the search config's job).

    Choices where the paper is silent (documented here, tested):
    - "Population mean" = mean raw fitness of this iteration's perturbations (elites excluded);
      "best so far" = the highest such population mean of any earlier iteration (-inf at the
      start, so iteration 0 always steps).
    - Step: mean += step * g with g = sum_i s_i (F_i - Fbar) eps_i / (n sigma) (raw fitness; the
      baseline Fbar cancels within pairs and only matters for an unpaired last slot).
    - When the mean does not beat the best so far, the mean stays and the top
      max(1, floor(elite_frac * population)) candidates of the iteration (by raw fitness, elites
      included) are carried into the next batch as its first slots (parent_ids: the elite), so
      they are re-evaluated under that generation's common random numbers; they never enter the
      gradient or the population mean. After a step the elites are dropped.
    - sigma *= sigma_decay after every iteration, step or not.

    Scale caveat: the paper perturbs its non-negative raw map parameters (init U[0, 0.01)), where
    sigma 0.01 is ~2x a typical raw value. On mirrorlab's default space theta = softplus^-1(raw)
    (theta ~ -5.3 at raw 0.005; d raw / d theta = sigmoid(theta) ~ raw) the same sigma moves raw by
    about 1% of its value. For a faithful reproduction use the `neural_raw` search space (theta = raw, map =
    |theta|; see mirrorlab.spaces), as experiments/paper/mbpp_search_es.yaml does.
    """

    name = "gbmpo_es"

    def __init__(self, dim: int, population: int, seed: int, x0: Any = None,
                 generations: int | None = None, sigma: float = 0.01, step: float = 0.01,
                 sigma_decay: float = 0.99, elite_frac: float = 0.25) -> None:
        super().__init__(dim, population, seed, x0, generations, sigma)
        if not 0 < elite_frac < 1:
            raise ValueError(f"elite_frac must be in (0, 1), got {elite_frac}")
        self.step, self.sigma_decay, self.elite_frac = float(step), float(sigma_decay), float(elite_frac)
        self.n_elites = max(1, int(math.floor(self.elite_frac * self.population)))
        if self.population - self.n_elites < 2:
            raise ValueError(
                f"gbmpo_es needs population >= {self.n_elites + 2} (elites + one antithetic pair)"
            )
        self.best_mean = -math.inf
        self.elites: list[Candidate] = []
        self.stepped: list[bool] = []  # per iteration: did the mean move

    def _ask(self) -> list[Candidate]:
        out = [
            Candidate(e.theta.copy(), self._cid(i), parent_ids=(e.id,), note="elite")
            for i, e in enumerate(self.elites)
        ]
        out += self._perturbations(self.population - len(out), len(out))
        return out

    def _tell(self, candidates: list[Candidate], fitnesses: np.ndarray) -> None:
        assert self._eps is not None and self._rows is not None
        f = fitnesses[self._slots]
        pop_mean = float(f.mean())
        if pop_mean > self.best_mean:
            g = es_gradient(self._eps, self._rows, f - pop_mean, self.sigma)
            self.mean = self.mean + self.step * g
            self.best_mean = pop_mean
            self.elites = []
            self.stepped.append(True)
        else:
            order = np.argsort(-fitnesses, kind="stable")[: self.n_elites]
            self.elites = [candidates[int(i)] for i in order]
            self.stepped.append(False)
        self.sigma *= self.sigma_decay
        self._eps = self._rows = None
        self._slots = []

    def _state(self) -> dict[str, Any]:
        return {
            **self._base_state(),
            "best_mean": None if not math.isfinite(self.best_mean) else self.best_mean,
            "elites": [e.to_dict() for e in self.elites],
            "stepped": list(self.stepped),
        }

    def _load_state(self, d: dict[str, Any]) -> None:
        self._load_base_state(d)
        self.best_mean = -math.inf if d["best_mean"] is None else float(d["best_mean"])
        self.elites = [Candidate.from_dict(e) for e in d["elites"]]
        self.stepped = list(d["stepped"])
