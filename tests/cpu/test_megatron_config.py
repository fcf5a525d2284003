"""Config -> Megatron TransformerConfig (megahybrid/megatron/transformer_config.py) on CPU: the fields
land where Megatron reads them, and what Megatron cannot build is a one-line ConfigError."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from megahybrid import load_config
from megahybrid.config import ConfigError

pytest.importorskip("megatron.core")

from megahybrid.megatron.transformer_config import (  # noqa: E402
    Precision,
    build_transformer_config,
    check_megatron,
)


def tiny(*overrides):
    return load_config("default:tiny", list(overrides))


def test_fields_reach_megatron():
    config = tiny("model.pattern='MG*-E'", "model.moe.num_shared_experts=1", "model.attention.qk_norm=true")
    tc = build_transformer_config(config, Precision(torch.float32))
    m = config.model
    assert (tc.num_layers, tc.hidden_size, tc.num_attention_heads, tc.num_query_groups) == (5, 64, 4, 2)
    assert tc.kv_channels == 16 and tc.qk_layernorm and tc.normalization == "RMSNorm"
    assert tc.activation_func is F.silu and tc.gated_linear_unit
    assert (tc.mamba_state_dim, tc.mamba_head_dim, tc.mamba_num_groups) == (16, 16, 1)
    assert tc.mamba_num_heads == 2 * 64 // 16
    assert (tc.linear_num_key_heads, tc.linear_num_value_heads, tc.linear_key_head_dim) == (2, 4, 16)
    assert tc.num_moe_experts == m.moe.num_experts and tc.moe_router_topk == 2
    assert tc.moe_ffn_hidden_size == 64 and tc.moe_shared_expert_intermediate_size == 64
    assert tc.moe_grouped_gemm and tc.moe_token_dispatcher_type == "alltoall"
    assert tc.moe_aux_loss_coeff == m.moe.aux_loss_coeff and not tc.moe_router_pre_softmax
    assert tc.params_dtype == torch.float32 and not tc.bf16 and tc.fp8 is None
    assert not tc.moe_router_padding_for_quantization


def test_moe_and_gdn_get_their_own_activation():
    """One TransformerConfig has one activation_func; GDN needs silu and MoE may differ from the MLP."""
    from megahybrid.megatron.model import layer_transformer_configs

    config = tiny("model.pattern='G-E'", "model.mlp.activation=relu2", "model.moe.activation=swiglu")
    tc = build_transformer_config(config, Precision(torch.float32))
    configs = layer_transformer_configs(tc, config.model, {"G", "-", "E"})
    assert configs["-"].activation_func.__name__ == "squared_relu" and not configs["-"].gated_linear_unit
    assert configs["G"].activation_func is F.silu
    assert configs["E"].activation_func is F.silu and configs["E"].gated_linear_unit


@pytest.mark.parametrize("overrides,field", [
    (["model.pattern='M*d'"], "'d'"),
    (["model.pattern='Mr-'"], "'r'"),
    (["model.pattern='*-'", "model.attention.bias=true"], "model.attention.bias"),
    (["model.pattern='M-'", "model.mamba2.norm_before_gate=true"], "model.mamba2"),
    (["model.pattern='M-'", "model.mamba2.gated_norm=false"], "model.mamba2.gated_norm"),
    (["model.pattern='p-'"], "'p'"),
    (["model.pattern='G-'", "model.gdn.allow_neg_eigval=true"], "model.gdn.allow_neg_eigval"),
    (["model.pattern='*E'", "model.moe.top_k=1"], "model.moe.norm_topk_prob"),
    (["model.pattern='*E'", "model.moe.router=sigmoid", "model.moe.score_correction_bias=true"],
     "model.moe.score_correction_bias"),
    (["model.pattern='*E'", "model.moe.routed_scaling_factor=2.5"], "model.moe.routed_scaling_factor"),
    (["model.pattern='*E'", "model.moe.num_experts=8", "model.moe.num_groups=2"], "model.moe.num_groups"),
    (["model.pattern='*-'", "parallel.cp=2"], "parallel.cp"),
    (["model.pattern='*E'", "parallel.tp=2"], "parallel.sequence_parallel"),
    (["model.pattern='M*-'", "parallel.recompute_symbols=M"], "parallel.recompute_symbols"),
    (["model.pattern='M*-'", "parallel.recompute=full", "parallel.recompute_symbols=MG"], "parallel.recompute_symbols"),
    (["model.pattern='M*-'", "parallel.recompute=full", "parallel.recompute_modules=[core_attn]"],
     "parallel.recompute_modules"),
    (["model.pattern='*-'", "model.attention.out_bias=true"], "model.attention.out_bias"),
    (["model.pattern='*-'", "model.mlp.activation=geglu_tanh"], "model.mlp.activation"),
    (["model.pattern='*E'", "model.moe.activation=geglu_tanh"], "model.moe.activation"),
])
def test_unbuildable_configs_name_the_field(overrides, field):
    with pytest.raises(ConfigError) as err:
        check_megatron(tiny(*overrides))
    message = str(err.value)
    assert field in message and "\n" not in message
    if field.startswith("'"):
        assert "M G * - E" in message  # says what the megatron backend builds


def test_fp8_widths_must_be_multiples_of_16():
    config = tiny("model.pattern='M-'", "model.mamba2.head_dim=32")  # in_proj 2*128 + 2*16 + 4 = 292
    with pytest.raises(ConfigError, match="multiple of 16"):
        check_megatron(config, Precision(fp8="tensorwise"))
    check_megatron(config)  # fine without FP8


def test_bf16_positions():
    p = Precision(fp8="delayed", bf16_first_layers=1, bf16_last_layers=2, bf16_layers=(3,))
    assert p.bf16_positions(8) == {0, 3, 6, 7}
    assert Precision().bf16_positions(3) == {0, 1, 2}


@pytest.mark.parametrize("overrides,field", [
    (["model.pattern='*-'", "model.post_norm_layers=[0]"], "model.post_norm_layers"),
    (["model.pattern='*-'", "model.attention.qk_norm=true", "model.attention.qk_norm_scope=all_heads"],
     "model.attention.qk_norm_scope"),
    (["model.pattern='G-'", "model.gdn.norm_eps=0.001"], "model.gdn.norm_eps"),
    (["model.pattern='*E'", "model.moe.num_shared_experts=1", "model.moe.shared_expert_gate=true"],
     "model.moe.shared_expert_gate"),
])
def test_hf_conversion_options_are_refused(overrides, field):
    """The options added for OlmoHybrid / Qwen3-Next conversion are reference-backend only."""
    with pytest.raises(ConfigError) as err:
        check_megatron(tiny(*overrides))
    assert str(err.value).startswith(field) and "\n" not in str(err.value)


def test_bench_command_passes_its_options_through(capsys):
    """`megahybrid bench` is megahybrid/megatron/bench.py's own parser (GPU runs; here only its help)."""
    from megahybrid.cli import main

    with pytest.raises(SystemExit) as done:
        main(["bench", "--help"])
    assert done.value.code == 0
    out = capsys.readouterr().out
    assert out.startswith("usage: megahybrid bench") and "--rows" in out and "--impls" in out
