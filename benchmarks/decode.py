"""Generation alone: the lean sampler's decode modes against HF `generate`, on one model and batch.

The tiny inner-step model (4.2M parameters, `inner_step.make_tiny4m`), one arithmetic prompt
completed 16 times to exactly 64 new tokens (stops suppressed). Modes: `hf` (model.generate),
`lean` (mirrorlab's step-by-step decoder, the CPU default), `static` (the fixed-shape step a CUDA
graph records, run eagerly), `graph` (that step captured once per call and replayed; CUDA only).
Also checks that the modes agree: greedy tokens identical, and the share of sampled rows (same
seed) identical to `lean`'s (float rounding differs between attention over L and over the masked
buffer, so a rare near-tie may sample differently).

    python benchmarks/decode.py [--device cuda] [--dtype float32|bfloat16] [--repeats 10]

Prints a table and writes benchmarks/results/decode_<device>.json.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from inner_step import make_tiny4m  # noqa: E402

from mirrorlab.gbmpo.sampling import SamplingParams, sample  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results"


def _sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def run(device: str, dtype: str, n: int, max_new: int, repeats: int) -> dict[str, Any]:
    """Time each mode (median of `repeats` calls after one warm-up) and check their agreement."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from mirrorlab.tasks import get as get_task

    with tempfile.TemporaryDirectory() as d:
        make_tiny4m(Path(d))
        model = AutoModelForCausalLM.from_pretrained(d, dtype=getattr(torch, dtype)).to(device).eval()
        tok = AutoTokenizer.from_pretrained(d)
    task = get_task("arithmetic")
    enc = tok([task.prompt(task.train[0])], return_tensors="pt").to(device)
    ids, att = enc.input_ids, enc.attention_mask
    stop, pad = [tok.eos_token_id], tok.pad_token_id
    p = SamplingParams(max_new_tokens=max_new, min_new_tokens=max_new)
    modes = ["hf", "lean", "static"] + (["graph"] if device.startswith("cuda") else [])

    def call(mode: str, params: SamplingParams = p, seed: int = 0) -> torch.Tensor:
        torch.manual_seed(seed)
        if mode == "hf":
            out = model.generate(input_ids=ids.repeat_interleave(n, 0),
                                 attention_mask=att.repeat_interleave(n, 0), do_sample=not params.greedy,
                                 max_new_tokens=max_new, min_new_tokens=max_new,
                                 top_k=0, top_p=1.0, pad_token_id=pad, eos_token_id=stop)
            return out[:, ids.shape[1]:]
        return sample(model, ids, att, params, stop, pad, repeats=n, use_lean=True,
                      cuda_graph=mode == "graph", static=mode in ("static", "graph"))[0]

    times: dict[str, list[float]] = {m: [] for m in modes}
    with torch.no_grad():
        for m in modes:
            call(m)  # warm-up
            for r in range(repeats):
                _sync(device)
                t = time.perf_counter()
                call(m, seed=r)
                _sync(device)
                times[m].append(time.perf_counter() - t)
        greedy = SamplingParams(max_new_tokens=max_new, greedy=True, min_new_tokens=max_new)
        ref_g = call("lean", greedy)
        ref_s = [call("lean", seed=s) for s in range(5)]
        agree = {}
        for m in modes[2:]:
            same = [(call(m, seed=s) == ref_s[s]).all(dim=1).float().mean().item() for s in range(5)]
            agree[m] = {"greedy_identical": bool(torch.equal(call(m, greedy), ref_g)),
                        "sampled_rows_identical": statistics.mean(same)}
    med = {m: statistics.median(v) for m, v in times.items()}
    return {
        "model": "tiny4m", "params": sum(q.numel() for q in model.parameters()), "dtype": dtype,
        "completions": n, "max_new_tokens": max_new, "repeats": repeats,
        "median_s": med, "tokens_per_s": {m: n * max_new / v for m, v in med.items()},
        "speedup_vs_hf": {m: med["hf"] / v for m, v in med.items()},
        "agreement_with_lean": agree, "raw_s": times,
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    ap.add_argument("--completions", type=int, default=16)
    ap.add_argument("--max-new", type=int, default=64)
    ap.add_argument("--repeats", type=int, default=10)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--out", type=Path, default=None)
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    r = run(a.device, a.dtype, a.completions, a.max_new, a.repeats)
    dev = torch.cuda.get_device_name(0) if a.device.startswith("cuda") else platform.processor() or "cpu"
    result = {"benchmark": "decode", "device": a.device, "device_name": dev,
              "threads": torch.get_num_threads(), "torch": torch.__version__, **r}
    out = a.out or RESULTS / f"decode_{a.device.split(':')[0]}_{a.dtype}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=1))
    print(f"device: {a.device} ({dev}), {a.dtype}, {a.completions} x {a.max_new} tokens, "
          f"median of {a.repeats}")
    print(f"{'mode':8} {'s/call':>8} {'tok/s':>9} {'vs hf':>6}  agreement with lean")
    for m, v in r["median_s"].items():
        ag = r["agreement_with_lean"].get(m)
        ag_s = (f"greedy {'identical' if ag['greedy_identical'] else 'DIFFERENT'}, "
                f"sampled rows {100 * ag['sampled_rows_identical']:.0f}% identical") if ag else ""
        print(f"{m:8} {v:8.4f} {r['tokens_per_s'][m]:9.0f} {r['speedup_vs_hf'][m]:6.2f}  {ag_s}")
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
