"""Config loading: YAML, presets, dotted overrides, strict typing."""

import pytest

from megahybrid.config import ConfigError, load_config


def test_yaml_with_preset_and_overrides(tmp_path):
    path = tmp_path / "run.yaml"
    path.write_text("preset: jamba:tiny\nmodel:\n  hidden_size: 96\ntrain:\n  steps: 7\n")
    cfg = load_config(str(path), ["model.moe.top_k=1", "train.lr=1e-4", "model.mamba2.dt_limit=[0.0, 0.5]"])
    assert cfg.model.hidden_size == 96 and cfg.train.steps == 7
    assert cfg.model.moe.top_k == 1 and cfg.train.lr == 1e-4
    assert cfg.model.mamba2.dt_limit == (0.0, 0.5)
    assert cfg.model.pattern == "m-mE*-mE"


def test_pattern_string_and_short_override_keys():
    cfg = load_config("(M*)x2", ["hidden_size=128", "attention.num_heads=4"])
    assert cfg.model.pattern == "(M*)x2" and cfg.model.hidden_size == 128


def test_missing_yaml_and_unknown_preset():
    with pytest.raises(ConfigError, match="file not found"):
        load_config("nope.yaml")
    with pytest.raises(ConfigError, match="did you mean jamba"):
        load_config({"preset": "jambaa"})


def test_nested_unknown_key_names_path():
    with pytest.raises(ConfigError, match=r"model\.attention\.num_head: unknown key; did you mean num_heads"):
        load_config({"model": {"pattern": "*", "attention": {"num_head": 4}}})


@pytest.mark.parametrize("override", ["parallel.tp=2", "parallel.pp=2", "parallel.ep=2",
                                      "parallel.cp=2 train.backend=megatron", "parallel.recompute=full"])
def test_train_refuses_layouts_it_cannot_run(override):
    from megahybrid.train.run import check_layout_supported

    config = load_config("default:tiny", [*override.split(), "model.pattern=MGE*", "train.seq_len=32"])
    with pytest.raises(ConfigError, match=r"^parallel"):
        check_layout_supported(config)


@pytest.mark.parametrize("override,match", [
    ("parallel.tp=2 parallel.sequence_parallel=true train.backend=megatron parallel.cp=2", r"^parallel.cp=2: the megatron"),
    ("parallel.tp=2 train.backend=megatron", r"^parallel.sequence_parallel=False: Megatron's MoE"),
])
def test_megatron_layouts_checked_before_training(override, match):
    """Model-parallel layouts go to the Megatron loop; its config errors come before any data work."""
    from megahybrid.train import megatron_loop
    from megahybrid.train.run import check_layout_supported

    config = load_config("default:tiny", [*override.split(), "model.pattern=MGE*", "train.seq_len=32"])
    assert megatron_loop.uses_megatron_loop(config)
    with pytest.raises(ConfigError, match=match):
        check_layout_supported(config)
