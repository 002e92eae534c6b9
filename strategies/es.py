"""Gaussian evolution strategies: `openai_es` (centred ranks + Adam/SGD) and `gbmpo_es` (the
GBMPO paper's variant, for faithful reproduction). Both are dimension-agnostic and maximise."""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from .base import Candidate, Strategy, centered_ranks


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


@dataclass(kw_only=True)
class GaussianESState:
    """Mutable state of a Gaussian ES: search mean, sigma, the seeded Generator, and the pending
    batch's noise (`eps`, `rows` as from `antithetic_noise`; `slots`: the perturbation slots)."""

    mean: np.ndarray
    sigma: float
    rng: np.random.Generator
    eps: np.ndarray | None = None
    rows: np.ndarray | None = None
    slots: list[int] = field(default_factory=list)


@dataclass(kw_only=True)
class OpenAIESState(GaussianESState):
    """`openai_es` state: the Gaussian ES fields plus the optimiser's moments (`m`: Adam first
    moment / SGD velocity, `v`: Adam second moment) and Adam's step count `t`."""

    m: np.ndarray
    v: np.ndarray
    t: int = 0


@dataclass(kw_only=True)
class GBMPOESState(GaussianESState):
    """`gbmpo_es` state: the Gaussian ES fields plus the best population mean so far, the elites
    carried into the next batch and, per iteration, whether the mean stepped."""

    best_mean: float = -math.inf
    elites: list[Candidate] = field(default_factory=list)
    stepped: list[bool] = field(default_factory=list)


class _GaussianES(Strategy):
    """Shared machinery: a mean, a sigma, a seeded Generator and the pending batch's noise."""

    state: GaussianESState

    def __init__(self, dim: int, population: int, seed: int, x0: Any = None,
                 generations: int | None = None, sigma: float = 0.05) -> None:
        super().__init__(dim, population, seed, x0, generations)
        if not sigma > 0:
            raise ValueError(f"sigma must be > 0, got {sigma}")
        rng = np.random.default_rng(self.seed)
        self.state = self._new_state(mean=self.x0.copy(), sigma=float(sigma), rng=rng)

    def _new_state(self, **common: Any) -> GaussianESState:
        return GaussianESState(**common)

    @property
    def mean(self) -> np.ndarray:
        """The current search mean (the live array)."""
        return self.state.mean

    @property
    def sigma(self) -> float:
        """The current perturbation std."""
        return self.state.sigma

    def recommendation(self) -> np.ndarray:
        """The current search mean."""
        return self.state.mean.copy()

    def _perturbations(self, n: int, first_slot: int) -> list[Candidate]:
        st = self.state
        eps, rows = antithetic_noise(st.rng, n, self.dim)
        st.eps, st.rows = eps, rows
        st.slots = list(range(first_slot, first_slot + n))
        g = self._generation
        out = []
        for slot, (k, s) in zip(st.slots, rows, strict=True):
            theta = st.mean + s * st.sigma * eps[k]
            out.append(Candidate(theta, self._cid(slot), parent_ids=(f"mean@g{g}",),
                                 note=f"mean@g{g}{'+' if s > 0 else '-'}eps[{k}]"))
        return out


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

    def _new_state(self, **common: Any) -> OpenAIESState:
        return OpenAIESState(**common, m=np.zeros(self.dim), v=np.zeros(self.dim))

    def _ask(self) -> list[Candidate]:
        out = []
        if self.eval_mean:
            out.append(Candidate(self.state.mean.copy(), self._cid(0), note=f"mean@g{self._generation}"))
        out += self._perturbations(self.population - len(out), len(out))
        return out

    def _tell(self, candidates: list[Candidate], fitnesses: np.ndarray) -> None:
        st = self.state
        assert st.eps is not None and st.rows is not None
        u = centered_ranks(fitnesses[st.slots])
        g = es_gradient(st.eps, st.rows, u, st.sigma)  # ascent direction
        grad = -g + self.weight_decay * st.mean  # descent form, as for a loss
        st.mean = st.mean + self._step(grad)
        st.sigma = max(st.sigma * self.sigma_decay, self.sigma_min)
        st.eps = st.rows = None
        st.slots = []

    def _step(self, grad: np.ndarray) -> np.ndarray:
        st = self.state
        if self.optimizer == "sgd":
            st.m = self.momentum * st.m + (1.0 - self.momentum) * grad
            return -self.lr * st.m
        st.t += 1
        a = self.lr * math.sqrt(1 - self.beta2**st.t) / (1 - self.beta1**st.t)
        st.m = self.beta1 * st.m + (1 - self.beta1) * grad
        st.v = self.beta2 * st.v + (1 - self.beta2) * grad * grad
        return -a * st.m / (np.sqrt(st.v) + 1e-8)


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

    def _new_state(self, **common: Any) -> GBMPOESState:
        return GBMPOESState(**common)

    @classmethod
    def _upgrade_state(cls, own: dict[str, Any], version: int) -> dict[str, Any]:
        """Version 1 wrote a best_mean of -inf as None."""
        return {**own, "best_mean": -math.inf if own["best_mean"] is None else own["best_mean"]}

    @property
    def best_mean(self) -> float:
        """The highest population mean of any iteration so far (-inf before the first)."""
        return self.state.best_mean

    @property
    def elites(self) -> list[Candidate]:
        """The candidates carried into the next batch (empty after a step)."""
        return self.state.elites

    @property
    def stepped(self) -> list[bool]:
        """Per iteration: did the mean move."""
        return self.state.stepped

    def _ask(self) -> list[Candidate]:
        out = [
            Candidate(e.theta.copy(), self._cid(i), parent_ids=(e.id,), note="elite")
            for i, e in enumerate(self.state.elites)
        ]
        out += self._perturbations(self.population - len(out), len(out))
        return out

    def _tell(self, candidates: list[Candidate], fitnesses: np.ndarray) -> None:
        st = self.state
        assert st.eps is not None and st.rows is not None
        f = fitnesses[st.slots]
        pop_mean = float(f.mean())
        if pop_mean > st.best_mean:
            g = es_gradient(st.eps, st.rows, f - pop_mean, st.sigma)
            st.mean = st.mean + self.step * g
            st.best_mean = pop_mean
            st.elites = []
            st.stepped.append(True)
        else:
            order = np.argsort(-fitnesses, kind="stable")[: self.n_elites]
            st.elites = [candidates[int(i)] for i in order]
            st.stepped.append(False)
        st.sigma *= self.sigma_decay
        st.eps = st.rows = None
        st.slots = []
