"""Search versus random at equal budget: does a strategy find maps that beat random-init maps?

For each strategy (and the `random` strategy, the paper's "random init" arm) and each search seed,
run the search of `--config` with the same population x generations x inner seeds (so the same
number of inner GBMPO steps; the table prints what each spent), then score every search's
answer (its confirmed map, or its incumbent) on the test split over fresh training seeds the search
never saw, by training it for `train.steps` exactly as `mirrorlab compare` does. Reports per
strategy: inner steps spent, test metric mean +- std over search seeds, the paired difference
against `random` (paired by search seed), the paired t-test p (scipy.stats) and the smallest
difference the experiment could detect (two-sided 5%, 80% power, from the observed paired spread).

    python benchmarks/search_vs_random.py --config experiments/testbed.yaml \
        --strategies openai_es,nevergrad:OnePlusOne --search-seeds 0,1,2 --test-seeds 1000,1001

Writes benchmarks/results/search_vs_random.json.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
from scipy import stats

from mirrorlab import compare as cmp
from mirrorlab.config import START_LABEL, CompareConfig, MethodConfig, load_config
from mirrorlab.repro import run_record
from mirrorlab.search import Search
from mirrorlab.spaces import make_space

RESULTS = Path(__file__).resolve().parent / "results" / "search_vs_random.json"
BASELINE = "paired baseline"


def strategy_cfg(base: Any, spec: str, seed: int, tmp: Path) -> Any:
    """The base config with strategy `spec` ("name" or "nevergrad:OPTIMIZER") and search seed."""
    cfg = base.model_copy(deep=True)
    name, _, opt = spec.partition(":")
    cfg.seed = seed
    cfg.name = f"svr-{name}{'-' + opt if opt else ''}-s{seed}"
    cfg.output_dir = str(tmp / "runs")
    cfg.tracking.enabled = False
    cfg.search.checkpoint_dir = str(tmp / "ck" / cfg.name)
    st = cfg.search.strategy
    params = dict(st.params) if name == base.search.strategy.name else {}
    if name == "nevergrad":
        params = {"optimizer": opt or "OnePlusOne", "sigma": params.get("sigma", 0.5)}
    elif name == "random":
        params = {"scale": cfg.search.space.init_scale}
    cfg.search.strategy = type(st)(name=name, population=st.population, generations=st.generations,
                                   params=params)
    return cfg


def min_detectable(sd: float, n: int, alpha: float = 0.05, power: float = 0.8) -> float:
    """Smallest mean paired difference a two-sided paired t-test detects with `power` (n pairs)."""
    if n < 2 or not math.isfinite(sd) or sd == 0:  # no spread observed: nothing to size it from
        return float("nan")
    t_a = stats.t.ppf(1 - alpha / 2, n - 1)
    t_b = stats.t.ppf(power, n - 1)
    return float((t_a + t_b) * sd / math.sqrt(n))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--config", default="experiments/testbed.yaml")
    ap.add_argument("--strategies", default="openai_es,nevergrad:OnePlusOne")
    ap.add_argument("--search-seeds", default="0,1,2")
    ap.add_argument("--test-seeds", default="1000,1001")
    ap.add_argument("--set", action="append", default=[], help="config overrides, as for the CLI")
    ap.add_argument("--out", default=str(RESULTS))
    args = ap.parse_args()
    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "1")))
    base = load_config(args.config, args.set)
    specs = [s for s in args.strategies.split(",") if s] + ["random"]
    search_seeds = [int(s) for s in args.search_seeds.split(",")]
    test_seeds = [int(s) for s in args.test_seeds.split(",")]
    t_all = time.perf_counter()
    searches: list[dict[str, Any]] = []
    with tempfile.TemporaryDirectory() as d:
        tmp = Path(d)
        for spec in specs:
            for seed in search_seeds:
                cfg = strategy_cfg(base, spec, seed, tmp)
                t0 = time.perf_counter()
                res = Search(cfg).run()
                space = make_space(cfg.search.space, cfg.divergence.coef)
                path = space.save(np.asarray(res.best_theta), tmp / "maps" / cfg.name)
                searches.append({"strategy": spec, "seed": seed, "steps": res.inner_steps_spent,
                                 "fitness": res.best_fitness, "stderr": res.best_stderr,
                                 "confirmed": res.confirmation is not None, "map": str(path),
                                 "wall_s": time.perf_counter() - t0})
                print(f"{spec} seed {seed}: fitness {res.best_fitness:.4f} "
                      f"({res.inner_steps_spent} inner steps, {searches[-1]['wall_s']:.0f} s)", flush=True)
        # score every answer on fresh seeds, on the test split, as `mirrorlab compare` trains
        score_cfg = base.model_copy(deep=True)
        score_cfg.tracking.enabled = False
        coef = base.divergence.coef
        methods = [MethodConfig(label=f"{s['strategy']}/s{s['seed']}",
                                divergence={"name": base.divergence.name, "coef": coef, "map": s["map"]})
                   for s in searches]
        if base.search.evaluator.baseline is not None:  # context: the paired baseline on the same seeds
            methods.append(MethodConfig(label=BASELINE, divergence=base.search.evaluator.baseline))
        score_cfg.compare = CompareConfig(methods=methods, seeds=test_seeds, split="test", include_start=True,
                                          baseline=methods[0].label, workers=base.compare.workers)
        scored = cmp.run_compare(score_cfg, out_dir=None, progress=False)
        for s in searches:
            rs = [r.metric for r in scored.runs if r.method == f"{s['strategy']}/s{s['seed']}"]
            s["test"] = float(np.mean(rs))
            s["test_runs"] = rs
    context = {lab: float(np.mean([r.metric for r in scored.runs if r.method == lab]))
               for lab in (START_LABEL, BASELINE) if any(r.method == lab for r in scored.runs)}
    rows = []
    rnd = {s["seed"]: s["test"] for s in searches if s["strategy"] == "random"}
    for spec in specs:
        mine = {s["seed"]: s["test"] for s in searches if s["strategy"] == spec}
        vals = [mine[k] for k in search_seeds]
        steps = [s["steps"] for s in searches if s["strategy"] == spec]
        row = {"strategy": spec, "inner_steps": float(np.mean(steps)), "test_mean": float(np.mean(vals)),
               "test_std": float(np.std(vals, ddof=1)) if len(vals) > 1 else 0.0}
        if spec != "random":
            diffs = np.array([mine[k] - rnd[k] for k in search_seeds])
            sd = float(np.std(diffs, ddof=1)) if diffs.size > 1 else float("nan")
            p = float("nan")
            if diffs.size > 1 and sd > 0:
                a, b = [mine[k] for k in search_seeds], [rnd[k] for k in search_seeds]
                p = float(stats.ttest_rel(a, b).pvalue)
            row.update(diff_vs_random=float(diffs.mean()), diff_sd=sd, p=p,
                       min_detectable=min_detectable(sd, diffs.size))
        rows.append(row)
    print(f"\nsearch vs random at equal budget ({args.config}; {len(search_seeds)} search seeds, "
          f"test split on {len(test_seeds)} fresh training seeds)")
    print(f"{'strategy':<22} {'inner steps':>11} {'test':>15} {'diff vs random':>15} {'p':>6} {'MDE':>6}")
    for r in rows:
        diff = f"{r['diff_vs_random']:+.3f}" if "diff_vs_random" in r else "(reference)"
        p = f"{r['p']:.3f}" if "p" in r and math.isfinite(r["p"]) else "-"
        m = r.get("min_detectable", float("nan"))
        mde = f"{m:.3f}" if math.isfinite(m) else "-"
        print(f"{r['strategy']:<22} {r['inner_steps']:>11.0f} {r['test_mean']:>7.3f} +- {r['test_std']:.3f} "
              f"{diff:>15} {p:>6} {mde:>6}")
    for lab, v in context.items():
        print(f"{lab:<22} {'':>11} {v:>7.3f} (same test seeds)")
    wall = time.perf_counter() - t_all
    print(f"wall time {wall:.0f} s")
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"config": args.config, "overrides": args.set, "rows": rows, "context": context,
                               "searches": searches, "test_seeds": test_seeds, "wall_s": wall,
                               "machine": platform.processor() or platform.machine(),
                               "run_record": run_record(base.seed)}, indent=2))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
