"""megahybrid `Config` -> Megatron-Core `TransformerConfig`, and the FP8 switch.

One function, `build_transformer_config`, translates every field the Megatron backend uses; what
Megatron cannot express raises `ConfigError` naming the field, the value and the fix
(`check_megatron`). Field-by-field:

    model.hidden_size / vocab / norm_eps      hidden_size, layernorm_epsilon
    model.norm = rmsnorm | layernorm          normalization = RMSNorm | LayerNorm
    model.zero_centered_norm                  layernorm_zero_centered_gamma (both store w, use 1 + w)
    model.init_std                            init_method_std; output layers use the same std (the
                                              reference does; Megatron would scale it by 1/sqrt(2L))
    attention.num_heads / num_kv_heads        num_attention_heads / num_query_groups (GQA)
    attention.head_dim / softmax_scale        kv_channels / softmax_scale
    attention.qk_norm / output_gate           qk_layernorm / attention_output_gate
    attention.rope_theta, rotary_fraction     used by the model's RotaryEmbedding (model.py)
    mlp.ffn_hidden_size, activation           ffn_hidden_size, activation_func + gated_linear_unit
    mamba2.state_size/head_dim/num_groups     mamba_state_dim / mamba_head_dim / mamba_num_groups,
    mamba2.expand                             mamba_num_heads = expand * hidden / head_dim
    gdn.*                                     linear_{num_key,num_value}_heads, linear_{key,value}_head_dim,
                                              linear_conv_kernel_dim
    moe.*                                     num_moe_experts, moe_router_topk, moe_ffn_hidden_size,
                                              moe_shared_expert_intermediate_size, moe_aux_loss_coeff,
                                              moe_z_loss_coeff, moe_router_score_function,
                                              moe_router_pre_softmax (= not norm_topk_prob),
                                              moe_expert_capacity_factor (+ drop policy "position")
    parallel.tp/pp/ep/etp/cp/sp               tensor/pipeline/expert/context parallel sizes

Fixed choices: grouped-GEMM experts with the alltoall dispatcher and TE's fused permute; the router
in fp32 (`moe_router_dtype`); no dropout; under FP8 the routed token counts are padded to the FP8
GEMM alignment (`moe_router_padding_for_quantization`, the successor of `moe_router_padding_for_fp8`):
without it the stock HybridModel's FP8 run failed in TE's grouped GEMM ("lda % 16", issue 5).

FP8 (`Precision`): one switch for the whole model. Under it only Transformer Engine modules run in
FP8 - i.e. each mixer's projections (FP8_POLICY); scans, delta-rule cores, convs, gates, norms and
the attention core stay in bf16/fp32. Chosen pattern positions can be pinned to bf16.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Literal, Optional

import torch
import torch.nn.functional as F

from megahybrid.config import ConfigError, fail
from megahybrid.mixers.gated_deltanet import gdn_sizes
from megahybrid.mixers.mamba2 import ssd_sizes
from megahybrid.mixers.mlp import mlp_width
from megahybrid.mixers.moe import expert_width, shared_expert_width
from megahybrid.pattern import resolve_layers

MEGATRON_SYMBOLS = ("M", "G", "*", "-", "E")
"""Pattern symbols the Megatron backend builds (model.py has one layer spec per symbol)."""

FP8_RECIPES = {"delayed": "delayed", "tensorwise": "tensorwise", "blockwise": "blockwise"}
"""Precision.fp8 -> Megatron fp8_recipe (current scaling is Megatron's "tensorwise")."""

FP8_POLICY = {
    "M": "in_proj (with its fused pre-norm), out_proj in FP8; conv1d, SSD scan, gated RMSNorm in bf16/fp32",
    "G": "in_proj (with its fused pre-norm), out_proj in FP8; conv1d, gated delta rule, gates, out_norm in bf16/fp32",
    "*": "linear_qkv (with its fused pre-norm), linear_proj in FP8; softmax attention core in bf16",
    "-": "linear_fc1 (with its fused pre-norm), linear_fc2 in FP8",
    "E": "expert grouped GEMMs (and shared expert) in FP8; router and pre-norm in fp32/bf16",
}
"""What runs in FP8 per mixer under `Precision.fp8`: exactly the Transformer Engine linears. The
embedding and the output layer (Megatron's ColumnParallelLinear, not a TE module) stay in bf16."""


@dataclass
class Precision:
    """Number formats of the Megatron model (the one FP8 switch, style.md rule 5)."""

    params_dtype: torch.dtype = torch.bfloat16
    """Parameter and activation dtype (float32 for exact parity tests)."""
    fp8: Optional[Literal["delayed", "tensorwise", "blockwise"]] = None
    """None = no FP8. delayed = TE delayed scaling; tensorwise = current (per-tensor) scaling;
    blockwise = 1x128 / 128x128 block scaling (TE on Hopper)."""
    fp8_format: Literal["hybrid", "e4m3"] = "hybrid"
    """hybrid: E4M3 forward, E5M2 gradients; e4m3: E4M3 both ways."""
    bf16_first_layers: int = 0
    """Keep the first N pattern positions in bf16 (Nemotron-H keeps the ends unquantised)."""
    bf16_last_layers: int = 0
    """Keep the last N pattern positions in bf16."""
    bf16_layers: tuple[int, ...] = ()
    """Further 0-based pattern positions pinned to bf16."""

    def bf16_positions(self, num_layers: int) -> set[int]:
        """Pattern positions that run without FP8 (all of them when fp8 is None)."""
        if self.fp8 is None:
            return set(range(num_layers))
        out = set(self.bf16_layers) | set(range(min(self.bf16_first_layers, num_layers)))
        out |= set(range(max(0, num_layers - self.bf16_last_layers), num_layers))
        return out


def _activation(name: str):
    """megahybrid activation -> (Megatron activation_func, gated_linear_unit)."""
    from megatron.core.activations import squared_relu

    return {"swiglu": (F.silu, True), "geglu": (F.gelu, True), "relu2": (squared_relu, False),
            "gelu": (F.gelu, False), "silu": (F.silu, False)}[name]


def check_megatron(config, precision: Optional[Precision] = None) -> list:
    """Raise ConfigError for anything the Megatron backend cannot build; return the LayerSpecs."""
    m = getattr(config, "model", config)
    specs = resolve_layers(config)
    symbols = {s.symbol for s in specs}
    other = sorted(symbols - set(MEGATRON_SYMBOLS))
    if other:
        fail("model.pattern", m.pattern or m.layers or m.backbone,
             f"has {', '.join(repr(s) for s in other)}, which the megatron backend does not build yet; it "
             f"builds {' '.join(MEGATRON_SYMBOLS)} (Mamba2, Gated DeltaNet, attention, MLP, MoE) - use "
             "backend='reference' for the others")
    if any(s.mtp_depth for s in specs):
        fail("model.pattern", m.pattern, "has an MTP ('/') part, which the megatron backend does not build yet; remove it")
    if m.residual_scale != 1.0:
        fail("model.residual_scale", m.residual_scale, "the megatron backend's layers add the sublayer output "
             "unscaled; set it to 1.0 (or fold the scale into each sublayer's output projection)")
    if m.post_norm_layers:
        fail("model.post_norm_layers", m.post_norm_layers, "the megatron backend's layers are pre-norm; set it to "
             "null or use backend='reference'")
    if m.adapters.method != "none":
        fail("model.adapters.method", m.adapters.method, "adapters are not built by the megatron backend yet; set it "
             "to 'none' or use backend='reference'")
    if m.hyper_connections.streams != 1:
        fail("model.hyper_connections.streams", m.hyper_connections.streams, "mHC hyper-connections are not built by "
             "the megatron backend; set it to 1 or use backend='reference'")
    if m.mod.layers:
        fail("model.mod.layers", m.mod.layers, "Mixture-of-Depths routing is not built by the megatron backend; set "
             "it to [] or use backend='reference'")
    if "*" in symbols and m.attention.qk_norm and m.attention.qk_norm_scope != "head":
        fail("model.attention.qk_norm_scope", m.attention.qk_norm_scope, "Megatron's QK layernorm is per head; "
             "use 'head' or backend='reference'")
    if "G" in symbols and m.gdn.norm_eps is not None and m.gdn.norm_eps != m.norm_eps:
        fail("model.gdn.norm_eps", m.gdn.norm_eps, f"Megatron's GatedDeltaNet norm uses model.norm_eps={m.norm_eps}; "
             "set it to null")
    if "E" in symbols and m.moe.shared_expert_gate:
        # Megatron has it (moe_shared_expert_gate, shared_experts.gate_weight) but megatron/mapping.py does not.
        fail("model.moe.shared_expert_gate", True, "is not wired to the megatron backend's name mapping yet; "
             "set it to false or use backend='reference'")
    a = m.attention
    if "*" in symbols:
        if a.sparsity.kind != "none":
            fail("model.attention.sparsity.kind", a.sparsity.kind, "the megatron backend's attention is dense; "
                 "set it to 'none' or use backend='reference'")
        if a.bias:
            fail("model.attention.bias", a.bias, "the megatron backend builds bias-free linears; set it to false")
        if a.out_bias:
            fail("model.attention.out_bias", a.out_bias, "the megatron backend builds bias-free linears; set it "
                 "to false or null")
        if a.rope_theta > 0 and a.rotary_fraction * (a.head_dim or m.hidden_size // a.num_heads) % 2:
            fail("model.attention.rotary_fraction", a.rotary_fraction, "must rotate an even number of channels")
    if symbols & {"-", "E"} and m.mlp.bias:
        fail("model.mlp.bias", True, "the megatron backend builds bias-free MLPs; set it to false")
    for part, symbol in (("mlp", "-"), ("moe", "E")):
        if symbol in symbols and getattr(m, part).activation == "geglu_tanh":
            fail(f"model.{part}.activation", "geglu_tanh", "the megatron backend's GLU uses the exact GELU; use "
                 "geglu (or backend='reference')")
    if "M" in symbols:
        c = m.mamba2
        if c.use_bias or not c.use_conv_bias or c.norm_before_gate:
            fail("model.mamba2", {"use_bias": c.use_bias, "use_conv_bias": c.use_conv_bias,
                                  "norm_before_gate": c.norm_before_gate},
                 "Megatron's MambaMixer needs use_bias=false, use_conv_bias=true, norm_before_gate=false")
        if tuple(c.dt_limit) != (0.0, float("inf")):
            fail("model.mamba2.dt_limit", c.dt_limit, "Megatron's MambaMixer has no dt clamp; use [0, inf]")
        if not c.gated_norm:
            fail("model.mamba2.gated_norm", False, "Megatron's MambaMixer always has its gated RMSNorm; set it to true")
    if "G" in symbols:
        if m.gdn.allow_neg_eigval:
            fail("model.gdn.allow_neg_eigval", True, "Megatron's GatedDeltaNet has beta in (0, 1); set it to false")
        if m.norm != "rmsnorm":
            fail("model.norm", m.norm, "Gated DeltaNet's output norm is an RMSNorm, and Megatron builds it from "
                 "model.norm; use rmsnorm")
    if "E" in symbols:
        moe = m.moe
        if moe.router == "softmax" and moe.top_k == 1 and moe.norm_topk_prob:
            fail("model.moe.norm_topk_prob", True, "top-1 routing in Megatron weights the expert by its softmax "
                 "probability (pre-softmax router); set it to false")
        if moe.router == "sigmoid" and not moe.norm_topk_prob and moe.top_k > 1:
            fail("model.moe.norm_topk_prob", False, "Megatron renormalises sigmoid top-k scores; set it to true")
        if moe.capacity_factor is not None and precision is not None and precision.fp8:
            fail("model.moe.capacity_factor", moe.capacity_factor, "FP8 routing pads expert inputs; use dropless (null)")
        deepseek = {"score_correction_bias": (moe.score_correction_bias, False),
                    "routed_scaling_factor": (moe.routed_scaling_factor, 1.0), "num_groups": (moe.num_groups, 1)}
        for name, (value, default) in deepseek.items():
            if value != default:  # Megatron has them (expert_bias, group-limited routing) but the mapping does not
                fail(f"model.moe.{name}", value, "is not wired to the megatron backend yet (NemotronH/DeepSeek-V3 "
                     f"routing); set it to {default} or use backend='reference'")
    p = getattr(config, "parallel", None)
    if p is not None:
        if p.tp > 1 and "E" in symbols and not p.sequence_parallel:
            fail("parallel.sequence_parallel", False, f"Megatron's MoE layer refuses to train under tensor "
                 f"parallelism (parallel.tp={p.tp}) without sequence parallelism; set it to true")
        if p.cp != 1:
            fail("parallel.cp", p.cp, "the megatron backend does not train under context parallelism yet "
                 "(state passing runs on the reference backend: train.backend=reference); set it to 1")
        if p.recompute == "full" and precision is not None and precision.fp8 is not None:
            fail("parallel.recompute", p.recompute, "full recompute under FP8 is not wired in the megatron "
                 "backend (it needs TE's checkpoint with the per-layer FP8 contexts); use 'selective' or 'none'")
        if p.recompute_symbols is not None:
            if p.recompute != "full":
                fail("parallel.recompute_symbols", p.recompute_symbols, f"applies to recompute='full' only (it is "
                     f"{p.recompute!r}); set parallel.recompute=full or remove it")
            unknown = sorted(set(p.recompute_symbols) - symbols)
            if unknown:
                fail("parallel.recompute_symbols", p.recompute_symbols, f"{', '.join(map(repr, unknown))} not in "
                     f"the pattern's layers ({''.join(sorted(symbols))})")
        if p.recompute_modules is not None and p.recompute != "selective":
            fail("parallel.recompute_modules", p.recompute_modules, f"applies to recompute='selective' only (it "
                 f"is {p.recompute!r}); set parallel.recompute=selective or remove it")
    if precision is not None and precision.fp8 is not None:
        if precision.fp8 not in FP8_RECIPES:
            fail("precision.fp8", precision.fp8, f"must be one of {list(FP8_RECIPES)} or None")
        if "M" in symbols:
            d_inner, nh, G, N, _ = ssd_sizes(m)
            width = 2 * d_inner + 2 * G * N + nh
            if width % 16:
                fail("model.mamba2", {"state_size": N, "num_groups": G},
                     f"FP8 needs the Mamba in_proj width {width} (2*d_inner + 2*G*N + heads) to be a multiple of 16")
        if "G" in symbols:
            Hk, Hv, dk, dv = gdn_sizes(m)
            width = 2 * Hk * dk + 2 * Hv * dv + 2 * Hv
            if width % 16:
                fail("model.gdn", {"num_qk_heads": Hk, "num_v_heads": Hv},
                     f"FP8 needs the GDN in_proj width {width} to be a multiple of 16")
    return specs


def build_transformer_config(config, precision: Optional[Precision] = None, **overrides):
    """Config -> Megatron `TransformerConfig` for the whole model. `overrides` set further
    TransformerConfig fields (e.g. a layer-specific activation_func, see model.py)."""
    from megatron.core.transformer.transformer_config import TransformerConfig

    precision = precision or Precision()
    specs = check_megatron(config, precision)
    m = getattr(config, "model", config)
    symbols = {s.symbol for s in specs}
    a = m.attention
    head_dim = a.head_dim or m.hidden_size // a.num_heads
    # The dense MLP's activation is the model-wide default; MoE and GDN layers get their own copy
    # of the config when theirs differs (model.py, `layer_config`).
    act = m.mlp.activation if "-" in symbols or "E" not in symbols else m.moe.activation
    activation_func, glu = _activation(act)
    init = _normal_init(m.init_std)
    kwargs = dict(
        num_layers=len(specs),
        hidden_size=m.hidden_size,
        num_attention_heads=a.num_heads,
        num_query_groups=a.num_kv_heads or a.num_heads,
        kv_channels=head_dim,
        softmax_scale=a.softmax_scale,
        qk_layernorm=a.qk_norm,
        attention_output_gate=a.output_gate,
        ffn_hidden_size=mlp_width(m),
        activation_func=activation_func,
        gated_linear_unit=glu,
        bias_activation_fusion=glu and activation_func is F.silu,
        normalization="RMSNorm" if m.norm == "rmsnorm" else "LayerNorm",
        layernorm_epsilon=m.norm_eps,
        layernorm_zero_centered_gamma=m.zero_centered_norm,
        add_bias_linear=False,
        add_qkv_bias=False,
        hidden_dropout=0.0,
        attention_dropout=0.0,
        bias_dropout_fusion=True,
        init_method_std=m.init_std,
        init_method=init,
        output_layer_init_method=init,
        params_dtype=precision.params_dtype,
        bf16=precision.params_dtype == torch.bfloat16,
        pipeline_dtype=precision.params_dtype,
        is_hybrid_model=True,
        # The LM head's loss in one TE kernel on the bf16 logits (no fp32 copy of the [tokens, vocab]
        # logits; the gradient is written in place). Megatron's default is off; at vocab 131072 the
        # unfused fp32 loss was most of a step's time (README, "Megatron backend").
        cross_entropy_loss_fusion=have_transformer_engine(),
        cross_entropy_fusion_impl="te",
    )
    if "M" in symbols:
        d_inner, nh, G, N, P = ssd_sizes(m)
        kwargs.update(mamba_state_dim=N, mamba_head_dim=P, mamba_num_groups=G, mamba_num_heads=nh,
                      use_mamba_mem_eff_path=have_causal_conv1d())
    if "G" in symbols:
        Hk, Hv, dk, dv = gdn_sizes(m)
        kwargs.update(linear_num_key_heads=Hk, linear_num_value_heads=Hv, linear_key_head_dim=dk,
                      linear_value_head_dim=dv, linear_conv_kernel_dim=m.gdn.conv_kernel)
    if "E" in symbols:
        moe = m.moe
        kwargs.update(
            num_moe_experts=moe.num_experts,
            moe_router_topk=moe.top_k,
            moe_ffn_hidden_size=expert_width(m),
            moe_shared_expert_intermediate_size=shared_expert_width(m) or None,
            moe_grouped_gemm=True,
            moe_token_dispatcher_type="alltoall",
            moe_permute_fusion=have_transformer_engine(),  # TE's fused permute (False only on CPU CI)
            moe_router_dtype="fp32",
            moe_router_score_function=moe.router,
            moe_router_pre_softmax=moe.router == "softmax" and not moe.norm_topk_prob,
            moe_router_load_balancing_type="aux_loss" if moe.aux_loss_coeff > 0 else "none",
            moe_aux_loss_coeff=moe.aux_loss_coeff,
            moe_z_loss_coeff=moe.z_loss_coeff or None,
            moe_expert_capacity_factor=moe.capacity_factor,
            moe_token_drop_policy="position",
            moe_router_padding_for_quantization=precision.fp8 is not None,
        )
    p = getattr(config, "parallel", None)
    if p is not None:
        kwargs.update(tensor_model_parallel_size=p.tp, pipeline_model_parallel_size=p.pp,
                      virtual_pipeline_model_parallel_size=p.vpp,
                      expert_model_parallel_size=p.ep, expert_tensor_parallel_size=p.etp or p.tp,
                      context_parallel_size=p.cp, sequence_parallel=p.sequence_parallel)
        if p.recompute == "selective":  # full recompute is per layer in model.py (Decoder), not Megatron's
            kwargs.update(recompute_granularity="selective", recompute_modules=p.recompute_modules)
    if precision.fp8 is not None:
        # Pinned positions are handled per layer by model.py (Precision.bf16_positions), not by
        # Megatron's first_last_layers_bf16, so any set of positions can be pinned.
        kwargs.update(fp8=precision.fp8_format, fp8_recipe=FP8_RECIPES[precision.fp8])
        if precision.fp8 == "delayed":
            kwargs.update(fp8_amax_history_len=1024, fp8_amax_compute_algo="max")
    kwargs.update(overrides)
    try:
        return TransformerConfig(**kwargs)
    except (AssertionError, ValueError) as e:  # Megatron's own checks; keep them one line
        raise ConfigError(f"model: Megatron's TransformerConfig rejected the translated config: {e}") from e


def layer_config(tc, **changes):
    """A copy of TransformerConfig `tc` with `changes` (a layer whose activation differs)."""
    if all(getattr(tc, k) == v for k, v in changes.items()):
        return tc
    return dataclasses.replace(tc, **changes)


def _normal_init(std: float):
    def init(tensor):
        return torch.nn.init.normal_(tensor, mean=0.0, std=std)

    return init


def have_transformer_engine() -> bool:
    try:
        import transformer_engine.pytorch  # noqa: F401
    except ImportError:
        return False
    return True


def have_causal_conv1d() -> bool:
    """True when the `causal_conv1d` CUDA extension imports (Megatron's fused Mamba path)."""
    try:
        import causal_conv1d  # noqa: F401
    except ImportError:
        return False
    return True

