"""A sandbox for running untrusted, model-written Python programs (DESIGN section 7).

Every program runs in its own session and process group under rlimits (CPU seconds, address
space, file size, open files, processes), with a wall-clock timeout that SIGKILLs the whole
group, a fresh private working directory that is removed afterwards, a scrubbed environment,
stdin on /dev/null and stdout/stderr captured up to a cap. When running as root on Linux the
program also gets (checked once per interpreter, see `isolation()`):

- new network, mount, PID and IPC namespaces: no network interfaces but a down loopback, a
  private /proc, and the program is PID 1 of its namespace, so when it dies (or is killed)
  every process it started dies with it, daemons included;
- an unprivileged uid/gid (one per concurrent slot, not `nobody`, so programs cannot signal
  each other) with no supplementary groups: it can write only to its own directory;
- fresh small tmpfs mounts over the world-writable directories (/tmp, /var/tmp, /dev/shm,
  /run/lock) and over any non-traversable ancestor of the Python installation (e.g. /root,
  whose other contents are thereby hidden), so nothing outside the run directory changes.

Without root (or without namespaces) only the rlimits, session, timeout, directory and
environment scrubbing apply; `isolation()` reports what is active. Limits of the design: it
is not a seccomp/VM boundary (kernel exploits, CPU-time side channels and reading
world-readable files remain possible), and a program shares its interpreter with whatever
harness code it is run with: anything that code writes (fd 4 included) the program can write
too, so results reported from inside the sandbox are claims, never verdicts. A harness must
compute verdicts outside, from data (`mirrorlab.tasks.mbpp` does: the program only reports the
values of the expressions it evaluates, and the parent compares them).
"""

from __future__ import annotations

import fcntl
import json
import os
import select
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

__all__ = [
    "SandboxLimits", "SandboxResult", "SandboxPool", "run_program", "isolation", "Program",
]

# The uid range used for sandboxed programs: base + (pid-derived block) + slot.
_UID_BASE = 200_000
_UID_SLOTS = 64
WRITABLE_DIRS = ("/tmp", "/var/tmp", "/dev/shm", "/run/lock")
_SAFE_ENV = {"PATH": "/usr/local/bin:/usr/bin:/bin", "LANG": "C.UTF-8", "LC_ALL": "C.UTF-8",
             "PYTHONHASHSEED": "0", "PYTHONDONTWRITEBYTECODE": "1", "HOME": "/nonexistent"}


@dataclass(frozen=True)
class SandboxLimits:
    """Resource limits of one program (per process, except `nproc` which is per program)."""

    cpu_s: int = 5
    memory_mb: int = 512
    file_size_mb: int = 16
    open_files: int = 64
    nproc: int = 16
    output_bytes: int = 64 * 1024
    report_bytes: int = 2 * 2**20  # what comes back from fd 4 (kept apart from the stdout cap)

    def rlimits(self) -> dict[str, int]:
        """The rlimit values, in the units setrlimit takes."""
        return {
            "RLIMIT_CPU": self.cpu_s,
            "RLIMIT_AS": self.memory_mb * 2**20,
            "RLIMIT_FSIZE": self.file_size_mb * 2**20,
            "RLIMIT_NOFILE": self.open_files,
            "RLIMIT_NPROC": self.nproc,
            "RLIMIT_CORE": 0,
        }


@dataclass
class SandboxResult:
    """What happened: exit status, captured output, timing and which isolation was active."""

    returncode: int | None
    stdout: str
    stderr: str
    timed_out: bool
    duration_s: float
    stdout_truncated: bool = False
    report: str = ""
    isolation: dict[str, bool] = field(default_factory=dict)

    @property
    def ok(self) -> bool:
        """True when the program exited normally with status 0 within its limits."""
        return self.returncode == 0 and not self.timed_out

    def to_dict(self) -> dict[str, Any]:
        """A JSON-able view."""
        return asdict(self)


@dataclass(frozen=True)
class Program:
    """One unit of work for `SandboxPool`: source code plus optional secret and files."""

    code: str
    secret: str | None = None
    files: tuple[tuple[str, str], ...] = ()
    timeout_s: float | None = None  # this program's wall-clock limit (None: the pool's)


# --------------------------------------------------------------------------- the boot stub
# Runs as root (when the caller is root) inside the fresh session: namespaces, mounts, rlimits,
# privilege drop, then exec of the real program. Kept as source so it needs no import path.
_BOOT = r'''
import ctypes, json, os, resource, sys
cfg = json.loads(sys.argv[1])
iso = {"netns": False, "mntns": False, "pidns": False, "ipcns": False, "uid": False,
       "private_tmp": False, "private_proc": False}
NEWNS, NEWPID, NEWNET, NEWIPC = 0x00020000, 0x20000000, 0x40000000, 0x08000000
MS_NOSUID, MS_NODEV, MS_NOEXEC, MS_REC, MS_PRIVATE, MS_BIND = 2, 4, 8, 16384, 1 << 18, 4096
libc = ctypes.CDLL(None, use_errno=True)
def mount(src, dst, fstype, flags, data):
    r = libc.mount(src and src.encode(), dst.encode(), fstype and fstype.encode(), flags,
                   data and data.encode())
    return r == 0
root = os.geteuid() == 0 and cfg["isolate"]
if root:
    for name, flag in (("mntns", NEWNS), ("netns", NEWNET), ("pidns", NEWPID), ("ipcns", NEWIPC)):
        iso[name] = libc.unshare(flag) == 0
if iso["mntns"] and mount(None, "/", None, MS_REC | MS_PRIVATE, None):
    # Make the interpreter reachable: overmount non-traversable ancestors, bind the needed dirs back.
    fixed = {}
    for need in cfg["need"]:
        parts = need.strip("/").split("/")
        for k in range(1, len(parts)):
            anc = "/" + "/".join(parts[:k])
            st = os.stat(anc)
            if not st.st_mode & 0o001 and anc not in fixed:
                fixed[anc] = []
            if anc in fixed:
                fixed[anc].append(need)
                break
    fds = {n: os.open(n, os.O_PATH) for ns in fixed.values() for n in ns}
    for anc, needs in fixed.items():
        mount("tmpfs", anc, "tmpfs", MS_NOSUID | MS_NODEV, "size=1m,mode=0755")
        for n in needs:
            os.makedirs(n, exist_ok=True)
            mount("/proc/self/fd/%d" % fds[n], n, None, MS_BIND | MS_REC, None)
    for fd in fds.values():
        os.close(fd)
    # The interpreter may live under a directory about to be replaced (a venv in /tmp): keep a
    # handle on it now and bind it back at its own path after the fresh tmpfs is mounted.
    under = [n for n in cfg["need"] if any(n == d or n.startswith(d + "/") for d in cfg["writable"])]
    kept = {n: os.open(n, os.O_PATH) for n in under}
    ok = True
    for d in cfg["writable"]:
        if os.path.isdir(d):
            ok &= mount("tmpfs", d, "tmpfs", MS_NOSUID | MS_NODEV,
                        "size=%dk,mode=1777,nr_inodes=1024" % (cfg["tmpfs_kb"]))
    for n, fd in kept.items():
        os.makedirs(n, exist_ok=True)
        mount("/proc/self/fd/%d" % fd, n, None, MS_BIND | MS_REC, None)
        os.close(fd)
    iso["private_tmp"] = ok
    # The run directory may now be hidden under a fresh tmpfs: bind it back at its own path.
    cwd = os.getcwd()
    if any(cwd == d or cwd.startswith(d + "/") for d in cfg["writable"]):
        os.makedirs(cwd, exist_ok=True)
        mount("/proc/self/cwd", cwd, None, MS_BIND, None)
        os.chdir(cwd)
if iso["pidns"]:
    import signal
    child = [0]
    def _stop(*_):  # SIGTERM from the parent: kill the namespace's init, which kills the rest
        if child[0]:
            os.kill(child[0], signal.SIGKILL)
    signal.signal(signal.SIGTERM, _stop)
    pid = child[0] = os.fork()
    if pid == 0:
        signal.signal(signal.SIGTERM, signal.SIG_DFL)
    else:
        # Relay the exit status of the namespace's init (the program).
        _, st = os.waitpid(pid, 0)
        if os.WIFSIGNALED(st):
            os._exit(128 + os.WTERMSIG(st))
        os._exit(os.WEXITSTATUS(st))
    if iso["mntns"]:
        iso["private_proc"] = mount("proc", "/proc", "proc", MS_NOSUID | MS_NODEV | MS_NOEXEC, None)
for name, value in cfg["rlimits"].items():
    r = getattr(resource, name)
    resource.setrlimit(r, (value, value + 1 if name == "RLIMIT_CPU" else value))
def _reachable(path):  # every ancestor searchable by "other" (needed without the mount fix-up)
    parts = path.strip("/").split("/")
    return all(os.stat("/" + "/".join(parts[:k])).st_mode & 0o001 for k in range(1, len(parts) + 1))
if root and not all(_reachable(n) for n in cfg["need"]):
    root = False  # the unprivileged uid could not even start the interpreter: stay as we are
if root:
    os.setgroups([])
    os.setgid(cfg["uid"])
    os.setuid(cfg["uid"])
    iso["uid"] = os.getuid() == cfg["uid"]
    libc.prctl(38, 1, 0, 0, 0)  # PR_SET_NO_NEW_PRIVS: setuid binaries cannot regain root
if cfg.get("probe"):
    print(json.dumps(iso)); sys.stdout.flush(); os._exit(0)
fds = cfg.get("fds") or []
if fds:
    import fcntl
    tmp = [fcntl.fcntl(f, fcntl.F_DUPFD, 10) for f in fds]  # above 3/4, so no clash
    for f in fds:
        os.close(f)
    for target, f in zip((3, 4), tmp):
        os.dup2(f, target)
        os.close(f)
os.execve(cfg["python"], [cfg["python"]] + cfg["flags"] + [cfg["script"]], cfg["env"])
'''


_BLOCK: tuple[int, int, int] | None = None  # (pid, first uid, lock fd)
_BLOCK_LOCK = threading.Lock()


def _uid_block() -> int:
    """First uid of this process's block of `_UID_SLOTS` uids, claimed with an flock so that
    concurrent processes (test workers, executors) never share a uid."""
    global _BLOCK
    with _BLOCK_LOCK:
        if _BLOCK is not None and _BLOCK[0] == os.getpid():
            return _BLOCK[1]
        start = os.getpid() % 4096
        for k in range(4096):
            block = (start + k) % 4096
            path = os.path.join(tempfile.gettempdir(), f"mirrorlab-sandbox-uids-{block}.lock")
            fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError:
                os.close(fd)
                continue
            _BLOCK = (os.getpid(), _UID_BASE + block * _UID_SLOTS, fd)  # held for the process lifetime
            return _BLOCK[1]
        raise RuntimeError("no free sandbox uid block")


class _UidAllocator:
    """Hands out distinct uids to concurrent runs of this process."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._free: list[int] = []
        self._pid = -1

    def acquire(self) -> int:
        with self._lock:
            if self._pid != os.getpid():  # after fork: a fresh block
                self._pid = os.getpid()
                self._free = list(range(_uid_block(), _uid_block() + _UID_SLOTS))[::-1]
            if not self._free:
                raise RuntimeError(f"more than {_UID_SLOTS} concurrent sandbox runs in one process")
            return self._free.pop()

    def release(self, uid: int) -> None:
        with self._lock:
            if _uid_block() <= uid < _uid_block() + _UID_SLOTS:
                self._free.append(uid)


_UIDS = _UidAllocator()
_ISOLATION: dict[str, bool] | None = None
_ISO_LOCK = threading.Lock()


def _python_needs(python: str) -> list[str]:
    """Directories the sandboxed interpreter must be able to reach."""
    real = Path(os.path.realpath(python))
    needs = {str(Path(sys.base_prefix).resolve()), str(Path(sys.prefix).resolve()), str(real.parent.parent)}
    return sorted(needs)


def _boot_cfg(python: str, script: str, uid: int, limits: SandboxLimits, isolate: bool,
              env: dict[str, str], flags: Sequence[str], probe: bool = False) -> dict[str, Any]:
    return {
        "python": python, "script": script, "uid": uid, "rlimits": limits.rlimits(),
        "isolate": isolate, "env": env, "flags": list(flags), "probe": probe,
        "writable": list(WRITABLE_DIRS), "need": _python_needs(python),
        "tmpfs_kb": limits.file_size_mb * 1024,
    }


def isolation(python: str | None = None) -> dict[str, bool]:
    """Which isolation features work here (probed once): namespaces, uid drop, private /tmp."""
    global _ISOLATION
    with _ISO_LOCK:
        if _ISOLATION is None:
            python = python or sys.executable
            uid = _UIDS.acquire()
            try:
                cfg = _boot_cfg(python, "-", uid, SandboxLimits(), True, dict(_SAFE_ENV), [], probe=True)
                r = subprocess.run(
                    [python, "-I", "-S", "-c", _BOOT, json.dumps(cfg)], capture_output=True, text=True,
                    timeout=30, start_new_session=True, stdin=subprocess.DEVNULL, cwd="/",
                )
                try:
                    _ISOLATION = json.loads(r.stdout.strip().splitlines()[-1])
                except (json.JSONDecodeError, IndexError):
                    _ISOLATION = {}
            finally:
                _UIDS.release(uid)
        return dict(_ISOLATION)


def pids_with_uid(uids: Iterable[int]) -> list[int]:
    """Pids of live processes whose real uid is in `uids` (read from /proc)."""
    wanted = set(uids)
    out = []
    for d in os.listdir("/proc"):
        if not d.isdigit():
            continue
        try:
            with open(f"/proc/{d}/status") as f:
                for line in f:
                    if line.startswith("Uid:"):
                        if int(line.split()[1]) in wanted:
                            out.append(int(d))
                        break
        except (OSError, ValueError):
            continue
    return out


def _kill_uid(uid: int) -> None:
    """SIGKILL every process whose real uid is `uid` (fallback cleanup without a PID namespace)."""
    for _ in range(3):
        pids = pids_with_uid([uid])
        if not pids:
            return
        for pid in pids:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        time.sleep(0.01)


def _wait_timeout(proc: subprocess.Popen[bytes], timeout_s: float) -> bool:
    """Wait for `proc` up to `timeout_s` without polling (pidfd); True if it timed out."""
    try:
        fd = os.pidfd_open(proc.pid)
    except (AttributeError, OSError):  # not Linux >= 5.3: Popen's polling wait
        try:
            proc.wait(timeout=timeout_s)
            return False
        except subprocess.TimeoutExpired:
            return True
    try:
        ready, _, _ = select.select([fd], [], [], timeout_s)
        return not ready
    finally:
        os.close(fd)


def _read_capped(f: Any, cap: int) -> tuple[str, bool]:
    f.seek(0)
    data = f.read(cap + 1)
    return data[:cap].decode("utf-8", "replace"), len(data) > cap


def run_program(
    code: str,
    timeout_s: float = 10.0,
    limits: SandboxLimits | None = None,
    *,
    secret: str | None = None,
    files: Iterable[tuple[str, str]] = (),
    python: str | None = None,
    python_flags: Sequence[str] = ("-I", "-S"),
    isolate: bool = True,
) -> SandboxResult:
    """Run Python source `code` in the sandbox and return its result.

    `secret`, when given, is readable once by the program from file descriptor 3 (a pipe);
    whatever the program writes to file descriptor 4 comes back as `report` (up to
    `limits.report_bytes`). Both are reachable by any code the program runs, so neither can
    authenticate a result. `files` are (name, text) pairs written into the run directory first.
    """
    limits = limits or SandboxLimits()
    python = python or sys.executable
    iso = isolation(python) if isolate else {}
    use_uid = bool(iso.get("uid"))
    uid = _UIDS.acquire()
    base = tempfile.mkdtemp(prefix="mirrorlab-sbx-")
    rundir = os.path.join(base, "run")
    os.mkdir(rundir, 0o700)
    start = time.monotonic()
    proc: subprocess.Popen[bytes] | None = None
    r_fd = w_fd = -1
    out = tempfile.TemporaryFile()
    err = tempfile.TemporaryFile()
    rep = tempfile.TemporaryFile()
    timed_out = False
    try:
        os.chmod(base, 0o711)
        for name, text in list(files) + [("main.py", code)]:
            p = Path(rundir, name)
            if p.resolve().parent != Path(rundir).resolve():
                raise ValueError(f"file name {name!r} must be a plain name inside the run directory")
            p.write_text(text)
        if use_uid:
            for p in Path(rundir).iterdir():
                os.chown(p, uid, uid)
            os.chown(rundir, uid, uid)
        r_fd, w_fd = os.pipe()
        if secret is not None:
            os.write(w_fd, secret.encode())
        os.close(w_fd)
        w_fd = -1
        env = dict(_SAFE_ENV, TMPDIR="/tmp")
        cfg = _boot_cfg(python, "main.py", uid, limits, isolate, env, python_flags)
        cfg["fds"] = [r_fd, rep.fileno()]  # the boot stub moves them to fds 3 and 4
        proc = subprocess.Popen(
            [python, "-I", "-S", "-c", _BOOT, json.dumps(cfg)],
            stdin=subprocess.DEVNULL, stdout=out, stderr=err, cwd=rundir, env=env,
            start_new_session=True, close_fds=True, pass_fds=(r_fd, rep.fileno()),
        )
        timed_out = _wait_timeout(proc, timeout_s)
    finally:
        if proc is not None:
            if proc.poll() is None and iso.get("pidns"):
                # Let the boot stub kill the namespace's init and reap it: the kernel then kills
                # and reaps every process of the namespace, so nothing is orphaned to host init.
                proc.send_signal(signal.SIGTERM)
                _wait_timeout(proc, 5.0)
            try:
                os.killpg(proc.pid, signal.SIGKILL)
            except (ProcessLookupError, PermissionError):
                pass
            proc.wait()
        if use_uid and not iso.get("pidns"):
            _kill_uid(uid)
        for fd in (r_fd, w_fd):
            if fd >= 0:
                os.close(fd)
        shutil.rmtree(base, ignore_errors=True)
        _UIDS.release(uid)
    duration = time.monotonic() - start
    stdout, trunc = _read_capped(out, limits.output_bytes)
    stderr, _ = _read_capped(err, limits.output_bytes)
    report, _ = _read_capped(rep, limits.report_bytes)
    for f in (out, err, rep):
        f.close()
    rc = proc.returncode if proc is not None else None
    if rc is not None and rc < 0:  # killed by a signal: report like a shell (and the PID-ns relay)
        rc = 128 - rc
    return SandboxResult(
        returncode=None if timed_out else rc, stdout=stdout, stderr=stderr, timed_out=timed_out,
        duration_s=duration, stdout_truncated=trunc, report=report, isolation=iso,
    )


class SandboxPool:
    """A bounded pool running many programs in parallel (threads waiting on child processes)."""

    def __init__(self, workers: int = 2, timeout_s: float = 10.0, limits: SandboxLimits | None = None,
                 **run_kwargs: Any) -> None:
        if workers < 1:
            raise ValueError(f"workers must be >= 1, got {workers}")
        self.workers = workers
        self.timeout_s = timeout_s
        self.limits = limits or SandboxLimits()
        self.run_kwargs = run_kwargs
        self._pool = ThreadPoolExecutor(max_workers=workers, thread_name_prefix="sandbox")

    def run(self, program: Program | str) -> SandboxResult:
        """Run one program synchronously (in the calling thread)."""
        p = Program(program) if isinstance(program, str) else program
        timeout = self.timeout_s if p.timeout_s is None else p.timeout_s
        return run_program(p.code, timeout, self.limits, secret=p.secret, files=p.files, **self.run_kwargs)

    def map(self, programs: Iterable[Program | str]) -> list[SandboxResult]:
        """Run all programs, at most `workers` at a time; results in input order."""
        return list(self._pool.map(self.run, programs))

    def close(self) -> None:
        """Shut the worker threads down."""
        self._pool.shutdown(wait=True)

    def __enter__(self) -> SandboxPool:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
