"""A lean autoregressive sampler: the `fast` generation backend of the GBMPO trainer.

Same distribution as HF `generate(do_sample=True)` with the processors the trainer uses (in HF's
order: min_new_tokens suppression of stop ids, temperature, top-k, top-p; then softmax and
`torch.multinomial`), greedy = argmax; left padding; rows stop at any stop id, later positions
hold `pad_id`. What it drops is HF's per-token machinery (logits-processor lists, stopping
criteria, `prepare_inputs_for_generation`, output bookkeeping), which dominates tiny models on CPU,
and the duplicate prefill: each distinct prompt is prefilled once and its KV cache repeated for
its `repeats` completions. With the same seed and logits it draws the same tokens as HF.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor

from mirrorlab.gbmpo.precision import PackedDecoder, autocast
from mirrorlab.models import base_model
from mirrorlab.rollouts import SamplingParams

log = logging.getLogger(__name__)


def process_logits(scores: Tensor, step: int, p: SamplingParams, stop_ids: Tensor) -> Tensor:
    """HF's sampling warpers on float32 next-token scores [B, V] at new-token index `step`."""
    if p.min_new_tokens and step < p.min_new_tokens:
        scores = scores.index_fill(-1, stop_ids, float("-inf"))
    if p.greedy:
        return scores
    if p.temperature != 1.0:
        scores = scores / p.temperature
    if p.top_k:
        k = min(p.top_k, scores.shape[-1])
        kth = torch.topk(scores, k)[0][..., -1, None]
        scores = scores.masked_fill(scores < kth, float("-inf"))
    if p.top_p < 1.0:
        sorted_logits, sorted_idx = torch.sort(scores, descending=False)
        cum = sorted_logits.softmax(dim=-1).cumsum(dim=-1)
        remove = cum <= (1 - p.top_p)
        remove[..., -1:] = False
        remove = remove.scatter(1, sorted_idx, remove)
        scores = scores.masked_fill(remove, float("-inf"))
    return scores


def next_tokens(scores: Tensor, greedy: bool) -> Tensor:
    """Argmax, or one multinomial draw from softmax(scores) per row (HF's calls, same RNG use)."""
    if greedy:
        return torch.argmax(scores, dim=-1)
    return torch.multinomial(torch.softmax(scores, dim=-1), num_samples=1).squeeze(1)


def _last_logits(out: Any) -> Tensor:
    return out.logits[:, -1].to(dtype=torch.float32)


def _rotate_half(x: Tensor) -> Tensor:
    h = x.shape[-1] // 2
    return torch.cat((-x[..., h:], x[..., :h]), dim=-1)


class LeanDecoder:
    """One-token decode steps for Llama-family models (Qwen2, Llama) over a preallocated KV cache.

    It calls the model's own modules (embeddings, norms, projections, MLP, rotary embedding, LM
    head; so LoRA layers apply) and replaces only HF's per-step glue: mask building, cache
    objects, attention dispatch and output classes. `supports` says when it applies; otherwise
    the sampler falls back to the model's forward.
    """

    TYPES = ("qwen2", "llama")

    def __init__(self, model: Any, cache: Any, attention_mask: Tensor, total_len: int,
                 static: bool = False, packed: PackedDecoder | None = None) -> None:
        base = base_model(model)
        self.inner = base.model
        self.lm_head = base.lm_head
        self.layers = list(self.inner.layers)
        cfg = base.config
        self.n_heads = cfg.num_attention_heads
        self.n_kv = cfg.num_key_value_heads
        self.head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
        B, P = attention_mask.shape
        self.len = P
        if packed is not None and static:
            raise ValueError("the packed bf16 decode step is dynamic-shape only (CPU); static=False")
        self.packed = packed
        self.hidden = cfg.hidden_size
        # the residual stream's dtype (the model's; a bf16-autocast prefill leaves bf16 values), or
        # bf16 for the packed step (its attention runs in bf16: 2.2x faster than fp32 SDPA on the CPU)
        dtype = torch.bfloat16 if packed is not None else self.inner.embed_tokens.weight.dtype
        self.keys: list[Tensor] = []
        self.values: list[Tensor] = []
        # static: the slots beyond the current length are attended under a mask, so they must
        # hold finite values (0 * NaN would leak through the attention product)
        alloc = torch.Tensor.new_zeros if static else torch.Tensor.new_empty
        for i in range(len(self.layers)):
            k, v = cache.layers[i].keys, cache.layers[i].values
            kb = alloc(k, (B, k.shape[1], total_len, k.shape[3]), dtype=dtype)
            vb = alloc(v, (B, v.shape[1], total_len, v.shape[3]), dtype=dtype)
            kb[:, :, :P] = k
            vb[:, :, :P] = v
            self.keys.append(kb)
            self.values.append(vb)
        self.mask: Tensor | None = None
        if bool((attention_mask == 0).any()):
            m = torch.ones((B, 1, 1, total_len), dtype=torch.bool, device=attention_mask.device)
            m[:, 0, 0, :P] = attention_mask.bool()
            self.mask = m
        self.gqa = self.n_kv != self.n_heads
        if packed is not None:  # rotary cos / sin of every position, looked up per step
            slots = torch.arange(total_len, device=attention_mask.device)[None]
            cos, sin = self.inner.rotary_emb(self.inner.embed_tokens.weight[:1], slots)
            self._cos, self._sin = cos[0], sin[0]
        self.static = static
        self.graph: Any = None
        if static:  # fixed shapes: the length lives on the device, the mask covers the buffer
            dev = attention_mask.device
            self._pad = self.mask if self.mask is not None else \
                torch.ones((B, 1, 1, total_len), dtype=torch.bool, device=dev)
            self._slots = torch.arange(total_len, device=dev)
            self._len = torch.full((1,), P, dtype=torch.long, device=dev)

    @classmethod
    def supports(cls, model: Any) -> bool:
        """Llama-family decoder with plain full attention and no active dropout."""
        base = base_model(model)
        cfg = getattr(base, "config", None)
        if cfg is None or getattr(cfg, "model_type", None) not in cls.TYPES:
            return False
        if getattr(cfg, "use_sliding_window", False):
            return False
        if any(t != "full_attention" for t in (getattr(cfg, "layer_types", None) or [])):
            return False
        inner = getattr(base, "model", None)
        return inner is not None and hasattr(inner, "rotary_emb") and hasattr(inner, "layers")

    def step(self, tok: Tensor, pos: Tensor) -> Tensor:
        """Float32 next-token logits [B, V] after feeding `tok` [B] at positions `pos` [B, 1].

        With a captured graph the result is the graph's output buffer, overwritten by the next
        step: use it before stepping again (the sampler does)."""
        if self.graph is not None:
            self._tok.copy_(tok)
            self._pos.copy_(pos)
            self.graph.replay()
            return self._out
        if self.packed is not None:
            return self._decode_packed(tok, pos)
        return self._decode(tok, pos)

    def _decode(self, tok: Tensor, pos: Tensor) -> Tensor:
        """One decode step. Dynamic: attend to the filled prefix of the KV buffer (host length).
        Static: attend to the whole buffer with the slots past the current length masked and
        the write index a device tensor, so the step has fixed shapes (graph-capturable)."""
        h = self.inner.embed_tokens(tok[:, None])
        cos, sin = self.inner.rotary_emb(h, pos)
        cos, sin = cos.unsqueeze(1), sin.unsqueeze(1)
        if self.static:
            idx = self._len
            mask = self._pad & (self._slots <= idx)
        else:
            L = self.len
            mask = None if self.mask is None else self.mask[..., : L + 1]
        B = h.shape[0]
        for i, layer in enumerate(self.layers):
            att = layer.self_attn
            x = layer.input_layernorm(h)
            q = att.q_proj(x).view(B, 1, self.n_heads, self.head_dim).transpose(1, 2)
            k = att.k_proj(x).view(B, 1, self.n_kv, self.head_dim).transpose(1, 2)
            v = att.v_proj(x).view(B, 1, self.n_kv, self.head_dim).transpose(1, 2)
            q = q * cos + _rotate_half(q) * sin
            k = k * cos + _rotate_half(k) * sin
            if self.static:
                self.keys[i].index_copy_(2, idx, k)
                self.values[i].index_copy_(2, idx, v)
                keys, values = self.keys[i], self.values[i]
            else:
                self.keys[i][:, :, L:L + 1] = k
                self.values[i][:, :, L:L + 1] = v
                keys, values = self.keys[i][:, :, :L + 1], self.values[i][:, :, :L + 1]
            o = torch.nn.functional.scaled_dot_product_attention(
                q, keys, values, attn_mask=mask, scale=att.scaling, enable_gqa=self.gqa)
            h = h + att.o_proj(o.transpose(1, 2).reshape(B, 1, -1))
            h = h + layer.mlp(layer.post_attention_layernorm(h))
        if self.static:
            self._len.add_(1)
        else:
            self.len = L + 1
        h = self.inner.norm(h)
        return self.lm_head(h[:, -1]).float()

    def _decode_packed(self, tok: Tensor, pos: Tensor) -> Tensor:
        """One decode step with the bf16 prepacked matmuls (`precision.pack_decoder`): 4 matmuls a
        layer, fused RMSNorm, rotary as two multiplies with the rotation folded into the weights,
        bf16 KV cache and attention, residual stream in the model's dtype. Same maths as `_decode` up to bf16
        rounding of the matmuls (the test checks the logits against the fp32 step)."""
        P, H, bf16 = self.packed, self.hidden, torch.bfloat16
        rms = torch.nn.functional.rms_norm
        h = self.inner.embed_tokens(tok)  # [B, H]
        B = h.shape[0]
        p = pos[:, 0]
        cos, sin = self._cos[p].unsqueeze(1), self._sin[p].unsqueeze(1)  # [B, 1, d]
        L = self.len
        mask = None if self.mask is None else self.mask[..., : L + 1]
        nq, nh, d = self.n_heads + self.n_kv, self.n_heads, self.head_dim
        A = nq * d
        for i, layer in enumerate(self.layers):
            pl = P.layers[i]
            ln = layer.input_layernorm
            y = pl.qkv(rms(h, (H,), ln.weight, ln.variance_epsilon).to(bf16))
            qk = y[:, :A].view(B, nq, d) * cos + y[:, A:2 * A].view(B, nq, d) * sin
            self.keys[i][:, :, L] = qk[:, nh:]
            self.values[i][:, :, L] = y[:, 2 * A:].view(B, self.n_kv, d)
            o = torch.nn.functional.scaled_dot_product_attention(
                qk[:, :nh].unsqueeze(2).to(bf16), self.keys[i][:, :, :L + 1], self.values[i][:, :, :L + 1],
                attn_mask=mask, scale=layer.self_attn.scaling, enable_gqa=self.gqa)
            h = h + pl.o(o.reshape(B, nh * d))
            ln = layer.post_attention_layernorm
            gate, up = pl.gate_up(rms(h, (H,), ln.weight, ln.variance_epsilon).to(bf16)).chunk(2, dim=-1)
            h = h + pl.down(layer.mlp.act_fn(gate) * up)
        self.len = L + 1
        norm = self.inner.norm
        return P.lm_head(rms(h, (H,), norm.weight, norm.variance_epsilon).to(bf16)).float()

    def capture(self) -> None:
        """Record one static step as a CUDA graph; `step` then replays it (CUDA, static only).

        A decode step of a small model is ~100 kernel launches of microseconds each: replaying
        them as one graph removes the launch cost that bounds generation on a GPU."""
        if not self.static or self._len.device.type != "cuda":
            raise ValueError("CUDA-graph capture needs static=True and a CUDA model")
        B, dev = self._pad.shape[0], self._len.device
        self._tok = torch.zeros(B, dtype=torch.long, device=dev)
        self._pos = self._len.new_zeros((B, 1))
        start = self._len.clone()
        try:
            side = torch.cuda.Stream(device=dev)
            side.wait_stream(torch.cuda.current_stream(dev))
            with torch.cuda.stream(side):  # warm-up (lazy inits) off the capture; it only writes
                self._decode(self._tok, self._pos)  # the slot the first real step overwrites
            torch.cuda.current_stream(dev).wait_stream(side)
            self._len.copy_(start)
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph):
                self._out = self._decode(self._tok, self._pos)
            self.graph = graph
        finally:  # captured or not, the decoder is where it was (static eager steps still work)
            self._len.copy_(start)


@torch.no_grad()
def sample(
    model: Any,
    input_ids: Tensor,
    attention_mask: Tensor,
    params: SamplingParams,
    stop_ids: Sequence[int],
    pad_id: int,
    repeats: int = 1,
    with_logps: bool = False,
    use_lean: bool = True,
    check_every: int | None = None,
    cuda_graph: bool = False,
    static: bool | None = None,
    compute_dtype: torch.dtype = torch.float32,
    packed: PackedDecoder | None = None,
) -> tuple[Tensor, Tensor | None]:
    """Complete each left-padded prompt row `repeats` times (rows repeat-interleaved).

    Returns (completion_ids [N * repeats, T], logps or None); T <= max_new_tokens (the loop stops
    early when every row has hit a stop id). `logps` are log softmax(logits / temperature) of the
    drawn tokens (the sampling policy's log-probs, no processors), for mu > 1. `check_every`: test
    for "all rows stopped" every that many tokens (default 1 on CPU, 8 on accelerators, where the
    test is a host sync; extra all-pad steps are trimmed, so only the RNG position differs).
    `cuda_graph`: on CUDA, replay the lean decode step as a captured CUDA graph (static shapes).
    `static`: use the fixed-shape decode step without a graph (default: when a graph is used;
    on the CPU it exists to test the graph's arithmetic against the dynamic step).
    `compute_dtype` bf16: the prefill (and any decode step through the model's own modules) under
    bf16 autocast; `packed` (`precision.pack_decoder`): the lean decode step's matmuls with those
    prepacked bf16 weights (they must be the model's current weights).
    """
    dev = input_ids.device
    stop = torch.as_tensor(list(stop_ids), dtype=torch.long, device=dev)
    pos = (attention_mask.long().cumsum(-1) - 1).clamp(min=0)
    padded = bool((attention_mask == 0).any())
    amp = autocast(dev, compute_dtype)
    with amp:
        out = model(input_ids=input_ids, attention_mask=attention_mask if padded else None,
                    position_ids=pos, use_cache=True, logits_to_keep=1)
    cache = out.past_key_values
    logits = _last_logits(out)
    del out
    if repeats > 1:
        cache.batch_repeat_interleave(repeats)
        logits = logits.repeat_interleave(repeats, dim=0)
        attention_mask = attention_mask.repeat_interleave(repeats, dim=0)
        pos = pos.repeat_interleave(repeats, dim=0)
    B = logits.shape[0]
    att = attention_mask.long()
    cur = pos[:, -1:]
    unfinished = torch.ones(B, dtype=torch.bool, device=dev)
    pad = torch.full((B,), pad_id, dtype=torch.long, device=dev)
    toks: list[Tensor] = []
    lps: list[Tensor] = []
    ones = torch.ones((B, 1), dtype=att.dtype, device=dev)
    graph = cuda_graph and dev.type == "cuda" and params.max_new_tokens > 1
    static = graph if static is None else static
    packed = None if static else packed  # the packed step is dynamic-shape (CPU) only
    total = att.shape[1] + params.max_new_tokens
    lean = LeanDecoder(model, cache, att, total, static=static, packed=packed) \
        if use_lean and hasattr(cache, "layers") and LeanDecoder.supports(model) else None
    if lean is not None and packed is not None:
        amp = contextlib.nullcontext()  # the packed step is bf16 by construction
    if lean is not None and graph:
        try:
            lean.capture()
        except Exception as e:  # noqa: BLE001 - an op that cannot be captured: decode eagerly
            log.warning("CUDA-graph capture failed (%s: %s); decoding step by step", type(e).__name__, e)
    if check_every is None:
        check_every = 1 if dev.type == "cpu" else 8
    for t in range(params.max_new_tokens):
        scores = process_logits(logits, t, params, stop)
        tok = torch.where(unfinished, next_tokens(scores, params.greedy), pad)
        toks.append(tok)
        if with_logps:
            lg = logits / params.temperature if params.temperature != 1.0 else logits
            lps.append(lg.gather(-1, tok[:, None]).squeeze(-1) - torch.logsumexp(lg, dim=-1))
        unfinished = unfinished & ~torch.isin(tok, stop)
        if t == params.max_new_tokens - 1:
            break
        if (t + 1) % check_every == 0 and not bool(unfinished.any()):
            break
        cur = cur + 1
        if lean is not None:
            with amp:
                logits = lean.step(tok, cur)
            continue
        if padded:
            att = torch.cat([att, ones], dim=1)
        with amp:
            out = model(input_ids=tok[:, None], attention_mask=att if padded else None, position_ids=cur,
                        past_key_values=cache, use_cache=True)
        logits = _last_logits(out)
        del out
    comp = torch.stack(toks, dim=1)
    if check_every > 1:  # trim trailing all-pad steps taken after every row had stopped
        done_at = _trim_length(comp, stop, pad_id)
        comp = comp[:, :done_at]
        lps = lps[:done_at]
    return comp, (torch.stack(lps, dim=1) if with_logps else None)


def _trim_length(comp: Tensor, stop: Tensor, pad_id: int) -> int:
    """Length up to the step at which the last row stopped (HF's output length)."""
    is_stop = torch.isin(comp, stop)
    if not bool(is_stop.any(dim=1).all()):
        return comp.shape[1]
    first = is_stop.long().argmax(dim=1)
    return int(first.max()) + 1
