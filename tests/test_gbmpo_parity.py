"""Parity of the GBMPO loss with TRL 1.16 GRPOTrainer (kl_k3, beta = lambda) on identical inputs.

TRL's own `_compute_loss` runs on a real GRPOTrainer built around the same model object; both
sides score the same prompt+completion tensors, so log-probs, loss and parameter gradients must
agree. TRL 1.16 defaults to `use_bias_correction_kl=True` (D times the differentiable ratio);
mirrorlab's default is the plain GBMPO form and `LossSpec(reg_times_ratio=True)` reproduces TRL's: both
are checked. Other intentional convention differences (none affect these inputs): mirrorlab passes explicit
position ids counted over real tokens (TRL does not, which only matters for left-padded prompts,
so the prompts here are unpadded), and `bnpo` with several micro-batches averages per-micro-batch
token means, as TRL does under gradient accumulation.
"""

from __future__ import annotations

import pytest
import torch

from mirrorlab import divergences
from mirrorlab.config import GenerationConfig, TrainConfig
from mirrorlab.gbmpo import GBMPOTrainer, LossSpec, advantages, gbmpo_loss
from mirrorlab.gbmpo.trainer import token_logps
from mirrorlab.models import build_char_tokenizer
from mirrorlab.tasks import get as get_task

trl = pytest.importorskip("trl")

TEMP = 0.7
T = 6
MAX_LEN = 8


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    from datasets import Dataset
    from transformers import Qwen2Config, Qwen2ForCausalLM
    from trl import GRPOConfig, GRPOTrainer

    torch.manual_seed(0)
    torch.set_num_threads(1)
    task = get_task("arithmetic", n_train=8, n_val=0, n_test=0)
    tok = build_char_tokenizer([task.charset])
    model = Qwen2ForCausalLM(Qwen2Config(
        vocab_size=len(tok), hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
        num_key_value_heads=2, intermediate_size=64, pad_token_id=tok.pad_token_id,
        eos_token_id=tok.eos_token_id, tie_word_embeddings=True, initializer_range=0.2,
    ))
    args = GRPOConfig(  # fp32 (TRL's CPU default autocasts to bf16)
        output_dir=str(tmp_path_factory.mktemp("trl")), per_device_train_batch_size=4, num_generations=2,
        max_completion_length=MAX_LEN, beta=0.04, temperature=TEMP, report_to="none", use_cpu=True,
        bf16=False, save_strategy="no", logging_strategy="no",
    )
    ds = Dataset.from_list([{"prompt": task.prompt(e)} for e in task.train])
    path = tmp_path_factory.mktemp("model")
    model.save_pretrained(path)  # TRL builds its reference model from a path
    tok.save_pretrained(path)
    def zero_reward(completions, **kw):
        return [0.0] * len(completions)

    trl_trainer = GRPOTrainer(model=str(path), reward_funcs=zero_reward, args=args, train_dataset=ds,
                              processing_class=tok)
    model = trl_trainer.model
    if not hasattr(trl_trainer, "current_gradient_accumulation_steps"):
        trl_trainer.current_gradient_accumulation_steps = 1
    gen = GenerationConfig(num_generations=2, temperature=TEMP, max_new_tokens=MAX_LEN)
    cfg = TrainConfig(generation=gen, compute_dtype="float32")  # TRL's side runs fp32
    ours = GBMPOTrainer(model, tok, task, divergences.get("kl_k3"), cfg, coef=0.04)

    g = torch.Generator().manual_seed(1)
    B, P = 4, 4
    prompt_ids = torch.randint(3, len(tok), (B, P), generator=g)
    completion_ids = torch.randint(3, len(tok), (B, T), generator=g)
    lengths = torch.tensor([6, 3, 5, 1])
    cmask = (torch.arange(T)[None] < lengths[:, None]).long()
    rewards = torch.tensor([1.0, 0.0, 0.3, 0.9])
    noise = 0.3 * torch.randn(B, T, generator=g)
    ref_noise = 0.5 * torch.randn(B, T, generator=g)
    return dict(trl=trl_trainer, ours=ours, model=model, prompt_ids=prompt_ids, completion_ids=completion_ids,
                cmask=cmask, rewards=rewards, noise=noise, ref_noise=ref_noise)


def _our_logps(env):
    ours = env["ours"]
    ids = torch.cat([env["prompt_ids"], env["completion_ids"]], 1)
    att = torch.cat([torch.ones_like(env["prompt_ids"]), env["cmask"]], 1)
    pos = att.cumsum(-1) - 1
    logits = ours._logits(env["model"], ids, att, pos.clamp(min=0), T)
    return token_logps(logits, env["completion_ids"])


def _grads(model):
    return [p.grad.detach().clone() for p in model.parameters() if p.grad is not None]


@pytest.mark.parametrize("loss_type", ["grpo", "dr_grpo", "bnpo", "dapo"])
@pytest.mark.parametrize("off_policy", [False, True])
@pytest.mark.parametrize("is_weight", [False, True])
def test_loss_and_grad_match_trl(env, loss_type, off_policy, is_weight):
    model, trl_trainer = env["model"], env["trl"]
    model.train()
    adv_kind = "grpo" if loss_type == "grpo" else "dr_grpo"
    adv = advantages(env["rewards"], 2, adv_kind)
    with torch.no_grad():
        base = _our_logps(env)
    ref = (base + env["ref_noise"]).detach()
    old = (base + env["noise"]).detach() if off_policy else None

    # TRL
    trl_trainer.loss_type = loss_type
    trl_trainer.args.use_bias_correction_kl = is_weight
    inputs = {
        "prompt_ids": env["prompt_ids"], "prompt_mask": torch.ones_like(env["prompt_ids"]),
        "completion_ids": env["completion_ids"], "completion_mask": env["cmask"], "advantages": adv,
        "ref_per_token_logps": ref, "num_items_in_batch": env["cmask"].sum(),
    }
    if old is not None:
        inputs["old_per_token_logps"] = old
    model.zero_grad(set_to_none=True)
    trl_loss = trl_trainer._compute_loss(model, inputs)
    trl_loss.backward()
    g_trl = _grads(model)

    # mirrorlab
    model.zero_grad(set_to_none=True)
    lp = _our_logps(env)
    out = gbmpo_loss(lp, old, ref, adv, env["cmask"], divergence=divergences.get("kl_k3"), coef=0.04,
                     spec=LossSpec(loss_type=loss_type, max_len=MAX_LEN, reg_times_ratio=is_weight))
    out.loss.backward()
    g_ours = _grads(model)

    assert abs(out.loss.item() - trl_loss.item()) <= 1e-5 * max(1.0, abs(trl_loss.item()))
    assert len(g_trl) == len(g_ours) > 0
    for a, b in zip(g_trl, g_ours, strict=True):
        torch.testing.assert_close(b, a, atol=1e-6, rtol=1e-4)
    if off_policy:  # the clipped branch was exercised
        assert out.metrics["clip_frac"].item() > 0


def test_logps_match_trl_fused_head(env):
    """Our completion-position log-probs (temperature-scaled) equal TRL's fused LM head."""
    ids = torch.cat([env["prompt_ids"], env["completion_ids"]], 1)
    att = torch.cat([torch.ones_like(env["prompt_ids"]), env["cmask"]], 1)
    with torch.no_grad():
        trl_lp, _, _ = env["trl"]._get_per_token_logps_and_entropies(env["model"], ids, att, T)
        ours = _our_logps(env)
    m = env["cmask"].bool()
    torch.testing.assert_close(ours[m], trl_lp[m], atol=1e-5, rtol=1e-5)


def test_grpo_advantages_match_trl_formula():
    from trl.trainer.utils import nanstd

    r = torch.tensor([1.0, 0.0, 0.0, 1.0, 1.0, 1.0, 0.5, 0.0])
    g = r.view(-1, 4)
    trl_adv = (r - g.mean(1).repeat_interleave(4)) / (nanstd(g, dim=1).repeat_interleave(4) + 1e-4)
    torch.testing.assert_close(advantages(r, 4, "grpo"), trl_adv)
    torch.testing.assert_close(advantages(r, 4, "dr_grpo"), r - g.mean(1).repeat_interleave(4))
