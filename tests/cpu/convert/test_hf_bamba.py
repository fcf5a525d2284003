"""BambaForCausalLM <-> megahybrid: logits parity both ways (Mamba2 + partial-rotary attention, each HF
layer = mixer block + SwiGLU MLP block), tied/untied, GQA/MHA, B/C groups, biases, a dt clamp; and what
the export refuses."""

import pytest

from tests.convert_checks import roundtrip, transformers


def tiny_config(**overrides):
    tf = transformers()
    kwargs = dict(vocab_size=96, hidden_size=32, num_hidden_layers=4, attn_layer_indices=[1, 3], num_attention_heads=4,
                  num_key_value_heads=2, intermediate_size=48, mamba_n_heads=4, mamba_d_state=8, mamba_n_groups=2,
                  mamba_chunk_size=8)
    return tf.BambaConfig(**{**kwargs, **overrides})


@pytest.mark.parametrize("overrides", [
    {},
    {"tie_word_embeddings": True, "num_key_value_heads": 4, "mamba_n_groups": 1, "attention_bias": True,
     "mlp_bias": True, "attn_layer_indices": [2], "time_step_limit": (1.5, 4.0)},
], ids=["untied-gqa-groups", "tied-mha-bias-dt_limit"])
def test_roundtrip(tmp_path, overrides):
    tf = transformers()
    ours = roundtrip(tmp_path, tf.BambaForCausalLM(tiny_config(**overrides)))
    m = ours.config
    assert m.pattern == ("M-*-M-*-" if not overrides else "M-M-*-M-")
    assert m.attention.rotary_fraction == 0.5


@pytest.mark.parametrize("override, field", [
    ("model.attention.rotary_fraction=1.0", "attention.rotary_fraction"),
    ("model.pattern=M-*-E", "pattern"),
    ("model.mlp.activation=relu2", "mlp.activation"),
    ("model.mamba2.norm_before_gate=true", "mamba2.norm_before_gate"),
    ("model.residual_scale=0.5", "residual_scale"),
])
def test_export_refuses(override, field):
    import megahybrid
    from megahybrid.convert import ConversionError
    from megahybrid.convert.hf_bamba import config_from_hf, config_to_hf

    config = megahybrid.load_config({"model": config_from_hf(tiny_config().to_dict())}, [override])
    with pytest.raises(ConversionError, match=f"model.{field}="):
        config_to_hf(config.model)
