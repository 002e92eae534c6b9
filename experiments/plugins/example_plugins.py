"""Example plugin: a new divergence, task and search strategy, usable from YAML and the CLI.

    mirrorlab --plugin experiments/plugins/example_plugins.py train \
        --set divergence.name=quartic --set task.name=double --set train.steps=5
    mirrorlab --plugin experiments/plugins/example_plugins.py search \
        --set search.strategy.name=hill_climb --set search.evaluator.kind=analytic

Anything registered here passes config validation (names are checked against the registries)
once the module is imported, which `--plugin` (or `MIRRORLAB_PLUGINS=a.py,b`) does first.
"""

from __future__ import annotations

import math
import random
from dataclasses import dataclass
from typing import Any

import numpy as np

from mirrorlab import divergences, strategies, tasks
from mirrorlab.strategies.base import Candidate, Strategy
from mirrorlab.tasks import Example, Task

# --------------------------------------------------------------------------- a divergence
# The Bregman divergence of any convex potential h(y) on probabilities (h' by autograd).
divergences.register_potential("quartic", lambda y: y**4 / 4, overwrite=True)


# --------------------------------------------------------------------------- a task
class Double(Task):
    """Double a number: `37+37=` -> `74`. Uses only the tiny model's arithmetic characters."""

    name = "double"
    metric_name = "accuracy"
    stop_strings = ("\n",)

    def __init__(self, seed: int = 0, n_train: int = 600, n_val: int = 100, n_test: int = 100) -> None:
        nums = random.Random(seed).sample(range(10, 1000), n_train + n_val + n_test)
        ex = [Example(id=f"double-{n}", question=f"{n}+{n}=", answer=2 * n) for n in nums]
        super().__init__(ex[:n_train], ex[n_train:n_train + n_val], ex[n_train + n_val:])

    def format_prompt(self, example: Example) -> str:
        return example.question

    def reference_completion(self, example: Example) -> str:
        return f"{example.answer}\n"

    def reward(self, completion: str, example: Example) -> float:
        return float(completion.split("\n", 1)[0].strip() == str(example.answer))


tasks.register("double", Double, overwrite=True)


# --------------------------------------------------------------------------- a strategy
@dataclass
class HillClimbState:
    """Everything the climb changes: checkpointed by the strategies' state codec, field by field."""

    center: np.ndarray
    center_fitness: float
    rng: np.random.Generator


class HillClimb(Strategy):
    """(1, lambda) hill climbing: Gaussian steps around the best point so far (maximises)."""

    name = "hill_climb"

    def __init__(self, dim: int, population: int, seed: int, x0: Any = None,
                 generations: int | None = None, sigma: float = 0.1) -> None:
        super().__init__(dim, population, seed, x0, generations)
        self.sigma = float(sigma)  # a setting, not state
        self.state = HillClimbState(self.x0.copy(), -math.inf, np.random.default_rng(self.seed))

    def _ask(self) -> list[Candidate]:
        s = self.state
        return [Candidate(s.center + self.sigma * s.rng.standard_normal(self.dim), self._cid(i),
                          note="center") for i in range(self.population)]

    def _tell(self, candidates: list[Candidate], fitnesses: np.ndarray) -> None:
        i = int(np.argmax(fitnesses))
        if fitnesses[i] > self.state.center_fitness:
            self.state.center, self.state.center_fitness = candidates[i].theta.copy(), float(fitnesses[i])


strategies.register("hill_climb", HillClimb, overwrite=True)
