"""The built wheel (not only the editable install) ships mirrorlab.strategies and mirrorlab.tasks."""

from __future__ import annotations

import subprocess
import sys
import sysconfig
import venv
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def wheel(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("dist")
    subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w", str(out),
         str(ROOT)],
        check=True,
        capture_output=True,
    )
    (whl,) = out.glob("mirrorlab-*.whl")
    return whl


def test_wheel_layout_has_subpackages_and_no_generic_top_level(wheel: Path) -> None:
    names = zipfile.ZipFile(wheel).namelist()
    top = {n.split("/")[0] for n in names if not n.split("/")[0].endswith((".dist-info", ".data"))}
    assert top == {"mirrorlab"}, top
    assert "mirrorlab/strategies/__init__.py" in names
    assert "mirrorlab/tasks/__init__.py" in names
    # every source file of the three source trees reaches the wheel (catches a package
    # missing from pyproject's explicit list)
    for src, dest in (("mirrorlab", "mirrorlab"), ("strategies", "mirrorlab/strategies"),
                      ("tasks", "mirrorlab/tasks")):
        for f in (ROOT / src).rglob("*.py"):
            rel = f.relative_to(ROOT / src).as_posix()
            assert f"{dest}/{rel}" in names, f"{src}/{rel} is missing from the wheel"


def test_wheel_imports_in_fresh_venv(wheel: Path, tmp_path: Path) -> None:
    env_dir = tmp_path / "venv"
    venv.EnvBuilder(with_pip=False).create(env_dir)
    py = env_dir / "bin" / "python"
    target = tmp_path / "site"
    subprocess.run(
        [sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--target", str(target), str(wheel)],
        check=True,
        capture_output=True,
    )
    # Dependencies come from this environment's site-packages (appended after the wheel's
    # copy); the editable mirrorlab is only reachable through a .pth hook, which PYTHONPATH ignores.
    deps = sysconfig.get_paths()["purelib"]
    code = (
        "import mirrorlab, mirrorlab.strategies, mirrorlab.tasks, mirrorlab.divergences;"
        "print(mirrorlab.__file__); print(mirrorlab.tasks.__file__); print(mirrorlab.strategies.__file__)"
    )
    res = subprocess.run(
        [str(py), "-c", code],
        cwd=tmp_path,
        env={"PYTHONPATH": f"{target}:{deps}", "PATH": "/usr/bin:/bin"},
        capture_output=True,
        text=True,
    )
    assert res.returncode == 0, res.stderr
    for line in res.stdout.split():
        assert line.startswith(str(target)), line
