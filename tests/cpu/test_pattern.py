"""Pattern language: Megatron-Core parity (its own parser is the reference) and bad inputs."""

import pytest
import torch

from megahybrid.config import Config, ConfigError, ModelConfig, ParallelConfig, load_config
from megahybrid.pattern import expand, parse, pattern_from_ratio, resolve_layers, stage_of

mega = pytest.importorskip("megatron.core.models.hybrid.hybrid_layer_allocation")

MEGATRON_PATTERNS = [
    "M", "*", "M*", "M*M*", "MMMM*", "M-M-M*-", "M*-ME-M*", "MG*-MGE-", "GGG*", "E", "-",
    "MMMME MMMME MMM*E".replace(" ", ""), "M-M-M-M*-M-M-M-M-M*-M-M-M-M-M*-M-M-M-M-M*-M-M-M-M-M-",
    "M+M+", "MDMD-", "M*M*/MM/MM", "MMMM/*M/*M/*M", "M-M-|M-M*-/MM/MM", "M*|M*", "MM|**|MM|**",
    "M-|M-|M-|M-", "GE|GE", "M*-/E", "MMMM/", "|M*", "M*|", "MGE*-+".replace("*", ""),
]


def _model(pattern: str, **fields) -> ModelConfig:
    cfg = load_config({"model": {"pattern": pattern, **fields}}, ["model.hidden_size=64",
                                                                   "model.attention.num_heads=4"])
    return cfg.model


@pytest.mark.parametrize("pattern", MEGATRON_PATTERNS)
def test_parse_matches_megatron(pattern):
    ours = parse(pattern)
    theirs = mega.parse_hybrid_pattern(pattern)
    assert (ours.main or None) == theirs.main_pattern
    assert ours.mtp == theirs.mtp_pattern
    assert ours.mtp_depths == theirs.mtp_num_depths
    assert mega.get_hybrid_total_layer_count(pattern) == len(ours.main_layers)
    assert mega.get_hybrid_total_pipeline_segment_count(pattern) == len(ours.segments)


@pytest.mark.parametrize("pattern,pp,vpp", [
    ("M*M*", 1, None), ("M*M*", 2, None), ("MMMM****", 4, None), ("M-M-|M-M*-", 2, None),
    ("M*|M*|GE|GE", 2, 2), ("M*|M*|GE|GE", 4, None), ("MM|**|MM|**", 2, 2), ("M*-ME-M*", 2, None),
    ("M-|M-|M-|M-/MM", 2, 2),
])
def test_stages_match_megatron(monkeypatch, pattern, pp, vpp):
    """Each layer's (pipeline rank, virtual stage) equals what Megatron's select_pipeline_segment gives."""
    monkeypatch.setattr(mega, "log_on_each_pipeline_stage", lambda *a, **k: None)  # needs a process group
    monkeypatch.setattr(mega, "log_single_rank", lambda *a, **k: None)
    parsed = parse(pattern)
    specs = [s for s in resolve_layers(Config(model=_model(pattern), parallel=ParallelConfig(pp=pp, vpp=vpp)))
             if not s.mtp_depth]
    assert [s.symbol for s in specs] == list(mega.parse_hybrid_pattern(pattern).main_pattern.replace("|", ""))
    for rank in range(pp):
        for vp in range(vpp or 1):
            monkeypatch.setattr(torch.distributed, "get_rank", lambda group=None: rank)
            monkeypatch.setattr(torch.distributed, "get_world_size", lambda group=None: pp)
            layers, offset = mega.select_pipeline_segment(parsed.main, object() if pp > 1 else None,
                                                          vp if vpp else None)
            for k, sym in enumerate(layers):
                spec = specs[offset + k]
                assert spec.symbol == sym
                assert stage_of(spec, len(parsed.segments), len(parsed.main_layers), pp) == (rank, vp)


@pytest.mark.parametrize("n,ratio", [(10, 0.1), (12, 0.25), (52, 0.08), (7, 0.5), (24, 1 / 6), (9, 0.0)])
def test_ratio_matches_megatron(n, ratio):
    count = round(n * ratio)
    assert pattern_from_ratio(n, count, "M") == mega.pattern_from_ratios(n, ratio)


def test_ratio_field_uses_megatron_allocator():
    cfg = load_config({"model": {"backbone": "mamba2", "num_layers": 10, "ratio": [9, 1]}},
                      ["model.attention.num_heads=4"])
    assert "".join(s.symbol for s in resolve_layers(cfg)) == mega.pattern_from_ratios(10, 0.1)


@pytest.mark.parametrize("extended,flat", [
    ("(M*)x3", "M*M*M*"), ("M M M *", "MMM*"), ("(MMM*E)x2", "MMM*EMMM*E"), ("((M*)x2-)x2", "M*M*-M*M*-"),
    ("Mx3*", "MMM*"), ("(M-|)x2M", "M-|M-|M"), ("(G E)x2 / M", "GEGE/M"), ("d w r s h m", "dwrshm"),
    ("(M*)x10", "M*" * 10),
])
def test_extensions_expand(extended, flat):
    assert expand(extended) == flat


def test_other_forms_resolve_to_same_layers():
    base = ["model.attention.num_heads=4", "model.hidden_size=64"]
    want = "d-d-d-*-d-d-d-*-"
    forms = [
        {"pattern": "(d-d-d-*-)x2"},
        {"layers": ["deltanet", "mlp", "deltanet", "mlp", "deltanet", "mlp", "attention", "mlp"] * 2},
        {"backbone": "deltanet", "num_layers": 8, "attention_every": 4, "mlp_after_mixer": "mlp"},
        {"backbone": "d", "num_layers": 8, "attention_layers": [3, 7], "mlp_after_mixer": "-"},
    ]
    for form in forms:
        specs = resolve_layers(load_config({"model": form}, base))
        assert "".join(s.symbol for s in specs) == want, form


BAD = [
    # (source dict or pattern, overrides, substring the first line must contain)
    ("MQM", [], "unknown layer symbol 'Q'"),
    ("M(*", [], "unbalanced '('"),
    ("M*)", [], "unbalanced ')'"),
    ("(M*)x0", [], "repeat count 0 must be >= 1"),
    ("(M*)x", [], "needs a repeat count"),
    ("x3", [], "'x' must follow"),
    ("M3", [], "stray count"),
    ("()x2", [], "empty group"),
    ("", [], "no layers"),
    ("   ", [], "no layers"),
    ("|", [], "no layers"),
    ("M*/MM/M*", [], "MTP part 2"),
    ("M*/M|M", [], "'|' is not allowed in the MTP part"),
    ("M*+", [], "only one attention kind"),
    ("*D", [], "only one attention kind"),
    ("|x2", [], "cannot be repeated"),
    ("M*|M*|M*", ["parallel.pp=2"], "not a multiple of parallel.pp=2"),
    ("M*M", ["parallel.pp=2"], "does not divide the 3 layers"),
    ("M*M*", ["parallel.pp=2", "parallel.vpp=2"], "needs '|' boundaries"),
    ("M*|M*", ["parallel.pp=1", "parallel.vpp=3"], "parallel.pp x parallel.vpp = 3"),
    ("*", ["model.attention.num_heads=7"], "model.attention.num_heads"),
    ("*", ["model.attention.num_kv_heads=3"], "model.attention.num_kv_heads"),
    ("E", ["model.moe.top_k=9", "model.moe.num_experts=8"], "model.moe.top_k"),
    ("M", ["model.mamba2.num_groups=3"], "model.mamba2.num_groups"),
    ("G", ["model.gdn.num_v_heads=3", "model.gdn.num_qk_heads=2"], "model.gdn.num_v_heads"),
    ({"model": {"pattern": "M", "layers": ["mamba2"]}}, [], "model.layers"),
    ({"model": {"layers": ["mamba2", "transformer"]}}, [], "model.layers[1]"),
    ({"model": {"backbone": "mlp", "num_layers": 4}}, [], "model.backbone"),
    ({"model": {"backbone": "mamba2"}}, [], "model.num_layers"),
    ({"model": {"backbone": "mamba2", "num_layers": 4, "attention_layers": [4]}}, [], "model.attention_layers"),
    ({"model": {"backbone": "mamba2", "num_layers": 4, "attention_every": 0}}, [], "model.attention_every"),
    ({"model": {"backbone": "mamba2", "num_layers": 4, "ratio": [1]}}, [], "model.ratio"),
    ({"model": {"backbone": "mamba2", "num_layers": 4, "ratio": [3, 1], "attention_every": 2}}, [],
     "conflicts with"),
    ({"model": {"backbone": "mamba2", "num_layers": 4, "mlp_after_mixer": "attention"}}, [],
     "model.mlp_after_mixer"),
    ({"model": {"pattern": "M*", "attention_every": 2}}, [], "only applies with model.backbone"),
    ({"model": {}}, [], "no layer layout"),
    ({"model": {"pattern": "M*", "hiden_size": 64}}, [], "did you mean hidden_size"),
    ({"model": {"pattern": "M*", "vocab_size": "big"}}, [], "model.vocab_size='big': must be an integer"),
    ({"model": {"pattern": "M*", "norm": "batchnorm"}}, [], "must be one of"),
    ({"model": {"pattern": "M*"}, "train": {"micro_batch_size": 3, "global_batch_size": 8}}, [],
     "train.global_batch_size"),
    ({"model": {"pattern": "M*"}}, ["parallel.sequence_parallel=true"], "parallel.sequence_parallel"),
    ({"model": {"pattern": "M*"}}, ["model.hidden_size=0"], "model.hidden_size"),
    ({"model": {"pattern": "M*"}}, ["model.vocab_size"], "expected dotted key=value"),
    ({"model": {"pattern": "M*"}}, ["trian.steps=3"], "trian"),
]


@pytest.mark.parametrize("source,overrides,expected", BAD, ids=[str(i) for i in range(len(BAD))])
def test_bad_inputs_give_one_line_errors(source, overrides, expected):
    if isinstance(source, str):
        source = {"model": {"pattern": source, "attention": {"num_heads": 4}}}
    with pytest.raises(ConfigError) as info:
        load_config(source, ["model.hidden_size=64", *overrides])
    first = str(info.value).splitlines()[0]
    assert expected in first, first
    assert len(first) < 400


def test_caret_points_at_bad_character():
    with pytest.raises(ConfigError) as info:
        parse("MM M?M")
    lines = str(info.value).splitlines()
    assert "position 4" in lines[0]
    assert lines[2].index("^") - 2 == 4 and lines[1][2 + 4] == "?"
