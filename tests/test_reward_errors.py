"""Typed reward failures (issue 20, item 4): "the program failed its asserts" is a real 0, "the
harness could not judge" is `REWARD_ERROR` (NaN), excluded from the group advantage, the loss and
the metric's denominator, counted as `reward_errors`, and an evaluation with too many fails.

The harness failures here are real: the sandbox's own limits (wall clock, address space, report
size) and an interpreter that exits before the harness runs; the trainer's are injected through
a task whose grader fails on chosen completions."""

from __future__ import annotations

import copy
import math
import time

import numpy as np
import pytest
import torch

import mirrorlab.divergences as dv
from mirrorlab.config import GenerationConfig, OptimConfig, TrainConfig
from mirrorlab.gbmpo import GBMPOTrainer
from mirrorlab.gbmpo.losses import advantages
from mirrorlab.gbmpo.trainer import RewardErrorRate
from mirrorlab.sandbox import SandboxLimits, SandboxPool
from mirrorlab.tasks import REWARD_ERROR, data_dir, is_reward_error
from mirrorlab.tasks.arithmetic import Arithmetic
from mirrorlab.tasks.mbpp import judge_programs

TESTS = ["assert add(1, 2) == 3", "assert add(2, 2) == 4", "assert add(0, 0) == 0"]
GOOD = "def add(a, b):\n    return a + b\n"


# --------------------------------------------------------------------------- the harness
def test_hangs_and_crashes_of_the_program_are_judged_failures_not_errors() -> None:
    """A program that hangs in one test, hangs at import, burns CPU or does not compile is judged
    (its tests fail): the harness's per-test timer ends each test, so the program cannot turn a
    0 into an excluded error by never finishing."""
    sleeper = "import time\ndef add(a, b):\n    if a == 2:\n        time.sleep(1000)\n    return a + b\n"
    progs = [GOOD, sleeper, "import time\ntime.sleep(1000)\n" + GOOD, "while True:\n    pass\n", "def (:"]
    with SandboxPool(2, timeout_s=5.0, limits=SandboxLimits(cpu_s=2)) as pool:
        t0 = time.monotonic()
        js = judge_programs(progs, [TESTS] * len(progs), pool, test_timeout_s=1.0)
        wall = time.monotonic() - t0
    assert all(j.judged for j in js), [j.error for j in js]
    assert [j.passed for j in js] == [1.0, pytest.approx(2 / 3), 0.0, 0.0, 0.0]
    # each hung test was cut at its own 1 s, not at the sandbox's 5 + 3 x 1 s wall clock
    assert wall < 5.0 + 3 * 1.0 + 5.0


@pytest.mark.parametrize("case", ["no_start", "wall_clock", "address_space", "report_size"])
def test_a_harness_that_cannot_judge_is_a_typed_error(case: str) -> None:
    """The harness never starts, or the sandbox's real limits stop it before its report ends."""
    kw: dict = {}
    test_timeout = 2.0
    if case == "no_start":  # the interpreter runs something else and exits: no harness at all
        kw["python_flags"] = ("-c", "import sys; sys.exit(3)")
    elif case == "wall_clock":  # the whole sandbox gets a few ms: killed before it reports
        kw["timeout_s"], test_timeout = 0.001, 0.001
    elif case == "address_space":  # too little memory to load the interpreter's modules
        kw["limits"] = SandboxLimits(memory_mb=8)
    else:  # the report is cut at 20 bytes: its end record is lost
        kw["limits"] = SandboxLimits(report_bytes=20)
    with SandboxPool(1, **{"timeout_s": 5.0, **kw}) as pool:
        [j] = judge_programs([GOOD], [TESTS], pool, test_timeout_s=test_timeout)
    assert not j.judged and is_reward_error(j.passed)
    want = {"no_start": "status 3", "wall_clock": "wall clock", "address_space": "status 1",
            "report_size": "truncated or malformed"}[case]
    assert want in j.error


@pytest.mark.skipif(not (data_dir() / "mbpp" / "mbpp.jsonl").is_file(), reason="MBPP data not found")
def test_mbpp_rewards_and_scores_carry_the_error() -> None:
    """Through the task: a broken harness gives NaN rewards and scores (not 0), pass@k leaves
    them out; the same completions with a working sandbox are judged."""
    from mirrorlab import tasks

    mbpp = tasks.get("mbpp", workers=1)
    e = next(x for x in mbpp.test if x.meta["task_id"] == 17)
    comps = [mbpp.reference_completion(e), "def square_perimeter(a):\n    return 0"]
    assert mbpp.judge(comps, [e] * 2) == ([1.0, 0.0], [1.0, 0.0])
    mbpp._pool = SandboxPool(1, timeout_s=5.0, python_flags=("-c", "import sys; sys.exit(3)"))
    try:
        rewards, scores = mbpp.judge(comps, [e] * 2)
        assert all(is_reward_error(x) for x in rewards + scores)
        assert math.isnan(mbpp.pass_at_k([comps], [e], k=1))  # nothing judged: no estimate, not 0
    finally:
        mbpp._pool.close()


# --------------------------------------------------------------------------- the advantage
def _oracle(r: np.ndarray, kind: str) -> np.ndarray:
    """The advantages of each group computed on its judged members alone (float64), 0 elsewhere."""
    out = np.zeros_like(r)
    for g in range(r.shape[0]):
        ok = ~np.isnan(r[g])
        x = r[g, ok]
        if x.size == 0:
            continue
        c = x - x.mean()
        if kind == "grpo":
            c = c / (x.std(ddof=1) + 1e-4) if x.size > 1 else np.zeros_like(c)
        out[g, ok] = c
    return out


@pytest.mark.parametrize("kind", ["dr_grpo", "grpo"])
def test_unjudged_samples_get_no_advantage_and_their_group_is_renormalised(kind: str) -> None:
    g = np.random.default_rng(0)
    r = g.random((6, 4))
    r[0, 1] = r[1, 0] = r[1, 3] = np.nan  # one or two errors in a group
    r[2, :3] = np.nan                     # one judged member: advantage 0
    r[3, :] = np.nan                      # a group the task could not judge at all
    adv = advantages(torch.tensor(r.ravel(), dtype=torch.float32), 4, kind).view(6, 4).numpy()
    assert np.isfinite(adv).all()
    np.testing.assert_allclose(adv, _oracle(r, kind), atol=1e-5)
    # a batch without errors takes the unchanged path: bit for bit what it always was
    clean = torch.tensor(g.random(8), dtype=torch.float32)
    c = clean.view(-1, 4)
    want = c - c.mean(1, keepdim=True)
    if kind == "grpo":
        want = want / (c.std(1, keepdim=True) + 1e-4)
    assert torch.equal(advantages(clean, 4, kind), want.reshape(-1))


# --------------------------------------------------------------------------- the trainer
class FlakyGrader(Arithmetic):
    """Arithmetic whose grader fails (REWARD_ERROR) on every `every`-th completion of a batch."""

    def __init__(self, every: int, **kw) -> None:
        super().__init__(**kw)
        self.every = every

    def _flaky(self, values: list[float]) -> list[float]:
        return [REWARD_ERROR if i % self.every == 0 else v for i, v in enumerate(values)]

    def rewards(self, completions, examples):  # noqa: ANN001, ANN201 - the Task interface
        return self._flaky(super().rewards(completions, examples))

    def scores(self, completions, examples):  # noqa: ANN001, ANN201 - the Task interface
        return self._flaky(super().scores(completions, examples))


class Alternating(Arithmetic):
    """A grader that judges every completion, alternately right and wrong (advantages never 0)."""

    def rewards(self, completions, examples):  # noqa: ANN001, ANN201 - the Task interface
        return [float(i % 2) for i in range(len(completions))]


def _trainer(tiny, task, **kw) -> GBMPOTrainer:  # noqa: ANN001
    model, tok = tiny
    gen = GenerationConfig(num_generations=4, max_new_tokens=6)
    cfg = TrainConfig(steps=2, prompts_per_step=4, generation=gen, seed=0,
                      optim=OptimConfig(lr=1e-2, weight_decay=0.0), **kw)
    return GBMPOTrainer(copy.deepcopy(model), tok, task, dv.get("kl_k3"), cfg, coef=0.04)


def test_a_step_counts_errors_and_gives_them_no_gradient(tiny) -> None:  # noqa: ANN001
    kw = {"n_train": 100, "n_val": 40, "n_test": 10}
    some = _trainer(tiny, FlakyGrader(3, **kw))
    m = some.train_step()
    assert m["reward_errors"] == 6  # 16 completions, indices 0, 3, ..., 15
    assert math.isfinite(m["loss"]) and math.isfinite(m["reward_mean"]) and math.isfinite(m["accuracy"])
    # nothing judged: no advantage and no regulariser term reach the weights
    none = _trainer(tiny, FlakyGrader(1, **kw))
    before = {k: v.clone() for k, v in none.model.state_dict().items()}
    m = none.train_step()
    assert m["reward_errors"] == 16 and math.isnan(m["reward_mean"])
    after = none.model.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)
    # control: the same trainer with a grader that judges everything (half right) moves them
    ok = _trainer(tiny, Alternating(**kw))
    ok.train_step()
    assert any(not torch.equal(before[k], v) for k, v in ok.model.state_dict().items())


def test_evaluation_leaves_errors_out_and_fails_past_the_threshold(tiny) -> None:  # noqa: ANN001
    kw = {"n_train": 100, "n_val": 40, "n_test": 10}
    honest = _trainer(tiny, Arithmetic(**kw)).evaluate("val")
    flaky = _trainer(tiny, FlakyGrader(20, **kw))  # 2 of 40: 5%, at the default threshold
    ev = flaky.evaluate("val")
    kept = [s for i, s in enumerate(honest.scores) if i % 20 != 0]
    assert ev.reward_errors == 2 and ev.n == 38
    assert ev.metric == pytest.approx(float(np.mean(kept)))
    assert ev.stderr == pytest.approx(float(np.std(kept) / math.sqrt(38)))
    strict = _trainer(tiny, FlakyGrader(20, **kw), max_reward_error_rate=0.01)
    with pytest.raises(RewardErrorRate, match="could not judge 2 of 40"):
        strict.evaluate("val")
