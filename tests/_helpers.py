"""Test helpers shared by modules (plain functions; fixtures live in conftest.py).

`kill9_when` / `killable`: start a search in its own process group, SIGKILL it once a condition
holds (a journal reached some length), and never leave its group behind; used by the kill -9
resume tests of the search and of its confirmation stage.
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import time
from collections.abc import Callable, Iterator
from pathlib import Path


@contextlib.contextmanager
def killable(cmd: list[str], cwd: str | Path,
             env: dict[str, str] | None = None) -> Iterator[subprocess.Popen]:
    """Run `cmd` in a new session (its own process group), stdout dropped, stderr piped; on exit,
    SIGKILL whatever of the group is still running, so a failing test leaves nothing behind."""
    proc = subprocess.Popen(cmd, cwd=cwd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                            start_new_session=True)
    try:
        yield proc
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(30)
        if _group_alive(proc.pid):
            os.killpg(proc.pid, signal.SIGKILL)


def kill9_when(proc: subprocess.Popen, ready: Callable[[], bool], timeout_s: float,
               poll_s: float = 0.02) -> None:
    """Poll `ready()` until it holds (or `proc` exits, or `timeout_s` passes), then SIGKILL the
    process itself (not its group: the test may check that its workers exit on their own)."""
    deadline = time.monotonic() + timeout_s
    while not ready() and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(poll_s)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait(30)


def assert_killed(proc: subprocess.Popen) -> None:
    """The process died of our SIGKILL (not by finishing or crashing first: then its stderr)."""
    assert proc.returncode == -signal.SIGKILL, proc.stderr.read().decode()[-2000:] if proc.stderr else ""


def _group_alive(pgid: int) -> bool:
    try:
        os.killpg(pgid, 0)
    except ProcessLookupError:
        return False
    return True


def wait_group_gone(pgid: int, timeout_s: float = 60.0) -> bool:
    """Wait until no process of group `pgid` is left; True when none is."""
    end = time.monotonic() + timeout_s
    while _group_alive(pgid) and time.monotonic() < end:
        time.sleep(0.1)
    return not _group_alive(pgid)


class StartsWithOne:
    """Arithmetic prompts; reward 1 when the completion starts with '1' (a reward the tiny model can
    learn in a few steps, shared by the learning tests of every generation backend)."""

    def __init__(self) -> None:
        from mirrorlab.tasks import get as get_task

        self._task = get_task("arithmetic", n_train=300, n_val=50, n_test=50)
        self.train, self.val, self.test = self._task.train, self._task.val, self._task.test
        self.stop_strings = self._task.stop_strings
        self.metric_name = self._task.metric_name

    def prompt(self, ex, tokenizer=None):  # noqa: ANN001, ANN201 - the Task interface
        return self._task.prompt(ex, tokenizer)

    def split(self, name: str) -> list:
        return getattr(self, name)

    def rewards(self, completions: list[str], examples: list) -> list[float]:
        return [1.0 if c.startswith("1") else 0.0 for c in completions]

    scores = rewards

    def judge(self, completions: list[str], examples: list) -> tuple[list[float], list[float]]:
        r = self.rewards(completions, examples)
        return r, list(r)
