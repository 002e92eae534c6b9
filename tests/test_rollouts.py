"""The rollout interface (`mirrorlab.rollouts`): every backend behind one protocol, chosen by a
registry, so a plugin backend drives the trainer like the built-in ones."""

from __future__ import annotations

import copy
import json

import pytest
import torch

from mirrorlab import divergences, rollouts
from mirrorlab.config import ConfigError, GenerationConfig, OptimConfig, TrainConfig, load_config
from mirrorlab.gbmpo import GBMPOTrainer
from mirrorlab.gbmpo.rollout_fast import FastRollout
from mirrorlab.rollouts import BackendUnavailableError, Completions, RolloutBackend, SamplingParams


def _cfg(backend: str, **kw) -> TrainConfig:
    return TrainConfig(steps=2, prompts_per_step=2, seed=3, grad_ratio_every=0,
                       generation=GenerationConfig(num_generations=4, max_new_tokens=8, backend=backend),
                       optim=OptimConfig(lr=1e-2), **kw)


class CountingRollout(FastRollout):
    """A plugin backend: the fast sampler, recording what the trainer asks of it."""

    name = "counting"

    def __init__(self, ctx: rollouts.RolloutContext) -> None:
        super().__init__(ctx)
        self.versions: list[object] = []
        self.calls: list[tuple[int, int, bool, bool]] = []  # (prompts, repeats, greedy, with_logps)
        self.resets = 0

    def sync(self, version: object) -> None:
        self.versions.append(version)
        super().sync(version)

    def reset(self) -> None:
        self.resets += 1
        super().reset()

    def generate(self, prompts, params: SamplingParams, repeats: int = 1,
                 with_logps: bool = False) -> Completions:
        self.calls.append((len(prompts), repeats, params.greedy, with_logps))
        return super().generate(prompts, params, repeats, with_logps)


@pytest.fixture()
def counting():
    rollouts.backends.register("counting", CountingRollout)
    yield
    rollouts.backends._factories.pop("counting", None)


@pytest.mark.parametrize("name", ["fast", "hf"])
def test_builtin_backends_satisfy_the_protocol(tiny, task, name):
    model, tok = tiny
    tr = GBMPOTrainer(model, tok, task, None, _cfg(name))
    assert isinstance(tr.rollouts, RolloutBackend) and tr.backend == name
    gen = tr.rollouts.generate([tr._prompt_ids(task.train[0])], tr.sampling_params(), repeats=3,
                               with_logps=True)
    assert gen.completion_ids.shape[0] == 3 and gen.prompt_ids.shape[0] == 3
    assert gen.logps is not None and gen.logps.shape == gen.completion_ids.shape
    assert gen.engine_logps is None and tr.rollouts.pop_metrics() == {}


def test_registered_names_are_what_the_config_allows():
    assert set(rollouts.backends.names()) >= {"fast", "hf", "vllm"}
    with pytest.raises(ConfigError, match=r"train.generation.backend.*allowed: fast, hf, vllm, auto"):
        load_config(overrides=["train.generation.backend=turbo"])


def test_a_plugin_backend_drives_the_training_step(tiny, task, counting):
    model, tok = tiny
    tr = GBMPOTrainer(copy.deepcopy(model), tok, task, divergences.get("kl_k3"), _cfg("counting"), coef=0.04)
    be = tr.rollouts
    assert isinstance(be, CountingRollout) and tr.backend == "counting" and be.resets == 1
    tr.train(steps=2)
    # one rollout per step: 2 prompts x G = 4, sampled, no log-probs kept (mu = 1)
    assert be.calls == [(2, 4, False, False)] * 2
    # synced before each generation; an optimiser step replaced the weights' version in between
    assert len(be.versions) == 2 and be.versions[0] is not be.versions[1]
    assert be.versions[1] is not tr.weights_version  # the last step's update is not generated from yet
    tr.evaluate("val", n=5)
    assert be.calls[-1] == (5, 1, True, False) and be.versions[-1] is tr.weights_version
    tr.reset()
    assert be.resets == 2 and tr.weights_version is not be.versions[-1]


def test_the_plugin_reproduces_the_fast_backend(tiny, task, counting):
    """Same seed, same weights: the wrapped sampler gives the fast backend's rollouts and metrics."""
    model, tok = tiny
    hist = {}
    for name in ("fast", "counting"):
        tr = GBMPOTrainer(copy.deepcopy(model), tok, task, divergences.get("kl_k3"), _cfg(name), coef=0.04)
        hist[name] = [{k: v for k, v in m.items() if "time" not in k and k != "tokens_per_s"}
                      for m in tr.train(steps=2)]
    same = json.dumps(hist["fast"], sort_keys=True) == json.dumps(hist["counting"], sort_keys=True)
    assert same  # compared as JSON: NaN (grad_ratio off) equals NaN


class _Unavailable:
    name = "broken"

    def __init__(self, ctx: rollouts.RolloutContext) -> None:
        raise BackendUnavailableError("broken needs a library this machine lacks")


def test_auto_falls_back_to_fast_and_an_explicit_choice_raises(tiny, task, monkeypatch, caplog):
    rollouts.backends.register("broken", _Unavailable)
    try:
        model, tok = tiny
        with pytest.raises(BackendUnavailableError, match="lacks"):
            GBMPOTrainer(model, tok, task, None, _cfg("broken"))
        monkeypatch.setattr(rollouts, "resolve", lambda name, model: "broken" if name == "auto" else name)
        with caplog.at_level("WARNING", logger="mirrorlab.rollouts"):
            tr = GBMPOTrainer(model, tok, task, None, _cfg("auto"))
        assert tr.backend == "fast" and "using fast" in caplog.text and "lacks" in caplog.text
    finally:
        rollouts.backends._factories.pop("broken", None)


def test_completions_repeat_prompts_and_mask_through_the_first_stop():
    ids = torch.tensor([[0, 5, 6], [7, 8, 9]])
    att = torch.tensor([[0, 1, 1], [1, 1, 1]])
    comp = torch.tensor([[1, 2, 0], [2, 0, 0], [3, 3, 3], [2, 2, 2]])  # stop id 2; pad 0
    c = rollouts.completions(ids, att, comp, (2,), repeats=2)
    assert torch.equal(c.prompt_ids, ids.repeat_interleave(2, 0))
    assert torch.equal(c.prompt_mask, att.repeat_interleave(2, 0))
    assert c.completion_mask.tolist() == [[1, 1, 0], [1, 0, 0], [1, 1, 1], [1, 0, 0]]
    ids2, att2 = rollouts.left_pad([[4], [5, 6, 7], []], pad_id=9)
    assert ids2.tolist() == [[9, 9, 4], [5, 6, 7], [9, 9, 9]]
    assert att2.tolist() == [[0, 0, 1], [1, 1, 1], [0, 0, 0]]
