"""`random`: independent random-init maps at equal budget (the paper's "random init" arm)."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np

from .base import Candidate, Strategy, as_vector

Sampler = Callable[[int], Any]


def derive_seed(seed: int, index: int) -> int:
    """A well-mixed 63-bit seed for the `index`-th random candidate of a search seeded `seed`."""
    return int(np.random.SeedSequence([int(seed) & (2**63 - 1), int(index)]).generate_state(
        2, dtype=np.uint32).astype(np.uint64).dot([1, 2**32]) % (2**63 - 1))


def gaussian_sampler(center: np.ndarray, scale: float) -> Sampler:
    """seed -> center + scale * N(0, I): the generic-space fallback."""
    center = np.asarray(center, dtype=np.float64)

    def sample(seed: int) -> np.ndarray:
        return center + scale * np.random.default_rng(seed).standard_normal(center.shape)

    return sample


@dataclass
class RandomInitState:
    """`random` state: how many candidates have been drawn (the next one's seed index)."""

    count: int = 0


class RandomInit(Strategy):
    """Independent random candidates, `population` per generation, no learning (the baseline).

    Candidate k of the search gets seed `derive_seed(seed, k)` (parent "random_init:seed=<s>"),
    so every candidate can be rebuilt from its seed alone. `sampler`: a callable seed -> vector
    (the search passes its space's `initial`, e.g. `NeuralSpace.initial` = the paper's random
    init of a neural map), or "gaussian" / None (x0 + scale * N(0, I), scale default 0.01).
    """

    name = "random"

    def __init__(self, dim: int, population: int, seed: int, x0: Any = None,
                 generations: int | None = None, sampler: str | Sampler | None = None,
                 scale: float = 0.01) -> None:
        super().__init__(dim, population, seed, x0, generations)
        if not scale > 0:
            raise ValueError(f"scale must be > 0, got {scale}")
        if sampler is None:
            sampler = "gaussian"
        if sampler == "gaussian":
            self._sample = gaussian_sampler(self.x0, scale)
        elif callable(sampler):
            self._sample = sampler
        else:
            raise ValueError(
                f"random sampler must be 'gaussian', None or a callable seed -> vector, got {sampler!r}"
            )
        self.sampler_name = sampler if isinstance(sampler, str) else getattr(sampler, "__name__", "custom")
        self.scale = float(scale)
        self.state = RandomInitState()

    def _ask(self) -> list[Candidate]:
        out = []
        for i in range(self.population):
            s = derive_seed(self.seed, self.state.count + i)
            theta = as_vector(self._sample(s), self.dim, what=f"sampler({s})")
            out.append(Candidate(theta, self._cid(i), note=f"random_init:seed={s}"))
        self.state.count += self.population
        return out

    def _tell(self, candidates: list[Candidate], fitnesses: np.ndarray) -> None:
        return None

    @classmethod
    def _upgrade_state(cls, own: dict[str, Any], version: int) -> dict[str, Any]:
        """Version 1 also recorded the sampler name and scale (settings, never read back)."""
        return {"count": own["count"]}
