"""The import-linter contracts in pyproject.toml hold: layers only point down, and the divergence
library imports no MLflow. Run against the package as it installs (strategies/ and tasks/ are
remapped into mirrorlab.strategies and mirrorlab.tasks), assembled in a temporary directory."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


def _assemble(dst: Path) -> Path:
    """Copy the sources into `dst` with the layout pyproject's package-dir gives the wheel."""
    dirs = tomllib.loads((REPO / "pyproject.toml").read_text())["tool"]["setuptools"]["package-dir"]
    for pkg, src in sorted(dirs.items(), key=lambda kv: kv[0].count(".")):
        shutil.copytree(REPO / src, dst / pkg.replace(".", "/"),
                        ignore=shutil.ignore_patterns("__pycache__"), dirs_exist_ok=True)
    return dst


def _lint(site: Path, config: Path) -> subprocess.CompletedProcess:
    lint = shutil.which("lint-imports", path=str(Path(sys.executable).parent)) or "lint-imports"
    env = {**os.environ, "PYTHONPATH": str(site)}
    return subprocess.run([lint, "--config", str(config), "--no-cache"], cwd=site, env=env,
                          capture_output=True, text=True, timeout=300)


def test_import_contracts_hold(tmp_path: Path) -> None:
    pytest.importorskip("importlinter")
    site = _assemble(tmp_path / "site")
    r = _lint(site, REPO / "pyproject.toml")
    assert r.returncode == 0, r.stdout[-4000:] + r.stderr[-2000:]
    assert "2 kept, 0 broken" in r.stdout


def test_an_upward_import_breaks_the_contract(tmp_path: Path) -> None:
    """The check can fail: the divergence library importing tracking (MLflow) is reported."""
    pytest.importorskip("importlinter")
    site = _assemble(tmp_path / "site")
    with (site / "mirrorlab" / "divergences" / "builtin.py").open("a") as f:
        f.write("\nfrom mirrorlab import tracking  # noqa: E402,F401\n")
    r = _lint(site, REPO / "pyproject.toml")
    assert r.returncode != 0
    assert "BROKEN" in r.stdout and "mirrorlab.divergences.builtin -> mirrorlab.tracking" in r.stdout
