"""The `hf` generation backend: transformers' `model.generate` (the reference the other backends
are tested against; slower on small models, where HF's per-token machinery dominates)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch

from mirrorlab.gbmpo import precision
from mirrorlab.gbmpo.losses import token_logps
from mirrorlab.rollouts import Completions, RolloutContext, SamplingParams, completions, left_pad


def generation_config(params: SamplingParams, pad_id: int, stop_ids: Sequence[int]) -> Any:
    """HF `GenerationConfig` with the semantics of `params` (greedy: no sampling)."""
    from transformers import GenerationConfig

    kw: dict[str, Any] = dict(max_new_tokens=params.max_new_tokens, pad_token_id=pad_id,
                              eos_token_id=list(stop_ids), use_cache=True)
    if params.greedy:
        kw.update(do_sample=False)
    else:
        kw.update(do_sample=True, temperature=params.temperature, top_p=params.top_p, top_k=params.top_k)
        if params.min_new_tokens:
            kw.update(min_new_tokens=params.min_new_tokens)
    return GenerationConfig(**kw)


class HFRollout:
    """`generation.backend: hf`."""

    name = "hf"

    def __init__(self, ctx: RolloutContext) -> None:
        self.ctx = ctx

    def sync(self, version: object) -> None:
        """Nothing to do: generation runs on the policy module itself."""

    def reset(self) -> None:
        """Nothing cached between runs."""

    def pop_metrics(self) -> dict[str, float]:
        """Nothing beyond the trainer's own step metrics."""
        return {}

    def generate(self, prompts: Sequence[list[int]], params: SamplingParams, repeats: int = 1,
                 with_logps: bool = False) -> Completions:
        """`repeats` completions per prompt; with `with_logps`, the log-probs of the drawn tokens from
        generate's own (temperature-scaled) logits."""
        c = self.ctx
        ids, att = left_pad([p for p in prompts for _ in range(repeats)], c.pad_id, c.device)
        model = c.model
        was_training = model.training
        model.eval()
        gc = generation_config(params, c.pad_id, c.stop_ids)
        if with_logps:
            gc.output_logits = True
            gc.return_dict_in_generate = True
        with precision.autocast(c.device, c.compute_dtype):
            out = model.generate(input_ids=ids, attention_mask=att, generation_config=gc)
        if was_training:
            model.train()
        seq = out.sequences if with_logps else out
        comp = seq[:, ids.shape[1]:]
        logps = None
        if comp.shape[1] == 0:
            comp = torch.full((ids.shape[0], 1), c.pad_id, dtype=torch.long, device=c.device)
        elif with_logps:
            logits = torch.stack(out.logits, dim=1)[:, : comp.shape[1]]
            t = params.temperature
            logps = token_logps(logits / t if t != 1.0 else logits, comp)
        return completions(ids, att, comp, c.stop_ids, 1, logps=logps)
