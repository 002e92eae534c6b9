"""The GBMPO training loop: sample G completions per prompt, score, take mu clipped steps.

One `GBMPOTrainer` holds a model, its reference, an optimiser and a prompt sampler. It is
built for reuse: `reset()` restores the starting weights from memory (or re-initialises the
LoRA adapter) and `set_regulariser()` swaps the regulariser, so a search scores many mirror
maps without reloading the model.

What the step avoids, by design (timed against TRL in benchmarks/inner_step.py): prompts are
tokenised once per example; log-probs are computed only at completion positions
(`logits_to_keep`, so the LM head never runs on prompt tokens); reference log-probs come from
one no-grad forward per generated batch (LoRA: the same module with the adapter disabled); there
is never a separate "old" forward (mu = 1: old = detached current; mu > 1: the log-probs of the
sampling logits, kept from generation); step metrics stay on the device until one host transfer
at the end of the step. Generation goes through one `mirrorlab.rollouts.RolloutBackend`
(`self.rollouts`, chosen by `generation.backend`): `fast` (`rollout_fast`: no per-token HF
machinery, prompt prefilled once per group), `hf` (`rollout_hf`) or `vllm` (`rollout_vllm`).
What remains is compute: the decode matmuls, one reference forward, one policy forward and
backward per pass; on CPUs with native bf16 (`train.compute_dtype: auto`) those run as bf16
matmuls with the loss in fp32 (`mirrorlab.gbmpo.precision`).
"""

from __future__ import annotations

import contextlib
import copy
import logging
import math
import random
import time
import warnings
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor

from mirrorlab import tasks
from mirrorlab.config import Config, TrainConfig
from mirrorlab.divergences import Divergence
from mirrorlab.gbmpo import allocator, precision
from mirrorlab.gbmpo.losses import (
    REGULARISER_FLOOR,
    BatchTotals,
    LossSpec,
    gbmpo_loss,
    masked_max,
    penalised_rewards,
    regulariser_probe,
    token_logps,
)
from mirrorlab.gbmpo.losses import advantages as compute_advantages
from mirrorlab.models import decoder_layers, frozen_trunk_depth, is_peft, load_model, trunk_hidden
from mirrorlab.repro import seed_everything
from mirrorlab.rollouts import (
    Completions,
    RolloutBackend,
    RolloutContext,
    SamplingParams,
    completion_mask_from,
    left_pad,
)
from mirrorlab.rollouts import build as build_rollouts
from mirrorlab.tasks import Task

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Regulariser:
    """What the run regularises with: a divergence (None: no regulariser), its coefficient lambda,
    how D is estimated (`sampled` at the sampled tokens, or `full` over the vocabulary in chunks
    of `chunk_size`) and where it acts (`placement`: `loss`, lambda * D in the per-token loss, or
    `reward`, lambda * sum_t D of the sampled tokens subtracted from each sequence's reward before
    the advantage). Built from a config by `mirrorlab.maps.build_divergence`."""

    divergence: Divergence | None
    coef: float
    estimator: str = "sampled"
    chunk_size: int = 8192
    placement: str = "loss"
    topk: int = 32  # the `topk` estimator's K
    anchor: str = "ref"  # `ref`: the frozen start; `lagged`: the policy, re-copied every `anchor_every` steps
    anchor_every: int = 50


@dataclass
class EvalResult:
    """Greedy evaluation on a split: mean metric, its standard error, mean completion length."""

    metric: float
    stderr: float
    mean_length: float
    scores: list[float] = field(default_factory=list)
    n: int = 0
    samples: list[dict[str, Any]] = field(default_factory=list)  # train.log_completions rows
    extra: dict[str, float] = field(default_factory=dict)  # the task's extra metrics, mean per name
    reward_errors: int = 0  # completions the task could not judge (left out of metric, stderr and n)


class RewardErrorRate(RuntimeError):
    """An evaluation in which the task could not judge too many completions
    (`train.max_reward_error_rate`): its metric would measure the grader, not the policy."""


@dataclass
class Rollout:
    """One generated batch: token ids, masks and rewards (rows grouped by prompt)."""

    input_ids: Tensor  # [B, P + T] prompt (left padded) + completion
    attention_mask: Tensor  # [B, P + T]
    position_ids: Tensor  # [B, P + T]
    completion_ids: Tensor  # [B, T]
    completion_mask: Tensor  # [B, T] 1 up to and including the stop token
    truncated: Tensor  # [B] bool: no stop token within max_new_tokens
    texts: list[str]
    rewards: Tensor  # [B]
    scores: Tensor  # [B]
    old_logps: Tensor | None = None  # [B, T] sampling-time log-probs (only when mu > 1)
    reward_errors: int = 0  # completions the task could not judge (NaN reward: no advantage, no loss)
    engine_logps: Tensor | None = None  # [B, T] the vLLM engine's log-probs of the drawn tokens


def _position_ids(attention_mask: Tensor) -> Tensor:
    """Positions counted over real tokens only (as HF generate does with left padding)."""
    pos = attention_mask.long().cumsum(-1) - 1
    return pos.clamp(min=0)


def _entropy(logits: Tensor) -> Tensor:
    logp = torch.log_softmax(logits.float(), dim=-1)
    return -(logp.exp() * logp).sum(-1)


def _grad_ratio(params: list[torch.nn.Parameter], reg_grads: list[Tensor]) -> Tensor:
    """||grad of lambda D|| / ||grad of the PG part||, where the PG gradient is the accumulated
    total minus the regulariser's own (measured on grad-ratio steps only)."""
    with torch.no_grad():
        g_reg = torch.sqrt(sum((x.float() ** 2).sum() for x in reg_grads))
        g_pg = torch.sqrt(sum(((p.grad.float() if p.grad is not None else 0.0) - x.float()).pow(2).sum()
                              for p, x in zip(params, reg_grads, strict=True)))
    return g_reg / g_pg.clamp(min=1e-30)


class GBMPOTrainer:
    """GBMPO on one task with one model; reusable across regularisers via `reset` / `set_regulariser`.

    The trainer holds one `Regulariser` (`self.reg`) from construction to the loss; `divergence`,
    `coef`, `estimator`, `chunk_size`, `topk`, `placement`, `anchor` and `anchor_every` read it.

    `coef` is lambda; `estimator` is `sampled` (the paper's) or `full` (exact, over the
    vocabulary). `cfg.grad_ratio_every` > 0 computes the regulariser-to-PG gradient-norm ratio every
    that many steps at the cost of one extra backward of the regulariser per micro-batch on
    those steps (0 turns it off).
    """

    def __init__(
        self,
        model: Any,
        tokenizer: Any,
        task: Task,
        divergence: Divergence | None = None,
        cfg: TrainConfig | None = None,
        coef: float = 0.0,
        estimator: str = "sampled",
        chunk_size: int = 8192,
        ref_model: Any = None,
        placement: str = "loss",
        topk: int = 32,
        anchor: str = "ref",
        anchor_every: int = 50,
        reg: Regulariser | None = None,
    ) -> None:
        """`reg`, when given, is the regulariser; otherwise one is made from `divergence`, `coef`,
        `estimator`, `chunk_size`, `placement`, `topk`, `anchor` and `anchor_every`."""
        self.cfg = cfg or TrainConfig()
        self.model = model
        self.tokenizer = tokenizer
        self.task = task
        self.reg = _checked(reg if reg is not None else Regulariser(
            divergence, float(coef), estimator, chunk_size, placement, topk, anchor, anchor_every))
        self._start_weights: dict[str, Tensor] | None = None  # lagged anchor, full model: the start
        self._anchor_lora: dict[str, Tensor] | None = None  # lagged anchor, LoRA: the adapter's copy
        self._force_reanchor = False
        self.device = next(model.parameters()).device
        if self.device.type == "cpu":
            allocator.tune_malloc()
        self.compute_dtype = precision.resolve_compute_dtype(self.cfg.compute_dtype, self.device)
        self.is_peft = is_peft(model)
        # LoRA on the top layers only: the layers below run once per batch (`_trunk`)
        self.trunk_depth = frozen_trunk_depth(model) if self.cfg.share_trunk else 0
        if self.is_peft:
            self.ref_model = None
        else:
            self.ref_model = ref_model if ref_model is not None else copy.deepcopy(model)
            self.ref_model.eval()
            for p in self.ref_model.parameters():
                p.requires_grad_(False)
        if self.compute_dtype == torch.bfloat16 and self.device.type == "cpu":
            for m in (self.model, self.ref_model):
                if m is not None:
                    precision.use_eager_attention(m)
        self._prompt_cache: dict[str, list[int]] = {}
        pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
        self.pad_id = int(pad)
        self.stop_ids = self._stop_token_ids()
        # stop strings longer than one token: applied after decoding (`_cut_at_stop_strings`)
        self.stop_strings = [st for st in self.task.stop_strings
                             if len(self.tokenizer(st, add_special_tokens=False)["input_ids"]) > 1]
        # the generation backend (`train.generation.backend`; `auto` resolved, a vLLM engine built
        # once per process and model and reused)
        self.rollouts: RolloutBackend = build_rollouts(RolloutContext(
            model=model, tokenizer=tokenizer, device=self.device, pad_id=self.pad_id,
            stop_ids=tuple(self.stop_ids), compute_dtype=self.compute_dtype, generation=self.cfg.generation,
            seed=self.cfg.seed))
        self.reset(self.cfg.seed)

    # ------------------------------------------------------------------ setup
    def _stop_token_ids(self) -> list[int]:
        """EOS plus every stop string of the task that is a single token (e.g. newline)."""
        ids = []
        eos = self.tokenizer.eos_token_id
        if isinstance(eos, int):
            ids.append(eos)
        elif eos is not None:
            ids.extend(eos)
        for s in self.task.stop_strings:
            t = self.tokenizer(s, add_special_tokens=False)["input_ids"]
            if len(t) == 1:
                ids.append(t[0])
        return sorted(set(ids))

    def set_regulariser(self, reg: Regulariser) -> None:
        """Use another regulariser (divergence, lambda, estimator, chunk size, placement, anchor)
        from the next step on."""
        self.reg = _checked(reg)

    # the regulariser's parts, read from the one object the trainer holds
    divergence = property(lambda self: self.reg.divergence, doc="the divergence (None: no regulariser)")
    coef = property(lambda self: self.reg.coef, doc="lambda")
    estimator = property(lambda self: self.reg.estimator, doc="sampled | topk | full")
    chunk_size = property(lambda self: self.reg.chunk_size, doc="vocabulary chunk of the full estimator")
    topk = property(lambda self: self.reg.topk, doc="K of the topk estimator")
    placement = property(lambda self: self.reg.placement, doc="loss | reward")
    anchor = property(lambda self: self.reg.anchor, doc="ref | lagged")
    anchor_every = property(lambda self: self.reg.anchor_every, doc="steps between lagged re-anchors")
    backend = property(lambda self: self.rollouts.name, doc="the generation backend in use (auto resolved)")

    def _trainable(self) -> list[torch.nn.Parameter]:
        return [p for p in self.model.parameters() if p.requires_grad]

    def _make_optimizer(self) -> None:
        o = self.cfg.optim
        self.optimizer = torch.optim.AdamW(
            self._trainable(), lr=o.lr, betas=tuple(o.betas), weight_decay=o.weight_decay,
            fused=self.device.type in ("cpu", "cuda"),  # one kernel for all params: ~6x faster step
        )
        total = max(1, self.cfg.steps * self.cfg.mu)
        warm = o.warmup_steps
        cosine = o.schedule == "cosine"

        def factor(s: int) -> float:
            if warm and s < warm:
                return (s + 1) / warm
            if not cosine:
                return 1.0
            frac = min(1.0, (s - warm) / max(1, total - warm))
            return 0.5 * (1.0 + math.cos(math.pi * frac))

        self.scheduler = torch.optim.lr_scheduler.LambdaLR(self.optimizer, factor)
        # a new optimiser comes with new weights (reset, checkpoint load); every step changes them:
        # the backend is synced to the new version before the next generation
        self._weights_changed()
        self.optimizer.register_step_post_hook(lambda *_: self._weights_changed())

    def _weights_changed(self) -> None:
        """Mark the policy's weights as changed (`rollouts.sync` before the next generation: the vLLM
        engine pushes them, the fast sampler packs them again). Call it after modifying
        `self.model`'s weights from outside the trainer."""
        self.weights_version = object()

    def reset(self, seed: int | None = None) -> None:
        """Back to the starting weights (from memory), a fresh optimiser, step 0, re-seeded RNGs."""
        seed = self.cfg.seed if seed is None else seed
        self.seed = seed
        self.rollouts.reset()
        seed_everything(seed)
        with torch.no_grad():
            if self.is_peft:
                from peft.tuners.lora import LoraLayer

                for m in self.model.modules():
                    if isinstance(m, LoraLayer):
                        for name in m.lora_A.keys():
                            m.reset_lora_parameters(name, True)
            elif hasattr(self, "step"):  # not on construction: the model is still the start
                if self._start_weights is not None:  # a lagged anchor moved the reference: back to the start
                    self.ref_model.load_state_dict(self._start_weights)
                    self._start_weights = None
                self.model.load_state_dict(self.ref_model.state_dict())
        self._anchor_lora = None
        self.model.zero_grad(set_to_none=True)
        self._make_optimizer()
        self.step = 0
        # the inert-regulariser check (`_check_regulariser`): None until measured
        self.regulariser_active: bool | None = None
        self.regulariser_probe: float | None = None
        self._warned_inert = False
        self._sampler = random.Random(f"mirrorlab.prompts:{seed}")
        self._order: list[int] = []

    # ------------------------------------------------------------------ data
    def _prompt_ids(self, ex: Any) -> list[int]:
        ids = self._prompt_cache.get(ex.id)
        if ids is None:
            text = self.task.prompt(ex, self.tokenizer)
            ids = self.tokenizer(text, add_special_tokens=False)["input_ids"]
            self._prompt_cache[ex.id] = ids
        return ids

    def _next_prompts(self, n: int) -> list[Any]:
        out = []
        train = self.task.train
        for _ in range(n):
            if not self._order:
                self._order = list(range(len(train)))
                self._sampler.shuffle(self._order)
            out.append(train[self._order.pop()])
        return out

    def _left_pad(self, seqs: Sequence[list[int]]) -> tuple[Tensor, Tensor]:
        return left_pad(seqs, self.pad_id, self.device)

    # ------------------------------------------------------------------ generation
    def sampling_params(self, greedy: bool = False, max_new_tokens: int | None = None) -> SamplingParams:
        """The `train.generation` settings as one backend-neutral `SamplingParams` (greedy: argmax,
        no minimum length)."""
        g = self.cfg.generation
        max_new = max_new_tokens or g.max_new_tokens
        return SamplingParams(max_new_tokens=max_new, greedy=greedy, temperature=g.temperature, top_k=g.top_k,
                              top_p=g.top_p, min_new_tokens=0 if greedy else min(g.min_new_tokens, max_new))

    @torch.no_grad()
    def generate(self, examples: Sequence[Any], repeats: int = 1, greedy: bool = False,
                 max_new_tokens: int | None = None) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        """Generate `repeats` completions per example.

        Returns (prompt_ids, prompt_mask, completion_ids, completion_mask).
        """
        c = self._generate(examples, repeats, greedy, max_new_tokens)
        return c.prompt_ids, c.prompt_mask, c.completion_ids, c.completion_mask

    @torch.no_grad()
    def _generate(self, examples: Sequence[Any], repeats: int = 1, greedy: bool = False,
                  max_new_tokens: int | None = None, with_logps: bool = False) -> Completions:
        """The backend's completions (weights synced first), cut at the task's multi-token stop
        strings. With `with_logps`, the sampling policy's log-probs of the drawn tokens come from the
        decoding logits themselves (the KV-cached forward that sampled each token), so with mu > 1
        the "old" log-probs cost no extra forward pass (the vLLM backend gives `engine_logps`)."""
        self.rollouts.sync(self.weights_version)
        out = self.rollouts.generate([self._prompt_ids(ex) for ex in examples],
                                     self.sampling_params(greedy, max_new_tokens), repeats=repeats,
                                     with_logps=with_logps)
        comp, cmask = self._cut_at_stop_strings(out.completion_ids, out.completion_mask)
        return replace(out, completion_ids=comp, completion_mask=cmask)

    def _cut_at_stop_strings(self, comp: Tensor, cmask: Tensor) -> tuple[Tensor, Tensor]:
        """End each completion at the token that completes the first multi-token stop string of the
        task (GSM8K's "\n\nQuestion:"), as HF `stop_strings` would: later tokens become padding,
        outside the mask (no loss, no reward text, no length). The decoders stop on one-token stops
        only, so a row runs on to its budget and the extra tokens are discarded here."""
        if not self.stop_strings:
            return comp, cmask
        rows = comp.masked_fill(cmask == 0, self.pad_id).tolist()
        lengths = cmask.sum(1).tolist()
        cut: dict[int, int] = {}
        for i, (row, n) in enumerate(zip(rows, lengths, strict=True)):
            n = int(n)
            if not self._has_stop_string(row[:n]):
                continue
            lo, hi = 1, n  # the shortest prefix whose text holds a stop string (monotone in length)
            while lo < hi:
                mid = (lo + hi) // 2
                if self._has_stop_string(row[:mid]):
                    hi = mid
                else:
                    lo = mid + 1
            if lo < n:
                cut[i] = lo
        if not cut:
            return comp, cmask
        comp, cmask = comp.clone(), cmask.clone()
        for i, n in cut.items():
            comp[i, n:] = self.pad_id
            cmask[i, n:] = 0
        return comp, cmask

    def _has_stop_string(self, ids: list[int]) -> bool:
        text = self.tokenizer.decode(ids, skip_special_tokens=True)
        return any(st in text for st in self.stop_strings)

    def _decode(self, comp: Tensor, cmask: Tensor) -> list[str]:
        ids = comp.masked_fill(cmask == 0, self.pad_id).tolist()
        return self.tokenizer.batch_decode(ids, skip_special_tokens=True)

    def rollout(self, examples: Sequence[Any], with_logps: bool | None = None) -> Rollout:
        """Sample G completions per example and score them with the task; `with_logps` (default:
        mu > 1) keeps the sampling policy's log-probs of the drawn tokens as `old_logps`."""
        G = self.cfg.generation.num_generations
        want = self.cfg.mu > 1 if with_logps is None else with_logps
        gen = self._generate(examples, repeats=G, with_logps=want)
        p_ids, p_att, comp, cmask = gen.prompt_ids, gen.prompt_mask, gen.completion_ids, gen.completion_mask
        stop = torch.tensor(self.stop_ids, device=self.device)
        _, truncated = completion_mask_from(comp, stop)
        texts = self._decode(comp, cmask)
        if self.stop_strings:  # a row cut at a stop string ended, it was not truncated
            ended = [any(st in t for st in self.stop_strings) for t in texts]
            truncated = truncated & ~torch.tensor(ended, device=self.device)
        rep = [ex for ex in examples for _ in range(G)]
        rw, sc = self.task.judge(texts, rep)
        errors = sum(1 for x in rw if math.isnan(x))
        rewards = torch.tensor(rw, dtype=torch.float32, device=self.device)
        scores = torch.tensor(sc, dtype=torch.float32, device=self.device)
        att = torch.cat([p_att, cmask], dim=1)
        return Rollout(
            input_ids=torch.cat([p_ids, comp], dim=1), attention_mask=att,
            position_ids=_position_ids(att), completion_ids=comp, completion_mask=cmask,
            truncated=truncated, texts=texts, rewards=rewards, scores=scores, old_logps=gen.logps,
            engine_logps=gen.engine_logps, reward_errors=errors,
        )

    # ------------------------------------------------------------------ log-probs
    def _logits(self, model: Any, ids: Tensor, att: Tensor, pos: Tensor, T: int,
                trunk: Tensor | None = None) -> Tensor:
        """Temperature-scaled float32 logits at the T completion positions only ([B, T, V]); the
        forward under bf16 autocast when `compute_dtype` is bf16. With `trunk` (the rows' hidden
        states above the frozen layers, `_trunk`) only the layers above it run."""
        with precision.autocast(self.device, self.compute_dtype):
            if trunk is None:
                out = model(input_ids=ids, attention_mask=att, position_ids=pos, logits_to_keep=T + 1,
                            use_cache=False)
            else:
                with decoder_layers(model, self.trunk_depth):
                    out = model(inputs_embeds=trunk, attention_mask=att, position_ids=pos,
                                logits_to_keep=T + 1, use_cache=False)
        logits = out.logits[:, :-1].float()
        t = self.cfg.generation.temperature
        return logits / t if t != 1.0 else logits

    @torch.no_grad()
    def _trunk(self, ro: Rollout, rows: slice) -> Tensor | None:
        """The hidden states of rows of a rollout entering the first adapted layer, computed once
        for the reference and every pass (`train.share_trunk`); None when there is no frozen trunk."""
        if not self.trunk_depth:
            return None
        with precision.autocast(self.device, self.compute_dtype):
            return trunk_hidden(self.model, ro.input_ids[rows], ro.attention_mask[rows],
                                ro.position_ids[rows], self.trunk_depth)

    @torch.no_grad()
    def _reference(self, ro: Rollout, rows: slice,
                   trunk: Tensor | None = None) -> tuple[Tensor, Tensor | None]:
        """Reference log-probs (and logits for the `full` estimator) of rows of a rollout."""
        T = ro.completion_ids.shape[1]
        args = (ro.input_ids[rows], ro.attention_mask[rows], ro.position_ids[rows], T, trunk)
        if self.is_peft and self._anchor_lora is not None:  # lagged anchor: the adapter's copy
            with self._lora_weights(self._anchor_lora):
                logits = self._logits(self.model, *args)
        elif self.is_peft:
            with self.model.disable_adapter():
                logits = self._logits(self.model, *args)
        else:
            logits = self._logits(self.ref_model, *args)
        lp = token_logps(logits, ro.completion_ids[rows])
        return lp, (logits.float() if self.estimator in ("full", "topk") else None)

    @contextlib.contextmanager
    def _lora_weights(self, weights: dict[str, Tensor]) -> Iterator[None]:
        """The adapter's trainable weights temporarily replaced by `weights` (the lagged anchor)."""
        params = dict(self.model.named_parameters())
        with torch.no_grad():
            saved = {n: params[n].detach().clone() for n in weights}
            for n, w in weights.items():
                params[n].copy_(w)
        try:
            yield
        finally:
            with torch.no_grad():
                for n, w in saved.items():
                    params[n].copy_(w)

    @torch.no_grad()
    def _reanchor(self) -> None:
        """`anchor: lagged`: every `anchor_every` steps (and at the first step after a checkpoint
        load) the reference becomes a copy of the current policy."""
        if self.anchor != "lagged" or not (self.step % self.anchor_every == 0 or self._force_reanchor):
            return
        self._force_reanchor = False
        if self.is_peft:
            self._anchor_lora = {n: p.detach().clone() for n, p in self.model.named_parameters()
                                 if p.requires_grad}
            return
        if self._start_weights is None:  # `reset` restores the start from here, not from the anchor
            self._start_weights = {k: v.detach().clone() for k, v in self.ref_model.state_dict().items()}
        self.ref_model.load_state_dict(self.model.state_dict())

    def _needs_ref(self) -> bool:
        return self.divergence is not None and self.coef != 0.0

    @torch.no_grad()
    def _policy_logps(self, ro: Rollout, trunk: Tensor | None = None) -> Tensor:
        """The current policy's log-probs of the sampled tokens (reward placement, when the sampler
        kept none)."""
        T = ro.completion_ids.shape[1]
        logits = self._logits(self.model, ro.input_ids, ro.attention_mask, ro.position_ids, T, trunk)
        return token_logps(logits, ro.completion_ids)

    # ------------------------------------------------------------------ training
    def _micro_slices(self, B: int) -> list[slice]:
        m = self.cfg.micro_batch_size or B
        return [slice(i, min(i + m, B)) for i in range(0, B, m)]

    def loss_spec(self) -> LossSpec:
        """The loss settings of this trainer's config and regulariser (estimator, chunk size)."""
        cfg = self.cfg
        return LossSpec(loss_type=cfg.loss_type, eps_low=cfg.epsilon_low, eps_high=cfg.epsilon_high,
                        estimator=self.estimator, chunk_size=self.chunk_size, topk=self.topk,
                        max_len=cfg.generation.max_new_tokens, reg_times_ratio=cfg.reg_times_ratio)

    def train_step(self, collect_samples: bool = False) -> dict[str, Any]:
        """One generated batch and mu optimisation passes over it; returns the step metrics (plus
        `samples`, a few of the batch's completions per `train.log_completions`, when asked)."""
        cfg = self.cfg
        t0 = time.perf_counter()
        need_ref = self._needs_ref()
        if need_ref:
            self._reanchor()
        in_reward = need_ref and self.placement == "reward"
        # --- rollout: G completions per prompt, scored by the task (reward placement keeps the
        # sampling log-probs: the penalty's policy side, with no extra forward)
        examples = self._next_prompts(cfg.prompts_per_step)
        ro = self.rollout(examples, with_logps=cfg.mu > 1 or in_reward)
        t_gen = time.perf_counter() - t0
        mask = ro.completion_mask.float()
        if cfg.mask_truncated:
            mask = mask * (~ro.truncated).float().unsqueeze(1)
        probe_mask = mask  # the inert-regulariser probe measures lambda * D on every sampled token
        if ro.reward_errors:  # completions the task could not judge: no gradient, out of the token count
            mask = mask * (~torch.isnan(ro.rewards)).float().unsqueeze(1)
        B = ro.completion_ids.shape[0]
        slices = self._micro_slices(B)
        totals = BatchTotals(num_seqs=B, num_tokens=mask.sum(), num_micro=len(slices))
        # --- reference pass (no grad) and the old policy (mu > 1: the sampling log-probs)
        trunks = [self._trunk(ro, s) for s in slices]  # the frozen layers' output, once per batch
        refs = [self._reference(ro, s, trunks[k]) if need_ref else (None, None) for k, s in enumerate(slices)]
        olds = [ro.old_logps[s] for s in slices] if cfg.mu > 1 and ro.old_logps is not None \
            else [None] * len(slices)  # None with mu > 1 (vllm): the first pass's log-probs
        # --- the regulariser in the reward (before the group advantage) or in the loss
        rewards, penalty, div_mean = ro.rewards, None, None
        if in_reward:
            ref_lp = torch.cat([r[0] for r in refs]) if len(refs) > 1 else refs[0][0]
            lp = ro.old_logps if ro.old_logps is not None else self._policy_logps(
                ro, None if trunks[0] is None else torch.cat(trunks))
            d_tok = self.divergence.sampled(lp.float(), ref_lp.float(), ro.completion_mask).detach()
            rewards, penalty = penalised_rewards(ro.rewards, d_tok, ro.completion_mask, self.coef)
            div_mean = (d_tok.float() * mask).sum() / totals.num_tokens.clamp(min=1.0)
        adv = compute_advantages(rewards, cfg.generation.num_generations, cfg.advantage)
        in_loss = need_ref and not in_reward
        want_ratio = in_loss and cfg.grad_ratio_every > 0 and self.step % cfg.grad_ratio_every == 0
        probe = None
        if in_loss and self.coef != 0.0 and (self.step == 0 or want_ratio):
            probe = self._check_regulariser(refs[0], probe_mask[slices[0]])
        # --- mu clipped passes over the batch, one optimiser step each
        self.model.train()
        acc, grad_norm, ratio = self._optimise(ro, adv, mask, slices, totals, refs, olds, in_loss,
                                               want_ratio, trunks)
        if div_mean is not None:
            acc["div_mean"] = div_mean
            acc["div_max"] = masked_max(d_tok, mask)
        self.step += 1
        m = self._step_metrics(ro, adv, mask, totals, acc, grad_norm, ratio, want_ratio,
                               time.perf_counter() - t0, t_gen, penalty=penalty,
                               examples=examples if collect_samples else None)
        m["reg_probe"] = float("nan") if probe is None else probe
        return m

    def _check_regulariser(self, ref: tuple[Tensor | None, Tensor | None], mask: Tensor) -> float:
        """`losses.regulariser_probe` on this batch: below `REGULARISER_FLOOR` the requested
        regulariser is numerically absent; warn once with the figures (or stop, with
        `train.require_active_regulariser`). Sets `regulariser_active` and `regulariser_probe`."""
        ratio = regulariser_probe(self.divergence, self.coef, self.estimator, ref[0], mask, ref[1],
                                  seed=self.step, topk=self.topk)
        self.regulariser_probe = ratio
        active = ratio >= REGULARISER_FLOOR
        self.regulariser_active = active if self.regulariser_active is not False else False
        if not active:
            name = getattr(self.divergence, "name", type(self.divergence).__name__)
            msg = (f"regulariser {name} (lambda {self.coef:g}, {self.estimator}) is numerically absent at "
                   f"step {self.step}: its pull on the token log-probs, 0.1 nats off the reference, is "
                   f"{ratio:.3g} of a unit-advantage policy gradient's (floor {REGULARISER_FLOOR:g}); "
                   "lambda too small, or D detached or clamped")
            if self.cfg.require_active_regulariser:
                raise RuntimeError(msg + " (train.require_active_regulariser: true)")
            if not self._warned_inert:
                log.warning(msg)
                warnings.warn(msg, RuntimeWarning, stacklevel=3)
                self._warned_inert = True
        return ratio

    def _optimise(self, ro: Rollout, adv: Tensor, mask: Tensor, slices: list[slice], totals: BatchTotals,
                  refs: list[tuple[Tensor | None, Tensor | None]], olds: list[Tensor | None], in_loss: bool,
                  want_ratio: bool, trunks: list[Tensor | None] | None = None,
                  ) -> tuple[dict[str, Tensor], Tensor, Tensor]:
        """The mu passes: per micro-batch forward, loss, backward (plus, on grad-ratio steps, the
        regulariser's own gradient); clip and step after each pass. `in_loss`: lambda * D is part of
        the loss (placement loss, lambda != 0); `trunks`: per micro-batch, the frozen layers' output
        (or None). Returns the first pass's token-weighted loss parts, the last gradient norm and the
        regulariser-to-PG ratio."""
        trunks = trunks if trunks is not None else [None] * len(slices)
        cfg, spec = self.cfg, self.loss_spec()
        T = ro.completion_ids.shape[1]
        params = self._trainable()
        div = self.divergence if in_loss else None
        ntok = totals.num_tokens.clamp(min=1.0)
        acc: dict[str, Tensor] = {}
        grad_norm = ratio = torch.zeros((), device=self.device)
        is_w: list[Tensor | None] = [None] * len(slices)  # vllm: truncated IS weights, from pass 0
        for it in range(cfg.mu):
            reg_grads: list[Tensor] | None = None
            for k, s in enumerate(slices):
                logits = self._logits(self.model, ro.input_ids[s], ro.attention_mask[s], ro.position_ids[s],
                                      T, trunks[k])
                lp = token_logps(logits, ro.completion_ids[s])
                if it == 0 and cfg.mu > 1 and olds[k] is None:
                    olds[k] = lp.detach()  # the sampling weights' own log-probs (pass 0 is at them)
                if it == 0 and ro.engine_logps is not None:
                    is_w[k] = self._engine_correction(ro, s, lp, acc)
                ref_lp, ref_logits = refs[k]
                out = gbmpo_loss(lp, olds[k], ref_lp, adv[s], mask[s], divergence=div, coef=self.coef,
                                 spec=spec, totals=totals, logits=logits, ref_logits=ref_logits,
                                 is_weight=is_w[k])
                if want_ratio and it == 0:
                    g = torch.autograd.grad(out.reg_loss, params, retain_graph=True, allow_unused=True)
                    g = [torch.zeros_like(p) if x is None else x for p, x in zip(params, g, strict=True)]
                    reg_grads = g if reg_grads is None else [a + b for a, b in zip(reg_grads, g, strict=True)]
                out.loss.backward()
                w = mask[s].sum() / ntok  # this micro-batch's share of the batch's tokens
                if it == 0:
                    with torch.no_grad():
                        ent = (_entropy(logits.detach()) * mask[s]).sum() / mask[s].sum().clamp(min=1.0)
                    parts = {"loss": out.loss.detach(), "pg_loss": out.pg_loss.detach(),
                             "reg_loss": out.reg_loss.detach(), "div_mean": out.metrics["div_mean"] * w,
                             "clip_frac": out.metrics["clip_frac"] * w, "entropy": ent * w}
                    for key, v in parts.items():
                        acc[key] = acc.get(key, 0.0) + v
                    dmax = out.metrics["div_max"]  # the largest per-token D of the batch
                    acc["div_max"] = dmax if "div_max" not in acc else torch.maximum(acc["div_max"], dmax)
                if it == cfg.mu - 1 and cfg.mu > 1:
                    acc["clip_frac_last"] = acc.get("clip_frac_last", 0.0) + out.metrics["clip_frac"] * w
            if reg_grads is not None:
                ratio = _grad_ratio(params, reg_grads)
            if cfg.optim.max_grad_norm is not None:
                grad_norm = torch.nn.utils.clip_grad_norm_(params, cfg.optim.max_grad_norm)
            else:
                grad_norm = torch.sqrt(sum((p.grad.float() ** 2).sum() for p in params if p.grad is not None))
            self.optimizer.step()
            self.scheduler.step()
            self.optimizer.zero_grad(set_to_none=True)
        return acc, grad_norm, ratio

    @torch.no_grad()
    def _engine_correction(self, ro: Rollout, rows: slice, lp: Tensor, acc: dict[str, Tensor]) -> Tensor:
        """vllm backend: the truncated importance weight min(exp(trainer - engine), C) of a micro-batch
        (`lp`: the trainer's log-probs under the sampling weights), and into `acc` its share of the
        batch's mean |trainer - engine| log-prob per token and mean weight."""
        from mirrorlab.gbmpo.vllm_engine import truncated_is_weight

        cmask = ro.completion_mask[rows].float()
        eng = ro.engine_logps[rows]
        w = truncated_is_weight(lp, eng, self.cfg.generation.vllm_is_cap, cmask)
        n_all = ro.completion_mask.float().sum().clamp(min=1.0)
        diff = ((lp.detach().float() - eng.float()).abs() * cmask).nan_to_num(0.0)
        for key, v in (("engine_logp_mismatch", diff.sum() / n_all),
                       ("is_weight_mean", (w * cmask).sum() / n_all)):
            acc[key] = acc.get(key, 0.0) + v
        return w

    def _step_metrics(self, ro: Rollout, adv: Tensor, mask: Tensor, totals: BatchTotals,
                      acc: dict[str, Tensor], grad_norm: Tensor, ratio: Tensor, want_ratio: bool,
                      dt: float, t_gen: float, penalty: Tensor | None = None,
                      examples: Sequence[Any] | None = None) -> dict[str, Any]:
        """All step metrics from one device-to-host transfer (which also carries the rewards,
        scores and lengths of the sampled completions when `examples` asks for samples)."""
        cfg = self.cfg
        B = totals.num_seqs
        zero = torch.zeros((), device=self.device)
        abs_adv = (adv.abs().unsqueeze(1) * mask).sum() / totals.num_tokens.clamp(min=1.0)
        lengths = ro.completion_mask.float().sum(1)
        keys = ["loss", "pg_loss", "reg_loss", "div_mean", "div_max", "clip_frac", "entropy"]
        names = keys + ["reward_mean", "reward_std", "accuracy", "completion_length", "truncated_frac",
                        "gen_tokens", "abs_adv", "grad_norm", "grad_ratio", "clip_frac_last",
                        "reward_penalty"]
        judged = ~torch.isnan(ro.rewards) if ro.reward_errors else None
        rw = ro.rewards if judged is None else ro.rewards[judged]
        sc = ro.scores if judged is None else ro.scores[judged]
        vec = torch.stack([
            torch.as_tensor(acc[k], device=self.device, dtype=torch.float32) for k in keys
        ] + [
            rw.mean(), rw.std() if rw.numel() > 1 else zero,
            sc.mean(), lengths.mean(), ro.truncated.float().mean(),
            ro.completion_mask.sum().float(), abs_adv, grad_norm.float(), ratio.float(),
            torch.as_tensor(acc.get("clip_frac_last", acc["clip_frac"]), device=self.device,
                            dtype=torch.float32),
            penalty.mean() if penalty is not None else zero,
        ])
        rows = self._sample_rows(B) if examples is not None else []
        if rows:  # a strided slice of the batch: no index tensor to copy to the device
            idx = slice(rows[0], rows[-1] + 1, rows[1] - rows[0] if len(rows) > 1 else 1)
            pen = penalty if penalty is not None else torch.zeros_like(ro.rewards)
            vec = torch.cat([vec, ro.rewards[idx].float(), ro.scores[idx].float(), lengths[idx],
                             pen[idx].float()])
        vals = vec.tolist()
        m: dict[str, Any] = dict(zip(names, vals[:len(names)], strict=True))
        if rows:
            n = len(rows)
            extra = vals[len(names):]
            G = cfg.generation.num_generations
            m["samples"] = [
                self._sample_row(self.step, "train", examples[i // G], ro.texts[i], extra[j],
                                 extra[n + j], extra[2 * n + j], penalty=extra[3 * n + j])
                for j, i in enumerate(rows)]
        m["reg_over_pg"] = self.coef * m["div_mean"] / max(m["abs_adv"], 1e-12)
        if not want_ratio:
            m["grad_ratio"] = float("nan")
        if cfg.mu == 1:
            m.pop("clip_frac_last")
        m["reward_errors"] = ro.reward_errors
        m.update(step=self.step, lr=self.scheduler.get_last_lr()[0], step_time=dt, gen_time=t_gen,
                 tokens_per_s=m["gen_tokens"] / dt if dt > 0 else float("nan"))
        if "engine_logp_mismatch" in acc:  # vllm backend: sampler vs trainer, and the weight push
            m["engine_logp_mismatch"], m["is_weight_mean"] = torch.stack(
                [acc["engine_logp_mismatch"], acc["is_weight_mean"]]).tolist()
        m.update(self.rollouts.pop_metrics())  # the backend's own (vllm: engine_sync_s, the weight pushes)
        if not math.isfinite(m["loss"]):
            raise FloatingPointError(f"non-finite loss at step {self.step}: {m['loss']}")
        return m

    def train(self, steps: int | None = None, callbacks: Iterable[Any] = ()) -> list[dict[str, Any]]:
        """Run `steps` more steps (default: up to `cfg.steps` in total); returns per-step metrics.

        Rows of the first step, the last step of this call and every `log_completions.every`-th
        step also hold `samples` (a few completions; `sample_tables` collects them)."""
        cfg = self.cfg
        n = max(0, cfg.steps - self.step) if steps is None else steps
        callbacks = list(callbacks)
        history = []
        lc = cfg.log_completions
        for i in range(n):
            s = self.step + 1
            want = lc.n > 0 and (s == 1 or i == n - 1 or (lc.every > 0 and s % lc.every == 0))
            m = self.train_step(collect_samples=want)
            history.append(m)
            for cb in callbacks:
                if hasattr(cb, "on_step"):
                    cb.on_step(self.step, m)
            if cfg.eval_every and self.step % cfg.eval_every == 0:
                r = self.evaluate(cfg.eval_split, n=cfg.eval_size)
                em = {"metric": r.metric, "stderr": r.stderr, "mean_length": r.mean_length, "n": r.n}
                m["eval"] = em
                for cb in callbacks:
                    if hasattr(cb, "on_eval"):
                        cb.on_eval(self.step, em)
        return history

    # ------------------------------------------------------------------ evaluation
    def evaluate(self, split: str = "val", n: int | None = None, indices: Sequence[int] | None = None,
                 batch_size: int = 256) -> EvalResult:
        """Greedy decoding on a split (the first `n` examples, or `indices`); the task's metric."""
        data = self.task.split(split)
        if indices is not None:
            exs = [data[i] for i in indices]
        else:
            exs = list(data[:n]) if n is not None else list(data)
        if not exs:
            return EvalResult(float("nan"), float("nan"), float("nan"), [], 0)
        max_new = self.cfg.eval_max_new_tokens or self.cfg.generation.max_new_tokens
        scores: list[float] = []
        lengths: list[float] = []
        samples: list[dict[str, Any]] = []
        n_samples = self.cfg.log_completions.n
        extra: dict[str, list[float]] = {}
        for i in range(0, len(exs), batch_size):
            chunk = exs[i:i + batch_size]
            _, _, comp, cmask = self.generate(chunk, repeats=1, greedy=True, max_new_tokens=max_new)
            texts = self._decode(comp, cmask)
            sc = [float(x) for x in self.task.scores(texts, chunk)]
            for name, vals in self.task.extra_metrics(texts, chunk).items():
                extra.setdefault(name, []).extend(float(v) for v in vals)
            ln = cmask.sum(1).float().tolist()
            for j in range(min(len(chunk), n_samples - len(samples))):  # the first n problems
                samples.append(self._sample_row(self.step, split, chunk[j], texts[j], None, sc[j], ln[j]))
            scores += sc
            lengths += ln
        arr = np.asarray(scores, dtype=np.float64)
        judged = arr[~np.isnan(arr)]
        errors = len(arr) - len(judged)
        if errors > self.cfg.max_reward_error_rate * len(arr):
            raise RewardErrorRate(
                f"evaluation on {split}: the task could not judge {errors} of {len(arr)} completions "
                f"({errors / len(arr):.1%} > train.max_reward_error_rate "
                f"{self.cfg.max_reward_error_rate:g}); "
                "its log has the first reason (MBPP: the sandbox's harness)")
        se = float(judged.std() / math.sqrt(len(judged))) if len(judged) > 1 else float("nan")
        mean = float(judged.mean()) if len(judged) else float("nan")
        return EvalResult(mean, se, float(np.mean(lengths)), scores, len(judged), samples,
                          {name: float(np.mean(v)) for name, v in extra.items()}, errors)

    @torch.no_grad()
    def reference_loglik(self, examples: Sequence[Any], batch_size: int = 256) -> list[float]:
        """Per example, the mean log-probability per token (temperature 1, teacher-forced) of the
        task's reference completion under the current policy: a continuous, forward-only fitness
        proxy that moves before greedy accuracy flips."""
        out: list[float] = []
        was_training = self.model.training
        self.model.eval()
        try:
            for i in range(0, len(examples), batch_size):
                chunk = list(examples[i:i + batch_size])
                ids, att = self._left_pad([self._prompt_ids(ex) for ex in chunk])
                tok = self.tokenizer
                refs = [tok(self.task.reference_completion(ex), add_special_tokens=False)["input_ids"]
                        for ex in chunk]
                T = max(1, max(len(r) for r in refs))
                comp = torch.full((len(chunk), T), self.pad_id, dtype=torch.long)
                cmask = torch.zeros((len(chunk), T), dtype=torch.long)
                for j, r in enumerate(refs):
                    comp[j, :len(r)] = torch.tensor(r, dtype=torch.long)
                    cmask[j, :len(r)] = 1
                comp, cmask = comp.to(self.device), cmask.to(self.device)
                full, fatt = torch.cat([ids, comp], 1), torch.cat([att, cmask], 1)
                pos = (fatt.cumsum(-1) - 1).clamp(min=0)
                with precision.autocast(self.device, self.compute_dtype):
                    logits = self.model(input_ids=full, attention_mask=fatt, position_ids=pos,
                                        logits_to_keep=T + 1, use_cache=False).logits[:, :-1]
                lp = token_logps(logits.float(), comp) * cmask
                out += (lp.sum(1) / cmask.sum(1).clamp(min=1)).double().tolist()
        finally:
            if was_training:
                self.model.train()
        return out

    @torch.no_grad()
    def sampled_scores(self, examples: Sequence[Any], k: int) -> list[list[float]]:
        """Per example, the task's score of k completions sampled at the training temperature (for
        expected reward = their mean and pass@k = their max)."""
        _, _, comp, cmask = self.generate(examples, repeats=k)
        texts = self._decode(comp, cmask)
        flat = self.task.scores(texts, [ex for ex in examples for _ in range(k)])
        return [[float(x) for x in flat[i * k:(i + 1) * k]] for i in range(len(examples))]

    # ------------------------------------------------------------------ completion samples
    def _sample_rows(self, B: int) -> list[int]:
        """Rows of a batch of B whose completions are logged: `log_completions.n`, evenly strided
        (0, B // n, 2 B // n, ...: with n <= prompts per step, one completion of each of n prompts)."""
        n = min(self.cfg.log_completions.n, B)
        return [i * (B // n) for i in range(n)] if n > 0 else []

    def _sample_row(self, step: int, split: str, ex: Any, text: str, reward: float | None, score: float,
                    length: float, penalty: float | None = None) -> dict[str, Any]:
        """One logged completion with its target and whether it was correct (texts cut to
        `log_completions.max_chars`); `reward` only on training rows (greedy evaluation has none)."""
        cap = self.cfg.log_completions.max_chars
        row: dict[str, Any] = {"step": int(step), "split": split, "example_id": str(ex.id),
                               "prompt": _clip(str(ex.question), cap), "completion": _clip(text, cap),
                               "target": _clip(str(ex.answer), cap), "correct": bool(score >= 1.0)}
        if reward is not None:
            row["reward"] = reward
        row.update(score=score, length=int(length))
        if penalty is not None:
            row["penalty"] = penalty
        return row

    # ------------------------------------------------------------------ checkpoints
    def _weights(self) -> dict[str, Tensor]:
        if self.is_peft:
            return {n: p.detach().cpu().clone() for n, p in self.model.named_parameters() if p.requires_grad}
        return {k: v.detach().cpu().clone() for k, v in self.model.state_dict().items()}

    def save_checkpoint(self, path: str | Path) -> Path:
        """Write weights (or adapter), optimiser, scheduler, RNG states and step to directory `path`."""
        from safetensors.torch import save_file

        p = Path(path)
        p.mkdir(parents=True, exist_ok=True)
        w = self._weights()
        # tied embeddings share storage: safetensors refuses aliases, so save distinct copies
        save_file({k: v.contiguous().clone() for k, v in w.items()}, str(p / "weights.safetensors"))
        state = {
            "step": self.step, "seed": self.seed, "coef": self.coef,
            "optimizer": self.optimizer.state_dict(), "scheduler": self.scheduler.state_dict(),
            "sampler": self._sampler.getstate(), "order": list(self._order),
            "rng_python": random.getstate(), "rng_numpy": np.random.get_state(),
            "rng_torch": torch.get_rng_state(),
            "rng_cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None,
            "peft": self.is_peft,
        }
        torch.save(state, p / "trainer_state.pt")
        return p

    def load_checkpoint(self, path: str | Path) -> None:
        """Restore a checkpoint written by `save_checkpoint` (same model, task and config)."""
        from safetensors.torch import load_file

        p = Path(path)
        self._force_reanchor = self.anchor == "lagged"  # the anchor is not in checkpoints: re-copy it
        w = load_file(str(p / "weights.safetensors"), device=str(self.device))
        state = torch.load(p / "trainer_state.pt", weights_only=False)
        if state["peft"] != self.is_peft:
            raise ValueError(
                f"checkpoint {p} was written for peft={state['peft']}, trainer has {self.is_peft}")
        with torch.no_grad():
            if self.is_peft:
                named = dict(self.model.named_parameters())
                for k, v in w.items():
                    named[k].copy_(v)
            else:
                self.model.load_state_dict(w)
        self._make_optimizer()
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        self.step = state["step"]
        self.seed = state["seed"]
        self.reg = replace(self.reg, coef=float(state["coef"]))
        self._sampler.setstate(state["sampler"])
        self._order = list(state["order"])
        random.setstate(state["rng_python"])
        np.random.set_state(state["rng_numpy"])
        torch.set_rng_state(state["rng_torch"])
        if state["rng_cuda"] is not None and torch.cuda.is_available():
            torch.cuda.set_rng_state_all(state["rng_cuda"])


def _clip(text: str, cap: int) -> str:
    return text if len(text) <= cap else text[: cap - 3] + "..."


def _check_anchor(anchor: str, every: int) -> tuple[str, int]:
    if anchor not in ("ref", "lagged"):
        raise ValueError(f"divergence.anchor must be one of ref, lagged, got {anchor!r}")
    if int(every) < 1:
        raise ValueError(f"divergence.anchor_every must be >= 1, got {every}")
    return anchor, int(every)


def _checked(reg: Regulariser) -> Regulariser:
    """`reg` with its placement and anchor validated (ValueError naming the field otherwise)."""
    _check_placement(reg.placement, reg.estimator)
    anchor, every = _check_anchor(reg.anchor, reg.anchor_every)
    return replace(reg, coef=float(reg.coef), anchor=anchor, anchor_every=every)


def _check_placement(placement: str, estimator: str) -> str:
    if placement not in ("loss", "reward"):
        raise ValueError(f"unknown placement {placement!r}; allowed: loss, reward")
    if placement == "reward" and estimator != "sampled":
        raise ValueError("placement reward penalises the sampled tokens' D: use estimator sampled")
    return placement


def sample_tables(history: Iterable[dict[str, Any]], eval_result: EvalResult | None = None,
                  split: str | None = None) -> dict[str, list[dict[str, Any]]]:
    """The completion samples of a run as MLflow tables: `step_XXXX` (from the history rows that
    hold `samples`) and `eval_<split>` (from an `EvalResult`), each a list of row dicts."""
    out: dict[str, list[dict[str, Any]]] = {}
    for row in history:
        rows = row.get("samples") if isinstance(row, dict) else None
        if rows:
            out[f"step_{int(rows[0]['step']):04d}"] = list(rows)
    if eval_result is not None and eval_result.samples:
        out[f"eval_{split or eval_result.samples[0]['split']}"] = list(eval_result.samples)
    return out


def build_trainer(cfg: Config, regulariser: Regulariser) -> GBMPOTrainer:
    """Model + task from a root `Config`, wired with `regulariser` into a GBMPOTrainer (build the
    regulariser from the config with `mirrorlab.maps.build_divergence(cfg.divergence)`)."""
    seed_everything(cfg.train.seed)
    model, tokenizer = load_model(cfg.model)
    task = tasks.get(cfg.task.name, **cfg.task.params)
    return GBMPOTrainer(model, tokenizer, task, cfg=cfg.train, reg=regulariser)
