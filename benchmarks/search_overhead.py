"""Search overhead: the share of wall time outside inner training steps and evaluation.

Runs the tiny real search (tiny model, arithmetic) with the `local`, `process` and `ray`
executors and reports, per run, wall time, the time workers spent in inner training + evaluation,
and the overhead share = 1 - (train + eval) / (wall * workers): model loading, resets, tracking
(MLflow, map artifacts, plots), checkpoints and scheduling. Wall time is everything from
`Search(cfg)` to the return of `run()` (construction, worker spawn and model load, MLflow parent
run, every generation, registry, shutdown). "steady" subtracts the one-time worker start-up
(`setup_s`: the time the search waited with no candidate running while workers spawned and
loaded the model, beyond what overlapped the MLflow start; candidates go to each worker as soon
as it is ready). The MLflow store itself (a fresh sqlite database: ~10 s of schema
migrations, once per store, not per search) is created before timing. Target: <= 5% with
`process`. Also the speed-up of 2 workers over 1 (meaningful only with 2 idle cores).

The tiny search: 3 generations x 4 candidates, tiny model on arithmetic, 40 inner steps of
4 prompts x 8 samples per candidate (about 2-4 s of inner work each, as a small real search;
the issue's test-sized 3-step runs would measure start-up, not the search).

    python benchmarks/search_overhead.py [--generations 3 --population 4 --inner-steps 40]

Writes benchmarks/results/search_overhead.json.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

from mirrorlab.config import config_from_dict
from mirrorlab.search import Search

RESULTS = Path(__file__).resolve().parent / "results" / "search_overhead.json"


def make_cfg(tmp: Path, name: str, executor: str, workers: int, args: argparse.Namespace) -> Any:
    """The tiny search used for the measurement."""
    return config_from_dict({
        "name": name, "seed": 0, "output_dir": str(tmp / "runs"),
        "train": {"prompts_per_step": args.prompts, "generation": {"num_generations": 8, "max_new_tokens": 8},
                  "optim": {"lr": 1e-3}},
        "divergence": {"name": "neural", "coef": 1.0},
        "search": {"space": {"kind": "neural", "init_scale": 1.0},
                   "strategy": {"name": "openai_es", "population": args.population,
                                "generations": args.generations, "params": {"sigma": 1.0}},
                   "evaluator": {"inner_steps": args.inner_steps, "val_size": args.val_size},
                   "executor": {"kind": executor, "workers": workers, "cpus_per_worker": 1},
                   "checkpoint_dir": str(tmp / f"ckpt-{name}")},
        "tracking": {"tracking_uri": f"sqlite:///{tmp / 'mlflow.db'}", "plots": not args.no_plots,
                     **({"plot_scope": args.plot_scope} if args.plot_scope else {})},
    })


def measure(tmp: Path, executor: str, workers: int, args: argparse.Namespace) -> dict[str, Any]:
    """Run one search and split its wall time."""
    cfg = make_cfg(tmp, f"bench-{executor}-{workers}", executor, workers, args)
    load = os.getloadavg()[0]
    t = time.monotonic()
    res = Search(cfg).run()
    wall = time.monotonic() - t
    tm = res.timings
    compute = tm["train_s"] + tm["eval_s"]
    overhead = 1.0 - compute / (wall * workers)
    steady_wall = wall - tm["setup_s"]
    return {
        "executor": executor, "workers": workers, "wall_s": wall, "train_eval_s": compute,
        "overhead_share": overhead,
        "overhead_share_steady": 1.0 - compute / (steady_wall * workers),
        "setup_s": tm["setup_s"], "reset_s": tm["reset_s"], "tracking_wait_s": tm["tracking_s"],
        "tracking_background_s": tm["tracking_bg_s"], "checkpoint_s": tm["checkpoint_s"],
        "strategy_s": tm["strategy_s"], "best_fitness": res.best_fitness,
        # inside jobs but outside train+eval (map construction, reset, result packing)
        "worker_job_other_s": tm["job_s"] - compute,
        # the parent waiting in executor.map beyond the workers' job time (dispatch, IPC), 1 worker
        "map_wall_s": tm["compute_s"],
        "candidates": sum(len(g.fitness) for g in res.history),
        "outside_s": wall * workers - compute, "loadavg_1m_before": load,
    }


def main() -> None:
    """Measure each executor, print a table, write JSON."""
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--generations", type=int, default=3)
    ap.add_argument("--population", type=int, default=4)
    ap.add_argument("--inner-steps", type=int, default=40)
    ap.add_argument("--prompts", type=int, default=4)
    ap.add_argument("--val-size", type=int, default=64)
    ap.add_argument("--no-plots", action="store_true")
    ap.add_argument("--plot-scope", choices=["all", "incumbents"], default=None,
                    help="which child runs get a map plot (default: the config's, incumbents)")
    ap.add_argument("--out", type=Path, default=RESULTS)
    ap.add_argument("--executors", default="local:1,process:1,process:2,ray:1,ray:2")
    args = ap.parse_args()
    torch.set_num_threads(1)
    rows = []
    with tempfile.TemporaryDirectory() as d:
        from mlflow import MlflowClient

        # create the store (schema migrations) before timing: once per store, not per search
        MlflowClient(tracking_uri=f"sqlite:///{Path(d) / 'mlflow.db'}").search_experiments()
        for item in args.executors.split(","):
            kind, workers = item.split(":")
            rows.append(measure(Path(d), kind, int(workers), args))
            r = rows[-1]
            print(f"{kind:8s} x{workers}: wall {r['wall_s']:7.1f} s  train+eval {r['train_eval_s']:7.1f} s  "
                  f"overhead {100 * r['overhead_share']:5.1f}%  "
                  f"(steady {100 * r['overhead_share_steady']:5.1f}%)  setup {r['setup_s']:5.1f} s  "
                  f"tracking wait {r['tracking_wait_s']:5.1f} s", flush=True)
    speedups = {}
    for kind in ("process", "ray"):
        one = [r for r in rows if r["executor"] == kind and r["workers"] == 1]
        two = [r for r in rows if r["executor"] == kind and r["workers"] == 2]
        if one and two:
            a, b = one[0], two[0]
            speedups[kind] = {"total": a["wall_s"] / b["wall_s"],
                              "steady": (a["wall_s"] - a["setup_s"]) / (b["wall_s"] - b["setup_s"])}
    print("\nexecutor  workers  wall_s  overhead  steady  setup_s")
    for r in rows:
        print(f"{r['executor']:8s}  {r['workers']:7d}  {r['wall_s']:6.1f}  {100 * r['overhead_share']:7.1f}%"
              f"  {100 * r['overhead_share_steady']:5.1f}%  {r['setup_s']:7.1f}")
    for k, v in speedups.items():
        print(f"speed-up of 2 workers over 1 ({k}): {v['total']:.2f}x total, {v['steady']:.2f}x steady")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    settings = {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()}
    args.out.write_text(json.dumps({
        "settings": settings, "runs": rows, "speedup_2_over_1": speedups,
        "target": "overhead_share <= 0.05 with process", "host": platform.node(),
        "cpus": os.cpu_count(), "loadavg_end": os.getloadavg(),
        "note": "2-core machine shared with other jobs: noisy",
    }, indent=2))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
