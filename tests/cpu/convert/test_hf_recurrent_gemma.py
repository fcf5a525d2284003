"""RecurrentGemmaForCausalLM <-> megahybrid: logits parity both ways (tied/untied, MQA/GQA, attention
biases, sequences longer than the attention window), and what the conversion refuses.

The parity bound here is 1e-5, tighter than issue 9's 1e-4: the measured difference is ~7e-7, while a
GELU of the wrong form in one branch (exact vs tanh) already moves the logits by ~9e-5."""

import pytest
import torch

from tests.convert_checks import roundtrip, transformers

ATOL = 1e-5


def tiny_config(**overrides):
    """hidden 48 (sqrt(48) is not a bf16 number, so the normaliser rounding is exercised), 2 recurrent +
    2 local-attention layers, window 8 < sequence 24, lru_width != hidden."""
    tf = transformers()
    kwargs = dict(vocab_size=96, hidden_size=48, num_hidden_layers=5, num_attention_heads=4, num_key_value_heads=1,
                  intermediate_size=80, lru_width=64, attention_window_size=8, conv1d_width=4,
                  block_types=["recurrent", "attention", "recurrent"], logits_soft_cap=5.0)
    return tf.RecurrentGemmaConfig(**{**kwargs, **overrides})


@pytest.mark.parametrize("overrides", [
    {},
    {"tie_word_embeddings": False, "num_key_value_heads": 2, "attention_bias": True},
], ids=["tied-mqa", "untied-gqa-bias"])
def test_roundtrip(tmp_path, overrides):
    tf = transformers()
    ours = roundtrip(tmp_path, tf.RecurrentGemmaForCausalLM(tiny_config(**overrides)), atol=ATOL)
    m = ours.config
    assert m.pattern == "r-w-r-r-w-"
    assert m.embedding_scale == 6.9375 != 48 ** 0.5  # bf16(sqrt(48))


def test_exact_normaliser_breaks_parity(tmp_path):
    """The bf16 rounding of sqrt(hidden) matters: with the exact sqrt the logits differ by more than
    the 1e-4 bound (so the parity test above can tell the two apart)."""
    from megahybrid.convert import convert, load_reference
    from tests.convert_checks import hf_logits, perturb, tokens

    tf = transformers()
    hf = tf.RecurrentGemmaForCausalLM(tiny_config()).eval()
    perturb(hf)
    hf.save_pretrained(tmp_path / "hf")
    convert(tmp_path / "hf", tmp_path / "mh", to="megahybrid")
    ours, _ = load_reference(tmp_path / "mh")
    ours.config.embedding_scale = 48 ** 0.5
    ids = tokens(96)
    with torch.no_grad():
        diff = (ours(ids) - hf_logits(hf, ids)).abs().max()
    assert diff > 1e-3


@pytest.mark.parametrize("override, field", [
    ("model.rglru.num_heads=2", "rglru.num_heads"),
    ("model.attention.out_bias=false", "attention.out_bias"),
    ("model.embedding_scale=7.0", "embedding_scale"),
    ("model.pattern=r-w-*-", "pattern"),
])
def test_config_to_hf_refuses(override, field):
    import megahybrid
    from megahybrid.convert import ConversionError
    from megahybrid.convert.hf_recurrent_gemma import config_from_hf, config_to_hf

    hf = tiny_config().to_dict()
    config = megahybrid.load_config({"model": config_from_hf(hf)}, [override])
    with pytest.raises(ConversionError, match=f"model.{field}="):
        config_to_hf(config.model)


def test_config_from_hf_refuses_exact_gelu():
    """hidden_activation='gelu' would also change the recurrent block's gate, which megahybrid fixes."""
    from megahybrid.convert import ConversionError
    from megahybrid.convert.hf_recurrent_gemma import config_from_hf

    with pytest.raises(ConversionError, match="hidden_activation='gelu'"):
        config_from_hf(tiny_config(hidden_activation="gelu").to_dict())
