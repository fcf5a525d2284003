"""FalconH1ForCausalLM <-> megahybrid: logits parity both ways with every µP multiplier away from 1
(folded into the weights on import, written back as 1.0 on export), with and without the gated
Mamba norm (both orders), SSM width apart from expand*hidden, head_dim apart from hidden/heads,
biases, tied and untied, GQA; config errors name the field."""

import pytest

from tests.convert_checks import roundtrip, transformers

MULTIPLIERS = dict(embedding_multiplier=1.7, lm_head_multiplier=0.6, attention_in_multiplier=1.3,
                   key_multiplier=0.7, attention_out_multiplier=0.8, ssm_in_multiplier=1.2, ssm_out_multiplier=0.9,
                   ssm_multipliers=[0.5, 1.5, 0.8, 1.25, 0.7], mlp_multipliers=[1.4, 0.75])


def tiny_falcon_h1(tied=False, rms_norm=False, norm_before_gate=True, bias=False, kv_heads=2, head_dim=None,
                   multipliers=True):
    tf = transformers()
    extra = {"head_dim": head_dim} if head_dim else {}  # FalconH1Attention reads head_dim only when set
    return tf.FalconH1Config(
        vocab_size=96, hidden_size=32, intermediate_size=48, num_hidden_layers=3, num_attention_heads=4,
        num_key_value_heads=kv_heads, mamba_d_ssm=48, mamba_n_heads=6, mamba_d_state=8,
        mamba_n_groups=2, mamba_d_conv=4, mamba_expand=2, mamba_chunk_size=8, mamba_rms_norm=rms_norm,
        mamba_norm_before_gate=norm_before_gate, mamba_proj_bias=bias, projectors_bias=bias, attention_bias=bias,
        mlp_bias=bias, tie_word_embeddings=tied, rope_parameters={"rope_type": "default", "rope_theta": 500.0},
        **extra, **(MULTIPLIERS if multipliers else {}))


@pytest.mark.parametrize("tied, rms_norm, norm_before_gate, bias, kv_heads, head_dim", [
    (False, False, True, False, 2, None),   # Falcon-H1's defaults: no gated norm
    (True, True, True, True, 4, 12),        # gated norm, norm(y)*silu(z); biases; MHA; head_dim 12 != 32/4
    (False, True, False, False, 1, None),   # norm(y*silu(z)); MQA
])
def test_roundtrip(tmp_path, tied, rms_norm, norm_before_gate, bias, kv_heads, head_dim):
    tf = transformers()
    config = tiny_falcon_h1(tied, rms_norm, norm_before_gate, bias, kv_heads, head_dim)
    ours = roundtrip(tmp_path, tf.FalconH1ForCausalLM(config))
    assert "".join(s.symbol for s in ours.specs) == "p-" * 3
    assert ours.config.mamba2.d_inner == 48 and ours.config.embedding_scale == 1.7


def test_export_writes_neutral_multipliers(tmp_path):
    """The folded weights go out with multipliers 1.0 (the logits check in roundtrip proves they fit)."""
    import json

    from megahybrid.convert import convert

    tf = transformers()
    tf.FalconH1ForCausalLM(tiny_falcon_h1()).save_pretrained(tmp_path / "hf")
    convert(tmp_path / "hf", tmp_path / "mh", to="megahybrid")
    convert(tmp_path / "mh", tmp_path / "back", to="hf")
    hf = json.loads((tmp_path / "back" / "config.json").read_text())
    assert hf["ssm_multipliers"] == [1.0] * 5 and hf["key_multiplier"] == 1.0 and hf["mlp_multipliers"] == [1.0, 1.0]
    assert hf["embedding_multiplier"] == 1.7 and hf["lm_head_multiplier"] == 0.6


def test_errors_name_the_field():
    import megahybrid
    from megahybrid.convert import ConversionError
    from megahybrid.convert.hf_falcon_h1 import config_from_hf, config_to_hf

    hf = tiny_falcon_h1().to_dict() | {"mamba_proj_bias": True}
    with pytest.raises(ConversionError, match="mamba_proj_bias=True .* projectors_bias=False"):
        config_from_hf(hf)
    model = megahybrid.load_config("(p-)x2", ["model.hidden_size=32", "model.attention.num_heads=4",
                                              "model.mamba2.head_dim=8", "model.attention.qk_norm=true"]).model
    with pytest.raises(ConversionError, match=r"model.attention=.*'qk_norm': True"):
        config_to_hf(model)
    model = megahybrid.load_config("(p-M-)x1", ["model.hidden_size=32", "model.attention.num_heads=4",
                                                "model.mamba2.head_dim=8"]).model
    with pytest.raises(ConversionError, match=r"model.pattern=.*'\(p-\)xN'"):
        config_to_hf(model)
