"""OlmoHybridForCausalLM <-> megahybrid: logits parity both ways. Exercises pre-norm GDN layers next to
post-norm attention layers (`model.post_norm_layers`), QK-norm over all heads, GQA, beta * 2
(`allow_neg_eigval`), the GDN norm's fixed eps, Hv = 2 Hk, RoPE and NoPE, tied/untied."""

import pytest

from tests.convert_checks import roundtrip, transformers


def tiny_config(**overrides):
    fields = dict(vocab_size=96, hidden_size=32, num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=2,
                  linear_num_key_heads=2, linear_num_value_heads=4, linear_key_head_dim=8, linear_value_head_dim=12,
                  intermediate_size=48, pad_token_id=0, eos_token_id=1, rms_norm_eps=1e-6,
                  layer_types=["linear_attention", "full_attention", "linear_attention", "full_attention"],
                  rope_parameters={"rope_type": "default", "rope_theta": 10000.0})
    return transformers().OlmoHybridConfig(**(fields | overrides))


@pytest.mark.parametrize("overrides", [
    {},
    # NoPE (the released checkpoints), beta in (0, 1), tied, Hv = Hk, MHA, attention first
    dict(rope_parameters=None, linear_allow_neg_eigval=False, tie_word_embeddings=True, linear_num_value_heads=2,
         num_key_value_heads=4, layer_types=["full_attention", "linear_attention", "linear_attention",
                                             "full_attention"]),
], ids=["rope-negeig-gqa", "nope-tied"])
def test_roundtrip(tmp_path, overrides):
    roundtrip(tmp_path, transformers().OlmoHybridForCausalLM(tiny_config(**overrides)))


def _model(**changes):
    import megahybrid
    from megahybrid.convert.hf_olmo_hybrid import config_from_hf

    model = config_from_hf(tiny_config().to_dict())
    for key, value in changes.items():
        section, _, name = key.rpartition(".")
        (model.setdefault(section, {}) if section else model)[name] = value
    return megahybrid.load_config({"model": model}).model


@pytest.mark.parametrize("changes, message", [
    ({"post_norm_layers": [2, 3]}, r"model.post_norm_layers=\[2, 3\]: OlmoHybridForCausalLM needs \[2, 3, 6, 7\]"),
    ({"attention.qk_norm_scope": "head"}, "model.attention.qk_norm_scope='head'"),
    ({"gdn.norm_eps": None}, "model.gdn.norm_eps=None"),
    ({"pattern": "G-*EG-*-", "moe.num_experts": 2}, "model.pattern='G-\\*EG-\\*-'"),
])
def test_config_to_hf_refuses(changes, message):
    from megahybrid.convert import ConversionError
    from megahybrid.convert.hf_olmo_hybrid import config_to_hf

    with pytest.raises(ConversionError, match=message):
        config_to_hf(_model(**changes))
