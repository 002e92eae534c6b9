"""`train.compute_dtype`: the bf16 path against the fp32 one (decode step, log-probs, loss, gradients,
learning), the per-CPU choice of `auto`, and the glibc allocator setting."""

from __future__ import annotations

import copy
import subprocess
import sys

import pytest
import torch
from _helpers import StartsWithOne
from transformers import LlamaConfig, LlamaForCausalLM, Qwen2Config, Qwen2ForCausalLM

from mirrorlab import divergences
from mirrorlab.config import Config, GenerationConfig, OptimConfig, TrainConfig
from mirrorlab.gbmpo import GBMPOTrainer
from mirrorlab.gbmpo.precision import (
    PackedDecoder,
    _rotated,
    pack_decoder,
    packed_matmul_available,
    resolve_compute_dtype,
)
from mirrorlab.gbmpo.sampling import LeanDecoder, SamplingParams, _rotate_half, sample
from mirrorlab.gbmpo.trainer import token_logps


def _packed(tr: GBMPOTrainer, batch: int):
    """The fast backend's packed decode weights at the trainer's current weights."""
    tr.rollouts.sync(tr.weights_version)
    return tr.rollouts.packed(batch)


def _cfg(dtype: str, **kw) -> TrainConfig:
    g = dict(num_generations=4, max_new_tokens=12)
    g.update(kw.pop("gen", {}))
    return TrainConfig(steps=kw.pop("steps", 2), prompts_per_step=kw.pop("prompts", 3), compute_dtype=dtype,
                       generation=GenerationConfig(**g), optim=OptimConfig(lr=kw.pop("lr", 1e-3)), seed=0,
                       **kw)


def _random_model(kind: str) -> torch.nn.Module:
    """Random-init Qwen2 (q/k/v bias, tied head, MHA) or Llama (no bias, untied, GQA 4:2)."""
    torch.manual_seed(0)
    if kind == "qwen2":
        cfg = Qwen2Config(vocab_size=64, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                          num_key_value_heads=4, intermediate_size=128, tie_word_embeddings=True)
        return Qwen2ForCausalLM(cfg).eval()
    cfg = LlamaConfig(vocab_size=64, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                      num_key_value_heads=2, intermediate_size=128, tie_word_embeddings=False)
    return LlamaForCausalLM(cfg).eval()


# --------------------------------------------------------------------------- the choice
@pytest.mark.parametrize("flags,device,want", [
    (["avx2", "avx512f", "amx_tile", "amx_bf16"], "cpu", torch.bfloat16),
    (["avx2", "avx512f", "avx512_bf16"], "cpu", torch.bfloat16),
    (["avx2", "fma"], "cpu", torch.float32),  # AVX2 only: bf16 matmuls are slower than fp32 there
    (["amx_bf16"], "cuda", torch.float32),  # unmeasured on GPUs: explicit only
])
def test_auto_picks_bf16_only_on_cpus_with_native_bf16(flags, device, want):
    assert resolve_compute_dtype("auto", device, flags) == want
    assert resolve_compute_dtype("float32", "cpu", ["amx_bf16"]) == torch.float32
    assert resolve_compute_dtype("bfloat16", "cpu", ["avx2"]) == torch.bfloat16


def test_invalid_compute_dtype_names_the_field_and_the_choices():
    with pytest.raises(ValueError, match="train.compute_dtype must be one of auto, float32, bfloat16"):
        resolve_compute_dtype("fp8", "cpu")
    with pytest.raises(ValueError, match="compute_dtype"):
        Config.model_validate({"train": {"compute_dtype": "half"}})


# --------------------------------------------------------------------------- the packed decode step
@pytest.mark.parametrize("heads", [1, 4])
def test_rotated_weights_equal_rotate_half_of_the_projection(heads):
    g = torch.Generator().manual_seed(1)
    w, b = torch.randn(heads * 8, 5, generator=g), torch.randn(heads * 8, generator=g)
    x = torch.randn(3, 5, generator=g)
    y = (x @ w.T + b).view(3, heads, 8)
    got = (x @ _rotated(w, heads).T + _rotated(b, heads)).view(3, heads, 8)
    torch.testing.assert_close(got, _rotate_half(y), rtol=0, atol=1e-6)


@pytest.mark.parametrize("kind", ["qwen2", "llama"])
def test_packed_decode_step_matches_the_fp32_step_within_bf16_rounding(kind):
    """Left-padded prompts, 6 decode steps: the packed bf16 step's logits against the fp32 lean step
    (itself tested against the model's forward) agree to bf16 precision, and the fp32 KV cache and
    the bf16 one give the same greedy tokens."""
    model = _random_model(kind)
    packed = pack_decoder(model, 3)
    assert isinstance(packed, PackedDecoder)
    assert packed.layers[0].qkv.prepacked == packed_matmul_available()
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(3, 64, (3, 7), generator=g)
    att = torch.ones_like(ids)
    att[0, :3] = 0
    nxt = torch.randint(3, 64, (3, 6), generator=g)
    pos = (att.cumsum(-1) - 1).clamp(min=0)
    steps = {}
    with torch.no_grad():
        for name, pk in (("fp32", None), ("bf16", packed)):
            out = model(input_ids=ids, attention_mask=att, position_ids=pos, use_cache=True)
            lean = LeanDecoder(model, out.past_key_values, att, 13, packed=pk)
            steps[name] = torch.stack([lean.step(nxt[:, t], pos[:, -1:] + 1 + t) for t in range(6)], 1)
    ref, got = steps["fp32"], steps["bf16"]
    assert got.dtype == torch.float32
    scale = ref.abs().max()
    err = (got - ref).abs().max()
    assert err < 0.03 * scale, (err, scale)  # bf16 keeps 8 bits: ~0.4% per matmul, a few layers deep
    assert err > 0  # it really ran in bf16
    # the log-probabilities a sampler would use
    lp_err = (ref.log_softmax(-1) - got.log_softmax(-1)).abs().max()
    assert lp_err < 0.05


def test_packed_step_refuses_static_shapes_and_lora_layers_are_not_packed():
    model = _random_model("qwen2")
    packed = pack_decoder(model, 2)
    ids = torch.randint(3, 64, (2, 4))
    att = torch.ones_like(ids)
    with torch.no_grad():
        out = model(input_ids=ids, attention_mask=att, use_cache=True)
    with pytest.raises(ValueError, match="dynamic-shape only"):
        LeanDecoder(model, out.past_key_values, att, 8, static=True, packed=packed)
    from peft import LoraConfig, get_peft_model

    lora = get_peft_model(copy.deepcopy(model), LoraConfig(r=2, target_modules=["q_proj", "v_proj"]))
    assert pack_decoder(lora, 2) is None  # LoRA layers decode through their own modules


def test_sample_with_packed_weights_is_seeded_and_stops(tiny, task):
    model, tok = tiny
    tr = GBMPOTrainer(model, tok, task, None, _cfg("bfloat16", gen=dict(max_new_tokens=20)))
    ids, att = tr._left_pad([tr._prompt_ids(task.train[i]) for i in (0, 3)])
    p = SamplingParams(max_new_tokens=20)
    packed = _packed(tr, 8)
    assert packed is not None
    runs = []
    for _ in range(2):
        torch.manual_seed(5)
        runs.append(sample(model, ids, att, p, tr.stop_ids, tr.pad_id, repeats=4, with_logps=True,
                           compute_dtype=torch.bfloat16, packed=packed))
    assert torch.equal(runs[0][0], runs[1][0]) and torch.equal(runs[0][1], runs[1][1])
    comp = runs[0][0]
    stop = torch.tensor(tr.stop_ids)
    is_stop = torch.isin(comp, stop)
    assert is_stop.any(1).all()  # the trained tiny model answers and stops in bf16 too
    first = is_stop.long().argmax(1)
    for i in range(comp.shape[0]):
        assert (comp[i, first[i] + 1:] == tr.pad_id).all()


def test_greedy_eval_in_bf16_agrees_with_fp32(tiny, task):
    """The pre-trained tiny model's greedy answers barely move under bf16 (its logits are peaked)."""
    model, tok = tiny
    res = {d: GBMPOTrainer(model, tok, task, None, _cfg(d)).evaluate("val", n=50, batch_size=25)
           for d in ("float32", "bfloat16")}
    same = sum(a == b for a, b in zip(res["float32"].scores, res["bfloat16"].scores, strict=True))
    assert same >= 45, same
    assert abs(res["float32"].metric - res["bfloat16"].metric) <= 0.1


def test_packed_weights_follow_every_optimiser_step_and_reset(tiny, task):
    model, tok = tiny
    tr = GBMPOTrainer(copy.deepcopy(model), tok, task, divergences.get("kl_k3"), _cfg("bfloat16", lr=1e-2),
                      coef=0.04)
    first = _packed(tr, 12)
    assert _packed(tr, 12) is first  # cached while the weights do not change (evaluation)
    tr.train_step()
    second = _packed(tr, 12)
    assert second is not first

    def head(pk):  # the packed lm_head is the model's head in bf16 (read back through a matmul)
        eye = torch.eye(tr.model.config.hidden_size, dtype=torch.bfloat16)
        return pk.lm_head(eye).float().T

    torch.testing.assert_close(head(second), tr.model.lm_head.weight.detach().bfloat16().float())
    assert not torch.equal(head(first), head(second))
    tr.reset()
    torch.testing.assert_close(head(_packed(tr, 12)), head(first))


# --------------------------------------------------------------------------- the training pass
def test_bf16_log_probs_loss_and_gradient_match_fp32_on_one_rollout(tiny, task):
    """Same rollout through both trainers: log-probs within bf16 noise, loss within 2%, gradient
    direction (cosine) > 0.99; everything the loss sees is float32."""
    model, tok = tiny
    trs = {d: GBMPOTrainer(copy.deepcopy(model), tok, task, divergences.get("kl_k3"), _cfg(d), coef=0.04)
           for d in ("float32", "bfloat16")}
    torch.manual_seed(0)
    ro = trs["float32"].rollout(task.train[:3])
    T = ro.completion_ids.shape[1]
    m = ro.completion_mask.bool()
    out = {}
    for d, tr in trs.items():
        tr.model.train()
        logits = tr._logits(tr.model, ro.input_ids, ro.attention_mask, ro.position_ids, T)
        assert logits.dtype == torch.float32
        lp = token_logps(logits, ro.completion_ids)
        ref_lp, _ = tr._reference(ro, slice(None))
        adv = torch.linspace(-1, 1, lp.shape[0])[:, None].expand_as(lp)
        pg = -(adv * lp * m).sum() / m.sum()
        reg = (tr.divergence.sampled(lp, ref_lp, m.float()) * m).sum() / m.sum()
        loss = pg + 0.04 * reg
        tr.model.zero_grad()
        loss.backward()
        g = torch.cat([p.grad.flatten() for p in tr.model.parameters() if p.grad is not None])
        out[d] = dict(lp=lp.detach(), ref=ref_lp, loss=loss.detach(), grad=g)
    a, b = out["float32"], out["bfloat16"]
    assert (a["lp"] - b["lp"])[m].abs().max() > 0  # the bf16 trainer really computed in bf16
    assert (a["lp"] - b["lp"])[m].abs().mean() < 0.02
    assert (a["lp"] - b["lp"])[m].abs().max() < 0.25
    for x in (a, b):  # KL 0 at the start: policy and reference compute alike
        assert (x["lp"] - x["ref"]).abs().max() < 1e-5
    assert abs(float(a["loss"] - b["loss"])) <= 0.02 * abs(float(a["loss"])) + 1e-3
    cos = torch.nn.functional.cosine_similarity(a["grad"], b["grad"], dim=0)
    assert cos > 0.99, float(cos)
    q_proj = trs["bfloat16"].model.model.layers[0].self_attn.q_proj
    assert q_proj.weight.dtype == torch.float32  # fp32 master weights


def test_bf16_learns_the_learnable_reward_like_fp32(tiny):
    """StartsWithOne (reward 1 for a completion starting with '1'), the learning test's settings, same
    seed: both precisions raise the reward, and end within noise of each other."""
    model, tok = tiny
    res = {}
    for d in ("float32", "bfloat16"):
        cfg = TrainConfig(steps=8, prompts_per_step=16, seed=0, grad_ratio_every=0, compute_dtype=d,
                          generation=GenerationConfig(num_generations=8, max_new_tokens=6),
                          optim=OptimConfig(lr=1e-3))
        tr = GBMPOTrainer(copy.deepcopy(model), tok, StartsWithOne(), divergences.get("kl_k3"), cfg,
                          coef=0.04)
        r = [m["reward_mean"] for m in tr.train()]
        res[d] = (r[0], sum(r[-2:]) / 2)
    for d, (start, end) in res.items():
        assert end > start + 0.2, (d, res)
    assert abs(res["float32"][1] - res["bfloat16"][1]) < 0.25, res


def test_the_packed_matmul_probe_leaves_the_global_rng_alone():
    """It runs lazily, at the first bf16 generation: drawing from torch's global RNG there shifted
    every later sample (a kill-and-resume search diverged from the uninterrupted one)."""
    packed_matmul_available.cache_clear()
    torch.manual_seed(3)
    before = torch.get_rng_state()
    packed_matmul_available()
    assert torch.equal(torch.get_rng_state(), before)


# --------------------------------------------------------------------------- allocator
def test_malloc_tuning_is_applied_once_and_can_be_turned_off():
    code = ("from mirrorlab.gbmpo.allocator import tune_malloc; a = tune_malloc(); b = tune_malloc(); "
            "print(a, b)")
    on = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    off = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                         env={**__import__("os").environ, "MIRRORLAB_MALLOC_TUNE": "0"})
    expect = "True True" if sys.platform.startswith("linux") else "False False"
    assert on.stdout.split() == expect.split()
    assert off.stdout.split() == ["False", "False"]
