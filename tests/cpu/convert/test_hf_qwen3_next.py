"""Qwen3NextForCausalLM <-> megahybrid: logits parity both ways, GDN (grouped qkvz, Hv = 2 Hk) + gated
attention (GQA, partial rotary), sparse MoE with gated shared expert and dense MLP layers, tied/untied."""

import pytest

from tests.convert_checks import roundtrip, transformers


def tiny_config(**overrides):
    fields = dict(vocab_size=96, hidden_size=32, num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=2,
                  head_dim=16, linear_num_key_heads=2, linear_num_value_heads=4, linear_key_head_dim=8,
                  linear_value_head_dim=12, linear_conv_kernel_dim=4, intermediate_size=48,
                  moe_intermediate_size=16, shared_expert_intermediate_size=24, num_experts=4,
                  num_experts_per_tok=2, decoder_sparse_step=1, mlp_only_layers=[0],
                  layer_types=["linear_attention", "full_attention", "linear_attention", "full_attention"],
                  rope_parameters={"rope_type": "default", "rope_theta": 10000.0, "partial_rotary_factor": 0.5})
    return transformers().Qwen3NextConfig(**(fields | overrides))


@pytest.mark.parametrize("overrides", [
    {},
    # tied embeddings, MoE every 2nd layer, no top-k renormalisation, Hv = Hk, default partial rotary (0.25)
    dict(tie_word_embeddings=True, decoder_sparse_step=2, mlp_only_layers=[], norm_topk_prob=False,
         linear_num_value_heads=2, rope_parameters={"rope_type": "default", "rope_theta": 5000.0}),
], ids=["untied-grouped-v", "tied-step2"])
def test_roundtrip(tmp_path, overrides):
    tf = transformers()
    roundtrip(tmp_path, tf.Qwen3NextForCausalLM(tiny_config(**overrides)))


def test_config_to_hf_refuses_plain_norm():
    import megahybrid
    from megahybrid.convert import ConversionError
    from megahybrid.convert.hf_qwen3_next import config_from_hf, config_to_hf

    model = config_from_hf(tiny_config().to_dict()) | {"zero_centered_norm": False}
    with pytest.raises(ConversionError, match="model.zero_centered_norm=False"):
        config_to_hf(megahybrid.load_config({"model": model}).model)


def test_config_to_hf_refuses_unpaired_pattern():
    import megahybrid
    from megahybrid.convert import ConversionError
    from megahybrid.convert.hf_qwen3_next import config_from_hf, config_to_hf

    model = config_from_hf(tiny_config().to_dict()) | {"pattern": "GG-*E-"}
    with pytest.raises(ConversionError, match="model.pattern='GG-\\*E-'.*mixer"):
        config_to_hf(megahybrid.load_config({"model": model}).model)


def test_mtp_head_is_dropped_and_unknown_tensors_are_named(tmp_path):
    """Hub checkpoints carry `mtp.*` (multi-token prediction, ignored by transformers too): dropped.
    Any other tensor the conversion does not use is an error that names it."""
    import torch
    from safetensors.torch import load_file, save_file

    from megahybrid.convert import ConversionError, convert

    transformers().Qwen3NextForCausalLM(tiny_config()).save_pretrained(tmp_path / "hf")
    weights = tmp_path / "hf" / "model.safetensors"
    tensors = load_file(weights) | {"mtp.fc.weight": torch.zeros(32, 64)}
    save_file(tensors, weights)
    convert(tmp_path / "hf", tmp_path / "mh", to="megahybrid")
    save_file(tensors | {"model.layers.0.extra.weight": torch.zeros(2)}, weights)
    with pytest.raises(ConversionError, match="not used by the conversion: model.layers.0.extra.weight"):
        convert(tmp_path / "hf", tmp_path / "mh2", to="megahybrid")
