"""The `topk` estimator (issue 20, item 3): the Bregman divergence over the reference's top-K
tokens plus one bucket for the rest of the mass. Equal to `full` when K covers the vocabulary,
>= 0 and 0 at the reference, a lower bound of full KL otherwise (data processing), its gradient
equal to finite differences, and the same path in the GBMPO loss."""

from __future__ import annotations

import pytest
import torch

import mirrorlab.divergences as dv
from mirrorlab.gbmpo import LossSpec, gbmpo_loss
from mirrorlab.gbmpo.losses import topk_coarsen

NAMES = ["kl_k3", "prob_l2", "neg_entropy", "neural"]


def _div(name: str) -> dv.Divergence:
    return dv.get("neural", seed=3, scale=0.5) if name == "neural" else dv.get(name)


def _logits(seed: int, shape=(3, 5, 12), dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(*shape, generator=g, dtype=dtype) * 2


@pytest.mark.parametrize("name", NAMES)
def test_topk_equals_full_when_k_covers_the_vocabulary_and_is_zero_at_the_reference(name):
    d = _div(name)
    x, ref = _logits(0), _logits(1)
    full = d.full(x, ref)
    for k in (12, 40):
        torch.testing.assert_close(d.full(*topk_coarsen(x, ref, k)), full, rtol=1e-10, atol=1e-12)
    for k in (1, 3, 11):
        cx, cr = topk_coarsen(x, ref, k)
        assert cx.shape[-1] == k + 1
        torch.testing.assert_close(cx.exp().sum(-1), torch.ones(3, 5, dtype=torch.float64))  # normalised
        assert bool((d.full(cx, cr) >= -1e-12).all())
        torch.testing.assert_close(d.full(*topk_coarsen(ref, ref, k)), torch.zeros(3, 5, dtype=torch.float64),
                                   rtol=0, atol=1e-12)


def test_topk_kl_is_a_lower_bound_of_full_kl_that_tightens_with_k():
    d = dv.get("kl_k3")
    x, ref = _logits(2), _logits(3)
    full = d.full(x, ref)
    prev = torch.zeros_like(full)
    for k in (1, 2, 4, 8, 11):
        cur = d.full(*topk_coarsen(x, ref, k))
        assert bool((cur <= full + 1e-12).all()) and bool((cur >= prev - 1e-12).all())
        prev = cur


@pytest.mark.parametrize("name", NAMES)
def test_topk_gradient_matches_finite_differences(name):
    d = _div(name)
    ref = _logits(4, (2, 3, 9))
    x = _logits(5, (2, 3, 9)).requires_grad_(True)
    assert torch.autograd.gradcheck(lambda z: d.full(*topk_coarsen(z, ref, 4)).sum(), (x,), eps=1e-6,
                                    atol=1e-6)


def test_the_loss_takes_the_topk_path():
    x, ref = _logits(6, (2, 4, 10), torch.float32), _logits(7, (2, 4, 10), torch.float32)
    comp = x.argmax(-1)
    lp = torch.log_softmax(x, -1).gather(-1, comp[..., None])[..., 0]
    ref_lp = torch.log_softmax(ref, -1).gather(-1, comp[..., None])[..., 0]
    adv, mask = torch.zeros(2), torch.ones(2, 4)
    d = dv.get("kl_k3")

    def reg(estimator: str, k: int) -> float:
        spec = LossSpec(estimator=estimator, topk=k)
        return gbmpo_loss(lp, None, ref_lp, adv, mask, divergence=d, coef=1.0, spec=spec, logits=x,
                          ref_logits=ref).reg_loss

    torch.testing.assert_close(reg("topk", 10), reg("full", 32))  # K = V: the same number
    assert 0 < float(reg("topk", 3)) <= float(reg("full", 32)) + 1e-6


def test_a_run_trains_with_the_topk_estimator(tiny, task):
    import copy

    from mirrorlab.config import GenerationConfig, OptimConfig, TrainConfig
    from mirrorlab.gbmpo import GBMPOTrainer

    model, tok = tiny
    gen = GenerationConfig(num_generations=2, max_new_tokens=4)
    cfg = TrainConfig(steps=3, prompts_per_step=2, generation=gen, optim=OptimConfig(lr=3e-3), seed=0)
    tr = GBMPOTrainer(copy.deepcopy(model), tok, task, dv.get("kl_k3"), cfg, coef=0.5, estimator="topk",
                      topk=4)
    hist = tr.train()
    assert all(torch.isfinite(torch.tensor(h["loss"])) for h in hist)
    assert hist[-1]["div_mean"] > 0 and tr.regulariser_active is True
