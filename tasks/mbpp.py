"""MBPP (Austin et al. 2021): write a Python function that passes three asserts.

Splits by task_id (test 11-510, validation 511-600, train 601-974, few-shot prompts 1-10).
The reward is the fraction of asserts that pass, each checked separately, with the code
executed in `mirrorlab.sandbox`; evaluation is pass@1 (all asserts pass), and `pass_at_k`
gives the unbiased pass@k estimator.

How an assert counts as passed: the parent parses each test into a plan (an `assert`
becomes a tree of comparisons whose operands are separate expressions). A trusted harness,
run in the sandbox before the untrusted code, reads a per-run random nonce from a pipe,
compiles every plan and keeps its own references to `exec`, `eval`, `os.write`, ... in local
variables; then it loads the solution, runs each test and writes `<nonce> <index>` to a
separate report descriptor when the test finishes without any exception (SystemExit
included) and every operand and result is a plain value (no Python-level `__eq__`,
`__bool__`, ... outside the standard library, checked recursively through containers). The
parent counts only well-formed nonce lines with increasing indices. So exiting early
(sys.exit / os._exit with status 0), redefining AssertionError or builtins, patching print,
sys.stdout, operator or ast, or returning always-equal / always-true objects earns nothing.
Not covered: a program that deliberately walks interpreter frames to read the nonce from the
harness's locals (the harness shares its process with the solution).
"""

from __future__ import annotations

import ast
import functools
import math
import re
import secrets
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from mirrorlab.sandbox import Program, SandboxLimits, SandboxPool

from .base import Example, Task, _normalise, data_dir, load_rows

SPLIT_IDS = {"prompt": (1, 10), "test": (11, 510), "val": (511, 600), "train": (601, 974)}

# The trusted harness. It must not rely on anything the solution can replace after it loads.
HARNESS = r'''
def _mirrorlab_harness():
    import os
    nonce = os.read(3, 256).decode()
    os.close(3)
    write, rep, _exec, _eval, _compile, _type, _len = os.write, 4, exec, eval, compile, type, len
    _isinstance, _str, _enumerate, _all, _bool = isinstance, str, enumerate, all, bool
    BaseExc, _FunctionType = BaseException, _type(lambda: 0)
    containers, _dict, _items = (list, tuple, set, frozenset), dict, dict.items
    _mro, _tdict = type.__dict__["__mro__"].__get__, type.__dict__["__dict__"].__get__
    stdlib = os.path.dirname(os.__file__) + "/"
    slot_types = (_type(object.__eq__), _type(list.append), _type(len), _type(None),
                  _type(object.__init__.__call__), _type(int.__dict__["real"]),
                  _type(type.__dict__["__mro__"]), _type(dict.__dict__["fromkeys"]))
    special = ("__eq__", "__ne__", "__lt__", "__le__", "__gt__", "__ge__", "__bool__", "__len__",
               "__contains__", "__iter__", "__hash__", "__getattribute__", "__mro__", "__dict__",
               "__instancecheck__", "__subclasscheck__")
    cmp_ops = {"Eq": lambda a, b: a == b, "NotEq": lambda a, b: a != b, "Lt": lambda a, b: a < b,
               "LtE": lambda a, b: a <= b, "Gt": lambda a, b: a > b, "GtE": lambda a, b: a >= b,
               "Is": lambda a, b: a is b, "IsNot": lambda a, b: a is not b,
               "In": lambda a, b: a in b, "NotIn": lambda a, b: a not in b}
    with open("tests.py") as f:  # a Python literal written by the trusted parent
        spec = _eval(f.read(), {"__builtins__": {}})
    with open("solution.py") as f:
        src = f.read()

    def prepare(p):
        # Compile every test before the untrusted code runs.
        kind = p[0]
        if kind == "cmp":
            return ("cmp", [_compile(e, "test", "eval") for e in p[1]], [cmp_ops[o] for o in p[2]])
        if kind == "not":
            return ("not", prepare(p[1]))
        if kind in ("and", "or"):
            return (kind, [prepare(q) for q in p[1]])
        return (kind, _compile(p[1], "test", "exec" if kind == "exec" else "eval"))

    plans = []
    for p in spec["plans"]:
        try:
            plans.append(prepare(p) if p is not None else None)
        except BaseExc:
            plans.append(None)
    setup = _compile(spec["setup"], "setup.py", "exec") if spec["setup"] else None

    def suspicious(t):
        # Comparison/truth methods written in Python outside the standard library.
        for klass in _mro(t):
            d = _tdict(klass)
            for n in special:
                if n in d:
                    f = d[n]
                    if _isinstance(f, slot_types):
                        continue
                    code = _isinstance(f, _FunctionType) and f.__code__
                    if not code or not code.co_filename.startswith(stdlib):
                        return True
        return False

    def plain(v, depth=0):
        t = _type(v)
        if depth > 100 or suspicious(t) or suspicious(_type(t)):
            return False
        if _isinstance(v, containers):
            return _all(plain(x, depth + 1) for x in v)
        if _isinstance(v, _dict):
            return _all(plain(k, depth + 1) and plain(x, depth + 1) for k, x in _items(v))
        return True

    def value(code):
        v = _eval(code, g)
        if not plain(v):
            raise ValueError("operand with overridden comparison or truth")
        return v

    def truth(v):
        if _type(v) is _bool:
            return v
        if not plain(v):
            raise ValueError("result with overridden truth")
        return _bool(v)

    def run(p):
        kind = p[0]
        if kind == "cmp":
            vals = [value(c) for c in p[1]]
            return _all(truth(op(vals[k], vals[k + 1])) for k, op in _enumerate(p[2]))
        if kind == "not":
            return not run(p[1])
        if kind == "and":
            return _all([run(q) for q in p[1]])
        if kind == "or":
            return True in [run(q) for q in p[1]]
        return truth(value(p[1]))

    g = {"__name__": "__main__", "__builtins__": __builtins__}
    try:
        _exec(_compile(src, "solution.py", "exec"), g)
        if setup is not None:  # MBPP's setup code builds test inputs from the solution's classes
            _exec(setup, g)
    except BaseExc:
        return
    for i, p in _enumerate(plans):
        if p is None:
            continue
        try:
            if p[0] == "exec":
                _exec(p[1], g)
            elif run(p) is not True:
                continue
        except BaseExc:
            continue
        write(rep, (nonce + " " + _str(i) + "\n").encode())


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
    """How the harness checks one test: an `assert` becomes a tree of expressions (operands are
    evaluated and checked separately); other statements are executed; None if it does not parse."""
    try:
        tree = ast.parse(test)
    except SyntaxError:
        return None
    if len(tree.body) == 1 and isinstance(tree.body[0], ast.Assert):
        return _plan(tree.body[0].test)
    return ("exec", test)


def extract_code(completion: str) -> str:
    """The code of a completion: the first ```python (or any ```) block, [BEGIN]...[DONE], or all."""
    fence = re.search(r"```[ \t]*(?:python3?|py)?[ \t]*\n(.*?)(?:```|\Z)", completion, re.S | re.I)
    if fence:
        return fence.group(1).strip("\n")
    m = re.search(r"\[BEGIN\](.*?)(?:\[DONE\]|\Z)", completion, re.S)
    if m:
        return m.group(1).strip("\n")
    return completion.strip("\n")


def parse_report(report: str, nonce: str, n_tests: int) -> int:
    """Number of asserts the harness reported as passed (valid nonce lines, increasing index)."""
    passed, last = 0, -1
    for line in report.splitlines():
        parts = line.split(" ")
        if len(parts) != 2 or parts[0] != nonce or not parts[1].isdigit():
            continue
        i = int(parts[1])
        if last < i < n_tests:
            passed += 1
            last = i
    return passed


def _spec(tests: Sequence[str], setup: str) -> str:
    return repr({"plans": [test_plan(t) for t in tests], "setup": setup})


def assert_fractions(
    codes: Sequence[str], tests: Sequence[Sequence[str]], pool: SandboxPool,
    setups: Sequence[str] | None = None,
) -> list[float]:
    """For each program, the fraction of its assert statements that pass (each run separately)."""
    setups = setups if setups is not None else [""] * len(codes)
    nonces = [secrets.token_hex(16) for _ in codes]
    progs = [
        Program(HARNESS, secret=n, files=(("solution.py", c), ("tests.py", _spec(t, s))))
        for c, t, s, n in zip(codes, tests, setups, nonces, strict=True)
    ]
    out = []
    for r, t, n in zip(pool.map(progs), tests, nonces, strict=True):
        out.append(parse_report(r.report, n, len(t)) / len(t) if t else 0.0)
    return out


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
    """MBPP with a sandboxed, per-assert reward and pass@1 evaluation."""

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
        self.timeout_s = timeout_s
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

    def rewards(self, completions: Sequence[str], examples: Sequence[Example]) -> list[float]:
        """Fraction of each example's asserts that the completion's code passes (sandboxed, parallel)."""
        if len(completions) != len(examples):
            raise ValueError(f"got {len(completions)} completions for {len(examples)} examples")
        return assert_fractions(
            [extract_code(c) for c in completions], [e.meta["tests"] for e in examples], self.pool,
            [e.meta.get("setup", "") for e in examples],
        )

    def reward(self, completion: str, example: Example) -> float:
        """Fraction of asserts passed by one completion."""
        return self.rewards([completion], [example])[0]

    def scores(self, completions: Sequence[str], examples: Sequence[Example]) -> list[float]:
        """pass@1 per example: 1 when every assert passes."""
        return [1.0 if r >= 1.0 else 0.0 for r in self.rewards(completions, examples)]

    def pass_at_k(self, completions: Sequence[Sequence[str]], examples: Sequence[Example], k: int) -> float:
        """Mean unbiased pass@k over examples, from n >= k completions per example."""
        flat = [c for cs in completions for c in cs]
        owners = [e for cs, e in zip(completions, examples, strict=True) for _ in cs]
        scores = self.scores(flat, owners)
        vals, i = [], 0
        for cs in completions:
            n = len(cs)
            vals.append(pass_at_k(n, int(sum(scores[i : i + n])), k))
            i += n
        return sum(vals) / len(vals) if vals else 0.0
