"""NemotronHForCausalLM <-> megahybrid: logits parity both ways for every layer type (Mamba2, attention,
relu2 MLP, MoE with shared expert), with and without d_inner != expand * hidden, B/C groups, group-limited
routing, a dt clamp that bites, tied embeddings; the legacy pattern field; what the export refuses."""

import math

import pytest
import torch

from tests.convert_checks import LOGITS_ATOL, roundtrip, transformers

LAYERS = ["linear_attention", "moe", "full_attention", "mlp"] * 2


def tiny_config(**overrides):
    tf = transformers()
    kwargs = dict(vocab_size=96, hidden_size=32, layers_block_type=LAYERS, num_attention_heads=4,
                  num_key_value_heads=2, head_dim=8, intermediate_size=48, ssm_state_size=8, mamba_num_heads=6,
                  mamba_head_dim=8, n_groups=2, chunk_size=8, n_routed_experts=8, num_experts_per_tok=2,
                  moe_intermediate_size=16, moe_shared_expert_intermediate_size=24, n_group=4, topk_group=2,
                  routed_scaling_factor=2.5)
    return tf.NemotronHConfig(**{**kwargs, **overrides})


def randomise_buffers(model, seed: int = 3) -> None:
    """`perturb` moves parameters only; e_score_correction_bias is a buffer (zeros at init)."""
    g = torch.Generator().manual_seed(seed)
    for name, buf in model.named_buffers():
        if name.endswith("e_score_correction_bias"):
            buf.copy_(0.3 * torch.randn(buf.shape, generator=g))


@pytest.mark.parametrize("overrides", [
    {},
    {"tie_word_embeddings": True, "mamba_num_heads": 4, "mamba_head_dim": 16, "n_groups": 1, "n_group": 1,
     "topk_group": 1, "norm_topk_prob": False, "routed_scaling_factor": 1.0, "time_step_min": 2.0,
     "time_step_max": 3.0},
], ids=["d_inner-groups-grouped_routing", "tied-clamped_dt-unnormalised"])
def test_roundtrip(tmp_path, overrides):
    tf = transformers()
    hf = tf.NemotronHForCausalLM(tiny_config(**overrides))
    randomise_buffers(hf)
    ours = roundtrip(tmp_path, hf)
    m = ours.config
    assert m.pattern == "ME*-ME*-"
    assert m.mamba2.d_inner == (None if overrides else 48)
    assert tuple(m.mamba2.dt_limit) == (overrides.get("time_step_min", 0.001), math.inf)
    assert m.moe.score_correction_bias and ours.layers[1].mixer.router.expert_bias.abs().sum() > 0


def test_dt_clamp_matters(tmp_path):
    """With time_step_min = 2.0 (softplus(dt) is mostly ~1.3 here) dropping the clamp moves the logits past
    the 1e-4 bound (measured 2.7e-4), so the roundtrip above can tell a missing dt_limit."""
    from megahybrid.convert import convert, load_reference
    from tests.convert_checks import hf_logits, perturb, tokens

    tf = transformers()
    hf = tf.NemotronHForCausalLM(tiny_config(time_step_min=2.0, time_step_max=3.0)).eval()
    perturb(hf)
    hf.save_pretrained(tmp_path / "hf")
    convert(tmp_path / "hf", tmp_path / "mh", to="megahybrid")
    ours, _ = load_reference(tmp_path / "mh")
    for layer in ours.layers:
        if hasattr(layer.mixer, "dt_limit"):
            layer.mixer.dt_limit = (0.0, math.inf)
    ids = tokens(96)
    with torch.no_grad():
        diff = float((ours(ids) - hf_logits(hf, ids)).abs().max())
    assert diff > LOGITS_ATOL, diff


def test_legacy_hybrid_override_pattern():
    from megahybrid.convert.hf_nemotron_h import pattern_from_hf

    assert pattern_from_hf({"hybrid_override_pattern": "M-M*-E"}) == "M-M*-E"
    assert pattern_from_hf({"layer_types": ["mamba", "attention", "moe"]}) == "M*E"
    with pytest.raises(Exception, match="hybrid_override_pattern"):
        pattern_from_hf({"hybrid_override_pattern": "M-G"})


@pytest.mark.parametrize("override, field", [
    ("model.attention.rope_theta=10000", "attention.rope_theta"),
    ("model.mamba2.dt_limit=[0.0, .inf]", "mamba2.dt_limit"),
    ("model.moe.router=softmax", "moe.router"),
    ("model.pattern=ME*G", "pattern"),
    ("model.mlp.activation=swiglu", "mlp.activation"),
])
def test_export_refuses(tmp_path, override, field):
    import megahybrid
    from megahybrid.convert import ConversionError
    from megahybrid.convert.hf_nemotron_h import config_from_hf, config_to_hf

    model = config_from_hf(tiny_config().to_dict())
    config = megahybrid.load_config({"model": model}, [override])
    with pytest.raises(ConversionError, match=f"model.{field}="):
        config_to_hf(config.model)


def test_tied_megahybrid_model_without_bias_exports(tmp_path):
    """megahybrid -> NemotronH for what NemotronH stores differently: a tied embedding (HF never ties: the
    export writes a copy as lm_head) and a router without score correction (exported as a zero bias)."""
    import megahybrid
    from megahybrid.convert import convert
    from megahybrid.convert.hf_nemotron_h import config_from_hf
    from megahybrid.convert.native import write
    from tests.convert_checks import assert_logits, hf_logits, perturb, tokens

    model = config_from_hf(tiny_config().to_dict())
    model["tie_embeddings"], model["moe"]["score_correction_bias"] = True, False
    config = megahybrid.load_config({"model": model})
    ours = megahybrid.build_model(config).eval()
    perturb(ours)
    write(tmp_path / "mh", config, ours.state_dict())
    convert(tmp_path / "mh", tmp_path / "hf", to="hf", arch="nemotron_h")
    loaded, info = transformers().AutoModelForCausalLM.from_pretrained(tmp_path / "hf", output_loading_info=True)
    assert not any(info[k] for k in ("missing_keys", "unexpected_keys", "mismatched_keys")), info
    ids = tokens(96)
    with torch.no_grad():
        assert_logits("NemotronH export of a tied megahybrid model", ours(ids), hf_logits(loaded.eval(), ids))
