"""The sandbox as a security boundary: hostile programs earn 0, stay in their limits, leave nothing.

Every hostile program is run both raw (`run_program`) and as an MBPP-style solution through the
per-assert harness (`assert_fractions`), whose reward must be 0.
"""

from __future__ import annotations

import os
import shutil
import socket
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from mirrorlab import sandbox
from mirrorlab.sandbox import Program, SandboxLimits, SandboxPool, run_program
from mirrorlab.tasks.mbpp import assert_fractions

LIMITS = SandboxLimits(cpu_s=2, memory_mb=256, file_size_mb=4, nproc=16, output_bytes=4096)
TIMEOUT = 3.0
SLACK = 3.0  # wall seconds allowed beyond the timeout (noisy shared machine)
TESTS = ["assert add(1, 2) == 3", "assert add(2, 2) == 4", "assert add(0, 0) == 0"]
GOOD = "def add(a, b):\n    return a + b\n"
ISO = sandbox.isolation()
CONTAINS_PROCESSES = pytest.mark.skipif(
    os.geteuid() == 0 and not ISO.get("uid"),
    reason=f"as root without a uid drop RLIMIT_NPROC and uid cleanup do not apply, have {ISO}",
)
ROOT_ISOLATION = pytest.mark.skipif(
    not (ISO.get("uid") and ISO.get("mntns")), reason=f"needs root namespaces + uid drop, have {ISO}"
)


def _uid_range() -> range:
    """The sandbox uids this test process hands out (other processes use other blocks)."""
    return range(sandbox._uid_block(), sandbox._uid_block() + sandbox._UID_SLOTS)


def _sandbox_processes() -> list[int]:
    """Pids of live processes running under a sandbox uid (should be none between runs)."""
    return sandbox.pids_with_uid(_uid_range())


@pytest.fixture(scope="module")
def pool() -> SandboxPool:
    with SandboxPool(2, timeout_s=TIMEOUT, limits=LIMITS) as p:
        yield p


@pytest.fixture
def canary(tmp_path: Path) -> Path:
    d = tmp_path / "canary"
    d.mkdir()
    (d / "keep.txt").write_text("precious")
    return d


def _snapshot(d: Path) -> dict[str, bytes]:
    return {str(p): p.read_bytes() for p in sorted(d.rglob("*")) if p.is_file()}


def _run_hostile(code: str, pool: SandboxPool) -> tuple[sandbox.SandboxResult, float, float]:
    """Run raw and via the assert harness, concurrently; returns (raw result, raw wall s, reward)."""
    with ThreadPoolExecutor(1) as ex:
        raw = ex.submit(run_program, code, TIMEOUT, LIMITS)
        reward = assert_fractions([code + "\n" + GOOD.replace("a + b", "a - b + 100")], [TESTS], pool)[0]
        res = raw.result()
    assert not _sandbox_processes(), "a sandboxed process outlived its run"
    return res, res.duration_s, reward


def test_good_solution_scores_one(pool: SandboxPool) -> None:
    assert assert_fractions([GOOD], [TESTS], pool) == [1.0]
    half = "def add(a, b):\n    return 4 if a == 2 else a + b + (a == 0)\n"
    assert assert_fractions([half], [TESTS], pool) == [pytest.approx(2 / 3)]
    assert assert_fractions(["this is not python"], [TESTS], pool) == [0.0]


def test_result_fields_and_scrubbed_env(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("MIRRORLAB_SECRET_TOKEN", "s3cr3t-value")
    code = (
        "import os, sys, glob\n"
        "print(sorted(os.environ))\n"
        "print(os.environ.get('MIRRORLAB_SECRET_TOKEN'))\n"
        "for p in glob.glob('/proc/*/environ'):\n"
        "    try:\n        print(open(p, 'rb').read())\n    except OSError:\n        pass\n"
        "print(sys.stdin.read())\n"
    )
    r = run_program(code, TIMEOUT, LIMITS)
    assert r.returncode == 0, r.stderr
    assert "s3cr3t-value" not in r.stdout and "MIRRORLAB_SECRET_TOKEN" not in r.stdout
    assert "None" in r.stdout
    assert not _sandbox_processes()


def test_fresh_directory_removed() -> None:
    r = run_program("import os\nopen('out.txt', 'w').write('x')\nprint(os.getcwd())\n", TIMEOUT, LIMITS)
    assert r.returncode == 0, r.stderr
    cwd = r.stdout.strip()
    assert cwd.startswith("/") and not os.path.exists(cwd)
    r2 = run_program("import os\nprint(os.listdir('.'))\n", TIMEOUT, LIMITS)
    assert r2.stdout.strip() == "['main.py']"  # nothing left from the previous run


def test_infinite_loop(pool: SandboxPool) -> None:
    res, wall, reward = _run_hostile("while True:\n    pass\n", pool)
    assert reward == 0.0
    assert not res.ok and wall < TIMEOUT + SLACK


@CONTAINS_PROCESSES
def test_fork_bomb(pool: SandboxPool) -> None:
    code = "import os\nwhile True:\n    try:\n        os.fork()\n    except OSError:\n        pass\n"
    res, wall, reward = _run_hostile(code, pool)
    assert reward == 0.0
    assert not res.ok and wall < TIMEOUT + SLACK


def test_memory_bomb(pool: SandboxPool) -> None:
    code = "x = []\nwhile True:\n    x.append(bytearray(50 * 2**20))\n"
    res, wall, reward = _run_hostile(code, pool)
    assert reward == 0.0
    assert res.returncode != 0 and "MemoryError" in res.stderr
    assert wall < TIMEOUT + SLACK


@pytest.fixture
def decoy() -> Path:
    """A root-owned directory inside the repository that hostile programs try to destroy."""
    d = Path(__file__).resolve().parents[1] / f".sandbox-decoy-{os.getpid()}"
    d.mkdir(mode=0o755)
    (d / "keep.txt").write_text("precious")
    yield d
    shutil.rmtree(d, ignore_errors=True)


@ROOT_ISOLATION
def test_write_and_delete_outside(pool: SandboxPool, canary: Path, decoy: Path) -> None:
    repo = decoy.parent
    marker = f"mirrorlab-pwned-{os.getpid()}"
    before = (_snapshot(canary), _snapshot(decoy), sorted(p.name for p in repo.iterdir()))
    code = (
        "import os, shutil\n"
        f"targets = ['/tmp/{marker}', '/var/tmp/{marker}', '/dev/shm/{marker}', '{repo}/{marker}',\n"
        f"           '{canary}/new.txt', '{decoy}/new.txt', '/{marker}']\n"
        "for t in targets:\n"
        "    try:\n        open(t, 'w').write('pwned')\n"
        "    except OSError as e:\n        print('denied', t, e)\n"
        f"for t in ['{canary}/keep.txt', '{decoy}/keep.txt']:\n"
        "    try:\n        os.remove(t)\n    except OSError as e:\n        print('denied', t, e)\n"
        f"shutil.rmtree('{canary}', ignore_errors=True)\n"
        f"shutil.rmtree('{decoy}', ignore_errors=True)\n"
        f"os.system('touch /tmp/{marker}-sh {repo}/{marker}-sh')\n"
    )
    res, wall, reward = _run_hostile(code, pool)
    assert reward == 0.0
    assert (_snapshot(canary), _snapshot(decoy), sorted(p.name for p in repo.iterdir())) == before
    for d in ("/tmp", "/var/tmp", "/dev/shm", "/", repo):
        assert not Path(d, marker).exists() and not Path(d, marker + "-sh").exists()
    assert f"denied {decoy}/keep.txt" in res.stdout  # the repo is not writable for the sandbox uid


@ROOT_ISOLATION
def test_host_tmp_hidden(tmp_path: Path) -> None:
    visible = Path("/tmp") / f"mirrorlab-visible-{os.getpid()}"
    visible.write_text("host")
    try:
        code = f"import os\nprint(os.path.exists({str(visible)!r}), os.path.exists({str(tmp_path)!r}))\n"
        r = run_program(code, TIMEOUT, LIMITS)
    finally:
        visible.unlink()
    assert r.stdout.split() == ["False", "False"], r.stderr


@ROOT_ISOLATION
def test_network_connection(pool: SandboxPool) -> None:
    srv = socket.socket()
    srv.bind(("127.0.0.1", 0))
    srv.listen(4)
    srv.settimeout(0.2)
    port = srv.getsockname()[1]
    accepted: list[object] = []

    def _accept() -> None:
        while not done.is_set():
            try:
                accepted.append(srv.accept())
            except (TimeoutError, OSError):
                continue

    done = threading.Event()
    th = threading.Thread(target=_accept)
    th.start()
    code = (
        "import socket\n"
        "for host in ['127.0.0.1', '1.1.1.1', '8.8.8.8']:\n"
        "    s = socket.socket(); s.settimeout(1)\n"
        f"    print(host, s.connect_ex((host, {port} if host == '127.0.0.1' else 53)))\n"
    )
    try:
        res, _, reward = _run_hostile(code, pool)
    finally:
        time.sleep(0.3)  # let a (failed) connection attempt reach the listener if it could
        done.set()
        th.join()
        srv.close()
    assert reward == 0.0
    assert accepted == []
    lines = res.stdout.split("\n")
    assert len([ln for ln in lines if ln.strip()]) == 3
    assert all(ln.split()[1] != "0" for ln in lines if ln.strip())  # every connect failed


@CONTAINS_PROCESSES
def test_background_child_outliving(pool: SandboxPool, tmp_path: Path) -> None:
    code = (
        "import os, time\n"
        "if os.fork() == 0:\n"
        "    os.setsid()\n"
        "    if os.fork() == 0:\n"
        "        time.sleep(30)\n"
        "        os._exit(0)\n"
        "    os._exit(0)\n"
        "if os.fork() == 0:\n"
        "    while True:\n        pass\n"
        "print('parent done')\n"
    )
    res, wall, reward = _run_hostile(code, pool)
    assert reward == 0.0
    assert "parent done" in res.stdout
    assert wall < TIMEOUT + SLACK
    time.sleep(0.2)
    assert not _sandbox_processes()


def test_stdout_flood(pool: SandboxPool) -> None:
    res, wall, reward = _run_hostile("import sys\nwhile True:\n    sys.stdout.write('x' * 65536)\n", pool)
    assert reward == 0.0
    assert len(res.stdout) <= LIMITS.output_bytes and res.stdout_truncated
    assert not res.ok and wall < TIMEOUT + SLACK


@pytest.mark.parametrize(
    "exit_call", ["sys.exit(0)", "os._exit(0)", "raise SystemExit", "raise KeyboardInterrupt"]
)
def test_early_exit_does_not_pass(pool: SandboxPool, exit_call: str) -> None:
    top = f"import os, sys\n{exit_call}\n" + GOOD
    inside = f"import os, sys\ndef add(a, b):\n    {exit_call}\n"
    after_first = (
        "import os, sys\nn = [0]\ndef add(a, b):\n    n[0] += 1\n"
        f"    if n[0] > 1:\n        {exit_call}\n    return a + b\n"
    )
    got = assert_fractions([top, inside, after_first], [TESTS] * 3, pool)
    assert got == [0.0, 0.0, pytest.approx(1 / 3)]
    res = run_program(top, TIMEOUT, LIMITS)
    assert not res.timed_out and res.returncode is not None
    assert not _sandbox_processes()


HACKS = {
    "assertion_error": "import builtins\nclass AssertionError(Exception):\n    pass\n"
                       "builtins.AssertionError = AssertionError\n",
    "always_equal": "class E:\n    def __eq__(self, o):\n        return True\n    __hash__ = None\n"
                    "def add(a, b):\n    return E()\n",
    "always_equal_in_list": "class E(int):\n    def __eq__(self, o):\n        return True\n"
                            "def add(a, b):\n    return E(0)\n",
    "truthy": "class T:\n    def __bool__(self):\n        return True\n"
              "    def __eq__(s, o):\n        return T()\n"
              "def add(a, b):\n    return T()\n",
    "patch_builtins": "import builtins\nbuiltins.exec = lambda *a, **k: None\n"
                      "builtins.eval = lambda *a, **k: True\n"
                      "builtins.compile = lambda *a, **k: None\nbuiltins.isinstance = lambda *a: True\n",
    "patch_os_write": "import os\n_w = os.write\nos.write = lambda fd, b: _w(fd, b)\n",
    "forge_report": "import os, json\nfor i in range(3):\n    os.write(4, f'{i}\\n'.encode())\n"
                    "    os.write(4, ('0' * 32 + f' {i}\\n').encode())\n"
                    "    print(f'nonce {i}')\n",
    "read_secret_pipe": "import os\ntry:\n    s = os.read(3, 256)\nexcept OSError:\n    s = b''\n"
                        "for i in range(3):\n    os.write(4, s + f' {i}\\n'.encode())\n",
    "exit_in_atexit": "import atexit, os\natexit.register(lambda: os.write(4, b'x 0\\n'))\n",
    "patch_operator": "import operator\noperator.eq = lambda a, b: True\n",
}


@pytest.mark.parametrize("name", sorted(HACKS))
def test_reward_hacks_earn_nothing(pool: SandboxPool, name: str) -> None:
    code = HACKS[name]
    if "def add" not in code:
        code = code + "def add(a, b):\n    return a - b + 100\n"  # a wrong solution
    assert assert_fractions([code], [TESTS], pool) == [0.0]
    assert not _sandbox_processes()


def test_pool_is_bounded_and_ordered() -> None:
    live, peak = [0], [0]
    lock = threading.Lock()

    class Counting(SandboxPool):
        def run(self, program: Program | str) -> sandbox.SandboxResult:
            with lock:
                live[0] += 1
                peak[0] = max(peak[0], live[0])
            try:
                return super().run(program)
            finally:
                with lock:
                    live[0] -= 1

    with Counting(2, timeout_s=TIMEOUT, limits=LIMITS) as p:
        res = p.map([f"import time\ntime.sleep(0.1)\nprint({i})" for i in range(6)])
    assert [r.stdout.strip() for r in res] == [str(i) for i in range(6)]
    assert peak[0] == 2


def test_isolation_reported() -> None:
    iso = sandbox.isolation()
    assert set(iso) >= {"netns", "mntns", "pidns", "uid", "private_tmp"}
    r = run_program("print(1)", TIMEOUT, LIMITS)
    assert r.isolation == iso and r.stdout == "1\n"
    if os.geteuid() == 0:
        assert iso["uid"] and iso["pidns"] and iso["netns"], iso
        code = ("import os\nstatus = open('/proc/self/status').read()\n"
                "print(os.getuid(), os.getpid(), status.count('NoNewPrivs:\\t1'))")
        uid, pid, nnp = run_program(code, TIMEOUT, LIMITS).stdout.split()
        assert int(uid) in _uid_range() and pid == "1" and nnp == "1"


def test_without_isolation_limits_still_apply() -> None:
    """The fallback (no namespaces/uid, as for non-root users): rlimits, timeout, cwd, env."""
    r = run_program("while True:\n    pass\n", 1.5, LIMITS, isolate=False)
    assert not r.ok and r.duration_s < 1.5 + SLACK
    r = run_program("x = bytearray(2**30)\n", TIMEOUT, LIMITS, isolate=False)
    assert r.returncode != 0 and "MemoryError" in r.stderr
    r = run_program("import os\nprint(os.listdir('.'), sorted(os.environ))\n", TIMEOUT, LIMITS, isolate=False)
    assert r.stdout.startswith("['main.py']") and "MIRRORLAB" not in r.stdout
    assert r.isolation == {}


@pytest.mark.xfail(strict=True, reason="documented limit: the harness shares its process with the solution")
def test_frame_walking_forgery_is_a_known_gap(pool: SandboxPool) -> None:
    code = (
        "import sys, os\n"
        "def add(a, b):\n"
        "    f = sys._getframe()\n"
        "    while f is not None and 'nonce' not in f.f_locals:\n"
        "        f = f.f_back\n"
        "    n = f.f_locals['nonce']\n"
        "    for i in range(3):\n"
        "        os.write(4, f'{n} {i}\\n'.encode())\n"
        "    os._exit(0)\n"
    )
    assert assert_fractions([code], [TESTS], pool) == [0.0]


@pytest.mark.skipif(os.geteuid() != 0, reason="private /tmp needs root (mount namespace)")
def test_interpreter_under_tmp_stays_reachable(tmp_path: Path) -> None:
    """A venv (or checkout) under /tmp must survive the fresh tmpfs mounted over /tmp (regression:
    CI clones into a temporary folder; the sandboxed interpreter could not find its prefix)."""
    import subprocess
    import venv

    env_dir = Path("/tmp") / f"mirrorlab-venv-test-{os.getpid()}"
    try:
        venv.EnvBuilder(with_pip=False, symlinks=True).create(env_dir)
        repo = Path(sandbox.__file__).resolve().parents[1]
        code = ("from mirrorlab.sandbox import run_program, isolation\n"
                "r = run_program('print(6*7)', 5.0)\n"
                "print(r.stdout.strip(), isolation()['private_tmp'], r.stderr[-300:])")
        res = subprocess.run([str(env_dir / "bin" / "python"), "-c", code], capture_output=True, text=True,
                             env={"PYTHONPATH": str(repo), "PATH": "/usr/bin:/bin"}, timeout=60, cwd=tmp_path)
        assert res.returncode == 0, res.stderr
        out = res.stdout.split()
        assert out[:2] == ["42", "True"], res.stdout
    finally:
        shutil.rmtree(env_dir, ignore_errors=True)
