"""The frozen trunk shared across forwards (`train.share_trunk`) against full forwards, side by side.

With LoRA on the top layers only (`model.lora.top_layers`), the layers below are the same for the
policy, the reference (adapter off) and every optimisation pass; `share_trunk: true` runs them
once per batch. Two trainers on the real testbed's setting (experiments/real_testbed.yaml:
SmolLM2-135M-Instruct, LoRA r16 on the top 8 of 30 layers, chat_order, 4 prompts x 8 completions
x 20 tokens, KL k3 @ 0.04 unless `--coef`), same seed, one with the shared trunk and one without,
alternate step by step so machine noise hits both alike; the first `--warmup` steps of each are
discarded. Their step metrics and LoRA weights must stay bitwise equal (checked: the script fails
otherwise). Prints a table and writes benchmarks/results/trunk_share[_TAG].json.

    python benchmarks/trunk_share.py [--steps 4] [--warmup 1] [--coef 0.04] [--mu 1] [--device cpu]
"""

from __future__ import annotations

import argparse
import json
import os
import random
import statistics
import time
from pathlib import Path

import numpy as np
import torch

from mirrorlab.config import load_config
from mirrorlab.gbmpo.trainer import build_trainer
from mirrorlab.maps import build_divergence
from mirrorlab.repro import run_record

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results"
KEYS = ("loss", "pg_loss", "reg_loss", "div_mean", "grad_norm", "reward_mean")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--config", default=str(ROOT / "experiments" / "real_testbed.yaml"))
    ap.add_argument("--steps", type=int, default=4, help="timed steps per trainer (after --warmup)")
    ap.add_argument("--warmup", type=int, default=1)
    ap.add_argument("--coef", type=float, default=0.04, help="KL k3 lambda (0: no reference pass)")
    ap.add_argument("--mu", type=int, default=1, help="optimisation passes per batch")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--tag", default="", help="suffix of the result file")
    args = ap.parse_args()
    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "1")))
    sets = ["divergence.name=kl_k3", f"divergence.coef={args.coef}", "divergence.params={}",
            f"train.mu={args.mu}", f"model.device={args.device}", "train.seed=0"]
    trainers = {}
    for share in (True, False):
        cfg = load_config(args.config, sets + [f"train.share_trunk={str(share).lower()}"])
        trainers[share] = build_trainer(cfg, build_divergence(cfg.divergence))
    depth = trainers[True].trunk_depth
    assert depth > 0 and trainers[False].trunk_depth == 0, "the config has no frozen trunk to share"
    n_layers = trainers[True].model.config.num_hidden_layers
    load0 = list(os.getloadavg())
    rec: dict[bool, dict[str, list[float]]] = {s: {"step": [], "gen": []} for s in trainers}
    cuda = args.device.startswith("cuda")
    for i in range(args.warmup + args.steps):
        ms = {}
        rng = (random.getstate(), np.random.get_state(), torch.get_rng_state(),  # sampling draws from
               torch.cuda.get_rng_state_all() if cuda else None)  # these: each step starts both alike
        for share, tr in trainers.items():
            random.setstate(rng[0])
            np.random.set_state(rng[1])
            torch.set_rng_state(rng[2])
            if cuda:
                torch.cuda.set_rng_state_all(rng[3])
                torch.cuda.synchronize()
            t = time.perf_counter()
            ms[share] = tr.train_step()
            if cuda:
                torch.cuda.synchronize()
            if i >= args.warmup:
                rec[share]["step"].append(time.perf_counter() - t)
                rec[share]["gen"].append(ms[share]["gen_time"])
        bad = [k for k in KEYS if ms[True][k] != ms[False][k]]
        if bad:
            raise SystemExit(f"step {i}: shared and full forwards differ in {bad}")
    w = [{n: p for n, p in tr.model.named_parameters() if p.requires_grad} for tr in trainers.values()]
    same_weights = all(torch.equal(w[0][n], w[1][n]) for n in w[0])
    if not same_weights:
        raise SystemExit("the LoRA weights differ after training")

    rows = []
    for share in (True, False):
        st, gen = statistics.median(rec[share]["step"]), statistics.median(rec[share]["gen"])
        rows.append({"share_trunk": share, "median_step_s": st, "median_gen_s": gen,
                     "median_rest_s": st - gen, "steps": rec[share]["step"]})
    on, off = rows
    out = {
        "settings": {"config": os.path.relpath(args.config, ROOT), "coef": args.coef, "mu": args.mu,
                     "steps": args.steps, "warmup": args.warmup, "device": args.device,
                     "trunk_depth": depth, "layers": n_layers,
                     "device_name": (torch.cuda.get_device_name() if cuda
                                     else run_record(0)["numerics"]["cpu"]["model"])},
        "rows": rows, "ratio_step": on["median_step_s"] / off["median_step_s"],
        "ratio_rest": on["median_rest_s"] / off["median_rest_s"], "bitwise_equal": True,
        "load_avg_start": load0, "load_avg_end": list(os.getloadavg()), "run": run_record(0),
    }
    print(f"frozen trunk: {depth} of {n_layers} layers; KL k3 lambda {args.coef}, mu {args.mu}; "
          f"median of {args.steps} steps after {args.warmup} warm-up; load {load0[0]:.2f}")
    print(f"{'share_trunk':>12} {'step s':>8} {'generation s':>13} {'rest s':>8}")
    for r in rows:
        print(f"{r['share_trunk']!s:>12} {r['median_step_s']:8.2f} {r['median_gen_s']:13.2f} "
              f"{r['median_rest_s']:8.2f}")
    print(f"ratio shared / full: step {out['ratio_step']:.2f}x, outside generation {out['ratio_rest']:.2f}x; "
          "metrics and weights bitwise equal")
    RESULTS.mkdir(parents=True, exist_ok=True)
    path = RESULTS / f"trunk_share{'_' + args.tag if args.tag else ''}.json"
    path.write_text(json.dumps(out, indent=1))
    print(f"wrote {path.relative_to(ROOT)}")


if __name__ == "__main__":
    main()
