"""GraniteMoeHybridForCausalLM <-> megahybrid: logits parity both ways with MoE (fused experts on disk +
shared_mlp) and dense (num_local_experts 0), µP multipliers that all differ from 1, RoPE and NoPE,
tied/untied, GQA; and what the export refuses."""

import pytest

from tests.convert_checks import roundtrip, transformers

MUP = dict(embedding_multiplier=3.0, residual_multiplier=0.6, logits_scaling=4.0, attention_multiplier=0.2)


def tiny_config(**overrides):
    tf = transformers()
    kwargs = dict(vocab_size=96, hidden_size=32, num_hidden_layers=4, layer_types=["mamba", "attention"] * 2,
                  num_attention_heads=4, num_key_value_heads=2, intermediate_size=16, shared_intermediate_size=24,
                  num_local_experts=4, num_experts_per_tok=2, mamba_n_heads=4, mamba_d_state=8, mamba_n_groups=2,
                  mamba_chunk_size=8, position_embedding_type="rope", **MUP)
    return tf.GraniteMoeHybridConfig(**{**kwargs, **overrides})


@pytest.mark.parametrize("overrides, pattern", [
    ({}, "ME*EME*E"),
    ({"num_local_experts": 0, "tie_word_embeddings": True, "position_embedding_type": None, "mamba_n_groups": 1,
      "attention_bias": True, "layer_types": ["mamba", "mamba", "attention", "mamba"]}, "M-M-*-M-"),
], ids=["moe-rope-untied", "dense-nope-tied-bias"])
def test_roundtrip(tmp_path, overrides, pattern):
    tf = transformers()
    ours = roundtrip(tmp_path, tf.GraniteMoeHybridForCausalLM(tiny_config(**overrides)))
    m = ours.config
    assert m.pattern == pattern
    assert (m.embedding_scale, m.residual_scale, m.logit_scale, m.attention.softmax_scale) == (3.0, 0.6, 0.25, 0.2)
    assert m.attention.rope_theta == (0.0 if "position_embedding_type" in overrides else 10000.0)


@pytest.mark.parametrize("override, field", [
    ("model.moe.router=sigmoid", "moe.router"),
    ("model.moe.num_shared_experts=0", "moe.num_shared_experts"),
    ("model.pattern=ME*-", "pattern"),
    ("model.attention.rotary_fraction=0.5", "attention.rotary_fraction"),
    ("model.logit_softcap=30.0", "logit_softcap"),
])
def test_export_refuses(override, field):
    import megahybrid
    from megahybrid.convert import ConversionError
    from megahybrid.convert.hf_granitemoehybrid import config_from_hf, config_to_hf

    overrides = [override] + (["model.moe.shared_ffn_hidden_size=null"] if "num_shared" in override else [])
    config = megahybrid.load_config({"model": config_from_hf(tiny_config().to_dict())}, overrides)
    with pytest.raises(ConversionError, match=f"model.{field}="):
        config_to_hf(config.model)
