"""The `fast` generation backend: HF-identical sampling semantics, stops, log-probs, LoRA, seeds."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from transformers.generation.logits_process import (
    MinNewTokensLengthLogitsProcessor,
    TemperatureLogitsWarper,
    TopKLogitsWarper,
    TopPLogitsWarper,
)

from mirrorlab import divergences
from mirrorlab.config import GenerationConfig, LoraConfig, ModelConfig, OptimConfig, TrainConfig
from mirrorlab.gbmpo import GBMPOTrainer
from mirrorlab.gbmpo.sampling import LeanDecoder, SamplingParams, process_logits, sample
from mirrorlab.gbmpo.trainer import token_logps
from mirrorlab.models import load_model


def _trainer(model, tok, task, backend, **gen):
    g = dict(num_generations=4, max_new_tokens=12, backend=backend)
    g.update(gen)
    # float32: these tests hold the fast backend to HF's exact tokens (bf16 has tests/test_precision.py)
    cfg = TrainConfig(steps=2, prompts_per_step=3, generation=GenerationConfig(**g),
                      optim=OptimConfig(lr=1e-3), seed=0, compute_dtype="float32")
    return GBMPOTrainer(model, tok, task, divergences.get("kl_k3"), cfg, coef=0.04)


@settings(max_examples=40, deadline=None)
@given(st.integers(0, 2**31 - 1), st.sampled_from([0.3, 0.7, 1.0, 1.7]), st.integers(0, 12),
       st.sampled_from([0.05, 0.5, 0.9, 1.0]), st.integers(0, 3), st.integers(0, 3))
def test_process_logits_matches_hf_warpers(seed, temp, top_k, top_p, step, min_new):
    g = torch.Generator().manual_seed(seed)
    scores = torch.randn(5, 17, generator=g) * 3
    scores[0, 3] = scores[0, 4]  # a tie at the top-k boundary keeps both, as in HF
    stop = torch.tensor([2, 5])
    hf = scores.clone()
    ids = torch.zeros((5, 4 + step), dtype=torch.long)
    if min_new:
        hf = MinNewTokensLengthLogitsProcessor(4, min_new, [2, 5])(ids, hf)
    if temp != 1.0:
        hf = TemperatureLogitsWarper(temp)(ids, hf)
    if top_k:
        hf = TopKLogitsWarper(top_k)(ids, hf)
    if top_p < 1.0:
        hf = TopPLogitsWarper(top_p)(ids, hf)
    p = SamplingParams(max_new_tokens=8, temperature=temp, top_k=top_k, top_p=top_p, min_new_tokens=min_new)
    ours = process_logits(scores, step, p, stop)
    assert torch.equal(torch.isinf(ours), torch.isinf(hf))
    torch.testing.assert_close(ours, hf, rtol=0, atol=0)


@pytest.mark.parametrize("gen", [dict(), dict(temperature=0.7, top_k=5, top_p=0.9)])
def test_fast_backend_draws_the_same_tokens_as_hf_generate(tiny, task, gen):
    model, tok = tiny
    exs = [task.train[0], task.train[5], task.train[9]]  # different lengths: left padding
    out = {}
    for backend in ("hf", "fast"):
        tr = _trainer(model, tok, task, backend, **gen)
        torch.manual_seed(7)
        out[backend] = tr.generate(exs, repeats=4)
    (ph, ah, ch, mh), (pf, af, cf, mf) = out["hf"], out["fast"]
    assert torch.equal(ph, pf) and torch.equal(ah, af)
    assert (ah == 0).any()  # the batch really is left padded
    assert torch.equal(ch, cf) and torch.equal(mh, mf)


def test_greedy_eval_identical_across_backends(tiny, task):
    model, tok = tiny
    res = [_trainer(model, tok, task, b).evaluate("val", n=40, batch_size=16) for b in ("hf", "fast")]
    assert res[0].scores == res[1].scores and res[0].mean_length == res[1].mean_length


def test_stops_pad_after_stop_and_exit_early(tiny, task):
    model, tok = tiny
    tr = _trainer(model, tok, task, "fast", max_new_tokens=40)
    torch.manual_seed(0)
    _, _, comp, cmask = tr.generate([task.train[1], task.train[2]], repeats=8)
    stop = torch.tensor(tr.stop_ids)
    is_stop = torch.isin(comp, stop)
    assert is_stop.any(1).all()  # the pre-trained tiny model answers and stops well within 40
    assert comp.shape[1] < 40  # early exit once every row stopped
    first = is_stop.long().argmax(1)
    for i in range(comp.shape[0]):
        assert cmask[i, : first[i] + 1].all() and not cmask[i, first[i] + 1:].any()
        assert (comp[i, first[i] + 1:] == tr.pad_id).all()
    assert comp.shape[1] == int(first.max()) + 1  # same length as HF's output
    ids, att = tr._left_pad([tr._prompt_ids(task.train[i]) for i in (1, 2)])
    p = SamplingParams(max_new_tokens=40)
    outs = []
    for every in (1, 8):  # the accelerator setting: test "all stopped" every 8 tokens, then trim
        torch.manual_seed(0)
        outs.append(sample(model, ids, att, p, tr.stop_ids, tr.pad_id, repeats=8, with_logps=True,
                           check_every=every))
    assert torch.equal(outs[0][0], outs[1][0]) and torch.equal(outs[0][1], outs[1][1])
    assert torch.equal(outs[0][0], comp)


def test_min_new_tokens_suppresses_stops(tiny, task):
    model, tok = tiny
    tr = _trainer(model, tok, task, "fast", max_new_tokens=10, min_new_tokens=10)
    _, _, comp, cmask = tr.generate([task.train[3]], repeats=4)
    assert comp.shape[1] == 10 and not torch.isin(comp, torch.tensor(tr.stop_ids)).any()
    assert cmask.all()


def test_sampling_logps_match_a_fresh_forward(tiny, task):
    model, tok = tiny
    tr = _trainer(model, tok, task, "fast", temperature=0.8, top_k=6)
    torch.manual_seed(1)
    gen = tr._generate([task.train[0], task.train[4]], repeats=4, with_logps=True)
    ids, att, comp, cmask, old = (gen.prompt_ids, gen.prompt_mask, gen.completion_ids, gen.completion_mask,
                                  gen.logps)
    full = torch.cat([ids, comp], 1)
    fatt = torch.cat([att, torch.ones_like(comp)], 1)
    pos = (fatt.cumsum(-1) - 1).clamp(min=0)
    with torch.no_grad():
        fresh = token_logps(tr._logits(model, full, fatt, pos, comp.shape[1]), comp)
    m = cmask.bool()
    torch.testing.assert_close(old[m], fresh[m], atol=1e-5, rtol=0)


@pytest.mark.parametrize("static", [False, True])
def test_lean_decoder_logits_match_model_forward(tiny, static):
    """Dynamic step, and the fixed-shape step a CUDA graph records (masked buffer, device index)."""
    model, _ = tiny
    assert LeanDecoder.supports(model)
    g = torch.Generator().manual_seed(0)
    V = model.config.vocab_size
    ids = torch.randint(3, V, (3, 7), generator=g)
    att = torch.ones_like(ids)
    att[0, :2] = 0
    nxt = torch.randint(3, V, (3, 5), generator=g)
    with torch.no_grad():
        pos = (att.cumsum(-1) - 1).clamp(min=0)
        out = model(input_ids=ids, attention_mask=att, position_ids=pos, use_cache=True)
        lean = LeanDecoder(model, out.past_key_values, att, 12, static=static)
        fatt = torch.cat([att, torch.ones_like(nxt)], 1)
        fpos = (fatt.cumsum(-1) - 1).clamp(min=0)
        ref = model(input_ids=torch.cat([ids, nxt], 1), attention_mask=fatt, position_ids=fpos).logits
        for t in range(5):
            got = lean.step(nxt[:, t], fpos[:, 7 + t: 8 + t])
            torch.testing.assert_close(got, ref[:, 7 + t].float(), atol=1e-5, rtol=1e-5)


def test_seeded_determinism_and_hf_loop_fallback(tiny, task):
    model, tok = tiny
    tr = _trainer(model, tok, task, "fast")
    ids, att = tr._left_pad([tr._prompt_ids(task.train[i]) for i in (0, 7)])
    p = SamplingParams(max_new_tokens=10, temperature=1.3, top_p=0.95)
    runs = []
    for lean, static in ((True, False), (True, False), (False, False), (True, True)):
        torch.manual_seed(3)
        runs.append(sample(model, ids, att, p, tr.stop_ids, tr.pad_id, repeats=5, use_lean=lean,
                           static=static)[0])
    assert all(torch.equal(runs[0], r) for r in runs[1:])


def _with_backend(tr, backend):
    gen = tr.cfg.generation.model_copy(update={"backend": backend})
    tr.cfg = tr.cfg.model_copy(update={"generation": gen})


def test_lora_model_fast_backend_matches_hf_and_trains(task):
    model, tok = load_model(ModelConfig(name="tiny", lora=LoraConfig(r=4, alpha=8)))
    assert LeanDecoder.supports(model)
    tr = GBMPOTrainer(model, tok, task, divergences.get("kl_k3"),
                      TrainConfig(steps=2, prompts_per_step=2, optim=OptimConfig(lr=1e-2), seed=0,
                                  generation=GenerationConfig(num_generations=4, max_new_tokens=8),
                                  # exact tokens are asked of two kernel paths: fp32 on every CPU (auto
                                  # would be bf16 on AMX / AVX512-BF16 CPUs, fp32 on AVX2 ones)
                                  compute_dtype="float32"),
                      coef=0.04)
    assert tr.cfg.generation.backend == "fast"  # the default
    hist = tr.train(2)
    assert len(hist) == 2 and all(h["gen_tokens"] > 0 for h in hist)
    with torch.no_grad():  # a clearly non-zero adapter, so that it visibly changes the logits
        for n, p in model.named_parameters():
            if "lora_B" in n:
                p.normal_(0, 0.5, generator=torch.Generator().manual_seed(1))
    out = {}
    for backend in ("hf", "fast"):
        _with_backend(tr, backend)
        torch.manual_seed(5)
        out[backend] = tr.generate([task.train[0], task.train[2]], repeats=4)[2]
    assert torch.equal(out["hf"], out["fast"])
    with model.disable_adapter():
        torch.manual_seed(5)
        base = tr.generate([task.train[0], task.train[2]], repeats=4)[2]
    assert not torch.equal(base, out["fast"])  # the adapter is applied by the lean decoder


@pytest.mark.slow
def test_smollm2_lean_decoder_matches_hf_loop(smollm2):
    model, tok = smollm2
    model.eval()
    assert LeanDecoder.supports(model) and model.config.num_key_value_heads < model.config.num_attention_heads
    enc = tok(["What is 2+3?", "Hello there, how are"], padding=True, padding_side="left",
              return_tensors="pt")
    p = SamplingParams(max_new_tokens=8, temperature=0.8, top_k=20)
    pad = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
    r = []
    for lean in (True, False):  # lean decoder (GQA) vs the model's own forward in the same loop
        torch.manual_seed(0)
        r.append(sample(model, enc.input_ids, enc.attention_mask, p, [tok.eos_token_id], pad, repeats=2,
                        with_logps=True, use_lean=lean))
    assert torch.equal(r[0][0], r[1][0])
    torch.testing.assert_close(r[0][1], r[1][1], atol=1e-4, rtol=0)


def _random_qwen2(device: str, dtype: torch.dtype = torch.float32):
    """A small random-init Qwen2 with grouped-query attention (no cache, no tokenizer needed)."""
    from transformers import Qwen2Config, Qwen2ForCausalLM

    torch.manual_seed(0)
    cfg = Qwen2Config(vocab_size=97, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                      num_key_value_heads=2, intermediate_size=128, max_position_embeddings=128)
    return Qwen2ForCausalLM(cfg).to(device=device, dtype=dtype).eval()


def test_cuda_graph_capture_is_refused_off_cuda():
    model = _random_qwen2("cpu")
    ids = torch.randint(3, 97, (2, 5))
    with torch.no_grad():
        out = model(input_ids=ids, use_cache=True)
        lean = LeanDecoder(model, out.past_key_values, torch.ones_like(ids), 9, static=True)
    with pytest.raises(ValueError, match="needs static=True and a CUDA model"):
        lean.capture()
    # a graph is asked for but the model is on the CPU: the sampler decodes step by step
    p = SamplingParams(max_new_tokens=4, greedy=True)
    a = sample(model, ids, torch.ones_like(ids), p, [1], 0, cuda_graph=True)[0]
    b = sample(model, ids, torch.ones_like(ids), p, [1], 0)[0]
    assert torch.equal(a, b)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA graphs need a GPU")
def test_cuda_graph_decode_matches_step_by_step(caplog):
    """The replayed graph gives the dynamic decoder's logits and tokens (fp32, GQA, left padding)."""
    model = _random_qwen2("cuda")
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(3, 97, (3, 9), generator=g).cuda()
    att = torch.ones_like(ids)
    att[0, :3] = 0
    nxt = torch.randint(3, 97, (3, 12), generator=g).cuda()
    pos = (att.cumsum(-1) - 1).clamp(min=0)
    with torch.no_grad():
        decs = []
        for static in (False, True):
            out = model(input_ids=ids, attention_mask=att, position_ids=pos, use_cache=True)
            decs.append(LeanDecoder(model, out.past_key_values, att, 9 + 12, static=static))
        decs[1].capture()
        for t in range(12):
            p_t = pos[:, -1:] + 1 + t
            ref = decs[0].step(nxt[:, t], p_t)
            got = decs[1].step(nxt[:, t], p_t).clone()
            torch.testing.assert_close(got, ref, atol=1e-4, rtol=1e-4)
    greedy = SamplingParams(max_new_tokens=16, greedy=True, min_new_tokens=16)
    runs = [sample(model, ids, att, greedy, [1], 0, repeats=4, cuda_graph=cg)[0] for cg in (False, True)]
    assert torch.equal(runs[0], runs[1])
    sampled = SamplingParams(max_new_tokens=16, temperature=0.9, top_k=40)
    rows = []
    for cg in (False, True):
        torch.manual_seed(7)
        rows.append(sample(model, ids, att, sampled, [1], 0, repeats=4, cuda_graph=cg)[0])
    assert rows[0].shape == rows[1].shape
    assert (rows[0] == rows[1]).all(dim=1).float().mean() >= 0.9  # near-ties may round apart
    assert "capture failed" not in caplog.text  # the sampler really replayed a graph


class _StopAt:
    """The arithmetic task with an extra multi-token stop string (GSM8K's "\\n\\nQuestion:" kind)."""

    def __init__(self, task, stop: str) -> None:
        self._t = task
        self.train, self.val, self.test = task.train, task.val, task.test
        self.stop_strings = (*task.stop_strings, stop)
        self.metric_name = task.metric_name

    def __getattr__(self, name):  # prompt, split, rewards, scores: the wrapped task's
        return getattr(self._t, name)


@pytest.mark.parametrize("backend", ["fast", "hf"])
def test_multi_token_stop_strings_end_completions_in_every_backend(tiny, task, backend):
    """Rows whose text reaches the stop string end with the token that completes it: later tokens
    are padding outside the mask, the row is not 'truncated', and no row's text holds the string
    anywhere but at its end. The check bites: some rows are cut."""
    model, tok = tiny
    stop = "12"
    tr = _trainer(model, tok, _StopAt(task, stop), backend, max_new_tokens=12, min_new_tokens=12,
                  num_generations=8)
    assert tr.stop_strings == [stop]
    torch.manual_seed(0)
    ro = tr.rollout(task.train[:4])
    lengths = ro.completion_mask.sum(1)
    cut = [i for i, t in enumerate(ro.texts) if stop in t]
    assert cut and len(cut) < len(ro.texts), ro.texts
    for i, text in enumerate(ro.texts):
        n = int(lengths[i])
        assert (ro.completion_ids[i, n:] == tr.pad_id).all() and not ro.completion_mask[i, n:].any()
        if i in cut:
            assert text.endswith(stop) and text.count(stop) == 1 and n < 12
            assert not bool(ro.truncated[i])
            assert stop not in tok.decode(ro.completion_ids[i, : n - 1].tolist(), skip_special_tokens=True)
        else:
            assert n == 12 and bool(ro.truncated[i])
