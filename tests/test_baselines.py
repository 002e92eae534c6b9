"""The KL baselines a reviewer asks for (issue 13): what each estimator's gradient is on-policy (exact
enumeration in float64), the regulariser placed in the reward, the standard baseline set of a
comparison, and the completion samples every run logs to MLflow."""

from __future__ import annotations

import copy
import json
import re

import numpy as np
import pandas as pd
import pytest
import torch
from mlflow import MlflowClient

from mirrorlab import divergences as dv
from mirrorlab.compare import compare_methods, method_slug, results_text, run_compare
from mirrorlab.config import (
    STANDARD_BASELINES,
    START_LABEL,
    ConfigError,
    DivergenceConfig,
    GenerationConfig,
    OptimConfig,
    TrainConfig,
    config_from_dict,
)
from mirrorlab.divergences import PotentialMixin
from mirrorlab.gbmpo import GBMPOTrainer, Regulariser, advantages, penalised_rewards, sample_tables
from mirrorlab.maps import build_divergence
from mirrorlab.records import FINISHED, Outcome, merge_samples

V = 7  # vocabulary of the enumerated expectations
STD_LABELS = [lab for lab, _ in STANDARD_BASELINES]


# --------------------------------------------------------------------------- exact enumeration
def _setup(seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    theta = torch.randn(V, generator=g, dtype=torch.float64)
    ref_lp = torch.log_softmax(torch.randn(V, generator=g, dtype=torch.float64) * 1.5, -1)
    return theta, ref_lp


def _grad(f, theta: torch.Tensor) -> torch.Tensor:
    """grad_theta f(log_softmax(theta)), the whole expression differentiated."""
    t = theta.clone().requires_grad_(True)
    (g,) = torch.autograd.grad(f(torch.log_softmax(t, -1)), t)
    return g


def _onpolicy(div: dv.Divergence, theta: torch.Tensor, ref_lp: torch.Tensor,
              mode: str = "loss") -> torch.Tensor:
    """E_{a ~ pi}[gradient estimate of one sampled token a], summed exactly over the vocabulary with
    the weights pi(a) held fixed (the sample is drawn, then differentiated):
    loss: grad est(a); ratio: grad (rho est(a)), rho = pi/sg(pi) (train.reg_times_ratio);
    reward: the policy-gradient term s(a) * sg(est(a)), s = grad log pi(a) (placement reward)."""
    pi = torch.softmax(theta, -1)
    total = torch.zeros(V, dtype=torch.float64)
    for a in range(V):
        t = theta.clone().requires_grad_(True)
        lp = torch.log_softmax(t, -1)[a : a + 1]
        est = div.sampled(lp, ref_lp[a : a + 1])
        if mode == "ratio":
            est = est * torch.exp(lp - lp.detach())
        elif mode == "reward":
            est = lp * est.detach()
        (g,) = torch.autograd.grad(est.sum(), t)
        total += pi[a] * g
    return total


def _kls(ref_lp: torch.Tensor):
    rkl = lambda lp: (lp.exp() * (lp - ref_lp)).sum()  # noqa: E731 - KL(pi || ref), the reverse KL
    fkl = lambda lp: (ref_lp.exp() * (ref_lp - lp)).sum()  # noqa: E731 - KL(ref || pi), the forward KL
    half_l2 = lambda lp: (lp.exp() * 0.5 * (lp - ref_lp) ** 2).sum()  # noqa: E731 - E_pi[k2]
    return rkl, fkl, half_l2


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_kl_estimators_expected_values_and_gradients_are_as_documented(seed):
    """The table of `mirrorlab/divergences/builtin.py` and docs/estimators.md, cell by cell."""
    theta, ref_lp = _setup(seed)
    rkl, fkl, half_l2 = _kls(ref_lp)
    g_r, g_f, g_2 = _grad(rkl, theta), _grad(fkl, theta), _grad(half_l2, theta)
    zero = torch.zeros(V, dtype=torch.float64)
    want = {  # estimator: (E value, loss, loss x rho, reward)
        "kl_k1": (rkl, zero, g_r, g_r),
        "kl_k2": (half_l2, g_r, g_2, g_2 - g_r),
        "kl_k3": (rkl, g_f, g_r, g_r - g_f),
        "kl_k1+": (rkl, g_r, 2 * g_r, g_r),
        "kl_k3+": (rkl, g_r, 2 * g_r - g_f, g_r - g_f),
    }
    lp = torch.log_softmax(theta, -1)
    assert float(g_r.norm()) > 1e-2 and float((g_r - g_f).norm()) > 1e-2  # the targets differ
    for name, (value, loss, ratio, reward) in want.items():
        d = dv.get(name)
        ev = (lp.exp() * d.sampled(lp, ref_lp)).sum()
        torch.testing.assert_close(ev, value(lp), rtol=1e-12, atol=1e-14, msg=f"{name} value")
        for mode, target in (("loss", loss), ("ratio", ratio), ("reward", reward)):
            got = _onpolicy(d, theta, ref_lp, mode)
            torch.testing.assert_close(got, target, rtol=1e-10, atol=1e-13, msg=f"{name} {mode}")
    # the unbiased reverse-KL gradient: k2 in the loss equals k1 in the reward (arXiv 2510.01555)
    torch.testing.assert_close(_onpolicy(dv.get("kl_k2"), theta, ref_lp),
                               _onpolicy(dv.get("kl_k1"), theta, ref_lp, "reward"), rtol=1e-10, atol=1e-13)


def test_straight_through_variants_have_one_value_and_the_other_gradient():
    g = torch.Generator().manual_seed(3)
    lp = torch.log(torch.rand(50, generator=g, dtype=torch.float64).clamp_min(1e-6)).requires_grad_(True)
    rp = torch.log(torch.rand(50, generator=g, dtype=torch.float64).clamp_min(1e-6))
    for name, value in (("kl_k3+", "kl_k3"), ("kl_k1+", "kl_k1")):
        st, v, k2 = dv.get(name), dv.get(value), dv.get("kl_k2")
        assert torch.equal(st.sampled(lp, rp), v.sampled(lp, rp))  # exactly the value's
        (gs,) = torch.autograd.grad(st.sampled(lp, rp).sum(), lp)
        (g2,) = torch.autograd.grad(k2.sampled(lp, rp).sum(), lp)
        (gv,) = torch.autograd.grad(v.sampled(lp, rp).sum(), lp)
        assert torch.equal(gs, g2) and not torch.allclose(gs, gv)  # exactly k2's, not the value's
    logits = torch.randn(3, V, generator=g, dtype=torch.float64)
    ref = torch.randn(3, V, generator=g, dtype=torch.float64)
    torch.testing.assert_close(dv.get("kl_k3+").full(logits, ref), dv.get("kl_k3").full(logits, ref))


def _bregmans() -> dict[str, dv.Divergence]:
    out = {"prob_l2": dv.get("prob_l2"), "neg_entropy": dv.get("neg_entropy"),
           "neural": dv.get("neural", seed=3, scale=0.5), "mixture": dv.get("mixture", weight=0.3),
           "custom": dv.get("custom", h=lambda y: y**3 / 6 + y * torch.log(y))}
    assert all(isinstance(d, PotentialMixin) for d in out.values())
    return out


@pytest.mark.parametrize("name", list(_bregmans()))
def test_bregman_sampled_estimator_gradients_are_as_documented(name):
    """D_h(y, y0) at the sampled token: E_pi[value] = sum_a pi D_h(pi_a, ref_a); in the loss
    E_pi[grad] = sum_a pi_a (h'(pi_a) - h'(ref_a)) grad pi_a; x rho: grad E_pi[value]; in the reward:
    sum_a D_h(pi_a, ref_a) grad pi_a (base.Divergence's docstring)."""
    d = _bregmans()[name]
    theta, ref_lp = _setup(4)
    pi = torch.softmax(theta, -1)
    jac = torch.autograd.functional.jacobian(lambda t: torch.softmax(t, -1), theta)  # [a, theta]
    with torch.no_grad():
        dvals = d.sampled(torch.log(pi), ref_lp)
        coeff = d.phi_inv(pi) - d.phi_inv(ref_lp.exp())  # h'(pi_a) - h'(ref_a), from the mirror map
    loss_target = (pi * coeff) @ jac
    torch.testing.assert_close(_onpolicy(d, theta, ref_lp), loss_target, rtol=1e-9, atol=1e-12)
    ratio_target = _grad(lambda lp: (lp.exp() * d.sampled(lp, ref_lp)).sum(), theta)
    torch.testing.assert_close(_onpolicy(d, theta, ref_lp, "ratio"), ratio_target, rtol=1e-9, atol=1e-12)
    torch.testing.assert_close(_onpolicy(d, theta, ref_lp, "reward"), dvals @ jac, rtol=1e-9, atol=1e-12)
    # not the gradient of the full divergence sum_a D_h(pi_a, ref_a) (that has no pi weights)
    full_grad = _grad(lambda lp: d.full(lp.unsqueeze(0), ref_lp.unsqueeze(0)).sum(), theta)
    torch.testing.assert_close(full_grad, coeff @ jac, rtol=1e-9, atol=1e-12)
    assert float((full_grad - loss_target).norm()) > 1e-3


def test_sequence_level_k1_in_reward_is_the_sequence_kl_gradient_and_k2_in_loss_is_not():
    """Two-token completions, tabular policy, every sequence enumerated: the reward placement
    (score of the sequence x sg(sum_t k1_t)) gives grad KL(pi(seq) || ref(seq)) exactly; k2 in the loss
    gives only the per-position part (the prefix distribution held fixed); the difference is
    sum_a grad pi_1(a) KL_2(a), the effect of the first token on the second token's KL."""
    n = 4
    g = torch.Generator().manual_seed(5)
    th1 = torch.randn(n, generator=g, dtype=torch.float64)
    th2 = torch.randn(n, n, generator=g, dtype=torch.float64)
    r1 = torch.log_softmax(torch.randn(n, generator=g, dtype=torch.float64), -1)
    r2 = torch.log_softmax(torch.randn(n, n, generator=g, dtype=torch.float64), -1)
    params = torch.cat([th1, th2.reshape(-1)])

    def logps(p):
        return torch.log_softmax(p[:n], -1), torch.log_softmax(p[n:].view(n, n), -1)

    def seq_kl(p):
        l1, l2 = logps(p)
        lseq = l1[:, None] + l2  # log pi(a, b)
        return (lseq.exp() * (lseq - (r1[:, None] + r2))).sum()

    p0 = params.clone().requires_grad_(True)
    (target,) = torch.autograd.grad(seq_kl(p0), p0)
    with torch.no_grad():
        l1, l2 = logps(params)
        w = (l1[:, None] + l2).exp()  # pi(a, b), held fixed
    k1, k2 = dv.get("kl_k1"), dv.get("kl_k2")
    reward = torch.zeros_like(params)
    loss = torch.zeros_like(params)
    for a in range(n):
        for b in range(n):
            p = params.clone().requires_grad_(True)
            q1, q2 = logps(p)
            lp = torch.stack([q1[a], q2[a, b]])
            rp = torch.stack([r1[a], r2[a, b]])
            pen = k1.sampled(lp, rp).sum().detach()
            (gr,) = torch.autograd.grad(lp.sum() * pen, p, retain_graph=True)  # REINFORCE, penalised reward
            (gl,) = torch.autograd.grad(k2.sampled(lp, rp).sum(), p)
            reward += w[a, b] * gr
            loss += w[a, b] * gl
    torch.testing.assert_close(reward, target, rtol=1e-10, atol=1e-13)
    with torch.no_grad():
        kl2 = (l2.exp() * (l2 - r2)).sum(-1)  # KL of the second token after each first token
    missing = torch.autograd.functional.jacobian(lambda p: torch.softmax(p[:n], -1), params).T @ kl2
    torch.testing.assert_close(loss + missing, target, rtol=1e-10, atol=1e-13)
    assert float(missing.norm()) > 1e-2


# --------------------------------------------------------------------------- reward placement
def test_penalised_rewards_by_hand_and_detached():
    r = torch.tensor([1.0, 0.0, 0.5])
    d = torch.tensor([[0.1, 0.2, 9.0], [0.3, 0.0, 0.0], [0.05, 0.05, 0.05]], requires_grad=True)
    m = torch.tensor([[1, 1, 0], [1, 0, 0], [1, 1, 1]])
    pr, pen = penalised_rewards(r, d, m, 0.5)
    torch.testing.assert_close(pen, torch.tensor([0.15, 0.15, 0.075]))
    torch.testing.assert_close(pr, r - pen)
    assert not pr.requires_grad and not pen.requires_grad


def _cfg(**kw):
    base = dict(steps=2, prompts_per_step=4, generation=GenerationConfig(num_generations=4, max_new_tokens=6),
                optim=OptimConfig(lr=1e-3), seed=0)
    base.update(kw)
    return TrainConfig(**base)


class _Recording(GBMPOTrainer):
    """Records the rollout, the reference log-probs, the advantages and the divergence's inputs."""

    def __init__(self, *a, always_ref: bool = False, **kw):
        self.seen: dict = {"ro": [], "ref": [], "adv": [], "in_loss": [], "div_inputs_grad": []}
        self.always_ref = always_ref
        super().__init__(*a, **kw)

    def _needs_ref(self):
        return self.divergence is not None and (self.always_ref or self.coef != 0.0)

    def rollout(self, examples, with_logps=None):
        ro = super().rollout(examples, with_logps)
        self.seen["ro"].append(ro)
        return ro

    def _reference(self, ro, rows, trunk=None):
        lp, logits = super()._reference(ro, rows, trunk)
        self.seen["ref"].append(lp)
        return lp, logits

    def _optimise(self, ro, adv, mask, slices, totals, refs, olds, in_loss, want_ratio, trunks=None):
        self.seen["adv"].append(adv.clone())
        self.seen["in_loss"].append(in_loss)
        return super()._optimise(ro, adv, mask, slices, totals, refs, olds, in_loss, want_ratio, trunks)


def _watch(div):
    calls = []
    inner = div.sampled

    def sampled(lp, rp, mask=None):
        calls.append(lp.requires_grad or rp.requires_grad)
        return inner(lp, rp, mask)

    div.sampled = sampled
    return calls


@pytest.mark.parametrize("name", ["kl_k1", "prob_l2"])
def test_reward_placement_advantages_from_penalised_rewards_and_no_d_gradient(tiny, task, name):
    model, tok = tiny
    div = dv.get(name)
    calls = _watch(div)
    coef = 0.7
    cfg = _cfg(advantage="grpo", grad_ratio_every=1, micro_batch_size=8)
    tr = _Recording(copy.deepcopy(model), tok, task, div, cfg, coef=coef, placement="reward")
    hist = tr.train(2)
    assert calls and not any(calls)  # D only ever saw detached log-probs
    assert tr.seen["in_loss"] == [False, False]  # no D term in the loss
    for step, m in enumerate(hist):
        ro = tr.seen["ro"][step]
        ref = torch.cat(tr.seen["ref"][2 * step: 2 * step + 2])  # two micro-batches per step
        cm = ro.completion_mask
        d = dv.get(name).sampled(ro.old_logps, ref, cm)
        pen = coef * (d * cm).sum(1)
        want = advantages(ro.rewards - pen, 4, "grpo")
        torch.testing.assert_close(tr.seen["adv"][step], want, rtol=1e-6, atol=1e-6)
        assert m["reg_loss"] == 0.0 and m["grad_ratio"] != m["grad_ratio"]  # NaN: no regulariser gradient
        assert m["reward_penalty"] == pytest.approx(float(pen.mean()), rel=1e-5, abs=1e-9)
        assert m["div_mean"] == pytest.approx(float((d * cm).sum() / cm.sum()), rel=1e-5, abs=1e-9)
    assert hist[-1]["reward_penalty"] > 0


def test_reward_placement_at_lambda_zero_is_the_unregularised_update(tiny, task):
    """One real trainer step: no divergence vs k1 in the reward at lambda 0 with the reference pass
    and the penalty computed anyway (the sampler keeping its log-probs must not change the draw)."""
    model, tok = tiny
    plain = GBMPOTrainer(copy.deepcopy(model), tok, task, None, _cfg(), coef=0.0)
    plain.train(1)
    tr = _Recording(copy.deepcopy(model), tok, task, dv.get("kl_k1"), _cfg(), coef=0.0, placement="reward",
                    always_ref=True)
    tr.train(1)
    assert tr.seen["ref"] and tr.seen["ro"][0].old_logps is not None  # the penalty path ran
    pairs = zip(tr.model.parameters(), plain.model.parameters(), strict=True)
    assert all(torch.equal(a, b) for a, b in pairs)


def test_placement_flows_from_config_through_the_builder(tiny, task):
    reg = build_divergence(DivergenceConfig(name="neural", coef=2.0, placement="reward"))
    assert isinstance(reg, Regulariser) and reg.placement == "reward" and reg.coef == 2.0
    model, tok = tiny
    tr = GBMPOTrainer(copy.deepcopy(model), tok, task, dv.get("kl_k3"), _cfg(), coef=0.1)
    assert tr.placement == "loss"
    tr.set_regulariser(reg)
    assert tr.placement == "reward" and tr.coef == 2.0 and tr.divergence.name == "neural"
    (m,) = tr.train(1)
    assert m["reg_loss"] == 0.0 and m["reward_penalty"] >= 0.0
    with pytest.raises(ValueError, match="sampled"):
        tr.set_regulariser(Regulariser(dv.get("kl_k3"), 0.1, "full", 64, "reward"))
    with pytest.raises(ConfigError, match="estimator=sampled"):
        config_from_dict({"divergence": {"placement": "reward", "estimator": "full"}})


# --------------------------------------------------------------------------- completion samples
def test_trainer_collects_bounded_samples_at_first_last_and_eval(tiny, task):
    model, tok = tiny
    cfg = _cfg(steps=5, log_completions={"n": 3, "every": 2, "max_chars": 16})
    tr = GBMPOTrainer(copy.deepcopy(model), tok, task, dv.get("kl_k3"), cfg, coef=0.04)
    hist = tr.train()
    steps = [m["step"] for m in hist if "samples" in m]
    assert steps == [1, 2, 4, 5]
    ev = tr.evaluate("val", n=10)
    tables = sample_tables(hist, ev, "val")
    assert list(tables) == ["step_0001", "step_0002", "step_0004", "step_0005", "eval_val"]
    for rows in tables.values():
        assert len(rows) == 3
        for r in rows:
            assert len(r["prompt"]) <= 16 and len(r["completion"]) <= 16 and r["length"] >= 1
            assert set(r) >= {"step", "split", "example_id", "prompt", "completion", "target", "correct",
                              "score", "length"}
            assert r["correct"] == (r["score"] >= 1.0)
    train_ex = {e.id: e for e in task.train}
    for r in tables["step_0001"] + tables["step_0005"]:  # rows line up: text, example, reward, score
        ex = train_ex[r["example_id"]]
        assert r["prompt"] == ex.question[:16] or r["prompt"].endswith("...")
        assert task.rewards([r["completion"]], [ex])[0] == pytest.approx(r["reward"])
        assert task.scores([r["completion"]], [ex])[0] == pytest.approx(r["score"])
    for r in tables["step_0001"] + tables["step_0005"]:
        assert "reward" in r and r["target"] == str(train_ex[r["example_id"]].answer)[:16]
    # evaluation rows carry no reward column (greedy eval has none), not an all-null one
    ev_rows = tables["eval_val"]
    assert ev_rows[0]["example_id"] == task.val[0].id and all("reward" not in r for r in ev_rows)
    assert [r["target"] for r in ev_rows] == [str(e.answer)[:16] for e in task.val[:3]]
    off = GBMPOTrainer(copy.deepcopy(model), tok, task, None, _cfg(log_completions={"n": 0}))
    assert not any("samples" in m for m in off.train(2)) and off.evaluate("val", n=4).samples == []


def test_outcome_samples_stay_out_of_the_journal_and_merge_by_seed():
    rows = {"eval_val": [{"step": 3, "completion": "12\n", "score": 1.0}]}
    a = Outcome(0, 0, FINISHED, fitness=0.5, samples=rows)
    b = Outcome(0, 1, FINISHED, fitness=0.4, samples=rows)
    d = a.to_dict()
    assert "samples" not in d and Outcome.from_dict(json.loads(json.dumps(d))).samples == {}
    m = merge_samples([a, b], [7, 9])
    assert [r["seed"] for r in m["eval_val"]] == [7, 9]


# --------------------------------------------------------------------------- standard baselines
def _compare_cfg(tmp_path, **compare):
    return config_from_dict({
        "name": "baselines", "output_dir": str(tmp_path / "runs"),
        "task": {"name": "arithmetic", "params": {"n_train": 200, "n_val": 20, "n_test": 20}},
        "train": {"steps": 1, "prompts_per_step": 2,
                  "generation": {"num_generations": 2, "max_new_tokens": 6},
                  "log_completions": {"n": 3, "max_chars": 20}},
        "tracking": {"tracking_uri": f"sqlite:///{tmp_path / 'mlflow.db'}", "experiment": "baselines"},
        "compare": {"seeds": [0], "eval_size": 5, **compare},
    })


def test_standard_set_expands_as_documented(tmp_path):
    cfg = _compare_cfg(tmp_path, baselines="standard", baseline_coef=0.1,
                       methods=[{"label": "ProbL2", "divergence": {"name": "prob_l2", "coef": 1.0}}])
    ms = compare_methods(cfg)
    assert [m.label for m in ms] == [*STD_LABELS, "ProbL2"]
    got = {m.label: (m.divergence.name, m.divergence.coef, m.divergence.placement) for m in ms[:4]}
    assert got == {"lambda 0": ("kl_k3", 0.0, "loss"), "KL k1 in reward": ("kl_k1", 0.1, "reward"),
                   "KL k2 in loss": ("kl_k2", 0.1, "loss"), "KL k3 in loss": ("kl_k3", 0.1, "loss")}
    assert cfg.compare.start_row and not cfg.compare.include_start
    assert [m.label for m in compare_methods(_compare_cfg(tmp_path, baselines="standard"))] == [
        *STD_LABELS, "kl_k3"]  # no methods: the single divergence section after the standard rows
    assert _compare_cfg(tmp_path, baselines="standard", baseline="KL k2 in loss").compare.baseline
    with pytest.raises(ConfigError, match="reserved"):
        _compare_cfg(tmp_path, baselines="standard",
                     methods=[{"label": "KL k2 in loss", "divergence": {"name": "kl_k2"}}])
    with pytest.raises(ConfigError, match="not a method label"):
        _compare_cfg(tmp_path, baseline="KL k2 in loss")  # standard labels only with the standard set


def _table(client: MlflowClient, run_id: str, path: str, tmp) -> pd.DataFrame:
    """A table logged with `log_table`, read back as `mlflow.load_table` would (without global state):
    the run lists it in its `mlflow.loggedArtifacts` tag, the file is pandas' split-oriented JSON."""
    logged = json.loads(client.get_run(run_id).data.tags["mlflow.loggedArtifacts"])
    assert {"path": path, "type": "table"} in logged
    local = client.download_artifacts(run_id, path, str(tmp))
    return pd.read_json(local, orient="split", dtype=False)


def test_standard_set_rows_in_table_and_mlflow_with_completion_samples(tmp_path):
    methods = [{"label": "ProbL2", "divergence": {"name": "prob_l2", "coef": 1.0}},
               {"label": "k3 again", "divergence": {"name": "kl_k3", "coef": 0.04}}]  # = "KL k3 in loss"
    cfg = _compare_cfg(tmp_path, baselines="standard", methods=methods, baseline="KL k3 in loss")
    res = run_compare(cfg, out_dir=tmp_path / "out", progress=False)
    labels = [START_LABEL, *STD_LABELS, "ProbL2", "k3 again"]
    assert [m.label for m in res.methods] == labels
    info = {m.label: m.divergence for m in res.methods}
    assert info["KL k1 in reward"]["placement"] == "reward" and info["KL k3 in loss"]["placement"] == "loss"
    assert res.best_baseline in STD_LABELS and {c.method for c in res.vs_best} == {"ProbL2", "k3 again"}
    text = results_text(res)
    for lab in labels:
        assert lab in text
    assert "kl_k1 @ 0.04, reward" in text and "none (lambda 0)" in text and "vs best baseline" in text
    saved = json.loads((tmp_path / "out" / "results.json").read_text())
    assert saved["methods"][2]["divergence"]["placement"] == "reward"
    same = {r.method: r.metric for r in res.runs}
    assert same["k3 again"] == same["KL k3 in loss"]  # identical arm: the run is reused

    client = MlflowClient(tracking_uri=cfg.tracking.tracking_uri)
    parent = client.get_run(res.meta["mlflow_run_id"])
    kids = client.search_runs([parent.info.experiment_id],
                              filter_string=f"tags.mlflow.parentRunId = '{parent.info.run_id}'")
    by = {r.data.tags["mirrorlab.method"]: r for r in kids}
    assert set(by) == set(labels)
    assert by["k3 again"].data.tags["mirrorlab.same_as"] == "KL k3 in loss"
    assert by["KL k1 in reward"].data.params["divergence.placement"] == "reward"
    assert "train/reward_penalty" in by["KL k1 in reward"].data.metrics
    # per-method summaries on the parent run: one key per statistic, the method's slug after the
    # slash (MLflow groups a statistic's methods in one chart section), slugs distinct per method
    slugs = {lab: method_slug(lab) for lab in labels}
    assert len(set(slugs.values())) == len(labels)
    assert all(re.fullmatch(r"[a-z0-9.-]+", v) for v in slugs.values())
    for lab in labels:
        assert f"accuracy_mean/{slugs[lab]}" in parent.data.metrics, lab
    for lab in ("ProbL2", "k3 again"):
        assert f"diff_vs_best_baseline/{slugs[lab]}" in parent.data.metrics
    # the sortable summary table, with the verdicts, and the children tagged with their compare run
    summ = _table(client, parent.info.run_id, "summary.json", tmp_path)
    assert list(summ["method"]) == labels and (summ["verdict"] == "(baseline)").sum() == 1
    assert all(r.data.tags["mirrorlab.compare_run"] == parent.info.run_id for r in by.values())
    # child runs span the training and evaluation they record (times taken where the run trained)
    for rr in res.runs:
        if rr.wall_s > 0:  # 0: a row reusing an identical arm's run
            info = client.get_run(rr.run_id).info
            assert info.end_time - info.start_time >= int(1000 * rr.wall_s) - 2, rr.method
    # completion tables on every child run, bounded
    for lab, run in by.items():
        files = {f.path for f in client.list_artifacts(run.info.run_id, "completions")}
        want = {"completions/eval_test.json"} | (set() if lab == START_LABEL else
                                                 {"completions/step_0001.json"})
        assert want <= files, (lab, files)
        df = _table(client, run.info.run_id, "completions/eval_test.json", tmp_path)
        assert len(df) == 3 and df["completion"].str.len().max() <= 20 and df["prompt"].str.len().max() <= 20
    tr = _table(client, by["KL k1 in reward"].info.run_id, "completions/step_0001.json", tmp_path)
    assert len(tr) == 3 and {"reward", "score", "length", "penalty"} <= set(tr.columns)
    # the parent links each (method, seed) to its child run and tables
    idx_path = client.download_artifacts(parent.info.run_id, "completions_index.json", str(tmp_path))
    idx = json.loads(open(idx_path).read())
    assert {(e["method"], e["seed"]) for e in idx} == {(lab, 0) for lab in labels}
    assert all(e["run_id"] == by[e["method"]].info.run_id for e in idx)


def test_search_candidates_log_their_completion_samples(tmp_path):
    from test_search import children, tiny_cfg

    from mirrorlab.search import Search

    cfg = tiny_cfg(tmp_path, "samples", strategy="random", params={},
                   evaluator={"seeds": 2, "inner_steps": 2})
    cfg.search.strategy.population = 2
    cfg.search.strategy.generations = 1
    cfg.train.log_completions.n = 2
    res = Search(cfg).run()
    client = MlflowClient(tracking_uri=cfg.tracking.tracking_uri)
    kids = [r for r in children(client, res.parent_run_id) if r.data.tags.get("mirrorlab.candidate_id")]
    assert kids
    for run in kids:
        files = {f.path for f in client.list_artifacts(run.info.run_id, "completions")}
        want = {"completions/step_0001.json", "completions/step_0002.json", "completions/eval_val.json"}
        assert want <= files
        df = _table(client, run.info.run_id, "completions/eval_val.json", tmp_path)
        seeds = sorted(json.loads(run.data.tags["mirrorlab.seeds"]))
        assert len(df) == 4 and sorted(set(df["seed"])) == seeds
    ckpt = json.loads((tmp_path / "ckpt-samples" / "checkpoint.json").read_text())
    assert "example_id" not in json.dumps(ckpt)  # samples stay out of the checkpoint
    assert np.isfinite(res.best_fitness)
