"""Zamba2ForCausalLM <-> megahybrid: logits parity both ways, with tied (blocks shared) and untied
(every hybrid layer its own block copy) embeddings, two shared blocks over three hybrid uses, RoPE on
and off, attention adapters on and off (GQA only without them: HF's k/v adapters are 2*hidden wide),
MLP biases; plus the refusals."""

import pytest

from tests.convert_checks import roundtrip, transformers

LAYERS = ["mamba", "hybrid", "mamba", "hybrid", "hybrid", "mamba"]


def tiny_config(**overrides):
    tf = transformers()
    fields = dict(vocab_size=96, hidden_size=32, num_hidden_layers=len(LAYERS), layers_block_type=LAYERS,
                  mamba_d_state=8, n_mamba_heads=4, mamba_ngroups=2, mamba_d_conv=4, chunk_size=8,
                  num_attention_heads=4, num_mem_blocks=2, use_shared_attention_adapter=True, adapter_rank=4,
                  use_mem_rope=True, intermediate_size=48, hidden_act="gelu", tie_word_embeddings=True)
    return tf.Zamba2Config(**{**fields, **overrides})


@pytest.mark.parametrize("overrides", [
    {},                                                                       # tied: blocks shared, round robin
    {"tie_word_embeddings": False},                                           # untied: a copy per hybrid layer
    {"use_mem_rope": False, "hidden_act": "silu", "add_bias_linear": True},   # NoPE, swiglu, biases
    {"use_shared_attention_adapter": False, "num_key_value_heads": 2, "num_mem_blocks": 1},  # GQA
], ids=["tied", "untied", "nope-silu-bias", "gqa-no-attn-adapters"])
def test_roundtrip(tmp_path, overrides):
    tf = transformers()
    # Noise 0.1, not 0.05: then dropping any one piece (a q adapter, a norm, the routing into the Mamba2
    # input) moves the logits by > 5e-2, far past the 1e-4 bound; the exact path stays ~1e-6.
    ours = roundtrip(tmp_path, tf.Zamba2ForCausalLM(tiny_config(**overrides)), perturb_scale=0.1)
    hybrid_uses = [layer.mixer for layer in ours.layers if layer.spec.symbol == "s"]
    assert len(hybrid_uses) == LAYERS.count("hybrid")
    distinct_blocks = {id(use.block) for use in hybrid_uses}
    tied = overrides.get("tie_word_embeddings", True)
    assert len(distinct_blocks) == (overrides.get("num_mem_blocks", 2) if tied else len(hybrid_uses))


def test_pattern_and_sharing_from_config():
    from megahybrid.convert.hf_zamba2 import config_from_hf

    model = config_from_hf(tiny_config().to_dict())
    assert model["pattern"] == "MsMMsMsMM"
    sa = model["shared_attention"]
    assert (sa["num_shared_blocks"], sa["adapter_rank"], sa["mlp_adapter_rank"], sa["output_to"]) == (2, 4, 4,
                                                                                                       "next_input")
    assert model["attention"]["head_dim"] == 16 and model["attention"]["softmax_scale"] == pytest.approx(8 ** -0.5)


def _megahybrid_model(**changes):
    import megahybrid
    from megahybrid.convert.hf_zamba2 import config_from_hf

    model = config_from_hf(tiny_config().to_dict())
    for dotted, value in changes.items():
        section, _, field = dotted.rpartition(".")
        (model[section] if section else model)[field] = value
    return megahybrid.load_config({"model": model}).model


@pytest.mark.parametrize("changes, field", [
    ({"pattern": "MsM*M"}, "model.pattern="),
    ({"shared_attention.output_to": "residual"}, "model.shared_attention.output_to="),
    ({"attention.num_kv_heads": 2}, "model.attention.num_kv_heads="),
    ({"attention.softmax_scale": None}, "model.attention.softmax_scale="),
    ({"mlp.activation": "relu2"}, "model.mlp.activation="),
    ({"norm_eps": 1e-6}, "model.norm_eps="),
])
def test_config_to_hf_refuses_what_zamba2_cannot_express(changes, field):
    from megahybrid.convert.base import ConversionError
    from megahybrid.convert.hf_zamba2 import config_to_hf

    with pytest.raises(ConversionError) as err:
        config_to_hf(_megahybrid_model(**changes))
    assert str(err.value).startswith(field), str(err.value)


def test_config_from_hf_refuses_other_gated_norm_eps():
    from megahybrid.convert.base import ConversionError
    from megahybrid.convert.hf_zamba2 import config_from_hf

    with pytest.raises(ConversionError, match="rms_norm_eps=1e-06"):
        config_from_hf(tiny_config(rms_norm_eps=1e-6).to_dict())


def test_diverged_copies_of_a_tied_block_are_refused(tmp_path):
    """A tied checkpoint whose later copy of a block differs cannot be one shared block."""
    import torch
    from safetensors.torch import load_file, save_file

    from megahybrid.convert import ConversionError, convert

    tf = transformers()
    hf_dir = tmp_path / "hf"
    tf.Zamba2ForCausalLM(tiny_config()).save_pretrained(hf_dir)
    tensors = load_file(hf_dir / "model.safetensors")
    owner = "model.layers.1.shared_transformer.self_attn.q_proj.weight"
    tensors[owner.replace("layers.1", "layers.4")] = tensors[owner] + 1.0  # layer 4 reuses block 0
    save_file(tensors, hf_dir / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(ConversionError, match="layers.4.shared_transformer.self_attn.q_proj.weight' differs"):
        convert(hf_dir, tmp_path / "out", to="megahybrid")
    assert torch.isfinite(tensors[owner]).all()
