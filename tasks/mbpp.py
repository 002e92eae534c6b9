"""MBPP (Austin et al. 2021): write a Python function that passes three asserts.

Splits by task_id (test 11-510, validation 511-600, train 601-974, few-shot prompts 1-10).
The reward is the fraction of asserts that pass, each checked separately, with the code
executed in `mirrorlab.sandbox`; evaluation is pass@1 (all asserts pass), and `pass_at_k`
gives the unbiased pass@k estimator.

How an assert is checked. The parent (this process, trusted) parses each test into a plan: an
`assert` becomes a tree of comparisons (`and`/`or`/`not` over chained `==`, `<`, `in`, ...) whose
operands are separate expressions. Literal operands (in MBPP the expected value of every assert)
are evaluated here, with `ast.literal_eval`. The other operands are evaluated in the sandbox and
only their values come back, as data; the parent computes every comparison and truth value
itself, on plain builtin values. Nothing the program writes is a verdict, so there is no nonce or
"pass" line to steal or forge.

In the sandbox a small harness (`HARNESS`) runs first, as PID 1 of the sandbox's PID namespace,
non-dumpable (PR_SET_DUMPABLE 0: processes of the same uid cannot ptrace it, touch its memory or
open its descriptors through /proc), ignoring SIGINT (init ignores signals it has no handler
for). It never runs program code. For each test it forks a child, which closes the report
descriptor (fd 4), loads the program into fresh globals, evaluates that test's operands in order
and writes their values, in a tagged encoding, to a memfd that only this child holds. When the
child exits, or after `test_timeout_s` when the harness kills it (the test fails), the harness
kills whatever is left in the namespace, then writes the memfd's content, framed, as that test's
record on fd 4 (`v <test> <length>`). After the last test (or at once when the program does not
compile) it writes the end record (`e <n_tests> 0`): a report without it was not judged (the
harness could not start, the sandbox's own limits killed it, the report was cut), which `judge`
types as an error (NaN, `REWARD_ERROR`) rather than scoring it 0. Because every test is timed by
the harness, a program cannot turn its 0 into an excluded error by hanging (that rests, like the
rest, on the harness being unreachable: with no uid drop a program can kill it). Operands without
any name in them (`[1] * 3`) are evaluated by the harness itself before any child exists (`p`
records). The parent takes exactly one record of each kind per test and decodes it strictly
(`ast.literal_eval`, then every node checked); only None, bool, int, float, complex, str, bytes,
list, tuple, set, frozenset, dict, Counter, OrderedDict and deque come out. A test fails on anything else: a
missing, repeated, truncated or malformed record, a wrong number of values, a value of another
type, or of a subclass that defines its own comparison or truth method (always-equal and
always-true objects; other subclasses, namedtuples say, are reported as their base value, and
no `__eq__` or `__bool__` of the program ever runs in the parent), a child that raised
(SystemExit included), exited early or timed out.

Threat model. The program may do anything in its own processes: walk frames (sys._getframe,
tracebacks, generators), scan gc.get_objects(), use inspect or ctypes, patch builtins, operator,
os or the harness's objects after they load, write anything to any descriptor, register atexit
handlers, start threads or children that act later. All of it stays in the child of one test: it
cannot write fd 4 (closed), reach the harness (non-dumpable init), outlive its test (killed) or
see another test's channel. What it can write is its own test's value record, so what remains,
by design, is that a program can claim values for the operands it evaluates. That is no more than
returning those values (a lookup table of the asserted inputs, which the prompt shows, and which
no harness can tell from solving): a claim cannot cover a literal operand, and cannot make a
comparison pass that fails on the claimed values. Limits: keeping each claim to its own test,
and the `p` records, rest on the harness being unreachable, which needs the uid drop and the PID
namespace (root, see `mirrorlab.sandbox.isolation()`); that a claim is only ever a value rests on
nothing but the parent's decoder and comparisons. Without a uid drop the program runs as the
caller's user and is not contained at all. The tests are trusted (the harness evaluates their
name-free operands). Each assert runs in a fresh copy of the program (its module code runs once
per assert; files it writes persist), so asserts cannot affect one another in memory; that is
more lenient than one shared namespace for programs whose state breaks after the first call. A
test statement other than an assert only has to run without raising (which the program can
claim), and a test without an assert never passes.
"""

from __future__ import annotations

import ast
import collections
import functools
import logging
import math
import operator
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from mirrorlab.sandbox import Program, SandboxLimits, SandboxPool, SandboxResult

from .base import (
    REWARD_ERROR,
    Example,
    Task,
    _normalise,
    data_dir,
    is_reward_error,
    load_rows,
    score_of_reward,
)

SPLIT_IDS = {"prompt": (1, 10), "test": (11, 510), "val": (511, 600), "train": (601, 974)}
VALUE_CAP = 256 * 1024  # bytes of encoded values one test may report
log = logging.getLogger(__name__)
# Wall seconds the harness gives one test's child before it kills it (the test fails): twice the
# default CPU limit, so a test that fits its CPU seconds is not cut short by a loaded machine.
TEST_TIMEOUT_S = 10.0
# Standard-library modules the harness imports before forking when the program names them
# (saves every test's child the import; only stdlib is importable under `python -I -S`).
PRELOAD = frozenset({
    "array", "bisect", "calendar", "cmath", "collections", "copy", "datetime", "decimal",
    "fractions", "functools", "heapq", "itertools", "json", "math", "operator", "os", "random",
    "re", "statistics", "string", "sys", "time", "typing",
})

# The in-sandbox harness. Code that runs in a child after the program has loaded uses only
# references bound here beforehand, so patching builtins or modules does not change what an
# honest encoding reports (a program that reaches these objects anyway only claims values).
HARNESS = r'''
def _mirrorlab_harness():
    import posix, sys, _signal, select, time
    _fork, _exit, _write, _read, _close = posix.fork, posix._exit, posix.write, posix.read, posix.close
    _wait, _kill, _lseek = posix.waitpid, posix.kill, posix.lseek
    _select, _now = select.select, time.monotonic
    _eval, _exec, _compile, _ascii, _isinstance, _hex = eval, exec, compile, ascii, isinstance, hex
    _index, _frepr, _sstr, _bhex = int.__index__, float.__repr__, str.__str__, bytes.hex
    _real, _imag = complex.__dict__["real"].__get__, complex.__dict__["imag"].__get__
    _liter, _titer, _siter, _fiter = list.__iter__, tuple.__iter__, set.__iter__, frozenset.__iter__
    _items, _get, _modules, _tuple, BaseExc = dict.items, dict.get, sys.modules, tuple, BaseException
    _type, _mro, _tdict = type, type.__dict__["__mro__"].__get__, type.__dict__["__dict__"].__get__
    BIG = 2**63
    _signal.signal(_signal.SIGINT, _signal.SIG_IGN)
    try:
        _close(3)  # the secret pipe: unused
    except OSError:
        pass
    try:  # PR_SET_DUMPABLE 0 through _ctypes (importing ctypes costs ten times more)
        import _ctypes

        class _Int(_ctypes._SimpleCData):
            _type_ = "i"

        class _Fn(_ctypes.CFuncPtr):
            _flags_ = _ctypes.FUNCFLAG_CDECL
            _restype_ = _Int

        _Fn(_ctypes.dlsym(_ctypes.dlopen(None), "prctl"))(4, 0, 0, 0, 0)
    except BaseExc:
        pass
    with open("tests.py") as f:  # a Python literal written by the trusted parent
        spec = _eval(f.read(), {"__builtins__": {}})
    with open("solution.py") as f:
        src = f.read()
    for name in spec["preload"]:
        try:
            __import__(name)
        except BaseExc:
            pass
    cap = spec["cap"]

    special = ("__eq__", "__ne__", "__lt__", "__le__", "__gt__", "__ge__", "__bool__", "__len__",
               "__contains__", "__hash__")

    def plain(v, base):
        # An instance of `base`, or of a subclass that defines no comparison or truth method.
        t = _type(v)
        if t is base:
            return True
        for k in _mro(t):
            if k is base:
                return True
            d = _tdict(k)
            for n in special:
                if n in d:
                    raise TypeError("a subclass with its own comparison or truth")
        raise TypeError("not an instance")

    def enc(v, d):
        # A plain value as a tree of tagged tuples (decoded by the parent's `decode_values`).
        if d > 100:
            raise ValueError("nested too deeply")
        if v is None:
            return ("n",)
        if v is True or v is False:
            return ("b", v)
        if _isinstance(v, int) and plain(v, int):
            v = _index(v)
            return ("i", v) if -BIG < v < BIG else ("x", _hex(v))
        if _isinstance(v, float) and plain(v, float):
            return ("f", _frepr(v))
        if _isinstance(v, complex) and plain(v, complex):
            return ("c", _frepr(_real(v)), _frepr(_imag(v)))
        if _isinstance(v, str) and plain(v, str):
            return ("s", _sstr(v))
        if _isinstance(v, bytes) and plain(v, bytes):
            return ("y", _bhex(v))
        d += 1
        if _isinstance(v, list) and plain(v, list):
            return ("l", *[enc(x, d) for x in _liter(v)])
        if _isinstance(v, tuple) and plain(v, tuple):
            return ("t", *[enc(x, d) for x in _titer(v)])
        if _isinstance(v, frozenset) and plain(v, frozenset):
            return ("F", *[enc(x, d) for x in _fiter(v)])
        if _isinstance(v, set) and plain(v, set):
            return ("S", *[enc(x, d) for x in _siter(v)])
        col = _get(_modules, "collections")
        if _isinstance(v, dict):
            tag, base, items = "d", dict, _items(v)
            if col is not None and _isinstance(v, col.Counter):
                tag, base = "C", col.Counter
            elif col is not None and _isinstance(v, col.OrderedDict):
                tag, base, items = "O", col.OrderedDict, col.OrderedDict.items(v)
            plain(v, base)
            out = [tag]
            for k, x in items:
                out += [enc(k, d), enc(x, d)]
            return _tuple(out)
        if col is not None and _isinstance(v, col.deque) and plain(v, col.deque):
            return ("q", *[enc(x, d) for x in col.deque.__iter__(v)])
        raise TypeError("not a plain value")

    def emit(tag, i, data):
        rec = tag + b" %d %d\n" % (i, len(data)) + data + b"\n"
        while rec:
            rec = rec[_write(4, rec):]

    try:
        code = _compile(src, "solution.py", "exec")
        setup = _compile(spec["setup"], "setup.py", "exec") if spec["setup"] else None
    except BaseExc:  # the program does not compile: every test fails, and that is a verdict
        emit(b"e", len(spec["tests"]), b"")
        return
    tests = []
    for t in spec["tests"]:
        try:
            tests.append(None if t is None else (
                [(k, _compile(s, "test", "eval" if k == "e" else "exec")) for k, s in t["steps"]],
                [_compile(s, "test", "eval") for s in t["pure"]]))
        except BaseExc:
            tests.append(None)
    for i, t in enumerate(tests):  # operands without names: evaluated before any program code
        if t is not None and t[1]:
            try:
                emit(b"p", i, _ascii([enc(_eval(c, {"__builtins__": {}}), 0) for c in t[1]]).encode())
            except BaseExc:
                pass

    def child(steps, fd):
        # Runs the program for one test; whatever happens here is only a claim about values.
        try:
            _close(4)
            posix.setpgid(0, 0)
            _signal.signal(_signal.SIGINT, _signal.default_int_handler)
            g = {"__name__": "__main__", "__builtins__": __builtins__}
            _exec(code, g)
            if setup is not None:  # MBPP's setup code builds test inputs from the program's classes
                _exec(setup, g)
            vals = []
            for kind, c in steps:
                if kind == "e":
                    vals += [enc(_eval(c, g), 0)]
                else:
                    _exec(c, g)
            data = _ascii(vals).encode()
            while data:
                data = data[_write(fd, data):]
            sys.stdout.flush()
        except BaseExc:
            pass
        _exit(0)

    def wait_for(pid, limit):
        # The child's exit status; a child still running after `limit` seconds is killed (its
        # test fails: a hang is the program's failure, judged here, not a harness error).
        try:
            pfd = posix.pidfd_open(pid)
        except BaseExc:
            pfd = -1
        if pfd >= 0:
            try:
                ready = _select([pfd], [], [], limit)[0]
            finally:
                _close(pfd)
        else:  # no pidfd (old kernel): poll
            end = _now() + limit
            ready = []
            while _now() < end and not ready:
                done, st = _wait(pid, posix.WNOHANG)
                if done == pid:
                    return st
                time.sleep(0.005)
        if not ready:
            try:
                posix.killpg(pid, 9)
            except OSError:
                pass
            try:
                _kill(pid, 9)
            except OSError:
                pass
        return _wait(pid, 0)[1]

    init = posix.getpid() == 1
    limit = spec["test_timeout"]
    for i, t in enumerate(tests):
        if t is None:
            continue
        try:
            fd = posix.memfd_create("mirrorlab-values")
        except BaseExc:
            continue
        try:
            pid = _fork()
        except BaseExc:
            _close(fd)
            continue
        if pid == 0:
            child(t[0], fd)
        try:
            posix.setpgid(pid, pid)
        except OSError:
            pass
        status = wait_for(pid, limit)
        if init:  # nothing the test started may outlive it: kill the rest of the namespace
            while True:
                try:
                    _kill(-1, 9)
                except OSError:
                    pass
                try:
                    _wait(-1, 0)
                except ChildProcessError:
                    break
        else:
            try:
                posix.killpg(pid, 9)
            except OSError:
                pass
        _lseek(fd, 0, 0)
        data, chunk = b"", b"-"
        while chunk and len(data) <= cap:
            chunk = _read(fd, cap + 1 - len(data))
            data += chunk
        _close(fd)
        if status == 0 and 0 < len(data) <= cap and data.isascii():
            emit(b"v", i, data)
    emit(b"e", len(tests), b"")  # the end of the report: every test was judged


_mirrorlab_harness()
'''


def _plan(node: ast.expr) -> tuple[Any, ...]:
    if isinstance(node, ast.Compare):
        return ("cmp", [ast.unparse(e) for e in [node.left, *node.comparators]],
                [type(o).__name__ for o in node.ops])
    if isinstance(node, ast.UnaryOp) and isinstance(node.op, ast.Not):
        return ("not", _plan(node.operand))
    if isinstance(node, ast.BoolOp):
        return ("and" if isinstance(node.op, ast.And) else "or", [_plan(v) for v in node.values])
    return ("val", ast.unparse(node))


@functools.lru_cache(maxsize=4096)
def test_plan(test: str) -> tuple[Any, ...] | None:
    """How one test is checked: a single `assert` becomes a tree of operand expressions
    (`cmp`, `not`, `and`, `or`, `val`); anything else a `seq` of ("assert", tree) and
    ("exec", statement) steps; None if it does not parse."""
    try:
        tree = ast.parse(test)
    except (SyntaxError, ValueError):
        return None
    steps = [("assert", _plan(s.test)) if isinstance(s, ast.Assert) else ("exec", ast.unparse(s))
             for s in tree.body]
    if len(steps) == 1 and steps[0][0] == "assert":
        return steps[0][1]
    return ("seq", steps)


@dataclass(frozen=True)
class Check:
    """One test as the parent judges it: a verdict tree over leaves, and what the sandbox runs.

    `leaves[k]` is ("lit", value) (evaluated here), ("pure", j) (the j-th value the harness
    reports for the test's name-free operands `pure`) or ("prog", j) (the j-th value the
    program's child reports; it evaluates the `e` steps of `steps`, running `x` steps between).
    """

    tree: tuple[Any, ...]
    leaves: tuple[tuple[str, Any], ...]
    steps: tuple[tuple[str, str], ...]
    pure: tuple[str, ...]

    @property
    def n_program_values(self) -> int:
        """How many values the program's child must report."""
        return sum(1 for kind, _ in self.steps if kind == "e")


@functools.lru_cache(maxsize=4096)
def plan_check(test: str) -> Check | None:
    """The `Check` of one test; None if it cannot pass (no parse, or no assert in it)."""
    plan = test_plan(test)
    if plan is None:
        return None
    leaves: list[tuple[str, Any]] = []
    steps: list[tuple[str, str]] = []
    pure: list[str] = []

    def leaf(src: str) -> int:
        try:
            leaves.append(("lit", ast.literal_eval(src)))
        except (ValueError, TypeError, SyntaxError, MemoryError, RecursionError):
            if any(isinstance(n, ast.Name) for n in ast.walk(ast.parse(src, mode="eval"))):
                leaves.append(("prog", sum(1 for kind, _ in steps if kind == "e")))
                steps.append(("e", src))
            else:
                leaves.append(("pure", len(pure)))
                pure.append(src)
        return len(leaves) - 1

    def tree(p: tuple[Any, ...]) -> tuple[Any, ...]:
        kind = p[0]
        if kind == "cmp":
            return ("cmp", tuple(leaf(e) for e in p[1]), tuple(p[2]))
        if kind == "not":
            return ("not", tree(p[1]))
        if kind in ("and", "or"):
            return (kind, tuple(tree(q) for q in p[1]))
        return ("val", leaf(p[1]))

    trees = []
    for kind, x in (plan[1] if plan[0] == "seq" else [("assert", plan)]):
        if kind == "assert":
            trees.append(tree(x))
        else:
            steps.append(("x", x))
    if not trees:
        return None
    return Check(trees[0] if len(trees) == 1 else ("and", tuple(trees)), tuple(leaves), tuple(steps),
                 tuple(pure))


_CMP: dict[str, Callable[[Any, Any], Any]] = {
    "Eq": operator.eq, "NotEq": operator.ne, "Lt": operator.lt, "LtE": operator.le,
    "Gt": operator.gt, "GtE": operator.ge, "Is": operator.is_, "IsNot": operator.is_not,
    "In": lambda a, b: a in b, "NotIn": lambda a, b: a not in b,
}


def holds(tree: tuple[Any, ...], values: Sequence[Any]) -> bool:
    """Whether a verdict tree holds for the leaf values (plain data); raises like the assert
    would (TypeError, ...). Every branch of `and`/`or` is evaluated, as the operands were."""
    kind = tree[0]
    if kind == "cmp":
        xs = [values[k] for k in tree[1]]
        return all(bool(_CMP[op](xs[j], xs[j + 1])) for j, op in enumerate(tree[2]))
    if kind == "not":
        return not holds(tree[1], values)
    if kind in ("and", "or"):
        rs = [holds(q, values) for q in tree[1]]
        return all(rs) if kind == "and" else any(rs)
    return bool(values[tree[1]])


_SEQS: dict[str, Callable[[Any], Any]] = {
    "l": list, "t": tuple, "S": set, "F": frozenset, "q": collections.deque,
}
_MAPS: dict[str, Callable[[Any], Any]] = {
    "d": dict, "C": collections.Counter, "O": collections.OrderedDict,
}
_SCALARS: dict[str, tuple[type, Callable[[Any], Any]]] = {
    "b": (bool, bool), "i": (int, int), "x": (str, lambda s: int(s, 16)), "f": (str, float),
    "s": (str, str), "y": (str, bytes.fromhex),
}


def _decode(node: Any, depth: int) -> Any:
    if type(node) is not tuple or not node or type(node[0]) is not str or depth > 120:
        raise ValueError("malformed value")
    tag, rest = node[0], node[1:]
    if tag == "n" and not rest:
        return None
    if tag in _SCALARS and len(rest) == 1 and type(rest[0]) is _SCALARS[tag][0]:
        return _SCALARS[tag][1](rest[0])
    if tag == "c" and len(rest) == 2 and all(type(x) is str for x in rest):
        return complex(float(rest[0]), float(rest[1]))
    if tag in _SEQS:
        return _SEQS[tag](_decode(x, depth + 1) for x in rest)
    if tag in _MAPS and len(rest) % 2 == 0:
        items = [_decode(x, depth + 1) for x in rest]
        return _MAPS[tag](dict(zip(items[::2], items[1::2], strict=True)))
    raise ValueError(f"malformed value (tag {tag!r})")


def decode_values(payload: str, n: int) -> list[Any]:
    """The `n` values of one harness record, rebuilt as plain builtin values (never pickle or
    eval); ValueError if the payload is anything but a list of `n` well-formed values."""
    try:
        raw = ast.literal_eval(payload)
        if type(raw) is not list or len(raw) != n:
            raise ValueError(f"expected a list of {n} values")
        return [_decode(x, 0) for x in raw]
    except (ValueError, TypeError, SyntaxError, MemoryError, RecursionError) as e:
        raise ValueError(f"malformed record: {e}") from None


def parse_report(report: str, n_tests: int) -> dict[tuple[str, int], str | None]:
    """The harness's records by (kind, test): "v" (values the test's child reported) and "p"
    (values of its name-free operands); None where a record repeats; ("e", n_tests) when the
    harness reached the end of its report (`judge`: without it nothing was judged). Parsing stops
    at the first malformed or truncated record."""
    out: dict[tuple[str, int], str | None] = {}
    pos = 0
    while pos < len(report):
        nl = report.find("\n", pos)
        head = report[pos:nl].split(" ") if nl >= 0 else []
        if (len(head) != 3 or head[0] not in ("v", "p", "e")
                or not all(h.isascii() and h.isdigit() and len(h) < 10 for h in head[1:])):
            break
        i, n = int(head[1]), int(head[2])
        end = nl + 1 + n
        if report[end:end + 1] != "\n":
            break
        if head[0] == "e":  # the last record: it ends the report
            if i == n_tests and n == 0 and end + 1 == len(report):
                out[("e", i)] = ""
            break
        if i >= n_tests:
            break
        key = (head[0], i)
        out[key] = None if key in out else report[nl + 1:end]
        pos = end + 1
    return out


def check_passed(check: Check | None, records: dict[tuple[str, int], str | None], i: int) -> bool:
    """The parent's verdict on test `i`: its values decode and its comparisons hold."""
    if check is None:
        return False
    try:
        prog = decode_values(records[("v", i)], check.n_program_values)  # type: ignore[arg-type]
        pure = decode_values(records[("p", i)], len(check.pure)) if check.pure else []  # type: ignore[arg-type]
        values = [x if kind == "lit" else (pure if kind == "pure" else prog)[x] for kind, x in check.leaves]
        return holds(check.tree, values) is True
    except Exception:  # missing record, malformed values, or the comparison itself raised
        return False


def extract_code(completion: str) -> str:
    """The code of a completion: the first ```python (or any ```) block, [BEGIN]...[DONE], or all."""
    fence = re.search(r"```[ \t]*(?:python3?|py)?[ \t]*\n(.*?)(?:```|\Z)", completion, re.S | re.I)
    if fence:
        return fence.group(1).strip("\n")
    m = re.search(r"\[BEGIN\](.*?)(?:\[DONE\]|\Z)", completion, re.S)
    if m:
        return m.group(1).strip("\n")
    return completion.strip("\n")


_IMPORT = re.compile(r"^[ \t]*(?:from[ \t]+([\w.]+)[ \t]+import|import[ \t]+([\w. \t,]+))", re.M)


def _preload(code: str) -> list[str]:
    names = set()
    for a, b in _IMPORT.findall(code):
        for part in (a or b).split(","):
            words = part.split()
            if words and words[0].split(".")[0] in PRELOAD:
                names.add(words[0].split(".")[0])
    return sorted(names)


def harness_program(
    code: str, tests: Sequence[str], setup: str = "", test_timeout_s: float = TEST_TIMEOUT_S,
    timeout_s: float | None = None,
) -> tuple[Program, list[Check | None]]:
    """The sandbox program that evaluates `code` on `tests`, and the checks that judge its report.

    Each test's child is killed by the harness after `test_timeout_s` (the test fails); the
    sandbox's own wall-clock limit is `timeout_s` (the harness's start-up allowance; None: the
    pool's) plus that per test, so a program that hangs is judged (0), never cut off unjudged."""
    checks = [plan_check(t) for t in tests]
    spec = {"tests": [None if k is None else {"steps": list(k.steps), "pure": list(k.pure)} for k in checks],
            "setup": setup, "preload": _preload(code), "cap": VALUE_CAP,
            "test_timeout": float(test_timeout_s)}
    wall = None if timeout_s is None else timeout_s + len(tests) * test_timeout_s
    return Program(HARNESS, files=(("solution.py", code), ("tests.py", repr(spec))), timeout_s=wall), checks


def fraction_passed(report: str, checks: Sequence[Check | None]) -> float:
    """Fraction of the tests that pass, judged here from the harness's report."""
    return _fraction(parse_report(report, len(checks)), checks)


def _fraction(records: dict[tuple[str, int], str | None], checks: Sequence[Check | None]) -> float:
    return sum(check_passed(k, records, i) for i, k in enumerate(checks)) / len(checks) if checks else 0.0


@dataclass(frozen=True)
class Judgement:
    """The parent's verdict on one program: the fraction of its tests that pass, or, when the
    harness could not judge it, why (`error`; `passed` is then NaN, `REWARD_ERROR`: a typed
    outcome that training and evaluation exclude, never a 0)."""

    passed: float
    error: str | None = None

    @property
    def judged(self) -> bool:
        """True when the harness reached the end of its report."""
        return self.error is None


def judge(result: SandboxResult, checks: Sequence[Check | None]) -> Judgement:
    """A `Judgement` from one harness run: judged when its report ends with the end record (every
    test then has its verdict, a missing value record being a failure of the program); otherwise
    a harness error: it could not start, the sandbox's limits killed it before it reported, or
    the report is missing, truncated or malformed."""
    records = parse_report(result.report, len(checks))
    if ("e", len(checks)) in records:
        return Judgement(_fraction(records, checks))
    if result.timed_out:
        why = (f"killed by the sandbox's wall clock after {result.duration_s:.1f} s, "
               "before the harness finished")
    elif result.returncode != 0:
        tail = " ".join(result.stderr.split())[-200:]
        why = (f"the harness exited with status {result.returncode} before finishing"
               + (f": {tail}" if tail else ""))
    elif not result.report:
        why = "the harness wrote no report"
    else:
        why = "the harness's report is truncated or malformed"
    return Judgement(REWARD_ERROR, why)


def judge_programs(
    codes: Sequence[str], tests: Sequence[Sequence[str]], pool: SandboxPool,
    setups: Sequence[str] | None = None, test_timeout_s: float = TEST_TIMEOUT_S,
) -> list[Judgement]:
    """For each program, the `Judgement` of its tests (each assert run separately in the sandbox,
    judged here from the values it reports), at most `pool.workers` programs at a time."""
    setups = setups if setups is not None else [""] * len(codes)
    built = [harness_program(c, t, s, test_timeout_s, pool.timeout_s)
             for c, t, s in zip(codes, tests, setups, strict=True)]
    results = pool.map([prog for prog, _ in built])
    return [judge(r, checks) for r, (_, checks) in zip(results, built, strict=True)]


def assert_fractions(
    codes: Sequence[str], tests: Sequence[Sequence[str]], pool: SandboxPool,
    setups: Sequence[str] | None = None, test_timeout_s: float = TEST_TIMEOUT_S,
) -> list[float]:
    """For each program, the fraction of its assert statements that pass, NaN (`REWARD_ERROR`)
    where the harness could not judge it (`judge_programs` says why)."""
    return [j.passed for j in judge_programs(codes, tests, pool, setups, test_timeout_s)]


def pass_at_k(n: int, c: int, k: int) -> float:
    """Unbiased pass@k from n samples of which c are correct (Chen et al. 2021)."""
    if not 0 <= c <= n or k < 1:
        raise ValueError(f"need 0 <= c <= n and k >= 1, got n={n}, c={c}, k={k}")
    if k > n:
        raise ValueError(f"k={k} exceeds the number of samples n={n}")
    if n - c < k:
        return 1.0
    return 1.0 - math.prod(1.0 - k / i for i in range(n - c + 1, n + 1))


def load_mbpp_rows(source: str = "auto", path: str | Path | None = None) -> list[dict[str, Any]]:
    """MBPP rows (task_id, text, code, test_list, test_setup_code) from local JSONL or the hub."""
    def hub() -> list[dict[str, Any]]:
        import datasets  # the hub path (not exercised offline)

        ds = datasets.load_dataset("mbpp", "full")
        return [dict(r) for split in ds.values() for r in split]

    return load_rows(Path(path) if path else data_dir() / "mbpp" / "mbpp.jsonl", source, "MBPP", hub)


class MBPP(Task):
    """MBPP with a sandboxed, per-assert reward and pass@1 evaluation.

    Limits: each test's child gets `cpu_s` CPU seconds, `memory_mb` and `test_timeout_s` wall
    seconds (default 2 x cpu_s), after which it fails; the harness gets `timeout_s` for its own
    start-up on top. A completion the harness could not judge gets NaN (`REWARD_ERROR`)."""

    name = "mbpp"
    metric_name = "pass@1"
    stop_strings = ("[DONE]",)
    default_chat = True

    def __init__(
        self,
        source: str = "auto",
        path: str | None = None,
        n_shots: int = 0,
        workers: int = 2,
        timeout_s: float = 10.0,
        cpu_s: int = 5,
        memory_mb: int = 512,
        chat: bool | None = None,
        test_timeout_s: float | None = None,
    ) -> None:
        rows = load_mbpp_rows(source, path)
        by_split: dict[str, list[Example]] = {k: [] for k in SPLIT_IDS}
        for r in sorted(rows, key=lambda r: int(r["task_id"])):
            tid = int(r["task_id"])
            split = next((s for s, (lo, hi) in SPLIT_IDS.items() if lo <= tid <= hi), None)
            if split is None:
                continue
            by_split[split].append(Example(
                id=f"mbpp-{tid}", question=r["text"], answer=r["code"],
                meta={"task_id": tid, "tests": list(r["test_list"]), "setup": r.get("test_setup_code", "")},
            ))
        self.prompts = by_split["prompt"]
        if not 0 <= n_shots <= len(self.prompts):
            raise ValueError(f"n_shots must be in [0, {len(self.prompts)}], got {n_shots}")
        self.n_shots = n_shots
        test_timeout_s = 2.0 * cpu_s if test_timeout_s is None else test_timeout_s
        if timeout_s <= 0 or test_timeout_s <= 0:
            raise ValueError(f"timeout_s and test_timeout_s must be > 0, got {timeout_s}, {test_timeout_s}")
        self.timeout_s = timeout_s  # the harness's start-up allowance; each test adds test_timeout_s
        self.test_timeout_s = test_timeout_s
        self.limits = SandboxLimits(cpu_s=cpu_s, memory_mb=memory_mb)
        self.workers = workers
        self._pool: SandboxPool | None = None
        super().__init__(by_split["train"], by_split["val"], by_split["test"], chat=chat)

    def dedupe_key(self, example: Example) -> str:
        """Problem text plus its tests (a few MBPP texts repeat with different tests)."""
        return _normalise(example.question) + "\x00" + "\n".join(example.meta["tests"])

    # ------------------------------------------------------------------ prompts
    def __getstate__(self) -> dict[str, Any]:
        """Picklable (for process/Ray executors): the worker pool is rebuilt on first use."""
        state = dict(self.__dict__)
        state["_pool"] = None
        return state

    @staticmethod
    def _problem(example: Example) -> str:
        tests = "\n".join(example.meta["tests"])
        return (f"You are an expert Python programmer, and here is your task: {example.question} "
                f"Your code should pass these tests:\n\n{tests}\n")

    def format_prompt(self, example: Example) -> str:
        """The problem and its tests (after `n_shots` solved examples from task_ids 1-10)."""
        shots = "".join(
            f"{self._problem(s)}```python\n{s.answer.replace(chr(13), '')}\n```\n\n"
            for s in self.prompts[: self.n_shots]
        )
        return shots + self._problem(example) + "Write the solution in a ```python code block.\n"

    def reference_completion(self, example: Example) -> str:
        """The reference solution in a fenced block."""
        return f"```python\n{example.answer}\n```"

    # ------------------------------------------------------------------ rewards
    @property
    def pool(self) -> SandboxPool:
        """The task's bounded sandbox pool (created on first use)."""
        if self._pool is None:
            self._pool = SandboxPool(self.workers, timeout_s=self.timeout_s, limits=self.limits)
        return self._pool

    def judgements(self, completions: Sequence[str], examples: Sequence[Example]) -> list[Judgement]:
        """Each completion's `Judgement` (sandboxed, parallel); harness errors are logged with why."""
        if len(completions) != len(examples):
            raise ValueError(f"got {len(completions)} completions for {len(examples)} examples")
        out = judge_programs(
            [extract_code(c) for c in completions], [e.meta["tests"] for e in examples], self.pool,
            [e.meta.get("setup", "") for e in examples], self.test_timeout_s,
        )
        errors = [j.error for j in out if not j.judged]
        if errors:
            log.warning("mbpp: the harness could not judge %d of %d completions (excluded, not scored 0); "
                        "first: %s", len(errors), len(out), errors[0])
        return out

    def rewards(self, completions: Sequence[str], examples: Sequence[Example]) -> list[float]:
        """Fraction of each example's asserts that the completion's code passes; NaN
        (`REWARD_ERROR`) where the harness could not judge it."""
        return [j.passed for j in self.judgements(completions, examples)]

    def reward(self, completion: str, example: Example) -> float:
        """Fraction of asserts passed by one completion."""
        return self.rewards([completion], [example])[0]

    def scores(self, completions: Sequence[str], examples: Sequence[Example]) -> list[float]:
        """pass@1 per example: 1 when every assert passes (NaN where the harness could not judge)."""
        return [score_of_reward(r) for r in self.rewards(completions, examples)]

    def judge(self, completions: Sequence[str],
              examples: Sequence[Example]) -> tuple[list[float], list[float]]:
        """Rewards and pass@1 scores from one sandbox run per completion."""
        rewards = self.rewards(completions, examples)
        return rewards, [score_of_reward(r) for r in rewards]

    def pass_at_k(self, completions: Sequence[Sequence[str]], examples: Sequence[Example], k: int) -> float:
        """Mean unbiased pass@k over examples, from n >= k completions per example; completions the
        harness could not judge are left out (an example with fewer than k judged ones too)."""
        flat = [c for cs in completions for c in cs]
        owners = [e for cs, e in zip(completions, examples, strict=True) for _ in cs]
        scores = self.scores(flat, owners)
        vals, i = [], 0
        for cs in completions:
            judged = [x for x in scores[i : i + len(cs)] if not is_reward_error(x)]
            if len(judged) >= k:
                vals.append(pass_at_k(len(judged), int(sum(judged)), k))
            i += len(cs)
        return sum(vals) / len(vals) if vals else math.nan  # nothing judged: no estimate, not 0
