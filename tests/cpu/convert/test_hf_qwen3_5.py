"""Qwen3.5 (dense and MoE text classes) <-> megahybrid: logits parity both ways (flat GDN in_proj_qkv/z/b/a,
Hv = 2 Hk, gated attention with GQA and partial rotary, tied/untied), the multimodal class's language
model imported and exported as the text class, and the refusals."""

import pytest
import torch

from tests.convert_checks import assert_logits, hf_logits, roundtrip, tokens, transformers

LAYER_TYPES = ["linear_attention", "full_attention", "linear_attention", "full_attention"]


def text_fields(**overrides):
    return dict(vocab_size=96, hidden_size=32, num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=2,
                head_dim=16, linear_num_key_heads=2, linear_num_value_heads=4, linear_key_head_dim=8,
                linear_value_head_dim=12, linear_conv_kernel_dim=4, layer_types=LAYER_TYPES,
                rope_parameters={"rope_type": "default", "rope_theta": 10000.0, "partial_rotary_factor": 0.5},
                ) | overrides


def dense_config(**overrides):
    return transformers().Qwen3_5TextConfig(**text_fields(intermediate_size=48, **overrides))


def moe_config(**overrides):
    return transformers().Qwen3_5MoeTextConfig(**text_fields(
        moe_intermediate_size=16, shared_expert_intermediate_size=24, num_experts=4, num_experts_per_tok=2,
        **overrides))


@pytest.mark.parametrize("tied", [False, True])
def test_dense_roundtrip(tmp_path, tied):
    roundtrip(tmp_path, transformers().Qwen3_5ForCausalLM(dense_config(tie_word_embeddings=tied)))


@pytest.mark.parametrize("tied", [False, True])
def test_moe_roundtrip(tmp_path, tied):
    roundtrip(tmp_path, transformers().Qwen3_5MoeForCausalLM(moe_config(tie_word_embeddings=tied)))


def test_multimodal_language_model_imports_and_exports_as_text(tmp_path):
    """Qwen3_5ForConditionalGeneration (nested text_config, model.language_model.*, model.visual.*):
    its text logits == megahybrid's; the export loads as Qwen3_5ForCausalLM with the same logits."""
    tf = transformers()
    vision = dict(depth=1, hidden_size=16, intermediate_size=32, num_heads=2, out_hidden_size=32, patch_size=4,
                  temporal_patch_size=1, spatial_merge_size=1)
    config = tf.Qwen3_5Config(text_config=text_fields(intermediate_size=48), vision_config=vision,
                              image_token_id=90, video_token_id=91, vision_start_token_id=92, vision_end_token_id=93)
    from megahybrid.convert import convert, load_reference
    from tests.convert_checks import perturb

    vlm = tf.Qwen3_5ForConditionalGeneration(config).float().eval()
    perturb(vlm)
    ids = tokens(96)  # text only: below the image/video token ids
    expected = hf_logits(vlm, ids)
    vlm.save_pretrained(tmp_path / "hf")
    convert(tmp_path / "hf", tmp_path / "mh", to="megahybrid")
    ours, _ = load_reference(tmp_path / "mh")
    with torch.no_grad():
        assert_logits("megahybrid logits vs HF vision-language model", expected, ours(ids))
    convert(tmp_path / "mh", tmp_path / "text", to="hf", arch="qwen3_5_text")
    text, info = tf.Qwen3_5ForCausalLM.from_pretrained(tmp_path / "text", output_loading_info=True)
    assert not any(info[k] for k in ("missing_keys", "unexpected_keys", "mismatched_keys")), info
    assert_logits("exported text model vs HF vision-language model", expected, hf_logits(text.eval(), ids))


def test_multimodal_export_is_refused_with_the_text_arch_named(tmp_path):
    import megahybrid
    from megahybrid.convert import ConversionError
    from megahybrid.convert.base import get

    model = get("qwen3_5_text").config_from_hf(dense_config().to_dict())
    with pytest.raises(ConversionError, match="--arch qwen3_5: .*--arch qwen3_5_text"):
        get("qwen3_5").config_to_hf(megahybrid.load_config({"model": model}).model)


def test_dense_class_refuses_moe_layers():
    import megahybrid
    from megahybrid.convert import ConversionError
    from megahybrid.convert.base import get

    model = get("qwen3_5_moe_text").config_from_hf(moe_config().to_dict())
    config = megahybrid.load_config({"model": model}).model
    with pytest.raises(ConversionError, match="model.pattern='G\\*?E.*Qwen3_5ForCausalLM has a dense MLP"):
        get("qwen3_5_text").config_to_hf(config)
    config.moe.norm_topk_prob = False
    with pytest.raises(ConversionError, match="model.moe.norm_topk_prob=False"):
        get("qwen3_5_moe_text").config_to_hf(config)
