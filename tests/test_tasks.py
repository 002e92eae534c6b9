"""Task interface and registry: disjoint splits, user-registered tasks, config integration."""

from __future__ import annotations

from pathlib import Path

import pytest

import mirrorlab.tasks as tasks
from mirrorlab.config import ConfigError, TaskConfig, config_from_dict
from mirrorlab.tasks import Example, SplitOverlapError, Task, check_disjoint, data_dir


class Echo(Task):
    """A toy user task: the answer is the question reversed."""

    name = "echo"

    def __init__(self, n: int = 4, overlap: bool = False) -> None:
        exs = [Example(f"e{i}", f"q{i}", f"{i}q") for i in range(3 * n)]
        train, val, test = exs[:n], exs[n : 2 * n], exs[2 * n :]
        if overlap:
            test = test + [train[0]]
        super().__init__(train, val, test)

    def format_prompt(self, example: Example) -> str:
        return f"Reverse: {example.question}\n"

    def reference_completion(self, example: Example) -> str:
        return example.answer

    def reward(self, completion: str, example: Example) -> float:
        return float(completion.strip() == example.answer)


class FakeChatTokenizer:
    chat_template = "{{ messages }}"

    def apply_chat_template(self, messages: list[dict[str, str]], tokenize: bool, add_generation_prompt: bool
                            ) -> str:
        assert not tokenize and add_generation_prompt
        return "<user>" + messages[0]["content"] + "</user><assistant>"


@pytest.fixture
def echo_registered() -> None:
    tasks.register("echo_user_task", Echo, overwrite=True)
    yield
    tasks.registry._factories.pop("echo_user_task", None)


def test_builtin_names() -> None:
    assert {"arithmetic", "gsm8k", "mbpp"} <= set(tasks.names())
    with pytest.raises(KeyError, match="allowed: .*arithmetic"):
        tasks.get("no_such_task")


def test_user_task_registry_and_config(echo_registered: None) -> None:
    assert "echo_user_task" in tasks.names()
    cfg = TaskConfig(name="echo_user_task", params={"n": 2})
    t = tasks.get(cfg.name, **cfg.params)
    assert len(t.train) == 2
    assert t.rewards(["0q", "x"], t.train) == [1.0, 0.0]
    assert t.scores(["0q", "x"], t.train) == [1.0, 0.0]
    assert config_from_dict({"task": {"name": "echo_user_task"}}).task.name == "echo_user_task"
    with pytest.raises(ConfigError, match="unknown task 'nope'"):
        config_from_dict({"task": {"name": "nope"}})


def test_overlapping_splits_refused() -> None:
    with pytest.raises(SplitOverlapError, match="'train' and 'test' overlap.*e0"):
        Echo(overlap=True)
    a, b = Example("a", "What is 2+2?", 4), Example("b", "what is  2+2?", 4)
    with pytest.raises(SplitOverlapError, match="problem"):
        check_disjoint({"train": [a], "test": [b]})  # same text under another id
    check_disjoint({"train": [a], "test": [Example("c", "What is 3+3?", 6)]})


def test_prompt_chat_template() -> None:
    t = Echo()
    e = t.test[0]
    assert t.prompt(e) == "Reverse: q8\n"
    assert t.prompt(e, FakeChatTokenizer()) == "Reverse: q8\n"  # chat off by default for Echo
    t.chat = True
    assert t.prompt(e, FakeChatTokenizer()) == "<user>Reverse: q8\n</user><assistant>"
    assert t.split("val") == t.val
    with pytest.raises(ValueError, match="unknown split"):
        t.split("dev")


def test_data_dir_override(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.delenv("MIRRORLAB_DATA_DIR", raising=False)
    import mirrorlab

    assert data_dir() == Path(mirrorlab.__file__).resolve().parents[1].parent / "shared" / "data"
    monkeypatch.setenv("MIRRORLAB_DATA_DIR", str(tmp_path))
    assert data_dir() == tmp_path
    with pytest.raises(FileNotFoundError, match="MIRRORLAB_DATA_DIR"):
        tasks.get("gsm8k", source="local")
    with pytest.raises(FileNotFoundError, match="MBPP data not found at .*MIRRORLAB_DATA_DIR"):
        tasks.get("mbpp", source="local")
    for name in ("gsm8k", "mbpp"):
        with pytest.raises(ValueError, match="source must be 'auto', 'local' or 'hub', got 'disk'"):
            tasks.get(name, source="disk")
