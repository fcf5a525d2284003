"""`megahybrid convert`: the command line, format detection and the errors issue 9 asks for
(unsupported architecture lists the supported ones; a shape mismatch names the tensor and both shapes)."""

import json

import torch
from safetensors.torch import load_file, save_file

from megahybrid.cli import main
from tests.convert_checks import assert_logits, hf_logits, perturb, tokens, transformers

EXPECTED = {"mamba2", "nemotron_h", "bamba", "granitemoehybrid", "qwen3_next", "qwen3_5_text", "qwen3_5_moe_text",
            "olmo_hybrid", "gated_deltanet", "delta_net", "recurrent_gemma", "jamba", "zamba2", "falcon_h1"}


def _tiny_mamba2(path, groups: int = 1):
    tf = transformers()
    config = tf.Mamba2Config(vocab_size=64, hidden_size=32, num_hidden_layers=2, num_heads=4, head_dim=16,
                             state_size=8, n_groups=groups, expand=2, chunk_size=8)
    model = tf.Mamba2ForCausalLM(config).float().eval()
    perturb(model)
    model.save_pretrained(path)
    return model


def test_list_names_every_architecture(capsys):
    assert main(["convert", "--list"]) == 0
    listed = {line.split()[0] for line in capsys.readouterr().out.splitlines()}
    assert EXPECTED <= listed, f"missing: {EXPECTED - listed}"


def test_cli_roundtrip_hf_megahybrid_hf(tmp_path, capsys):
    """HF -> megahybrid -> HF through the command line; the source architecture is remembered, so
    the second call needs no --arch."""
    model = _tiny_mamba2(tmp_path / "hf")
    assert main(["convert", str(tmp_path / "hf"), str(tmp_path / "mh"), "--to", "megahybrid"]) == 0
    assert main(["convert", str(tmp_path / "mh"), str(tmp_path / "back"), "--to", "hf"]) == 0
    tf = transformers()
    back = tf.AutoModelForCausalLM.from_pretrained(tmp_path / "back", dtype=torch.float32).eval()
    ids = tokens(64)
    assert_logits("HF -> megahybrid -> HF logits", hf_logits(model, ids), hf_logits(back, ids))


def test_unsupported_architecture_lists_supported(tmp_path, capsys):
    (tmp_path / "llama").mkdir()
    (tmp_path / "llama" / "config.json").write_text(json.dumps({"model_type": "llama"}))
    assert main(["convert", str(tmp_path / "llama"), str(tmp_path / "out"), "--to", "megahybrid"]) == 2
    err = capsys.readouterr().err
    assert "'llama' is not supported; supported:" in err and "jamba" in err and "zamba2" in err


def test_shape_mismatch_names_tensor_and_both_shapes(tmp_path, capsys):
    _tiny_mamba2(tmp_path / "hf")
    tensors = load_file(tmp_path / "hf" / "model.safetensors")
    tensors["backbone.layers.1.mixer.out_proj.weight"] = torch.zeros(32, 60)
    save_file(tensors, str(tmp_path / "hf" / "model.safetensors"), metadata={"format": "pt"})
    assert main(["convert", str(tmp_path / "hf"), str(tmp_path / "out"), "--to", "megahybrid"]) == 2
    err = capsys.readouterr().err
    assert "'layers.1.mixer.out_proj.weight' has shape (32, 60)" in err and "(32, 64)" in err


def test_missing_tensor_is_named(tmp_path, capsys):
    _tiny_mamba2(tmp_path / "hf")
    tensors = load_file(tmp_path / "hf" / "model.safetensors")
    del tensors["backbone.layers.0.mixer.A_log"]
    save_file(tensors, str(tmp_path / "hf" / "model.safetensors"), metadata={"format": "pt"})
    assert main(["convert", str(tmp_path / "hf"), str(tmp_path / "out"), "--to", "megahybrid"]) == 2
    assert "'backbone.layers.0.mixer.A_log' is missing" in capsys.readouterr().err


def test_to_hf_without_known_architecture_asks_for_arch(tmp_path, capsys):
    """A megahybrid run (trained here, not converted) records no HF architecture."""
    from megahybrid import build_model, load_config
    from megahybrid.convert import native

    config = load_config("MM", ["model.hidden_size=32", "model.vocab_size=64", "model.mamba2.head_dim=16",
                                "model.mamba2.state_size=8"])
    native.write(tmp_path / "mh", config, build_model(config).state_dict())
    assert main(["convert", str(tmp_path / "mh"), str(tmp_path / "out"), "--to", "hf"]) == 2
    assert "needs --arch" in capsys.readouterr().err
    assert main(["convert", str(tmp_path / "mh"), str(tmp_path / "out"), "--to", "hf", "--arch", "mamba2"]) == 0


def test_hf_to_megatron_and_back_is_lossless(tmp_path):
    """HF -> Megatron dist checkpoint (TP=2, two gloo ranks) -> megahybrid: every tensor equal to the
    direct HF -> megahybrid conversion, bit for bit."""
    from megahybrid.convert import read

    _tiny_mamba2(tmp_path / "hf", groups=2)  # Megatron splits the B/C groups over TP ranks
    assert main(["convert", str(tmp_path / "hf"), str(tmp_path / "mcore"), "--to", "megatron", "--tp", "2"]) == 0
    _, direct, _ = read(tmp_path / "hf")
    _, via_megatron, _ = read(tmp_path / "mcore")
    assert direct.keys() == via_megatron.keys()
    for key in direct:
        assert torch.equal(direct[key], via_megatron[key]), key
