"""The `vllm` generation backend: the process's colocated vLLM engine (`vllm_engine.VLLMEngine`).

The engine holds its own copy of the weights: `sync` pushes the policy's whenever their version
changed since the engine last saw them. Completions come with the engine's log-probs of the drawn
tokens (`engine_logps`), which the trainer corrects for with a truncated importance weight; its
own log-probs are recomputed for the loss, so `logps` stays None.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from mirrorlab.gbmpo import vllm_engine
from mirrorlab.rollouts import Completions, RolloutContext, SamplingParams, completions, left_pad


class VLLMRollout:
    """`generation.backend: vllm`."""

    name = "vllm"

    def __init__(self, ctx: RolloutContext) -> None:
        self.ctx = ctx
        g = ctx.generation
        self.engine = vllm_engine.VLLMEngine.for_model(
            ctx.model, ctx.tokenizer, dtype=g.vllm_dtype, seed=ctx.seed, kv_cache_mb=g.vllm_kv_cache_mb,
            device=ctx.device.type)
        self._sync_s = 0.0

    def sync(self, version: object) -> None:
        """Push the policy's weights into the engine unless it already holds this version."""
        if self.engine.loaded is not version:
            self._sync_s += self.engine.load_weights(self.ctx.model, version)

    def reset(self) -> None:
        """Nothing: the engine is the process's, kept across runs on purpose (`sync` refreshes it)."""

    def pop_metrics(self) -> dict[str, float]:
        """`engine_sync_s`: seconds spent pushing weights since the last call."""
        out, self._sync_s = {"engine_sync_s": self._sync_s}, 0.0
        return out

    def generate(self, prompts: Sequence[list[int]], params: SamplingParams, repeats: int = 1,
                 with_logps: bool = False) -> Completions:
        """`repeats` completions per prompt from the engine, with its log-probs as `engine_logps`.
        Per-request seeds come from the trainer's seeded torch RNG, so a fixed engine and seed
        reproduce the same completions."""
        c = self.ctx
        seed = None if params.greedy else int(torch.randint(0, 2**30, (1,)).item())
        toks, lps = self.engine.generate(prompts, params, c.stop_ids, repeats=repeats, seed=seed)
        T = max(1, max(len(t) for t in toks))
        comp = torch.full((len(toks), T), c.pad_id, dtype=torch.long)
        elp = torch.zeros((len(toks), T), dtype=torch.float32)
        for i, (t, lp) in enumerate(zip(toks, lps, strict=True)):
            if t:
                comp[i, :len(t)] = torch.tensor(t, dtype=torch.long)
                elp[i, :len(t)] = torch.tensor(lp, dtype=torch.float32)
        ids, att = left_pad(prompts, c.pad_id, c.device)
        return completions(ids, att, comp.to(c.device), c.stop_ids, repeats, engine_logps=elp.to(c.device))
