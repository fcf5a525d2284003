"""JambaForCausalLM <-> megahybrid: logits parity both ways over Mamba1 + attention layers with MLP and
MoE FFNs (per-expert hub keys), tied and untied, GQA and MHA; config errors name the field."""

import pytest

from tests.convert_checks import roundtrip, transformers


def tiny_jamba(tied=False, kv_heads=2, proj_bias=False, conv_bias=True, layers=4, attn=(2, 1), experts=(2, 1),
               head_dim=None):
    tf = transformers()
    extra = {"head_dim": head_dim} if head_dim else {}  # JambaAttention reads head_dim only when set
    return tf.JambaConfig(**extra, vocab_size=96, hidden_size=32, intermediate_size=48, num_hidden_layers=layers,
                          num_attention_heads=4, num_key_value_heads=kv_heads, num_experts=4, num_experts_per_tok=2,
                          attn_layer_period=attn[0], attn_layer_offset=attn[1], expert_layer_period=experts[0],
                          expert_layer_offset=experts[1], mamba_d_state=8, mamba_d_conv=4, mamba_expand=2,
                          mamba_dt_rank=3, mamba_proj_bias=proj_bias, mamba_conv_bias=conv_bias,
                          tie_word_embeddings=tied, rms_norm_eps=1e-6)


@pytest.mark.parametrize("tied, kv_heads, proj_bias, conv_bias, attn, experts, head_dim", [
    (False, 2, False, True, (2, 1), (2, 1), None),  # GQA; attention and MoE in layers 1 and 3
    (True, 4, True, False, (4, 2), (2, 0), 12),     # MHA, tied, biases flipped, head_dim 12 != 32/4; MoE on Mamba layers
])
def test_roundtrip(tmp_path, tied, kv_heads, proj_bias, conv_bias, attn, experts, head_dim):
    tf = transformers()
    config = tiny_jamba(tied, kv_heads, proj_bias, conv_bias, attn=attn, experts=experts, head_dim=head_dim)
    ours = roundtrip(tmp_path, tf.JambaForCausalLM(config), seq=24)
    symbols = "".join(s.symbol for s in ours.specs)
    assert set(symbols) == {"m", "*", "-", "E"}, symbols


def test_config_maps_layer_periods():
    from megahybrid.convert.hf_jamba import config_from_hf

    hf = tiny_jamba(layers=8, attn=(8, 4), experts=(2, 1)).to_dict()
    assert config_from_hf(hf)["pattern"] == "m-mEm-mE*-mEm-mE"


def test_export_refuses_rope_and_irregular_layers():
    import megahybrid
    from megahybrid.convert import ConversionError
    from megahybrid.convert.hf_jamba import config_to_hf

    base = ["model.hidden_size=32", "model.attention.num_heads=4", "model.mamba1.inner_layernorms=true",
            "model.attention.rope_theta=0"]
    with pytest.raises(ConversionError, match=r"model.attention.rope_theta=10000.0: .*no positional"):
        config_to_hf(megahybrid.load_config("m-*E", base[:-1]).model)
    with pytest.raises(ConversionError, match=r"model.pattern=.*do not follow one period"):
        config_to_hf(megahybrid.load_config("m-*-*-m-m-*-", base).model)
    with pytest.raises(ConversionError, match=r"model.pattern=.*followed by an MLP"):
        config_to_hf(megahybrid.load_config("mm-*-", base).model)
