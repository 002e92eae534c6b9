"""One way in: every map format builds through `maps.build_divergence`, and every command (train,
eval, compare, the search's evaluator, preflight, `maps show`) goes through it, so `compile`, a
saved map and a searched coefficient mean the same everywhere.

The command tests run the real CLI in a subprocess with a plugin divergence whose `compile()`
appends the calling command to a file (a real registered divergence, not a mock).
"""

from __future__ import annotations

import json
import math
import textwrap
from pathlib import Path

import numpy as np
import pytest
from test_cli import SHORT, run_cli

from mirrorlab import divergences
from mirrorlab.config import ConfigError, DivergenceConfig, config_from_dict
from mirrorlab.maps import build_divergence, load_map, resolve_map_ref
from mirrorlab.spaces import MixtureSpace, NeuralRawSpace, NeuralSpace
from mirrorlab.tracking import MLflowTracker


def _formats(tmp: Path) -> dict[str, tuple[str, str, float | None]]:
    """label -> (reference, expected sha or weight tag, expected searched coef) for each format."""
    neural = divergences.NeuralMirrorMap.random_init(4)
    theta = np.asarray(neural.theta, dtype=np.float64)
    out: dict[str, tuple[str, str, float | None]] = {}
    out["neural file"] = (str(neural.save(tmp / "n.safetensors")), neural.sha, None)
    d = NeuralSpace().save(theta, tmp / "neural_dir")
    out["neural dir"] = (str(d), neural.sha, None)
    out["neural file in dir"] = (str(d / "map.safetensors"), neural.sha, None)
    raw_space = NeuralRawSpace()
    raw = raw_space.initial(2)
    out["neural_raw dir"] = (str(raw_space.save(raw, tmp / "raw_dir")), raw_space.divergence(raw).sha, None)
    mix = MixtureSpace()
    mt = np.array([0.7, math.log(0.25)])
    out["mixture dir"] = (str(mix.save(mt, tmp / "mix_dir")), f"w={mix.weight(mt):.6f}", 0.25)
    return out


def _tag(div: object) -> str:
    return f"w={div.weight:.6f}" if isinstance(div, divergences.MixtureDivergence) else str(div.sha)


def test_every_map_format_builds_with_its_coefficient(tmp_path):
    for label, (ref, want, coef) in _formats(tmp_path).items():
        reg = build_divergence(DivergenceConfig(name="neural", coef=0.04, map=ref, estimator="full",
                                                chunk_size=512))
        assert _tag(reg.divergence) == want, label
        assert reg.coef == pytest.approx(coef if coef is not None else 0.04), label
        assert (reg.estimator, reg.chunk_size) == ("full", 512)
        assert _tag(resolve_map_ref(ref)) == want, label  # the `maps` commands read it too
    # map references a search substitutes (search:best) go through the same builder
    ref, want, _ = _formats(tmp_path / "again")["mixture dir"]
    reg = build_divergence(DivergenceConfig(map="search:best"), map_refs={"search:best": ref})
    assert _tag(reg.divergence) == want and reg.coef == pytest.approx(0.25)


def test_registered_model_uri_builds(tmp_path):
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    cfg = config_from_dict({"name": "maps-uri", "tracking": {"tracking_uri": uri}})
    div = divergences.NeuralMirrorMap.random_init(9)
    tracker = MLflowTracker(cfg, "manual", NeuralSpace())
    rid = tracker.session.create_run("register", {})
    d = NeuralSpace().save(np.asarray(div.theta), tmp_path / "map")
    tracker.client.log_artifacts(rid, str(d), "map")
    registered = tracker.register_best(rid, name="probe-map", alias="best")
    assert registered == "models:/probe-map@best"
    reg = build_divergence(DivergenceConfig(name="neural", map=registered), tracking_uri=uri)
    assert reg.divergence.sha == div.sha
    assert load_map(f"runs:/{rid}/map", tracking_uri=uri).divergence.sha == div.sha


def test_bad_references_name_what_is_accepted(tmp_path):
    with pytest.raises(FileNotFoundError, match="no map at"):
        build_divergence(DivergenceConfig(name="neural", map=str(tmp_path / "missing")))
    with pytest.raises(ConfigError, match="random:SEED"):
        resolve_map_ref(str(tmp_path / "missing"))


def test_compile_applies_to_what_the_builder_returns():
    reg = build_divergence(DivergenceConfig(name="prob_l2", compile=True))
    assert reg.divergence.compiled
    assert not build_divergence(DivergenceConfig(name="prob_l2")).divergence.compiled


PROBE = textwrap.dedent('''
    """A divergence whose compile() records which command asked (test_maps)."""
    import os
    import sys

    from mirrorlab import divergences


    class CompileProbe(divergences.ProbL2):
        name = "compile_probe"

        def compile(self, **kw):
            cmd = next((a for a in sys.argv[1:] if a in ("train", "eval", "compare", "search")), "?")
            with open(os.environ["PROBE_LOG"], "a") as f:
                f.write(cmd + "\\n")
            return self


    divergences.register("compile_probe", CompileProbe, overwrite=True)
''')


@pytest.mark.slow
def test_compile_and_a_mixture_map_reach_every_command(tmp_path, monkeypatch):
    """`divergence.compile` is applied in train, eval, compare and the search's evaluator (its
    baseline and its candidates); a mixture map directory trains in `train` with its searched
    lambda and in `compare`."""
    plugin = tmp_path / "probe.py"
    plugin.write_text(PROBE)
    log = tmp_path / "probe.log"
    monkeypatch.setenv("PROBE_LOG", str(log))
    mix_dir = MixtureSpace().save(np.array([0.3, math.log(0.5)]), tmp_path / "mix")
    probe = ["divergence.name=compile_probe", "divergence.compile=true"]
    base = ["tracking.enabled=false", *SHORT]

    r = run_cli(tmp_path, "--plugin", str(plugin), "train", "--no-save", "--n", "4", sets=[*base, *probe])
    assert r.returncode == 0, r.stderr[-2000:]
    r = run_cli(tmp_path, "--plugin", str(plugin), "eval", "--n", "4", sets=[*base, *probe])
    assert r.returncode == 0, r.stderr[-2000:]
    # a mixture map directory in `train`: its searched lambda (0.5) replaces divergence.coef
    r = run_cli(tmp_path, "train", "--no-save", "--n", "4",
                sets=[*base, "divergence.name=mixture", f"divergence.map={mix_dir}", "divergence.coef=0.01",
                      "name=mixtrain"])
    assert r.returncode == 0, r.stderr[-2000:]
    res = json.loads((tmp_path / "runs" / "mixtrain" / "train" / "results.json").read_text())
    assert res["regulariser"]["divergence"] == "MixtureDivergence"
    assert res["regulariser"]["coef"] == pytest.approx(0.5)

    cmp_cfg = tmp_path / "cmp.yaml"
    cmp_cfg.write_text(json.dumps({"compare": {"seeds": [0], "eval_size": 4, "methods": [
        {"label": "probe", "divergence": {"name": "compile_probe", "compile": True}},
        {"label": "mixture map", "divergence": {"name": "mixture", "map": str(mix_dir), "coef": 0.01}}]}}))
    r = run_cli(tmp_path, "--plugin", str(plugin), "compare", str(cmp_cfg), sets=base)
    assert r.returncode == 0, r.stderr[-2000:]
    out = json.loads((tmp_path / "runs" / "mirrorlab" / "compare" / "results.json").read_text())
    (mixed,) = [m for m in out["methods"] if m["label"] == "mixture map"]
    assert mixed["divergence"]["effective_coef"] == pytest.approx(0.5)

    r = run_cli(tmp_path, "--plugin", str(plugin), "search", sets=[
        *base, "search.space.kind=mixture", "search.strategy.name=random",
        "search.strategy.population=1", "search.strategy.generations=1", "search.evaluator.inner_steps=1",
        "search.evaluator.val_size=4", "search.evaluator.baseline.name=compile_probe",
        "search.evaluator.baseline.compile=true"])
    assert r.returncode == 0, r.stderr[-2000:]
    calls = log.read_text().split()
    assert calls.count("train") == 1 and calls.count("eval") == 1 and calls.count("compare") == 1
    assert calls.count("search") == 1  # the search's paired baseline, built once per worker


def test_the_search_evaluator_compiles_each_candidate_with_its_coefficient():
    """A candidate's regulariser comes from the same builder: the space's searched lambda, the
    configured estimator, and `compile` (no model is loaded to check this)."""
    from mirrorlab.inner import GBMPOEvaluator

    cfg = config_from_dict({"search": {"space": {"kind": "mixture"}},
                            "divergence": {"compile": True, "estimator": "full", "coef": 0.04}})
    ev = GBMPOEvaluator(cfg)
    ev.space = MixtureSpace.from_config(cfg.search.space, cfg.divergence.coef)
    reg = ev._regulariser(np.array([0.0, math.log(0.3)]))
    assert reg.divergence.compiled
    assert reg.coef == pytest.approx(0.3) and reg.estimator == "full"
