"""The anchor as a choice (issue 20, item 2): `divergence.anchor: ref | lagged`. With a lag of one
step and mu = 1 the reference is the policy itself, so D = 0 and the regulariser adds no gradient
(the run equals lambda = 0); `ref` is unchanged; a lagged run's `reset` returns to the true start;
the LoRA path anchors on a copy of the adapter."""

from __future__ import annotations

import copy

import pytest
import torch

import mirrorlab.divergences as dv
from mirrorlab.config import (
    GenerationConfig,
    LoraConfig,
    ModelConfig,
    OptimConfig,
    TrainConfig,
    config_from_dict,
)
from mirrorlab.gbmpo import GBMPOTrainer
from mirrorlab.models import load_model


def _cfg(steps: int = 3) -> TrainConfig:
    gen = GenerationConfig(num_generations=4, max_new_tokens=6)
    return TrainConfig(steps=steps, prompts_per_step=4, generation=gen, optim=OptimConfig(lr=3e-3), seed=0,
                       grad_ratio_every=1)


def _curve(model, tok, task, coef, steps: int = 3, **kw):
    tr = GBMPOTrainer(copy.deepcopy(model), tok, task, dv.get("kl_k3"), _cfg(steps), coef=coef, **kw)
    return tr, tr.train()


@pytest.mark.parametrize("lora", [False, True])
def test_a_lag_of_one_step_is_no_regulariser_and_ref_is_unchanged(tiny, task, lora):
    model, tok = tiny
    if lora:
        model, _ = load_model(ModelConfig(name="tiny", lora=LoraConfig(r=4, alpha=8)))
    lag_tr, lag = _curve(model, tok, task, 1.0, anchor="lagged", anchor_every=1)
    _, none = _curve(model, tok, task, 0.0)
    _, ref = _curve(model, tok, task, 1.0)
    _, ref_again = _curve(model, tok, task, 1.0, anchor="ref", anchor_every=1)
    for h in lag:  # the reference is the policy itself at every step
        assert h["div_mean"] == 0.0 and h["div_max"] == 0.0 and h["reg_loss"] == 0.0
        assert h["grad_ratio"] == 0.0
    assert [h["loss"] for h in lag] == [h["loss"] for h in none]  # the same run as lambda = 0
    assert [h["loss"] for h in ref] == [h["loss"] for h in ref_again]  # anchor_every means nothing for ref
    assert ref[-1]["div_mean"] > 0 and ref[-1]["loss"] != none[-1]["loss"]  # the frozen start: D grows


def test_a_longer_lag_re_anchors_and_reset_returns_to_the_start(tiny, task):
    model, tok = tiny
    tr, hist = _curve(model, tok, task, 1.0, steps=4, anchor="lagged", anchor_every=3)
    assert hist[0]["div_mean"] == 0.0 and hist[3]["div_mean"] == 0.0  # re-anchored at steps 0 and 3
    assert hist[2]["div_mean"] > 0.0  # behind the policy in between (step 1 moved it)
    tr.reset(0)
    start = model.state_dict()
    for k, v in tr.model.state_dict().items():
        torch.testing.assert_close(v, start[k], rtol=0, atol=0)
    for k, v in tr.ref_model.state_dict().items():
        torch.testing.assert_close(v, start[k], rtol=0, atol=0)


def test_the_anchor_is_configured_recorded_and_validated():
    cfg = config_from_dict({"divergence": {"name": "kl_k3", "anchor": "lagged", "anchor_every": 10}})
    from mirrorlab.maps import build_divergence

    reg = build_divergence(cfg.divergence)
    assert (reg.anchor, reg.anchor_every) == ("lagged", 10)
    from mirrorlab.compare import regulariser_text

    assert "lagged anchor / 10 steps" in regulariser_text(cfg.divergence.model_dump(mode="json"))
    from mirrorlab.config import ConfigError

    with pytest.raises(ConfigError, match="divergence.anchor"):
        config_from_dict({"divergence": {"anchor": "previous"}})
