"""The rollout interface: what a generation backend of the GBMPO trainer takes and returns.

A backend turns tokenised prompts and sampling settings into completions: token ids, a mask up to
and including the first stop token, and, when asked, the log-probs of the drawn tokens. The
trainer keeps the RL step (rollout -> reference pass -> optimise -> metrics) and talks to every
backend through `RolloutBackend`, built from a `RolloutContext` by the `backends` registry:
`fast` (mirrorlab's lean sampler, `mirrorlab.gbmpo.rollout_fast`), `hf` (transformers' generate,
`rollout_hf`) and `vllm` (a colocated vLLM engine, `rollout_vllm`), each registered by import
path so that this module stays below the config, which validates `train.generation.backend`
against the registry. A plugin adds one with `backends.register("name", factory)`, where
`factory(ctx=RolloutContext) -> RolloutBackend`.

Weights: the trainer replaces a version token whenever the policy's weights change (optimiser
step, reset, checkpoint load) and calls `sync(version)` before each generation; a backend with
its own copy of the weights (vLLM) pushes them when the version differs from the one it holds.
"""

from __future__ import annotations

import importlib.util
import logging
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Protocol, runtime_checkable

import torch
from torch import Tensor

from mirrorlab.registry import Registry

log = logging.getLogger(__name__)

# `auto`: vLLM from this model size up, where it measured faster than the fast sampler (on the
# 2-core development CPU, benchmarks/README.md: on the 1.7M and 4.2M tiny models the fast sampler
# is faster, 16 x 64: 0.19 s vs 0.29 s; on SmolLM2-135M vLLM generates 2.2x faster than the fp32
# lean sampler, 1.1x (8 x 64) to 1.5x (32 x 8 x 64) than the bf16 one)
AUTO_MIN_PARAMS = 50_000_000


@dataclass(frozen=True)
class SamplingParams:
    """Decoding settings with HF semantics (top_k = 0 and top_p = 1 mean off)."""

    max_new_tokens: int
    greedy: bool = False
    temperature: float = 1.0
    top_k: int = 0
    top_p: float = 1.0
    min_new_tokens: int = 0


@dataclass(frozen=True)
class RolloutContext:
    """What a backend is built from: the policy and its tokenizer, where it runs, the ids that end a
    completion, the compute dtype, the `train.generation` config section and the run's seed."""

    model: Any
    tokenizer: Any
    device: torch.device
    pad_id: int
    stop_ids: tuple[int, ...]
    compute_dtype: torch.dtype
    generation: Any  # mirrorlab.config.GenerationConfig
    seed: int = 0


@dataclass(frozen=True)
class Completions:
    """One generated batch, rows grouped by prompt (`repeats` consecutive rows per prompt)."""

    prompt_ids: Tensor  # [N, P] left padded
    prompt_mask: Tensor  # [N, P]
    completion_ids: Tensor  # [N, T]; after a row's stop token: pad
    completion_mask: Tensor  # [N, T] 1 up to and including the first stop token
    logps: Tensor | None = None  # [N, T] the sampling policy's log-probs (asked for with with_logps)
    engine_logps: Tensor | None = None  # [N, T] log-probs reported by an engine with its own weights


class BackendUnavailableError(RuntimeError):
    """A backend cannot run here (not installed, model not supported); the message names the fix.
    With `train.generation.backend: auto` the trainer falls back to `fast`."""


@runtime_checkable
class RolloutBackend(Protocol):
    """The trainer's view of a generation backend."""

    name: str

    def generate(self, prompts: Sequence[list[int]], params: SamplingParams, repeats: int = 1,
                 with_logps: bool = False) -> Completions:
        """`repeats` completions of each tokenised prompt; `with_logps` asks for `logps` (a backend
        that cannot give them returns None there and `engine_logps` instead)."""
        ...

    def sync(self, version: object) -> None:
        """The policy's weights are now at `version` (replaced whenever they change)."""
        ...

    def reset(self) -> None:
        """Drop per-run caches (a new run starts from other weights)."""
        ...

    def pop_metrics(self) -> dict[str, float]:
        """Backend metrics accumulated since the last call (the trainer logs them per step)."""
        ...


backends: Registry[RolloutBackend] = Registry("generation backend")
backends.register("fast", "mirrorlab.gbmpo.rollout_fast:FastRollout")
backends.register("hf", "mirrorlab.gbmpo.rollout_hf:HFRollout")
backends.register("vllm", "mirrorlab.gbmpo.rollout_vllm:VLLMRollout")


def vllm_available() -> bool:
    """Whether `import vllm` would find a package (it is not imported)."""
    return importlib.util.find_spec("vllm") is not None


def resolve(name: str, model: Any) -> str:
    """`auto` -> `vllm` where vLLM is installed and the model is large enough for it to be the
    faster sampler (>= AUTO_MIN_PARAMS parameters, measured), else `fast`; other names pass."""
    if name != "auto":
        return name
    if not vllm_available():
        return "fast"
    n = sum(p.numel() for p in model.parameters())
    return "vllm" if n >= AUTO_MIN_PARAMS else "fast"


def build(ctx: RolloutContext) -> RolloutBackend:
    """The backend `ctx.generation.backend` names (`auto` resolved by `resolve`; an `auto` choice
    that cannot run here falls back to `fast` with a warning)."""
    asked = ctx.generation.backend
    name = resolve(asked, ctx.model)
    try:
        return backends.get(name, ctx=ctx)
    except BackendUnavailableError as e:
        if asked != "auto":
            raise
        log.warning("generation backend auto: %s; using fast", e)
        return backends.get("fast", ctx=ctx)


def left_pad(seqs: Sequence[list[int]], pad_id: int,
             device: torch.device | str = "cpu") -> tuple[Tensor, Tensor]:
    """Token lists as one left-padded id tensor and its attention mask."""
    width = max(len(s) for s in seqs)
    ids = torch.full((len(seqs), width), pad_id, dtype=torch.long)
    att = torch.zeros((len(seqs), width), dtype=torch.long)
    for i, s in enumerate(seqs):
        if s:
            ids[i, width - len(s):] = torch.tensor(s, dtype=torch.long)
            att[i, width - len(s):] = 1
    return ids.to(device), att.to(device)


def completion_mask_from(ids: Tensor, stop_ids: Tensor) -> tuple[Tensor, Tensor]:
    """Mask up to and including the first stop token; also whether no stop token occurred."""
    is_stop = torch.isin(ids, stop_ids)
    # number of stop tokens strictly before each position
    before = torch.cumsum(is_stop.long(), dim=1) - is_stop.long()
    mask = (before == 0).long()
    truncated = ~is_stop.any(dim=1)
    return mask, truncated


def completions(prompt_ids: Tensor, prompt_mask: Tensor, comp: Tensor, stop_ids: Sequence[int], repeats: int,
                logps: Tensor | None = None, engine_logps: Tensor | None = None) -> Completions:
    """`Completions` from one row per prompt (repeated here to one per completion) and the drawn ids."""
    if repeats > 1:
        prompt_ids = prompt_ids.repeat_interleave(repeats, dim=0)
        prompt_mask = prompt_mask.repeat_interleave(repeats, dim=0)
    cmask, _ = completion_mask_from(comp, torch.tensor(list(stop_ids), device=comp.device))
    return Completions(prompt_ids, prompt_mask, comp, cmask, logps, engine_logps)
