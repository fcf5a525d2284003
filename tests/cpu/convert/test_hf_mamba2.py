"""Mamba2ForCausalLM <-> megahybrid: logits parity both ways, tied and untied, two B/C groups."""

import pytest

from tests.convert_checks import roundtrip, transformers


@pytest.mark.parametrize("tied, groups", [(False, 1), (True, 2)])
def test_roundtrip(tmp_path, tied, groups):
    tf = transformers()
    config = tf.Mamba2Config(vocab_size=96, hidden_size=32, num_hidden_layers=2, num_heads=4, head_dim=16,
                             state_size=8, n_groups=groups, expand=2, conv_kernel=4, chunk_size=8,
                             tie_word_embeddings=tied)
    roundtrip(tmp_path, tf.Mamba2ForCausalLM(config))


def test_unknown_architecture_lists_supported(tmp_path):
    import json

    from megahybrid.convert import ConversionError, convert

    (tmp_path / "config.json").write_text(json.dumps({"model_type": "llama"}))
    with pytest.raises(ConversionError, match="'llama' is not supported; supported: .*mamba2"):
        convert(tmp_path, tmp_path / "out", to="megahybrid")
