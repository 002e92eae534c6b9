"""Sandbox throughput on MBPP reference solutions, and per-program overhead vs a bare launch.

Target (issue 4): at least 15 programs/s with 2 workers on the 2-core CPU machine, with the
unforgeable assert harness of issue 12 (one forked child per assert, verdicts in the parent).
Usage: python benchmarks/sandbox_throughput.py [--n 300] [--repeats 30]
Writes benchmarks/results/sandbox_throughput.json.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path
from statistics import mean, median

from rich.console import Console
from rich.table import Table

from mirrorlab import sandbox
from mirrorlab.sandbox import SandboxPool, run_program
from mirrorlab.tasks.base import data_dir
from mirrorlab.tasks.mbpp import assert_fractions, load_mbpp_rows

TARGET = 15.0


def _latency_ms(fn, repeats: int) -> dict[str, float]:
    fn()  # warm-up
    ts = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        ts.append((time.perf_counter() - t0) * 1000)
    return {"mean_ms": mean(ts), "median_ms": median(ts)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--n", type=int, default=300, help="MBPP reference programs per measurement")
    ap.add_argument("--repeats", type=int, default=30, help="launches per latency measurement")
    ap.add_argument("--out", default=str(Path(__file__).parent / "results" / "sandbox_throughput.json"))
    args = ap.parse_args()

    py = sys.executable
    load_start = os.getloadavg()[0]
    lat = {
        "bare python -c pass": _latency_ms(
            lambda: subprocess.run([py, "-c", "pass"], check=True), args.repeats),
        "bare python -I -S -c pass": _latency_ms(
            lambda: subprocess.run([py, "-I", "-S", "-c", "pass"], check=True), args.repeats),
        "sandbox run_program('pass')": _latency_ms(lambda: run_program("pass"), args.repeats),
        "sandbox, no namespaces/uid": _latency_ms(lambda: run_program("pass", isolate=False), args.repeats),
    }
    overhead = lat["sandbox run_program('pass')"]["median_ms"] - lat["bare python -c pass"]["median_ms"]

    have_data = (data_dir() / "mbpp" / "mbpp.jsonl").is_file()
    if have_data:
        rows = load_mbpp_rows("local")[: args.n]
        codes = [r["code"] for r in rows]
        tests = [r["test_list"] for r in rows]
        setups = [r["test_setup_code"] for r in rows]
        source = "mbpp references"
    else:  # still measure something meaningful without the data
        codes = ["def add(a, b):\n    return a + b\n"] * args.n
        tests = [["assert add(1, 2) == 3", "assert add(2, 2) == 4", "assert add(0, 0) == 0"]] * args.n
        setups = [""] * args.n
        source = "synthetic (no MBPP data)"
    thr = {}
    for workers in (1, 2):
        with SandboxPool(workers) as pool:
            t0 = time.perf_counter()
            rewards = assert_fractions(codes, tests, pool, setups)
            dt = time.perf_counter() - t0
        thr[workers] = {"programs_per_s": len(codes) / dt, "seconds": dt, "n": len(codes),
                        "mean_reward": mean(rewards)}

    result = {
        "benchmark": "sandbox_throughput",
        "source": source,
        "harness": "a fork per assert from a pre-loaded in-sandbox harness; values as data, "
                   "verdicts in the parent",
        "target_programs_per_s_2_workers": TARGET,
        "meets_target": thr[2]["programs_per_s"] >= TARGET,
        "throughput": {str(k): v for k, v in thr.items()},
        "latency": lat,
        "overhead_vs_bare_python_ms": overhead,
        "isolation": sandbox.isolation(),
        "machine": {"cpus": os.cpu_count(), "platform": platform.platform(),
                    "python": platform.python_version(), "loadavg_1m": os.getloadavg()[0],
                    "loadavg_1m_at_start": load_start},
        "time": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")

    con = Console()
    t = Table(title=f"Sandbox throughput ({source}, n={len(codes)})")
    t.add_column("workers")
    t.add_column("programs/s", justify="right")
    t.add_column("seconds", justify="right")
    t.add_column("mean reward", justify="right")
    for k, v in thr.items():
        t.add_row(str(k), f"{v['programs_per_s']:.1f}", f"{v['seconds']:.1f}", f"{v['mean_reward']:.3f}")
    con.print(t)
    t2 = Table(title="Per-program latency")
    t2.add_column("launch")
    t2.add_column("median ms", justify="right")
    t2.add_column("mean ms", justify="right")
    for k, v in lat.items():
        t2.add_row(k, f"{v['median_ms']:.1f}", f"{v['mean_ms']:.1f}")
    con.print(t2)
    con.print(f"overhead vs bare `python -c pass`: {overhead:.1f} ms; target {TARGET}/s with 2 workers: "
              f"{'met' if result['meets_target'] else 'NOT met'} (load avg {os.getloadavg()[0]:.1f})")
    con.print(f"wrote {out}")


if __name__ == "__main__":
    main()
