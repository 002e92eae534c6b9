"""GBMPO loss as small pure functions (DESIGN section 3).

Everything here is float32 maths on tensors with no host sync, so it can run inside a
compiled or accumulated training step. Conventions follow TRL 1.16's GRPOTrainer where the two
share a loss type (see `tests/test_gbmpo_parity.py`):
- advantages: `grpo` divides by (unbiased group std + 1e-4), `dr_grpo` only centres;
- `dr_grpo` aggregation divides by B * max_new_tokens (the generation budget, TRL's
  `max_completion_length`), not by the longest completion in the batch;
- `bnpo` is a token mean per micro-batch (averaged over micro-batches), `dapo` a token mean
  over the whole generated batch (they coincide without micro-batching);
- the regulariser is lambda * D as in DESIGN section 3 (in the loss; `penalised_rewards` places it
  in the reward instead, before the advantage). TRL 1.16 defaults to
  `use_bias_correction_kl=True` (D multiplied by the differentiable ratio rho, which changes the
  gradient even on-policy); `LossSpec(reg_times_ratio=True)` reproduces that, the default False
  is the classic GRPO / GBMPO form (TRL with `use_bias_correction_kl=False`).

The settings that stay fixed for a run travel as one frozen `LossSpec`; the totals of the
generated batch that a micro-batch's share is measured against as a `BatchTotals`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch
from torch import Tensor

AdvantageKind = Literal["grpo", "dr_grpo"]
LossType = Literal["grpo", "dr_grpo", "bnpo", "dapo"]
Estimator = Literal["sampled", "topk", "full"]

STD_EPS = 1e-4


def token_logps(logits: Tensor, ids: Tensor) -> Tensor:
    """log softmax(logits) gathered at `ids`, in float32."""
    logits = logits.float()
    return logits.gather(-1, ids.unsqueeze(-1)).squeeze(-1) - torch.logsumexp(logits, dim=-1)


def advantages(rewards: Tensor, group_size: int, kind: AdvantageKind = "dr_grpo") -> Tensor:
    """Per-completion advantages; rewards are laid out group by group ([q0 x G, q1 x G, ...]).

    A NaN reward (the task could not judge the completion, `tasks.REWARD_ERROR`) gets advantage 0
    and is left out of its group: the mean (and, for grpo, the std) are those of the judged
    members, exactly as if the group had only them."""
    if kind not in ("grpo", "dr_grpo"):
        raise ValueError(f"unknown advantage kind {kind!r}; allowed: grpo, dr_grpo")
    r = rewards.float().view(-1, group_size)
    judged = ~torch.isnan(r)
    if not bool(judged.all()):
        return _judged_advantages(r, judged, kind).reshape(-1)
    centred = r - r.mean(dim=1, keepdim=True)
    if kind == "grpo":
        centred = centred / (r.std(dim=1, keepdim=True) + STD_EPS)
    return centred.reshape(-1)


def _judged_advantages(r: Tensor, judged: Tensor, kind: AdvantageKind) -> Tensor:
    """`advantages` over the judged members of each group [N, G] (the rest get 0)."""
    n = judged.sum(dim=1, keepdim=True)
    zero = torch.zeros_like(r)
    mean = torch.where(judged, r, zero).sum(dim=1, keepdim=True) / n.clamp(min=1)
    centred = torch.where(judged, r - mean, zero)
    if kind == "grpo":  # the unbiased std, as torch.std, of the judged members
        std = ((centred ** 2).sum(dim=1, keepdim=True) / (n - 1).clamp(min=1)).sqrt()
        centred = torch.where(n > 1, centred / (std + STD_EPS), zero)
    return centred


def penalised_rewards(rewards: Tensor, d_tok: Tensor, mask: Tensor, coef: float) -> tuple[Tensor, Tensor]:
    """The regulariser placed in the reward (`divergence.placement: reward`, verl's use_kl_in_reward):
    each sequence's reward minus lambda times its per-token D summed over the completion.

    `d_tok` [B, T] is the divergence of the sampled tokens (`divergence.sampled(logp, ref_logp,
    mask)`), detached here so no gradient flows through it; `mask` [B, T] the completion mask.
    Returns (penalised rewards [B], penalty [B] = coef * sum_t mask * D), both float32; the group
    advantage is then computed from the penalised rewards.
    """
    d = d_tok.detach().float() * mask.to(torch.float32)
    penalty = coef * d.sum(-1)
    return rewards.float() - penalty, penalty


def policy_loss(
    logp: Tensor, old_logp: Tensor, adv: Tensor, eps_low: float = 0.2, eps_high: float = 0.2
) -> tuple[Tensor, Tensor]:
    """Clipped surrogate per token: -min(rho A, clip(rho, 1-eps_low, 1+eps_high) A).

    Returns (per-token loss, per-token clipped indicator as float). `adv` is [B] or [B, T].
    """
    if adv.dim() == 1:
        adv = adv.unsqueeze(1)
    ratio = torch.exp(logp - old_logp)
    clipped = torch.clamp(ratio, 1 - eps_low, 1 + eps_high)
    loss = -torch.min(ratio * adv, clipped * adv)
    was_clipped = ((ratio < 1 - eps_low) & (adv < 0)) | ((ratio > 1 + eps_high) & (adv > 0))
    return loss, was_clipped.to(logp.dtype)


def aggregate(
    per_token: Tensor,
    mask: Tensor,
    kind: LossType,
    max_len: int | None = None,
    num_seqs: int | None = None,
    num_tokens: Tensor | float | None = None,
    num_micro: int = 1,
) -> Tensor:
    """Reduce a [B, T] per-token loss to a scalar with one of the four aggregations.

    With micro-batching pass the totals of the whole generated batch (`num_seqs` sequences,
    `num_tokens` unmasked tokens, `num_micro` micro-batches) so that summing the micro-batch
    values gives the full-batch loss. Defaults describe a single micro-batch.
    """
    mask = mask.to(per_token.dtype)
    b = per_token.shape[0]
    num_seqs = b if num_seqs is None else num_seqs
    masked = per_token * mask
    if kind == "grpo":
        return (masked.sum(-1) / mask.sum(-1).clamp(min=1.0)).sum() / num_seqs
    if kind == "dr_grpo":
        L = per_token.shape[1] if max_len is None else max_len
        return masked.sum() / (num_seqs * L)
    if kind == "bnpo":
        return masked.sum() / mask.sum().clamp(min=1.0) / num_micro
    if kind == "dapo":
        denom = mask.sum() if num_tokens is None else num_tokens
        if isinstance(denom, Tensor):
            denom = denom.clamp(min=1.0)
        return masked.sum() / denom
    raise ValueError(f"unknown loss type {kind!r}; allowed: grpo, dr_grpo, bnpo, dapo")


@dataclass
class LossOutput:
    """The scalar loss plus its parts and diagnostics (all tensors, no host sync)."""

    loss: Tensor
    pg_loss: Tensor
    reg_loss: Tensor
    metrics: dict[str, Tensor]


@dataclass(frozen=True)
class LossSpec:
    """The loss settings of a run: aggregation (`loss_type`), PPO clip range, how D is estimated
    (`sampled` at the sampled tokens, `full` over the vocabulary in chunks of `chunk_size`, `topk`
    over the reference's `topk` most likely tokens plus one bucket for the rest), the
    dr_grpo length budget `max_len` (None: the batch's T), and whether D is multiplied by the
    ratio rho (`reg_times_ratio`, TRL's `use_bias_correction_kl`)."""

    loss_type: LossType = "dr_grpo"
    eps_low: float = 0.2
    eps_high: float = 0.2
    estimator: Estimator = "sampled"
    chunk_size: int = 8192
    topk: int = 32
    max_len: int | None = None
    reg_times_ratio: bool = False


@dataclass(frozen=True)
class BatchTotals:
    """Totals of the whole generated batch, so micro-batch losses sum to the full-batch loss:
    sequences, unmasked tokens and micro-batches (defaults: a single micro-batch)."""

    num_seqs: int | None = None
    num_tokens: Tensor | float | None = None
    num_micro: int = 1


def gbmpo_loss(
    logp: Tensor,
    old_logp: Tensor | None,
    ref_logp: Tensor | None,
    adv: Tensor,
    mask: Tensor,
    divergence=None,
    coef: float = 0.0,
    spec: LossSpec = LossSpec(),
    totals: BatchTotals = BatchTotals(),
    logits: Tensor | None = None,
    ref_logits: Tensor | None = None,
    is_weight: Tensor | None = None,
) -> LossOutput:
    """Per-token GBMPO loss l = PG + lambda * D, aggregated; returns parts and diagnostics.

    `old_logp=None` means on-policy (mu = 1): old = detached current, so rho = 1. The
    divergence is evaluated in float32 on log-probs (`sampled`) or on `logits` and `ref_logits`
    (`full`). `is_weight` [B, T] (detached; e.g. the vLLM backend's truncated importance weight
    trainer / sampler) multiplies every token's loss, PG and regulariser alike.
    """
    logp32 = logp.float()
    old = logp32.detach() if old_logp is None else old_logp.float()
    pg_tok, clipped = policy_loss(logp32, old, adv.float(), spec.eps_low, spec.eps_high)
    if is_weight is not None:
        pg_tok = pg_tok * is_weight.detach().float()
    agg = dict(kind=spec.loss_type, max_len=spec.max_len, num_seqs=totals.num_seqs,
               num_tokens=totals.num_tokens, num_micro=totals.num_micro)
    pg = aggregate(pg_tok, mask, **agg)
    maskf = mask.to(logp32.dtype)
    ntok = maskf.sum().clamp(min=1.0)
    metrics: dict[str, Tensor] = {
        "clip_frac": (clipped * maskf).sum() / ntok,
    }
    if divergence is not None and (coef != 0.0 or ref_logp is not None or ref_logits is not None):
        if spec.estimator == "sampled":
            if ref_logp is None:
                raise ValueError("sampled estimator needs ref_logp")
            d_tok = divergence.sampled(logp32, ref_logp.float())
        elif spec.estimator in ("full", "topk"):
            if logits is None or ref_logits is None:
                raise ValueError(f"{spec.estimator} estimator needs logits and ref_logits")
            x, ref_x = logits.float(), ref_logits.float()
            if spec.estimator == "topk":
                x, ref_x = topk_coarsen(x, ref_x, spec.topk)
            d_tok = divergence.full(x, ref_x, chunk_size=spec.chunk_size)
        else:
            raise ValueError(f"unknown estimator {spec.estimator!r}; allowed: sampled, topk, full")
        d_tok = d_tok.float()
        if spec.reg_times_ratio:  # TRL's use_bias_correction_kl: D * rho (rho differentiable)
            d_tok = d_tok * torch.exp(logp32 - old)
        d_w = d_tok if is_weight is None else d_tok * is_weight.detach().float()
        reg = coef * aggregate(d_w, mask, **agg)
        metrics["div_mean"] = (d_tok.detach().float() * maskf).sum() / ntok
        metrics["div_max"] = masked_max(d_tok.detach(), mask)
    else:
        reg = pg.new_zeros(())
        metrics["div_mean"] = metrics["div_max"] = pg.new_zeros(())
    metrics["pg_loss"] = pg.detach()
    metrics["reg_loss"] = reg.detach()
    return LossOutput(loss=pg + reg, pg_loss=pg, reg_loss=reg, metrics=metrics)


def masked_max(x: Tensor, mask: Tensor) -> Tensor:
    """The largest entry of `x` where `mask` is set (0 when none is): D per token's `div_max`."""
    return torch.where(mask.bool(), x.float(), -torch.inf).max().clamp(min=0.0)


def topk_coarsen(logits: Tensor, ref_logits: Tensor, k: int) -> tuple[Tensor, Tensor]:
    """Both distributions coarsened to the reference's `k` most likely tokens plus one bucket
    holding the rest of the mass, as normalised log-probs [..., k + 1] (just `k` columns when `k`
    covers the vocabulary): the `topk` estimator is the exact (`full`) divergence of these, between
    `sampled` (one token) and `full` (the vocabulary): k + 1 Bregman terms per token instead of V.
    Equal to `full` when k covers the vocabulary; for KL (an f-divergence) a lower bound of it
    otherwise (data processing); for other potentials no order holds in general."""
    lp, ref_lp = torch.log_softmax(logits, -1), torch.log_softmax(ref_logits, -1)
    V = lp.shape[-1]
    if k >= V:
        return lp, ref_lp
    idx = ref_lp.topk(k, dim=-1).indices
    top, ref_top = lp.gather(-1, idx), ref_lp.gather(-1, idx)
    rest_mask = torch.ones_like(lp, dtype=torch.bool).scatter(-1, idx, False)
    ninf = torch.finfo(lp.dtype).min
    rest = torch.logsumexp(lp.masked_fill(~rest_mask, ninf), -1, keepdim=True)
    ref_rest = torch.logsumexp(ref_lp.masked_fill(~rest_mask, ninf), -1, keepdim=True)
    return torch.cat([top, rest], -1), torch.cat([ref_top, ref_rest], -1)


#: below this, lambda * D moves the token log-probs less than float32 resolves against a policy
#: gradient of unit advantage: the regulariser is numerically absent (`regulariser_probe`)
REGULARISER_FLOOR = 1e-6


def regulariser_probe(divergence, coef: float, estimator: str, ref_logp: Tensor, mask: Tensor,
                      ref_logits: Tensor | None = None, scale: float = 0.1, seed: int = 0,
                      topk: int = 32) -> float:
    """How strongly lambda * D pulls the policy back, off the reference, on one batch: the norm of
    d(lambda * mean_token D) / d(token log-probs) (`sampled`; the logits for `full`) at a seeded
    point `scale` nats away from the reference (log-probs lowered by |N(0, scale^2)|, logits shifted
    by N(0, scale^2)), divided by the same norm for a policy-gradient term of unit advantage
    (||mask|| / n_tokens). Zero for a detached or clamped D; about lambda * scale for KL. No model
    pass, no global RNG: a cheap check that the requested regulariser acts at all."""
    g = torch.Generator(device="cpu").manual_seed(seed)
    maskf = mask.float()
    ntok = maskf.sum().clamp(min=1.0)
    with torch.enable_grad():
        if estimator in ("full", "topk"):
            if ref_logits is None:
                raise ValueError(f"the {estimator} estimator's probe needs ref_logits")
            base = ref_logits.detach().float()
            noise = torch.randn(base.shape, generator=g).to(base.device)
            x = (base + scale * noise).requires_grad_(True)
            d_tok = divergence.full(*topk_coarsen(x, base, topk)) if estimator == "topk" else \
                divergence.full(x, base)
        else:
            base = ref_logp.detach().float()
            noise = torch.randn(base.shape, generator=g).to(base.device)
            x = (base - scale * noise.abs()).requires_grad_(True)
            d_tok = divergence.sampled(x, base)
        reg = coef * (d_tok.float() * maskf).sum() / ntok
        (grad,) = torch.autograd.grad(reg, x, allow_unused=True) if reg.requires_grad else (None,)
    if grad is None:
        return 0.0
    unit = torch.sqrt(maskf.sum()) / ntok
    return float(torch.nan_to_num(grad.float(), nan=0.0).norm() / unit)
