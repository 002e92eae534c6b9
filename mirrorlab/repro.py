"""Reproducibility helpers: seeding and the run record (seed, versions, git commit, CPU numerics)."""

from __future__ import annotations

import importlib.metadata
import os
import platform
import random
import subprocess
from pathlib import Path
from typing import Any

import numpy as np
import torch

_TRACKED_PACKAGES = (
    "mirrorlab", "torch", "numpy", "transformers", "peft", "mlflow", "nevergrad", "pydantic",
    "datasets", "safetensors", "ray", "trl",
)


def seed_everything(seed: int) -> None:
    """Seed Python, numpy and torch (CPU and CUDA) RNGs."""
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def package_versions(names: tuple[str, ...] = _TRACKED_PACKAGES) -> dict[str, str]:
    """Installed versions of the packages that decide a run's numbers (absent ones skipped)."""
    out = {}
    for n in names:
        try:
            out[n] = importlib.metadata.version(n)
        except importlib.metadata.PackageNotFoundError:
            continue
    return out


def git_commit(path: str | Path | None = None) -> str | None:
    """The git commit of the mirrorlab source tree (with '-dirty' when modified), or None."""
    root = Path(path) if path else Path(__file__).resolve().parent.parent
    try:
        sha = subprocess.run(
            ["git", "-C", str(root), "rev-parse", "HEAD"], capture_output=True, text=True, timeout=5
        )
        if sha.returncode != 0:
            return None
        dirty = subprocess.run(
            ["git", "-C", str(root), "status", "--porcelain", "--untracked-files=no"],
            capture_output=True, text=True, timeout=5,
        )
        return sha.stdout.strip() + ("-dirty" if dirty.stdout.strip() else "")
    except (OSError, subprocess.SubprocessError):
        return None


# Environment variables that change a CPU run's numbers (kernel ISA, BLAS code path, threads).
NUMERICS_ENV = (
    "ATEN_CPU_CAPABILITY", "MKL_CBWR", "MKL_ENABLE_INSTRUCTIONS", "MKL_DEBUG_CPU_TYPE", "MKL_NUM_THREADS",
    "MKL_DYNAMIC", "OMP_NUM_THREADS", "ONEDNN_MAX_CPU_ISA", "DNNL_MAX_CPU_ISA", "ONEDNN_DEFAULT_FPMATH_MODE",
    "GLIBC_TUNABLES", "CUBLAS_WORKSPACE_CONFIG",
)
# CPU flags that decide which vector code paths torch, MKL and oneDNN take.
_ISA_FLAGS = ("sse4_2", "avx", "fma", "avx2", "avx512f", "avx512bw", "avx512vl", "avx512_vnni",
              "avx512_bf16", "avx512_fp16", "amx_tile", "amx_bf16", "neon", "asimd", "sve")


def cpu_info(cpuinfo: str | Path = "/proc/cpuinfo") -> dict[str, Any]:
    """The CPU's model name and the ISA flags among `_ISA_FLAGS` it has (empty where unreadable)."""
    model, flags = platform.processor() or platform.machine(), set()
    try:
        for line in Path(cpuinfo).read_text().splitlines():
            k, _, v = line.partition(":")
            k = k.strip().lower()
            if k in ("model name", "hardware") and v.strip():
                model = v.strip()
            elif k in ("flags", "features"):
                flags = set(v.split())
                break  # the first core is enough
    except OSError:
        pass
    return {"model": model, "isa_flags": [f for f in _ISA_FLAGS if f in flags], "cores": os.cpu_count()}


def numerics() -> dict[str, Any]:
    """What decides a CPU run's rounding: torch's kernel ISA, threads, BLAS, deterministic mode,
    and the environment variables that pin them (runs on different ISAs differ in the last bits,
    which a few RL steps amplify)."""
    return {
        "torch_cpu_capability": torch.backends.cpu.get_cpu_capability(),
        "threads": torch.get_num_threads(),
        "interop_threads": torch.get_num_interop_threads(),
        "mkl": torch.backends.mkl.is_available(),
        "deterministic_algorithms": torch.are_deterministic_algorithms_enabled(),
        "env": {k: os.environ[k] for k in NUMERICS_ENV if k in os.environ},
        "cpu": cpu_info(),
    }


def run_record(seed: int) -> dict[str, Any]:
    """What every run logs: seed, package versions, git commit, host facts, CPU numerics."""
    return {
        "seed": seed,
        "git_commit": git_commit() or os.environ.get("MIRRORLAB_GIT_COMMIT", "unknown"),
        "python": platform.python_version(),
        "platform": platform.platform(),
        "packages": package_versions(),
        "cuda": torch.cuda.is_available(),
        "numerics": numerics(),
    }
