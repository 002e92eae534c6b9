"""The `fast` generation backend: mirrorlab's lean KV-cached sampler (`mirrorlab.gbmpo.sampling`).

Same distribution as HF generate with the trainer's processors, each prompt prefilled once per
group; on CPUs with native bf16 the decode matmuls use prepacked bf16 weights
(`precision.pack_decoder`), packed again after each weight change.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch

from mirrorlab.gbmpo import precision
from mirrorlab.gbmpo.sampling import LeanDecoder, sample
from mirrorlab.models import is_peft
from mirrorlab.rollouts import Completions, RolloutContext, SamplingParams, completions, left_pad


class FastRollout:
    """`generation.backend: fast`."""

    name = "fast"

    def __init__(self, ctx: RolloutContext) -> None:
        self.ctx = ctx
        self._version: object = None
        self._packed: tuple[object, Any] | None = None  # (weights version, bf16 decode weights)

    def sync(self, version: object) -> None:
        """Remember the weights' version: the packed decode weights follow it."""
        self._version = version

    def reset(self) -> None:
        """Drop the packed decode weights (a new run packs its own)."""
        self._packed = None

    def pop_metrics(self) -> dict[str, float]:
        """Nothing beyond the trainer's own step metrics."""
        return {}

    def packed(self, batch: int) -> Any:
        """bf16 prepacked decode weights of the policy at the synced version (CPU, compute_dtype
        bf16), None where they do not apply (fp32, CUDA, LoRA)."""
        c = self.ctx
        if c.compute_dtype != torch.bfloat16 or c.device.type != "cpu" or is_peft(c.model) \
                or not LeanDecoder.supports(c.model):
            return None
        if self._packed is None or self._packed[0] is not self._version:
            self._packed = (self._version, precision.pack_decoder(c.model, batch))
        return self._packed[1]

    def generate(self, prompts: Sequence[list[int]], params: SamplingParams, repeats: int = 1,
                 with_logps: bool = False) -> Completions:
        """`repeats` completions per prompt from the lean sampler (the model in eval mode meanwhile)."""
        c = self.ctx
        ids, att = left_pad(prompts, c.pad_id, c.device)
        model = c.model
        was_training = model.training
        model.eval()
        try:
            comp, logps = sample(model, ids, att, params, c.stop_ids, c.pad_id, repeats=repeats,
                                 with_logps=with_logps, cuda_graph=c.generation.cuda_graph,
                                 compute_dtype=c.compute_dtype, packed=self.packed(len(prompts) * repeats))
        finally:
            if was_training:
                model.train()
        return completions(ids, att, comp, c.stop_ids, repeats, logps=logps)
