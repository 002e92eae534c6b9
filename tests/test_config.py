"""The config system: YAML + --set overrides, and errors that name the field and what is allowed."""

from __future__ import annotations

from pathlib import Path

import pytest

from mirrorlab.config import (
    Config,
    ConfigError,
    apply_overrides,
    config_from_dict,
    dump_config,
    load_config,
    parse_override,
)


def test_defaults_validate() -> None:
    cfg = load_config()
    assert isinstance(cfg, Config)
    assert cfg.divergence.name == "kl_k3"


def test_yaml_and_overrides(tmp_path: Path) -> None:
    p = tmp_path / "c.yaml"
    p.write_text("train:\n  steps: 5\n  optim:\n    lr: 0.001\ndivergence:\n  name: prob_l2\n")
    cfg = load_config(p, ["train.optim.lr=5e-4", "divergence.coef=1.0", "search.strategy.params.sigma=0.02"])
    assert cfg.train.steps == 5
    assert cfg.train.optim.lr == pytest.approx(5e-4)
    assert cfg.divergence.name == "prob_l2" and cfg.divergence.coef == 1.0
    assert cfg.search.strategy.params == {"sigma": 0.02}


def test_round_trip_through_dump(tmp_path: Path) -> None:
    cfg = load_config(None, ["train.steps=7", "compare.seeds=[3, 4]"])
    p = tmp_path / "dump.yaml"
    p.write_text(dump_config(cfg))
    assert load_config(p) == cfg


@pytest.mark.parametrize(
    ("override", "needle"),
    [
        ("train.stepz=3", "train.stepz: unknown key; allowed: "),
        ("train.steps=many", "train.steps"),
        ("train.optim.lr=-1", "train.optim.lr"),
        ("train.loss_type=ppo", "'grpo', 'dr_grpo', 'bnpo' or 'dapo'"),
        ("divergence.name=nope", "unknown divergence 'nope'; allowed: "),
        ("task.name=nope", "unknown task 'nope'; allowed: "),
        ("search.strategy.name=nope", "unknown strategy 'nope'; allowed: "),
        ("search.executor.kind=slurm", "search.executor.kind"),
    ],
)
def test_bad_values_name_the_field(override: str, needle: str) -> None:
    with pytest.raises(ConfigError) as e:
        load_config(None, [override])
    assert needle in str(e.value)


def test_unknown_key_lists_allowed_keys() -> None:
    with pytest.raises(ConfigError) as e:
        config_from_dict({"train": {"optim": {"learning_rate": 1}}})
    msg = str(e.value)
    assert "train.optim.learning_rate: unknown key" in msg
    assert "lr" in msg and "warmup_steps" in msg


def test_compare_baseline_must_be_a_method() -> None:
    methods = [{"label": "kl", "divergence": {"name": "kl_k3"}}]
    with pytest.raises(ConfigError, match="baseline 'x' is not a method label"):
        config_from_dict({"compare": {"methods": methods, "baseline": "x"}})


def test_override_parsing() -> None:
    assert parse_override("a.b=[1, 2]") == (["a", "b"], [1, 2])
    assert parse_override("a=true") == (["a"], True)
    with pytest.raises(ConfigError, match="key.path=value"):
        parse_override("nonsense")
    with pytest.raises(ConfigError, match="not a section"):
        apply_overrides({"a": 1}, ["a.b=2"])


def test_missing_file_and_non_mapping(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="not found"):
        load_config(tmp_path / "absent.yaml")
    p = tmp_path / "list.yaml"
    p.write_text("- 1\n- 2\n")
    with pytest.raises(ConfigError, match="top level must be a mapping"):
        load_config(p)


def test_renamed_field_is_accepted_with_a_deprecation_warning():
    """`train.reg_is_weight` was renamed `reg_times_ratio`: old configs still load, with a warning
    naming the new field; setting both is an error naming them."""
    import warnings

    from mirrorlab.config import ConfigError, config_from_dict

    with warnings.catch_warnings(record=True) as w:
        warnings.simplefilter("always")
        cfg = config_from_dict({"train": {"reg_is_weight": True}})
    assert cfg.train.reg_times_ratio is True
    assert any(issubclass(x.category, DeprecationWarning) and "reg_times_ratio" in str(x.message) for x in w)
    with pytest.raises(ConfigError, match="reg_is_weight is the deprecated name of reg_times_ratio"):
        config_from_dict({"train": {"reg_is_weight": True, "reg_times_ratio": False}})


def test_every_field_is_documented_once_and_the_reference_is_current():
    """Each config field carries its description at the field; docs/config.md is generated from
    them (`mirrorlab fields --markdown > docs/config.md`) and must be regenerated after a change."""
    from pathlib import Path

    from mirrorlab.config import config_reference, field_rows

    rows = field_rows()
    assert len(rows) > 100
    assert [r[0] for r in rows if not r[3].strip()] == []
    doc = Path(__file__).resolve().parents[1] / "docs" / "config.md"
    assert doc.read_text() == config_reference(), "regenerate: mirrorlab fields --markdown > docs/config.md"
