"""The sandbox as a security boundary: hostile programs earn 0, stay in their limits, leave nothing.

Every hostile program is run both raw (`run_program`) and as an MBPP-style solution through the
per-assert harness (`assert_fractions`), whose reward must be 0; programs that try to forge the
reward (frame walking, gc, ctypes, guessed descriptors, patching, late writers) earn 0 too.
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
from mirrorlab.tasks.mbpp import assert_fractions, fraction_passed, harness_program

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
    all_but_first = f"import os, sys\ndef add(a, b):\n    if a != 1:\n        {exit_call}\n    return a + b\n"
    got = assert_fractions([top, inside, all_but_first], [TESTS] * 3, pool)
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


# --------------------------------------------------------------------------- forging the reward
# Each forger gets `add` wrong (or never answers) and attacks the harness from where the program
# runs. It must score 0 while an honest solution in the same batch scores 1, and the diagnostics
# it writes to stderr show that the attack really reached what it aimed at.
FORGE_LIB = r'''
import os, sys


def _diag(msg):
    try:
        os.write(2, ("DIAG " + msg + "\n").encode())
    except OSError:
        pass


def _records():
    # Every report a forger might guess: this harness's framed value records claiming the right
    # answers, the old nonce lines, bare pass lines.
    out = []
    for i, v in enumerate((3, 4, 0)):
        p = "[('i', %d)]" % v
        out += ["v %d %d\n%s\n" % (i, len(p), p), "p %d %d\n%s\n" % (i, len(p), p),
                "%s %d\n" % ("0" * 32, i), "PASS %d\n" % i]
    return "".join(out).encode()


def _spray(tag="spray"):
    data, hit = _records(), []
    for fd in range(21):
        try:
            os.write(fd, data)
            hit.append(fd)
        except OSError:
            pass
    for path in ("/proc/1/fd/4", "/proc/%d/fd/4" % os.getppid(), "/proc/%d/mem" % os.getppid()):
        try:
            fd = os.open(path, os.O_WRONLY)
            os.write(fd, data)
            hit.append(path)
        except OSError:
            pass
    _diag("%s wrote to %s" % (tag, hit))


def _use(objs):
    # Use whatever harness objects turn up: call its report function, lift its caps.
    found = set()
    for o in objs:
        name = getattr(o, "__name__", "")
        if callable(o) and name in ("emit", "child", "enc", "_mirrorlab_harness"):
            found.add(name)
        if callable(o) and name == "emit":
            for i, v in enumerate((3, 4, 0)):
                try:
                    o(b"v", i, ("[('i', %d)]" % v).encode())
                    _diag("emit worked")
                except Exception as e:
                    _diag("emit failed: %r" % e)
        if isinstance(o, dict) and "cap" in o and "tests" in o:
            found.add("spec")
            o["cap"] = 10**9
    _diag("found %s" % sorted(found))


def _frames(f):
    objs = []
    while f is not None:
        objs += list(f.f_locals.values()) + list(f.f_globals.values())
        f = f.f_back
    return objs


def _wrong(a, b):
    return a - b + 100
'''

FOUND = "DIAG found ['_mirrorlab_harness', 'child', 'emit', 'enc', 'spec']"
# name -> (program after FORGE_LIB, diagnostics that must appear, diagnostics that must not)
FORGERS: dict[str, tuple[str, tuple[str, ...], tuple[str, ...]]] = {
    "frame_walk": (
        "def add(a, b):\n    _use(_frames(sys._getframe()))\n    _spray()\n    os._exit(0)\n",
        (FOUND, "emit failed"), ("emit worked",)),
    "traceback_tb_frame": (
        "def add(a, b):\n    try:\n        raise ValueError\n    except ValueError as e:\n"
        "        _use(_frames(e.__traceback__.tb_frame))\n    _spray()\n    return _wrong(a, b)\n",
        (FOUND, "emit failed"), ("emit worked",)),
    "gc_scan_and_patch_closures": (
        "import gc\n"
        "def add(a, b):\n"
        "    objs = gc.get_objects()\n"
        "    for f in [o for o in objs if type(o) is type(add) and o.__name__ in ('emit', 'child', 'enc')]:\n"
        "        for cell in f.__closure__ or ():\n"
        "            try:\n                v = cell.cell_contents\n            except ValueError:\n"
        "                continue\n"
        "            objs.append(v)\n"
        "    _use(objs)\n"
        "    for f in [o for o in objs if type(o) is type(add) and o.__name__ in ('emit', 'child', 'enc')]:\n"
        "        for cell in f.__closure__ or ():\n"
        "            try:\n"
        "                if callable(cell.cell_contents) and type(cell.cell_contents) is not type(add):\n"
        "                    cell.cell_contents = lambda *a, **k: True  # every harness helper 'passes'\n"
        "            except ValueError:\n"
        "                pass\n"
        "    _spray()\n"
        "    return _wrong(a, b)\n",
        (FOUND, "emit failed"), ("emit worked",)),
    "inspect_stack": (
        "import inspect\n"
        "def add(a, b):\n"
        "    objs = []\n"
        "    for fi in inspect.stack():\n"
        "        objs += list(fi.frame.f_locals.values()) + list(fi.frame.f_globals.values())\n"
        "    _use(objs)\n    _spray()\n    return _wrong(a, b)\n",
        (FOUND, "emit failed"), ("emit worked",)),
    "ctypes_steal_report_fd": (
        "import ctypes\n"
        "libc = ctypes.CDLL(None, use_errno=True)\n"
        "def add(a, b):\n"
        "    data, h = _records(), os.getppid()\n"
        "    pfd = libc.syscall(434, h, 0)  # pidfd_open(harness)\n"
        "    got = libc.syscall(438, pfd, 4, 0) if pfd >= 0 else -1  # pidfd_getfd: its fd 4\n"
        "    _diag('pidfd_getfd = %d errno %d' % (got, ctypes.get_errno()))\n"
        "    if got >= 0 and not os.path.exists('stolen'):  # forge each record once\n"
        "        open('stolen', 'w').close()\n"
        "        os.write(got, data)\n"
        "    r = libc.ptrace(16, h, 0, 0)  # PTRACE_ATTACH, to poke the harness's memory\n"
        "    _diag('ptrace = %d errno %d' % (r, ctypes.get_errno()))\n"
        "    libc.write(4, data, len(data))\n"
        "    os._exit(0)\n",
        ("DIAG pidfd_getfd = -1 errno 1", "DIAG ptrace = -1 errno 1"), ()),
    "spray_every_fd": (
        "_spray('module')\ndef add(a, b):\n    _spray('add')\n    return _wrong(a, b)\n",
        ("DIAG module wrote to [", "2, 3]"), ("/proc", "3, 4")),  # its own channel (3) but not 4
    "spray_every_fd_then_exit": ("def add(a, b):\n    _spray()\n    os._exit(0)\n", (), ("/proc", "3, 4")),
    "monkeypatch_builtins_and_os": (
        "import builtins, operator, posix\n"
        "add = _wrong\n"
        "_real = os.write\n"
        "os.write = posix.write = lambda fd, data: (_real(fd, _records()), len(data))[1]\n"
        "operator.eq = operator.ne = operator.is_ = lambda a, b: True\n"
        "sys.modules['collections'] = None\n"
        "for n in ('eval', 'exec', 'compile', 'isinstance', 'ascii', 'repr', 'len', 'type', 'bool', 'hex',\n"
        "          'all', 'any', 'enumerate', 'print', 'open', 'AssertionError', 'BaseException'):\n"
        "    setattr(builtins, n, lambda *a, **k: True)\n",
        (), ()),
    "atexit_records": (
        "import atexit\natexit.register(_spray, 'atexit')\n"
        "def add(a, b):\n    atexit.register(_spray, 'atexit')\n"
        "    if a == 2:\n        sys.exit(0)\n    return _wrong(a, b)\n",
        (), ("DIAG atexit",)),
    "child_writes_after_exit": (
        "import time\n"
        "def add(a, b):\n"
        "    if os.fork() == 0:\n        time.sleep(0.5)\n        _spray('late child')\n        os._exit(0)\n"
        "    if os.fork() == 0:\n        os.setsid()\n"
        "        if os.fork() == 0:\n            time.sleep(0.5)\n            _spray('late daemon')\n"
        "        os._exit(0)\n"
        "    return _wrong(a, b)\n",
        (), ("DIAG late",) if ISO.get("pidns") else ()),
    "thread_writes_later": (
        "import threading, time\n"
        "def _later():\n    time.sleep(0.05)\n    for _ in range(30):\n        _spray('thread')\n"
        "        time.sleep(0.01)\n"
        "threading.Thread(target=_later, daemon=True).start()\n"
        "def add(a, b):\n    time.sleep(0.2)\n    return _wrong(a, b)\n",
        ("DIAG thread wrote",), ()),
}


def _score_batch(codes: list[str], pool: SandboxPool) -> list[tuple[float, str]]:
    """(reward, stderr) of each program under the assert harness."""
    built = [harness_program(c, TESTS) for c in codes]
    results = pool.map([p for p, _ in built])
    return [(fraction_passed(r.report, k), r.stderr) for r, (_, k) in zip(results, built, strict=True)]


@pytest.mark.parametrize("name", sorted(FORGERS))
def test_forging_attempts_earn_nothing(pool: SandboxPool, name: str) -> None:
    """Frame walks, tracebacks, gc, inspect, ctypes, descriptor guessing, patching, atexit, late
    children and threads: the forger scores 0, the honest solution beside it 1."""
    code, must, must_not = FORGERS[name]
    (forged, err), (honest, _) = _score_batch([FORGE_LIB + code, GOOD], pool)
    assert (forged, honest) == (0.0, 1.0), err[-2000:]
    for text in must:
        assert text in err, err[-2000:]
    for text in must_not:
        assert text not in err, err[-2000:]
    assert not _sandbox_processes()


def test_value_claims_are_no_more_than_return_values(pool: SandboxPool) -> None:
    """What a program can write is a claim about the values of its own operands (into the one
    channel its test's child holds). That equals returning those values; it cannot claim the
    literal side, other tests, or types the parent does not know."""
    def claim(payload: str) -> str:
        return ("import os\ndef add(a, b):\n    for fd in range(3, 21):\n        try:\n"
                f"            os.write(fd, {payload!r}.encode())\n        except OSError:\n"
                "            pass\n    os._exit(0)\n")

    payloads = ["[('i', 3)]", "[('i', 99), ('i', 99)]", "[('i', 3)]\nv 1 10\n[('i', 4)]\n",
                "[('E',)]", "[('i', True)]", "[('s', '3')]"]
    got = assert_fractions([claim(p) for p in payloads] + ["def add(a, b):\n    return 3\n", GOOD],
                           [TESTS] * (len(payloads) + 2), pool)
    assert got[0] == got[-2] == pytest.approx(1 / 3)  # claiming 3 == returning 3 for every call
    assert got[1:-2] == [0.0] * (len(payloads) - 1)
    assert got[-1] == 1.0


def test_values_round_trip(pool: SandboxPool) -> None:
    """Every supported type comes back with its own comparison semantics (Counter, OrderedDict,
    deque included); subclasses compare as their base value unless they define comparisons."""
    code = (
        "import collections\n"
        "class L(list):\n    def __eq__(self, o):\n        return True\n"
        "class M(list):\n    pass\n"
        "P = collections.namedtuple('P', 'x y')\n"
        "V = [None, True, 7, -2**80, 1.5, float('inf'), 2 - 3j, 'é\\n', b'\\x00', [1, [2]], (1,), {1, 2},\n"
        "     frozenset({3}), {'a': [1]}, collections.Counter('aab'), collections.OrderedDict(a=1, b=2),\n"
        "     collections.deque([1, 2]), collections.defaultdict(int, a=1), float('nan'), L([5]),\n"
        "     M([5]), P(1, 2)]\n"
        "def f(i):\n    return V[i]\n"
    )
    true = ["assert f(0) is None", "assert f(1) is True", "assert f(2) == 3 + 4",
            "assert f(3) == -1208925819614629174706176", "assert 1 < f(4) <= 1.5",
            "assert f(5) == float('inf')", "assert f(6) == 2-3j", "assert f(7) == 'é\\n'",
            "assert f(8) == b'\\x00'", "assert f(9) == [1, [2]] and 2 in f(9)[1]", "assert f(10) == (1,)",
            "assert f(11) == {2, 1}", "assert f(12) == frozenset({3})", "assert f(13) == {'a': [1]}",
            "assert f(14) == collections.Counter({'a': 2, 'b': 1, 'c': 0})",
            "assert f(14) == {'a': 2, 'b': 1}", "assert f(15) != collections.OrderedDict(b=2, a=1)",
            "assert f(15) == {'b': 2, 'a': 1}", "assert f(16) == collections.deque([1, 2])",
            "assert f(17) == {'a': 1}", "assert f(18) != f(18)", "assert f(20) == [5]",
            "assert f(21) == (1, 2)",
            "assert not f(0)", "assert f(2) in [6, 7] or f(2) is None"]
    false = ["assert f(1) is 1", "assert f(11) == [1, 2]", "assert f(16) == [1, 2]",
             "assert f(15) == collections.OrderedDict(b=2, a=1)", "assert f(19) == [5]",
             "assert f(19) != [6]", "assert f(20) == [6]",
             "assert f(2) < 'a'", "assert f(18) == f(18)", "assert f(2) == 8 or f(0)"]
    assert assert_fractions([code, code], [true, false], pool) == [1.0, 0.0]


def test_each_assert_gets_a_fresh_program(pool: SandboxPool) -> None:
    """Asserts run in fresh copies of the program: state from one cannot reach the next."""
    code = "n = [0]\ndef add(a, b):\n    n[0] += 1\n    return a + b if n[0] == 1 else -1\n"
    assert assert_fractions([code], [TESTS], pool) == [1.0]


def test_harness_without_isolation() -> None:
    """The fallback (no namespaces, no uid drop: the harness is not PID 1) still works. It is not
    a boundary: the program runs as the caller, so it can reach the harness's descriptors (and
    the caller); verdicts are still computed here, so what it can forge is values, not passes."""
    wrong = "import os\ndef add(a, b):\n    if os.fork() == 0:\n        os._exit(0)\n    return a - b + 100\n"
    with SandboxPool(2, timeout_s=TIMEOUT, limits=LIMITS, isolate=False) as p:
        assert assert_fractions([GOOD, wrong], [TESTS] * 2, p) == [1.0, 0.0]


@ROOT_ISOLATION
def test_program_cannot_stop_the_harness(pool: SandboxPool) -> None:
    """Signals to the harness (PID 1 of the namespace) are ignored: an honest solution that
    tries to kill or stop it still scores 1."""
    code = ("import os, signal\n"
            "for s in (signal.SIGINT, signal.SIGTERM, signal.SIGUSR1, signal.SIGSTOP, signal.SIGKILL):\n"
            "    for pid in (1, os.getppid()):\n"
            "        try:\n            os.kill(pid, s)\n        except OSError:\n            pass\n" + GOOD)
    assert assert_fractions([code], [TESTS], pool) == [1.0]


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
