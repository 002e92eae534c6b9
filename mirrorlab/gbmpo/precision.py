"""Compute precision of the inner loop (`train.compute_dtype`): bf16 matmuls where the CPU has them.

On a CPU with native bf16 matrix instructions (Intel AMX, AVX512-BF16) a bf16 matmul is 3-7x faster
than fp32 at the inner loop's shapes; on AVX2-only CPUs it is slower. So `auto` picks bf16 from the
CPU's flags at run time and fp32 elsewhere (CUDA included: unmeasured here, set it explicitly).

What bf16 changes, and what it does not: the policy's forward and backward and the reference forward
run under `torch.autocast` (bf16 matmuls, fp32 master weights, gradients and AdamW state); the logits
are cast to fp32 before every log-softmax, so log-probs, the loss and the divergence stay fp32. The
decode step multiplies by bf16 copies of the weights prepacked in oneDNN's blocked layout (`Packed`),
re-packed after each optimiser step; its KV cache and attention are bf16, its residual stream,
norms and rotary fp32.
"""

from __future__ import annotations

import contextlib
import functools
import logging
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from mirrorlab.models import base_model

log = logging.getLogger(__name__)

COMPUTE_DTYPES = ("auto", "float32", "bfloat16")
NATIVE_BF16_FLAGS = ("amx_bf16", "avx512_bf16")


def cpu_native_bf16(flags: Sequence[str] | None = None) -> bool:
    """Whether the CPU has bf16 matrix instructions (AMX or AVX512-BF16); `flags` default: this CPU's."""
    if flags is None:
        from mirrorlab.repro import cpu_info

        flags = cpu_info()["isa_flags"]
    return any(f in flags for f in NATIVE_BF16_FLAGS)


def resolve_compute_dtype(setting: str, device: torch.device | str,
                          flags: Sequence[str] | None = None) -> torch.dtype:
    """`train.compute_dtype` for a device: auto is bf16 on a CPU with native bf16, fp32 elsewhere."""
    if setting not in COMPUTE_DTYPES:
        raise ValueError(f"train.compute_dtype must be one of {', '.join(COMPUTE_DTYPES)}; got {setting!r}")
    if setting == "float32":
        return torch.float32
    if setting == "bfloat16":
        return torch.bfloat16
    kind = torch.device(device).type
    return torch.bfloat16 if kind == "cpu" and cpu_native_bf16(flags) else torch.float32


def autocast(device: torch.device, dtype: torch.dtype) -> contextlib.AbstractContextManager[Any]:
    """bf16 autocast on `device` when `dtype` is bf16, else a no-op context."""
    if dtype == torch.float32:
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=dtype)


def use_eager_attention(model: Any) -> bool:
    """Switch `model` to HF's eager (matmul-softmax-matmul) attention, where it can be switched:
    under bf16 autocast on the CPU it measured 1.4x faster forward+backward than SDPA's CPU flash
    kernel (tiny4m, 16 x 72 tokens: 0.157 s vs 0.220 s; fp32 and no-grad forwards: equal)."""
    base = base_model(model)
    if not hasattr(base, "set_attn_implementation"):
        return False
    try:
        base.set_attn_implementation("eager")
    except (ValueError, ImportError, NotImplementedError) as e:
        log.info("eager attention unavailable for %s: %s", type(base).__name__, e)
        return False
    return True


@functools.cache
def packed_matmul_available() -> bool:
    """Whether this torch build has oneDNN's prepacked bf16 linear (checked once, against F.linear)."""
    try:
        g = torch.Generator().manual_seed(0)  # a private RNG: the first call may come mid-rollout
        w = torch.randn(24, 16, generator=g).bfloat16()
        x = torch.randn(4, 16, generator=g).bfloat16()
        wp = torch.ops.mkldnn._reorder_linear_weight(w, 4)
        y = torch.ops.mkldnn._linear_pointwise(x, wp, None, "none", [], "")
        ok = torch.allclose(y.float(), torch.nn.functional.linear(x.float(), w.float()), atol=0.1, rtol=0.02)
    except (AttributeError, RuntimeError, NotImplementedError) as e:
        log.info("prepacked bf16 linear unavailable (%s); decoding with plain bf16 matmuls", e)
        return False
    return bool(ok)


@dataclass(frozen=True)
class Packed:
    """A frozen bf16 copy of a linear map (several layers stacked along the output: q|k|..., gate|up),
    in oneDNN's blocked layout when available; `__call__` takes and returns bf16."""

    weight: Tensor
    bias: Tensor | None
    prepacked: bool

    @classmethod
    def of(cls, weights: Sequence[Tensor], biases: Sequence[Tensor | None], batch_hint: int) -> Packed:
        """Stack `weights` [out_i, in] (and `biases`, None meaning zeros) and pack them in bf16."""
        with torch.no_grad():
            w = torch.cat([x.detach() for x in weights]).to(torch.bfloat16).contiguous()
            b = None
            if any(x is not None for x in biases):
                b = torch.cat([x.detach() if x is not None else w.new_zeros(wi.shape[0])
                               for x, wi in zip(biases, weights, strict=True)]).to(torch.bfloat16)
            if packed_matmul_available():
                return cls(torch.ops.mkldnn._reorder_linear_weight(w, max(1, batch_hint)), b, True)
        return cls(w, b, False)

    def __call__(self, x: Tensor) -> Tensor:
        if self.prepacked:
            return torch.ops.mkldnn._linear_pointwise(x, self.weight, self.bias, "none", [], "")
        return torch.nn.functional.linear(x, self.weight, self.bias)


@dataclass(frozen=True)
class PackedLayer:
    """One decoder layer's matmuls: q|k|rot(q)|rot(k)|v in one, o, gate|up in one, down."""

    qkv: Packed
    o: Packed
    gate_up: Packed
    down: Packed


@dataclass(frozen=True)
class PackedDecoder:
    """bf16 prepacked weights of a Llama-family model's decode-step matmuls (built by `pack_decoder`).

    The q and k projections come twice, the second time with rotate_half folded into the weights
    (rotate_half is linear: a signed permutation of each head's rows), so rotary embedding is
    q * cos + rot(q) * sin with no data movement."""

    layers: list[PackedLayer]
    lm_head: Packed


def _plain_linear(m: Any) -> bool:
    return type(m) is torch.nn.Linear


def _rotated(t: Tensor | None, heads: int) -> Tensor | None:
    """rotate_half applied to the output rows of a projection's weight [heads * d, in] or bias."""
    if t is None:
        return None
    x = t.reshape(heads, -1, *t.shape[1:])
    h = x.shape[1] // 2
    return torch.cat([-x[:, h:], x[:, :h]], dim=1).reshape(t.shape)


def pack_decoder(model: Any, batch_hint: int) -> PackedDecoder | None:
    """Pack `model`'s decoder matmuls in bf16, or None where a layer is not a plain `nn.Linear`
    (LoRA-wrapped, quantised: those decode through their own modules) or the MLP is not gate/up/down."""
    base = base_model(model)
    cfg = base.config
    n_q, n_kv = cfg.num_attention_heads, cfg.num_key_value_heads
    layers = []
    for layer in base.model.layers:
        att, mlp = layer.self_attn, layer.mlp
        lin = [att.q_proj, att.k_proj, att.v_proj, att.o_proj]
        lin += [getattr(mlp, n, None) for n in ("gate_proj", "up_proj", "down_proj")]
        norms = (layer.input_layernorm, layer.post_attention_layernorm)
        if not all(_plain_linear(m) for m in lin) or not hasattr(mlp, "act_fn") \
                or not all(hasattr(n, "variance_epsilon") for n in norms):
            return None
        q, k, v, o, gate, up, down = lin
        qkv = Packed.of(
            [q.weight, k.weight, _rotated(q.weight, n_q), _rotated(k.weight, n_kv), v.weight],
            [q.bias, k.bias, _rotated(q.bias, n_q), _rotated(k.bias, n_kv), v.bias], batch_hint)
        layers.append(PackedLayer(
            qkv=qkv, o=Packed.of([o.weight], [o.bias], batch_hint),
            gate_up=Packed.of([gate.weight, up.weight], [gate.bias, up.bias], batch_hint),
            down=Packed.of([down.weight], [down.bias], batch_hint)))
    if not _plain_linear(base.lm_head):
        return None
    head = Packed.of([base.lm_head.weight], [base.lm_head.bias], batch_hint)
    return PackedDecoder(layers=layers, lm_head=head)
