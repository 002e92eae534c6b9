"""Reproducibility helpers: seeding and the run record (seed, versions, git commit)."""

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


def run_record(seed: int) -> dict[str, Any]:
    """What every run logs: seed, package versions, git commit, host facts."""
    return {
        "seed": seed,
        "git_commit": git_commit() or os.environ.get("MIRRORLAB_GIT_COMMIT", "unknown"),
        "python": platform.python_version(),
        "platform": platform.platform(),
        "packages": package_versions(),
        "cuda": torch.cuda.is_available(),
    }
