"""A requested regulariser that silently does nothing is caught (issue 20, item 1): the probe of
lambda * D's pull off the reference (`losses.regulariser_probe`), the trainer's warning / error and
its record, and D per token (mean and max) logged every step."""

from __future__ import annotations

import copy
import math
import warnings

import pytest
import torch

import mirrorlab.divergences as dv
from mirrorlab.config import GenerationConfig, OptimConfig, TrainConfig
from mirrorlab.divergences.base import Divergence
from mirrorlab.gbmpo import GBMPOTrainer
from mirrorlab.gbmpo.losses import REGULARISER_FLOOR, regulariser_probe

# the coefficient each built-in is used at (DivergenceConfig's default 0.04; the quickstart's
# random-init neural map at 10 with init scale 0.01; ProbL2 at the testbed's 1.0)
USUAL = {"prob_l2": 1.0, "neural": 10.0}


def _make(name: str) -> Divergence:
    if name == "custom":
        return dv.get("custom", h=lambda y: y * y * y / 6 + y * torch.log(y))
    if name == "neural":
        return dv.get("neural", seed=1, scale=0.01)
    if name == "mixture":
        return dv.get("mixture", weight=0.3)
    return dv.get(name)


def _batch(seed: int = 0, B: int = 8, T: int = 12, V: int = 50):
    g = torch.Generator().manual_seed(seed)
    ref_logits = torch.randn(B, T, V, generator=g) * 2
    comp = torch.randint(0, V, (B, T), generator=g)
    ref_logp = torch.log_softmax(ref_logits, -1).gather(-1, comp[..., None])[..., 0]
    mask = torch.ones(B, T)
    mask[:, 9:] = 0
    return ref_logp, ref_logits, mask


class Detached(Divergence):
    """KL (k3) whose value is detached: what a refactor that computes D under no_grad produces."""

    name = "detached_test"

    def sampled(self, logp, ref_logp, mask=None):
        return dv.get("kl_k3").sampled(logp, ref_logp).detach()

    def full(self, logits, ref_logits, chunk_size=8192):
        return dv.get("kl_k3").full(logits, ref_logits).detach()


def _clamped_h(y: torch.Tensor) -> torch.Tensor:
    """A custom potential clamped flat over the whole probability range: its Bregman divergence is
    identically 0 (what an over-eager clamp of a user potential does)."""
    return torch.clamp(y * y, max=-1.0)


@pytest.mark.parametrize("name", dv.names())
@pytest.mark.parametrize("estimator", ["sampled", "topk", "full"])
def test_every_registered_divergence_acts_at_its_usual_coefficient(name, estimator):
    """Registry contract: each built-in pulls the policy back off the reference at the coefficient it
    is used at, well above the floor: the check stays quiet on all of them."""
    ref_logp, ref_logits, mask = _batch()
    r = regulariser_probe(_make(name), USUAL.get(name, 0.04), estimator, ref_logp, mask, ref_logits)
    assert math.isfinite(r) and r > 100 * REGULARISER_FLOOR, (name, estimator, r)


@pytest.mark.parametrize("estimator", ["sampled", "topk", "full"])
def test_inert_regularisers_fall_below_the_floor(estimator):
    ref_logp, ref_logits, mask = _batch(1)
    kl = dv.get("kl_k3")
    usual = regulariser_probe(kl, 0.04, estimator, ref_logp, mask, ref_logits)
    tiny = regulariser_probe(kl, 1e-9, estimator, ref_logp, mask, ref_logits)
    assert tiny == pytest.approx(usual * 1e-9 / 0.04, rel=1e-3)  # linear in lambda
    assert tiny < REGULARISER_FLOOR
    assert regulariser_probe(Detached(), 0.04, estimator, ref_logp, mask, ref_logits) == 0.0
    clamped = dv.get("custom", h=_clamped_h)
    assert regulariser_probe(clamped, 0.04, estimator, ref_logp, mask, ref_logits) < REGULARISER_FLOOR
    assert regulariser_probe(kl, 0.0, estimator, ref_logp, mask, ref_logits) == 0.0


def _trainer(tiny, task, div, coef, **kw):
    model, tok = tiny
    gen = GenerationConfig(num_generations=2, max_new_tokens=4)
    cfg = TrainConfig(steps=2, prompts_per_step=2, generation=gen, optim=OptimConfig(lr=1e-3), seed=0,
                      grad_ratio_every=0, **kw)
    return GBMPOTrainer(copy.deepcopy(model), tok, task, div, cfg, coef=coef)


def test_the_trainer_warns_once_records_and_can_refuse(tiny, task):
    tr = _trainer(tiny, task, dv.get("kl_k3"), 1e-12)
    with pytest.warns(RuntimeWarning, match="numerically absent") as rec:
        hist = tr.train()
    assert len([w for w in rec if "numerically absent" in str(w.message)]) == 1  # once
    assert tr.regulariser_active is False and hist[0]["reg_probe"] < REGULARISER_FLOOR
    assert all("div_max" in h and h["div_max"] >= h["div_mean"] >= 0 for h in hist)  # D's scale, every step
    strict = _trainer(tiny, task, Detached(), 0.04, require_active_regulariser=True)
    with pytest.raises(RuntimeError, match="train.require_active_regulariser"):
        strict.train()
    ok = _trainer(tiny, task, dv.get("kl_k3"), 0.04)
    with warnings.catch_warnings():
        warnings.simplefilter("error", RuntimeWarning)
        hist = ok.train()
    assert ok.regulariser_active is True and hist[0]["reg_probe"] > 100 * REGULARISER_FLOOR
    assert math.isnan(hist[1]["reg_probe"])  # measured at step 0 (grad_ratio_every = 0: only then)
    none = _trainer(tiny, task, dv.get("kl_k3"), 0.0)
    none.train()
    assert none.regulariser_active is None  # lambda = 0 asks for no regulariser: nothing to check
