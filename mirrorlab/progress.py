"""Optional rich progress displays: training steps, runs of a comparison, and a search's live summary.

These are plain callback objects. The trainer calls `on_step(step, metrics)` / `on_eval(step,
metrics)`; the search calls the `SearchProgress` hooks if it was given one (every hook is
optional for the caller, and every hook is safe to call in any order). Nothing here is needed
for correctness: pass no callback and nothing is printed.
"""

from __future__ import annotations

import math
from typing import Any

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

from mirrorlab.values import fmt


def progress_bars(console: Console | None) -> Progress:
    """The rich progress display every command shares (description, bar, n/N, time, info)."""
    return Progress(
        TextColumn("[bold]{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        TextColumn("{task.fields[info]}"),
        console=console or Console(stderr=True),
        transient=False,
    )


class TrainProgress:
    """A progress bar over training steps; a trainer callback (`on_step`, `on_eval`).

    Use as a context manager, or share one `Progress` across runs via `progress=`.
    """

    def __init__(
        self, total: int, description: str = "train", console: Console | None = None,
        progress: Progress | None = None, keys: tuple[str, ...] = ("reward_mean", "div_mean", "loss"),
    ) -> None:
        self._own = progress is None
        self.progress = progress or progress_bars(console)
        self.keys = keys
        self.task = self.progress.add_task(description, total=total, info="")
        self.last: dict[str, Any] = {}

    def __enter__(self) -> TrainProgress:
        if self._own:
            self.progress.start()
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    def on_step(self, step: int, metrics: dict[str, Any]) -> None:
        """Advance one step and show the chosen metrics."""
        self.last = dict(metrics)
        info = " ".join(f"{k}={fmt(metrics[k])}" for k in self.keys if k in metrics)
        self.progress.update(self.task, advance=1, info=info)

    def on_eval(self, step: int, metrics: dict[str, Any]) -> None:
        """Show the latest evaluation beside the bar."""
        shown = {k: v for k, v in metrics.items() if isinstance(v, int | float)}
        info = " ".join(f"{k}={fmt(v)}" for k, v in list(shown.items())[:3])
        self.progress.update(self.task, info=f"eval {info}")

    def close(self) -> None:
        """Mark complete and stop the display if this object started it."""
        t = self.progress.tasks[[x.id for x in self.progress.tasks].index(self.task)]
        if t.total is not None and t.completed < t.total:
            self.progress.update(self.task, total=t.completed)
        if self._own:
            self.progress.stop()
        else:  # a shared display: drop this run's bar, the caller keeps its own summary
            self.progress.remove_task(self.task)


class SearchProgress:
    """Live view of a search: generations and candidates bars plus one summary line per generation.

    Hooks (all optional for the search to call): `on_search_start(generations, population,
    start_generation=0)`, `on_generation_start(generation, n_candidates)`,
    `on_candidate_end(generation, candidate_id, fitness, status)`, `on_generation_end(generation,
    best, mean, failures)`, `on_search_end(result=None)`. `history` keeps what was reported.
    """

    def __init__(self, console: Console | None = None, enabled: bool = True) -> None:
        self.console = console or Console(stderr=True)
        self.enabled = enabled
        self.progress = progress_bars(self.console)
        self._gen_task: Any = None
        self._cand_task: Any = None
        self._started = False
        self.best_so_far = -math.inf
        self.failures = 0
        self.history: list[dict[str, Any]] = []

    def _ensure(self) -> None:
        if self.enabled and not self._started:
            self.progress.start()
            self._started = True

    def on_search_start(self, generations: int, population: int, start_generation: int = 0) -> None:
        """Create the generations bar (resumed searches start part-way)."""
        self._ensure()
        self._gen_task = self.progress.add_task("generations", total=generations, info="")
        if start_generation:
            self.progress.update(self._gen_task, completed=start_generation)

    def on_generation_start(self, generation: int, n_candidates: int) -> None:
        """Reset the candidates bar for a new generation."""
        self._ensure()
        if self._cand_task is None:
            self._cand_task = self.progress.add_task("candidates", total=n_candidates, info="")
        else:
            self.progress.reset(self._cand_task, total=n_candidates, info="")
        self.progress.update(self._cand_task, description=f"gen {generation} candidates")

    def on_candidate_end(
        self, generation: int, candidate_id: str, fitness: float | None, status: str = "FINISHED"
    ) -> None:
        """Advance the candidates bar; count failures."""
        failed = status.upper() == "FAILED" or fitness is None
        self.failures += int(failed)
        if self._cand_task is not None:
            info = f"{candidate_id}: {'FAILED' if failed else fmt(fitness)}"
            self.progress.update(self._cand_task, advance=1, info=info)

    def on_generation_end(self, generation: int, best: float, mean: float, failures: int = 0) -> None:
        """Advance the generations bar and print the compact summary line."""
        if best is not None and math.isfinite(float(best)):
            self.best_so_far = max(self.best_so_far, float(best))
        row = {"generation": generation, "best": best, "mean": mean, "failures": failures,
               "best_so_far": self.best_so_far}
        self.history.append(row)
        if self._gen_task is not None:
            self.progress.update(self._gen_task, advance=1, info=f"best so far {fmt(self.best_so_far)}")
        if self.enabled:
            self.progress.console.print(
                f"gen {generation}: best {fmt(best)}  mean {fmt(mean)}  failures {failures}  "
                f"best so far {fmt(self.best_so_far)}"
            )

    def on_search_end(self, result: Any = None) -> None:
        """Stop the live display."""
        if self._started:
            self.progress.stop()
            self._started = False

    def __enter__(self) -> SearchProgress:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.on_search_end()
