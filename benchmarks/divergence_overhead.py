"""Cost of every divergence next to the work it rides on: the sampled tokens' log-probs.

For vocabulary V (default 49,152) the baseline is log_softmax(logits) + gather of the sampled
token, per token. Each divergence's `sampled` estimator is timed on the same number of tokens
(target: <= 5% of the baseline), forward and forward+backward, plus its `full` estimator over
the whole vocabulary and its `topk` estimator (K + 1 terms, `--topk`), reported as measured.
Results: a table on stdout and benchmarks/results/divergence_overhead.json.

    python benchmarks/divergence_overhead.py                 # CPU, ~1-2 minutes
    python benchmarks/divergence_overhead.py --device cuda   # GPU (bf16 logits)
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import time
from collections.abc import Callable
from pathlib import Path

import torch

from mirrorlab.divergences import get
from mirrorlab.gbmpo.losses import topk_coarsen

NAMES = ["kl_k1", "kl_k2", "kl_k3", "prob_l2", "neg_entropy", "neural", "custom"]


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timeit(fn: Callable[[], object], device: torch.device, min_time: float, max_reps: int = 2000) -> float:
    """Median seconds per call over repeated calls (after one warm-up)."""
    fn()
    _sync(device)
    times: list[float] = []
    start = time.perf_counter()
    while len(times) < max_reps and (time.perf_counter() - start < min_time or len(times) < 3):
        t0 = time.perf_counter()
        fn()
        _sync(device)
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def make(name: str):
    if name == "custom":  # a user potential: h(y) = y^3/6 + y log y (h' by autograd)
        return get("custom", h=lambda y: y * y * y / 6 + torch.special.xlogy(y, y))
    if name == "neural":
        return get("neural", seed=0, scale=0.01)
    return get(name)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--vocab", type=int, default=49152)
    ap.add_argument("--tokens", type=int, default=None, help="tokens per batch (default 512 cpu, 8192 cuda)")
    ap.add_argument("--topk", type=int, default=32, help="K of the topk estimator's row")
    ap.add_argument("--full-tokens", type=int, default=None, help="tokens for `full` (16 cpu, 512 cuda)")
    ap.add_argument("--chunk-size", type=int, default=8192)
    ap.add_argument("--threads", type=int, default=1, help="torch CPU threads")
    ap.add_argument("--compile", action="store_true", help="also time neural with torch.compile")
    ap.add_argument("--min-time", type=float, default=1.0, help="seconds of timing per row")
    ap.add_argument("--out", default=str(Path(__file__).parent / "results" / "divergence_overhead.json"))
    args = ap.parse_args()

    torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    cuda = device.type == "cuda"
    T = args.tokens or (8192 if cuda else 512)
    Tf = args.full_tokens or (512 if cuda else 16)
    V = args.vocab
    ldtype = torch.bfloat16 if cuda else torch.float32
    g = torch.Generator(device=device).manual_seed(0)
    logits = (torch.randn(T, V, generator=g, device=device) * 2).to(ldtype)
    ref_logits = logits + (0.3 * torch.randn(T, V, generator=g, device=device)).to(ldtype)
    idx = torch.randint(0, V, (T, 1), generator=g, device=device)

    def logprobs(x: torch.Tensor) -> torch.Tensor:
        return torch.log_softmax(x.float(), dim=-1).gather(-1, idx).squeeze(-1)

    with torch.no_grad():
        ref_lp = logprobs(ref_logits)
        lp0 = logprobs(logits)
    leaf = logits.detach().requires_grad_(True)

    def base_fwd() -> object:
        with torch.no_grad():
            return logprobs(logits)

    def base_bwd() -> object:
        leaf.grad = None
        logprobs(leaf).sum().backward()
        return None

    per_m = 1e6 / T
    base_f = timeit(base_fwd, device, args.min_time) * per_m
    base_b = timeit(base_bwd, device, args.min_time) * per_m
    rows = []
    for name in NAMES + (["neural+compile"] if args.compile else []):
        d = make(name.removesuffix("+compile"))
        if name.endswith("+compile"):
            d.compile()
        lpl = lp0.clone().requires_grad_(True)

        def fwd(d=d) -> object:
            with torch.no_grad():
                return d.sampled(lp0, ref_lp)

        def bwd(d=d, lpl=lpl) -> object:
            lpl.grad = None
            d.sampled(lpl, ref_lp).sum().backward()
            return None

        check = None
        if name.endswith("+compile"):  # the compiled kernels must agree with eager
            eager = make("neural").sampled(lp0, ref_lp)
            check = float(((fwd() - eager).abs() / eager.abs().clamp_min(1e-30)).max())
        s_f = timeit(fwd, device, args.min_time) * per_m
        s_b = timeit(bwd, device, args.min_time) * per_m
        ft = Tf if name not in ("neural", "neural+compile", "custom") or cuda else max(1, Tf // 8)
        fl, rl = logits[:ft], ref_logits[:ft]
        if cuda:
            torch.cuda.reset_peak_memory_stats(device)
            before = torch.cuda.memory_allocated(device)

        def full(d=d, fl=fl, rl=rl) -> object:
            with torch.no_grad():
                return d.full(fl, rl, chunk_size=args.chunk_size)

        f_t = timeit(full, device, args.min_time, max_reps=20) * 1e6 / ft

        def topk(d=d, fl=fl, rl=rl) -> object:  # the topk estimator: K + 1 terms per token
            with torch.no_grad():
                return d.full(*topk_coarsen(fl, rl, args.topk))

        k_t = timeit(topk, device, args.min_time, max_reps=20) * 1e6 / ft
        peak = (torch.cuda.max_memory_allocated(device) - before) / ft if cuda else None
        rows.append(
            {
                "name": name,
                "sampled_fwd_s_per_Mtok": s_f,
                "sampled_fwd_bwd_s_per_Mtok": s_b,
                "sampled_fwd_pct_of_logprob": 100 * s_f / base_f,
                "sampled_fwd_bwd_pct_of_logprob": 100 * s_b / base_b,
                "full_s_per_Mtok": f_t,
                "topk_s_per_Mtok": k_t,
                "topk": args.topk,
                "full_tokens_timed": ft,
                "full_peak_bytes_per_token": peak,
                "max_rel_diff_vs_eager": check,
            }
        )

    target = 5.0
    print(
        f"device={device} ({_device_name(device)}) vocab={V} tokens/batch={T} logits={ldtype} "
        f"threads={args.threads} chunk={args.chunk_size}"
    )
    print(f"baseline log_softmax+gather: fwd {base_f:.3f} s/Mtok, fwd+bwd {base_b:.3f} s/Mtok")
    hdr = (
        f"{'divergence':<12} {'fwd s/Mtok':>11} {'fwd %':>7} {'f+b s/Mtok':>11} {'f+b %':>7} "
        f"{'full s/Mtok':>12} {'topk s/Mtok':>12}"
    )
    print(hdr)
    print("-" * len(hdr))
    for r in rows:
        print(
            f"{r['name']:<12} {r['sampled_fwd_s_per_Mtok']:>11.4f} {r['sampled_fwd_pct_of_logprob']:>6.2f}% "
            f"{r['sampled_fwd_bwd_s_per_Mtok']:>11.4f} {r['sampled_fwd_bwd_pct_of_logprob']:>6.2f}% "
            f"{r['full_s_per_Mtok']:>12.2f} {r['topk_s_per_Mtok']:>12.2f}"
        )
    ok = all(r["sampled_fwd_pct_of_logprob"] <= target for r in rows if r["name"] in NAMES[:-1])
    verdict = "met" if ok else "NOT met"
    print(f"target: every built-in sampled divergence <= {target}% of the log-prob cost (fwd): {verdict}")
    out = {
        "benchmark": "divergence_overhead",
        "machine": {
            "node": platform.node(),
            "processor": platform.processor() or platform.machine(),
            "cpu_count": __import__("os").cpu_count(),
            "device": str(device),
            "device_name": _device_name(device),
            "torch": torch.__version__,
            "threads": args.threads,
        },
        "vocab": V,
        "tokens_per_batch": T,
        "logits_dtype": str(ldtype),
        "chunk_size": args.chunk_size,
        "baseline": {"logprob_fwd_s_per_Mtok": base_f, "logprob_fwd_bwd_s_per_Mtok": base_b},
        "target_pct": target,
        "target_met": ok,
        "rows": rows,
        "time": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }
    p = Path(args.out)
    p.parent.mkdir(parents=True, exist_ok=True)
    p.write_text(json.dumps(out, indent=2))
    print(f"wrote {p}")


def _device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return platform.processor() or platform.machine()


if __name__ == "__main__":
    main()
