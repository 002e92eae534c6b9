"""PNG plots of searches and comparisons, from plain data (lists and dicts).

Every function takes plain Python data and an output path, draws with matplotlib's Agg backend
through `matplotlib.figure.Figure` (no pyplot global state, safe in worker threads) and returns
the path written. So plots are testable without training anything, and any caller (the CLI,
a notebook, the search) can produce them from saved results.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from matplotlib.figure import Figure
from matplotlib.ticker import MaxNLocator

from mirrorlab.values import is_finite

_FAILED = "FAILED"


def _save(fig: Figure, path: str | Path) -> Path:
    p = Path(path)
    p.parent.mkdir(parents=True, exist_ok=True)
    fig.tight_layout()
    fig.savefig(p, dpi=110)
    return p


def _generations(history: Sequence[Sequence[float | None]] | Mapping[int, Sequence[float | None]]):
    if isinstance(history, Mapping):
        return sorted((int(g), list(v)) for g, v in history.items())
    return [(g, list(v)) for g, v in enumerate(history)]


def fitness_stats(
    history: Sequence[Sequence[float | None]] | Mapping[int, Sequence[float | None]],
) -> list[dict[str, float]]:
    """Per generation: best, mean, std, min, max of finite fitnesses, failures, best so far."""
    out = []
    best_so_far = -math.inf
    for g, vals in _generations(history):
        ok = [float(v) for v in vals if is_finite(v)]
        n = len(ok)
        mean = sum(ok) / n if n else math.nan
        std = math.sqrt(sum((v - mean) ** 2 for v in ok) / (n - 1)) if n > 1 else 0.0
        best = max(ok) if ok else math.nan
        if ok:
            best_so_far = max(best_so_far, best)
        out.append({
            "generation": g, "best": best, "mean": mean, "std": std,
            "min": min(ok) if ok else math.nan, "max": best, "failures": len(vals) - n,
            "best_so_far": best_so_far if math.isfinite(best_so_far) else math.nan,
        })
    return out


def plot_fitness(
    history: Sequence[Sequence[float | None]] | Mapping[int, Sequence[float | None]],
    path: str | Path,
    title: str = "fitness per generation",
    ylabel: str = "fitness",
) -> Path:
    """Fitness per generation: every candidate (dots), best, mean +- std band, min-max, best so far.

    `history[g]` lists the fitnesses of generation g; None/NaN marks a failed candidate.
    """
    stats = fitness_stats(history)
    fig = Figure(figsize=(6.4, 4.2))
    ax = fig.add_subplot(1, 1, 1)
    for g, vals in _generations(history):
        ok = [v for v in vals if is_finite(v)]
        ax.scatter([g] * len(ok), ok, s=12, color="0.6", alpha=0.7, zorder=1,
                   label="candidates" if g == stats[0]["generation"] else None)
    gens = [s["generation"] for s in stats]
    mean = [s["mean"] for s in stats]
    ax.fill_between(gens, [s["min"] for s in stats], [s["max"] for s in stats], color="C0", alpha=0.12,
                    label="min-max")
    ax.fill_between(gens, [m - s["std"] for m, s in zip(mean, stats, strict=True)],
                    [m + s["std"] for m, s in zip(mean, stats, strict=True)], color="C0", alpha=0.25,
                    label="mean +- std")
    ax.plot(gens, mean, "-o", color="C0", ms=3, label="mean")
    ax.plot(gens, [s["best"] for s in stats], "-^", color="C2", ms=4, label="best")
    ax.plot(gens, [s["best_so_far"] for s in stats], "--", color="C3", label="best so far")
    fails = [(s["generation"], s["failures"]) for s in stats if s["failures"]]
    if fails:
        ax.set_title(f"{title} ({sum(f for _, f in fails)} failed)")
    else:
        ax.set_title(title)
    ax.set_xlabel("generation")
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_ylabel(ylabel)
    ax.legend(fontsize=7, loc="best")
    ax.grid(alpha=0.3)
    return _save(fig, path)


def lineage_marks(candidates: Sequence[Mapping[str, Any]],
                  answer: str | None = None) -> dict[str, str | None]:
    """Which candidate the lineage plot stars (`answer`: the search's answer when given and
    evaluated, else the highest fitness) and which it rings (`top`: the highest single search
    fitness, only when that is not the answer)."""
    ok = [c for c in candidates if is_finite(c.get("fitness")) and c.get("status", "") != _FAILED]
    if not ok:
        return {"answer": None, "top": None}
    top = str(max(ok, key=lambda c: float(c["fitness"]))["id"])
    ans = top if answer is None else (answer if any(str(c["id"]) == answer for c in ok) else None)
    return {"answer": ans, "top": None if top == ans else top}


def plot_lineage(candidates: Sequence[Mapping[str, Any]], path: str | Path, title: str = "lineage",
                 answer: str | None = None) -> Path:
    """Candidates as points (generation, fitness) with a line from each to its parent.

    Each candidate is a mapping with `id`, `generation`, `fitness` (None/NaN if failed), optional
    `parent` and `status`. A parent that is another candidate's id is joined to it; any other
    parent label (e.g. an ES search mean `mean@g3`, never evaluated itself) becomes a hollow node
    half a generation earlier at its children's mean fitness, so families stay visible. Failed
    candidates are drawn as crosses on the bottom edge. `answer`: the id of the search's answer
    (the registered map, chosen by the incumbent rule or the confirmation stage), starred; the
    highest single search fitness, when another candidate, is ringed (it is not the answer).
    """
    fig = Figure(figsize=(6.4, 4.2))
    ax = fig.add_subplot(1, 1, 1)
    ok = [c for c in candidates if is_finite(c.get("fitness")) and c.get("status", "") != _FAILED]
    pos = {str(c["id"]): (float(c["generation"]), float(c["fitness"])) for c in ok}
    lo = min((p[1] for p in pos.values()), default=0.0)
    virtual: dict[str, list[tuple[float, float]]] = {}
    for c in ok:
        par = c.get("parent")
        if par is not None and str(par) not in pos:
            virtual.setdefault(str(par), []).append(pos[str(c["id"])])
    vpos = {k: (min(x for x, _ in v) - 0.5, sum(y for _, y in v) / len(v)) for k, v in virtual.items()}
    for c in ok:
        par = c.get("parent")
        if par is None:
            continue
        src = pos.get(str(par)) or vpos.get(str(par))
        if src is None:
            continue
        (x0, y0), (x1, y1) = src, pos[str(c["id"])]
        ax.plot([x0, x1], [y0, y1], "-", color="0.55", lw=0.7, alpha=0.7, zorder=1)
    if vpos:
        ax.scatter([p[0] for p in vpos.values()], [p[1] for p in vpos.values()], facecolors="none",
                   edgecolors="0.35", s=30, zorder=2, label="parent not evaluated (e.g. ES mean)")
    if ok:
        xs, ys = zip(*pos.values(), strict=True)
        ax.scatter(xs, ys, c=ys, cmap="viridis", s=22, zorder=2, label="candidate")
        marks = lineage_marks(ok, answer)
        if marks["answer"] is not None:
            ans = next(c for c in ok if str(c["id"]) == marks["answer"])
            ax.scatter([ans["generation"]], [ans["fitness"]], marker="*", s=160, color="C3", zorder=3,
                       label=f"answer ({ans['id']})" if answer is not None else f"best ({ans['id']})")
        if marks["top"] is not None:
            top = next(c for c in ok if str(c["id"]) == marks["top"])
            ax.scatter([top["generation"]], [top["fitness"]], marker="o", s=110, facecolors="none",
                       edgecolors="C1", zorder=3,
                       label=f"highest search fitness ({top['id']}, not the answer)")
    failed = [c for c in candidates if c not in ok]
    if failed:
        ax.scatter([c["generation"] for c in failed], [lo] * len(failed), marker="x", color="C3",
                   zorder=2, label=f"failed ({len(failed)})")
    ax.set_xlabel("generation")
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_ylabel("fitness")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    if candidates:
        ax.legend(fontsize=7, loc="best")
    return _save(fig, path)


def _mean_band(series: Sequence[Sequence[float]]) -> tuple[list[float], list[float], list[float]]:
    """Pointwise mean, min and max over runs of possibly unequal length (finite values only)."""
    n = max((len(s) for s in series), default=0)
    mean, lo, hi = [], [], []
    for i in range(n):
        vals = [float(s[i]) for s in series if i < len(s) and is_finite(s[i])]
        mean.append(sum(vals) / len(vals) if vals else math.nan)
        lo.append(min(vals) if vals else math.nan)
        hi.append(max(vals) if vals else math.nan)
    return mean, lo, hi


def _smooth(xs: list[float], window: int) -> list[float]:
    if window <= 1:
        return xs
    out = []
    for i in range(len(xs)):
        w = [x for x in xs[max(0, i - window + 1): i + 1] if math.isfinite(x)]
        out.append(sum(w) / len(w) if w else math.nan)
    return out


def plot_training_curves(
    curves: Mapping[str, Sequence[Sequence[float]]],
    path: str | Path,
    ylabel: str = "reward",
    title: str = "training curves",
    smooth: int = 1,
) -> Path:
    """Per method, the mean over seeds of a per-step quantity with a min-max band.

    `curves[label]` holds one sequence per seed (values per training step); `smooth` applies a
    trailing moving average of that many steps to each seed's curve first.
    """
    fig = Figure(figsize=(6.4, 4.2))
    ax = fig.add_subplot(1, 1, 1)
    for i, (label, series) in enumerate(curves.items()):
        sm = [_smooth([float(v) if is_finite(v) else math.nan for v in s], smooth) for s in series]
        mean, lo, hi = _mean_band(sm)
        steps = list(range(1, len(mean) + 1))
        col = f"C{i % 10}"
        ax.plot(steps, mean, color=col, label=f"{label} (n={len(series)})")
        if len(series) > 1:
            ax.fill_between(steps, lo, hi, color=col, alpha=0.18)
    ax.set_xlabel("training step")
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    ax.grid(alpha=0.3)
    if curves:
        ax.legend(fontsize=7, loc="best")
    return _save(fig, path)


def plot_metric_vs_length(
    points: Mapping[str, Sequence[tuple[float, float]]],
    path: str | Path,
    metric_name: str = "accuracy",
    title: str | None = None,
) -> Path:
    """Per method, each seed as a point (mean completion length, metric) plus mean +- std crosses.

    `points[label]` lists (mean_length, metric) pairs, one per seed.
    """
    fig = Figure(figsize=(6.4, 4.2))
    ax = fig.add_subplot(1, 1, 1)
    for i, (label, pts) in enumerate(points.items()):
        pts = [(float(x), float(y)) for x, y in pts if is_finite(x) and is_finite(y)]
        if not pts:
            continue
        col = f"C{i % 10}"
        xs, ys = zip(*pts, strict=True)
        ax.scatter(xs, ys, color=col, s=18, alpha=0.55)
        n = len(pts)
        mx, my = sum(xs) / n, sum(ys) / n
        sx = math.sqrt(sum((x - mx) ** 2 for x in xs) / (n - 1)) if n > 1 else 0.0
        sy = math.sqrt(sum((y - my) ** 2 for y in ys) / (n - 1)) if n > 1 else 0.0
        ax.errorbar([mx], [my], xerr=[sx], yerr=[sy], fmt="o", color=col, ms=7, capsize=3,
                    label=f"{label}")
    ax.set_xlabel("mean completion length (tokens)")
    ax.set_ylabel(metric_name)
    ax.set_title(title or f"{metric_name} vs completion length (per seed; mean +- std)")
    ax.grid(alpha=0.3)
    if points:
        ax.legend(fontsize=7, loc="best")
    return _save(fig, path)


def plot_probe(labels: Sequence[str], table: Sequence[Sequence[float]],
               components: Mapping[str, Mapping[str, Any]], path: str | Path, title: str = "probe",
               ylabel: str = "fitness") -> Path:
    """Left: every evaluation of every probed point (one dot per seed, seeds coloured alike, points
    sorted by mean, a bar at the mean); right: per fitness proxy, the signal and noise standard
    deviations relative to the noise (so proxies in other units compare), with the ICC."""
    fig = Figure(figsize=(11, 4.4))
    ax, bx = fig.add_subplot(1, 2, 1), fig.add_subplot(1, 2, 2)
    rows = [list(r) for r in table]
    order = sorted(range(len(rows)), key=lambda i: sum(rows[i]) / max(len(rows[i]), 1))
    for x, i in enumerate(order):
        for s, v in enumerate(rows[i]):
            ax.scatter([x + (s - (len(rows[i]) - 1) / 2) * 0.08], [v], s=14, color=f"C{s % 10}", alpha=0.8,
                       label=f"seed {s}" if x == 0 else None)
        m = sum(rows[i]) / len(rows[i])
        ax.plot([x - 0.3, x + 0.3], [m, m], color="k", lw=1.5)
    ax.set_xticks(range(len(order)))
    ax.set_xticklabels([labels[i] for i in order], rotation=45, ha="right", fontsize=7)
    ax.set_ylabel(ylabel)
    ax.set_title(title, fontsize=9)
    ax.legend(fontsize=6, loc="best")
    ax.grid(alpha=0.3)
    names = list(components)
    sig = [components[n]["signal_sd"] / max(components[n]["noise_sd"], 1e-12) for n in names]
    bx.bar(range(len(names)), sig, color="C2", label="signal sd / noise sd")
    bx.axhline(1.0, color="0.4", ls="--", lw=1, label="signal = noise of one evaluation")
    for i, n in enumerate(names):
        bx.text(i, sig[i], f"icc {components[n]['icc']:.2f}", ha="center", va="bottom", fontsize=7)
    bx.set_xticks(range(len(names)))
    bx.set_xticklabels(names, rotation=30, ha="right", fontsize=7)
    bx.set_title("signal relative to one evaluation's noise, per fitness", fontsize=9)
    bx.legend(fontsize=7)
    bx.grid(alpha=0.3, axis="y")
    return _save(fig, path)
