"""transformers `JambaForCausalLM` (model_type `jamba`, AI21, Lieber et al. 2024, arXiv 2403.19887).

Each HF layer is a mixer (Mamba1, or attention every `attn_layer_period` layers from
`attn_layer_offset`) followed by an FFN (MoE every `expert_layer_period` layers from
`expert_layer_offset`, else a dense SwiGLU MLP): two megahybrid blocks, `m`/`*` then `-`/`E`.

On disk: `model.{embed_tokens, final_layernorm}`, `lm_head`, and per layer `model.layers.{i}.`
`{input_layernorm, pre_ff_layernorm}`, `mamba.*` (megahybrid's Mamba1 names, with the dt/B/C
RMSNorms), `self_attn.{q,k,v,o}_proj` (no bias, no positional embedding: `attention.rope_theta = 0`),
`feed_forward.{gate,up,down}_proj` or `feed_forward.router` + per-expert
`feed_forward.experts.{e}.{gate,up,down}_proj` (fused to megahybrid's `gate_up_proj`/`down_proj`).
Routing: softmax, top-k, the top-k weights not renormalised (`moe.norm_topk_prob = false`).
Nothing is folded. Unsupported: `hidden_act` other than silu (it is both the FFN's and the Mamba
conv's activation in Jamba; megahybrid's Mamba1 conv is silu).
"""

from __future__ import annotations

import math

from megahybrid.convert.base import ConversionError, HFArchitecture, Tensors, register, unsupported
from megahybrid.convert.hf_common import copy, experts_from_hub, experts_to_hub, finish_from_hf, finish_to_hf
from megahybrid.mixers.mlp import mlp_width
from megahybrid.mixers.moe import expert_width
from megahybrid.pattern import resolve_layers

ATTENTION_KEYS = ("q_proj.weight", "k_proj.weight", "v_proj.weight", "o_proj.weight")
MLP_KEYS = ("gate_proj.weight", "up_proj.weight", "down_proj.weight")
MIXERS, CHANNELS = ("m", "*"), ("-", "E")


def _periodic(index: int, period: int, offset: int) -> bool:
    return index % period == offset


def config_from_hf(hf: dict) -> dict:
    if hf.get("hidden_act", "silu") != "silu":
        raise ConversionError(f"HF config: hidden_act={hf['hidden_act']!r}: megahybrid's Jamba layers (SwiGLU "
                              "FFN, Mamba1 conv) use silu only")
    hidden, heads, layers = hf["hidden_size"], hf["num_attention_heads"], hf["num_hidden_layers"]
    num_experts = hf.get("num_experts", hf.get("num_local_experts", 16))
    pattern = ""
    for i in range(layers):
        attention = _periodic(i, hf.get("attn_layer_period", 8), hf.get("attn_layer_offset", 4))
        moe = num_experts > 1 and _periodic(i, hf.get("expert_layer_period", 2), hf.get("expert_layer_offset", 1))
        pattern += ("*" if attention else "m") + ("E" if moe else "-")
    dt_rank = hf.get("mamba_dt_rank", "auto")
    return {
        "pattern": pattern,
        "hidden_size": hidden,
        "vocab_size": hf["vocab_size"],
        "norm_eps": hf.get("rms_norm_eps", 1e-6),
        "tie_embeddings": hf.get("tie_word_embeddings", False),
        "init_std": hf.get("initializer_range", 0.02),
        "attention": {"num_heads": heads, "num_kv_heads": hf.get("num_key_value_heads") or heads,
                      "head_dim": hf.get("head_dim") or hidden // heads, "rope_theta": 0.0},
        "mamba1": {"state_size": hf.get("mamba_d_state", 16), "expand": hf.get("mamba_expand", 2),
                   "conv_kernel": hf.get("mamba_d_conv", 4),
                   "dt_rank": math.ceil(hidden / 16) if dt_rank == "auto" else dt_rank,
                   "inner_layernorms": True, "use_conv_bias": hf.get("mamba_conv_bias", True),
                   "use_bias": hf.get("mamba_proj_bias", False)},
        "mlp": {"ffn_hidden_size": hf["intermediate_size"], "activation": "swiglu"},
        "moe": {"num_experts": max(num_experts, 1), "top_k": min(hf.get("num_experts_per_tok", 2), num_experts),
                "ffn_hidden_size": hf["intermediate_size"], "activation": "swiglu", "router": "softmax",
                "norm_topk_prob": False, "aux_loss_coeff": hf.get("router_aux_loss_coef", 0.001)},
    }


def period_and_offset(flags: list[bool], field: str) -> tuple[int, int]:
    """The smallest (period, offset) with flags[i] == (i % period == offset) for every layer; with no
    flag set, a period longer than the model (Jamba needs offset < period)."""
    n = len(flags)
    if not any(flags):
        return n + 1, n
    for period in range(1, n + 1):
        for offset in range(period):
            if all(f == _periodic(i, period, offset) for i, f in enumerate(flags)):
                return period, offset
    where = [i for i, f in enumerate(flags) if f]
    raise unsupported("pattern", field, f"Jamba places these layers every `period` layers from an offset; "
                      f"HF layers {where} do not follow one period")


def _hf_layers(m) -> list[tuple[str, str]]:
    """The pattern as Jamba layers: (mixer, channel) symbol pairs."""
    symbols = [s.symbol for s in resolve_layers(m)]
    pairs = list(zip(symbols[0::2], symbols[1::2]))
    if len(symbols) % 2 or any(a not in MIXERS or b not in CHANNELS for a, b in pairs):
        raise unsupported("pattern", m.pattern, "JambaForCausalLM layers are a Mamba1 ('m') or attention ('*') "
                          "mixer followed by an MLP ('-') or MoE ('E'), e.g. '(m-mE*-mE)x2'")
    return pairs


def _check_expressible(m, symbols: set) -> None:
    if m.norm != "rmsnorm" or m.zero_centered_norm:
        raise unsupported("norm", m.norm, "Jamba has plain RMSNorm (zero_centered_norm=false)")
    for field, value, plain in (("embedding_scale", m.embedding_scale, 1.0), ("logit_scale", m.logit_scale, 1.0),
                                ("residual_scale", m.residual_scale, 1.0), ("logit_softcap", m.logit_softcap, None),
                                ("post_norm_layers", getattr(m, "post_norm_layers", None), None)):
        if value != plain and value:
            raise unsupported(field, value, f"JambaForCausalLM has no such multiplier; it must be {plain}")
    a = m.attention
    if "*" in symbols:
        head_dim = a.head_dim or m.hidden_size // a.num_heads
        if a.rope_theta != 0:
            raise unsupported("attention.rope_theta", a.rope_theta, "Jamba's attention has no positional "
                              "embedding; it must be 0")
        if a.qk_norm or a.output_gate or a.bias or getattr(a, "out_bias", None):
            raise unsupported("attention", "qk_norm/output_gate/bias", "Jamba's attention has none of them")
        if a.softmax_scale is not None and a.softmax_scale != head_dim ** -0.5:
            raise unsupported("attention.softmax_scale", a.softmax_scale, "Jamba scales scores by head_dim**-0.5")
    if "m" in symbols and not m.mamba1.inner_layernorms:
        raise unsupported("mamba1.inner_layernorms", False, "Jamba's Mamba1 always has its dt/B/C RMSNorms")
    widths = set()
    if "-" in symbols:
        if m.mlp.activation != "swiglu" or m.mlp.bias:
            raise unsupported("mlp.activation", m.mlp.activation, "Jamba's MLP is a bias-free SwiGLU")
        widths.add(mlp_width(m))
    if "E" in symbols:
        moe = m.moe
        if moe.activation != "swiglu" or moe.router != "softmax" or moe.norm_topk_prob:
            raise unsupported("moe", {"activation": moe.activation, "router": moe.router,
                                      "norm_topk_prob": moe.norm_topk_prob},
                              "Jamba routes by softmax top-k without renormalising, to SwiGLU experts")
        extras = {"num_shared_experts": moe.num_shared_experts, "capacity_factor": moe.capacity_factor,
                  "routed_scaling_factor": getattr(moe, "routed_scaling_factor", 1.0) != 1.0,
                  "score_correction_bias": getattr(moe, "score_correction_bias", False),
                  "num_groups": getattr(moe, "num_groups", 1) != 1}
        used = {k: v for k, v in extras.items() if v}
        if used:
            name = next(iter(used))
            raise unsupported(f"moe.{name}", getattr(moe, name), "Jamba's MoE has no shared experts, capacity, "
                              "scaling, score bias or expert groups")
        widths.add(expert_width(m))
    if len(widths) > 1:
        raise unsupported("moe.ffn_hidden_size", m.moe.ffn_hidden_size, f"Jamba has one intermediate_size for "
                          f"the MLP and the experts; the MLP is {mlp_width(m)} wide")


def config_to_hf(m) -> dict:
    pairs = _hf_layers(m)
    _check_expressible(m, {s for pair in pairs for s in pair})
    a, mm = m.attention, m.mamba1
    attn_period, attn_offset = period_and_offset([mixer == "*" for mixer, _ in pairs], "attention layers")
    moe_period, moe_offset = period_and_offset([channel == "E" for _, channel in pairs], "MoE layers")
    has_moe = any(channel == "E" for _, channel in pairs)
    width = expert_width(m) if has_moe else mlp_width(m)
    hf = {
        "model_type": "jamba", "architectures": ["JambaForCausalLM"],
        "hidden_size": m.hidden_size, "vocab_size": m.vocab_size, "num_hidden_layers": len(pairs),
        "intermediate_size": width, "hidden_act": "silu", "rms_norm_eps": m.norm_eps,
        "tie_word_embeddings": m.tie_embeddings, "initializer_range": m.init_std,
        "num_attention_heads": a.num_heads, "num_key_value_heads": a.num_kv_heads or a.num_heads,
        "attn_layer_period": attn_period, "attn_layer_offset": attn_offset,
        "expert_layer_period": moe_period, "expert_layer_offset": moe_offset,
        "num_experts": m.moe.num_experts if has_moe else 1,
        "num_experts_per_tok": m.moe.top_k if has_moe else 1,
        "router_aux_loss_coef": m.moe.aux_loss_coeff,
        "mamba_d_state": mm.state_size, "mamba_d_conv": mm.conv_kernel, "mamba_expand": mm.expand,
        "mamba_dt_rank": mm.dt_rank or math.ceil(m.hidden_size / 16), "mamba_conv_bias": mm.use_conv_bias,
        "mamba_proj_bias": mm.use_bias, "max_position_embeddings": m.max_seq_len,
    }
    head_dim = a.head_dim or m.hidden_size // a.num_heads
    if head_dim != m.hidden_size // a.num_heads:
        hf["head_dim"] = head_dim  # JambaAttention reads it when present
    return hf


def _mamba_keys(m) -> list[str]:
    keys = ["in_proj.weight", "conv1d.weight", "x_proj.weight", "dt_proj.weight", "dt_proj.bias", "A_log", "D",
            "out_proj.weight", "dt_layernorm.weight", "b_layernorm.weight", "c_layernorm.weight"]
    if m.mamba1.use_conv_bias:
        keys.append("conv1d.bias")
    if m.mamba1.use_bias:
        keys += ["in_proj.bias", "out_proj.bias"]
    return keys


def state_from_hf(hf: Tensors, m) -> dict:
    out = {"embedding.weight": hf.pop("model.embed_tokens.weight"),
           "final_norm.weight": hf.pop("model.final_layernorm.weight")}
    for j, (mixer, channel) in enumerate(_hf_layers(m)):
        src, mix, ffn = f"model.layers.{j}.", f"layers.{2 * j}.", f"layers.{2 * j + 1}."
        out[mix + "norm.weight"] = hf.pop(src + "input_layernorm.weight")
        out[ffn + "norm.weight"] = hf.pop(src + "pre_ff_layernorm.weight")
        if mixer == "m":
            copy(hf, src + "mamba.", out, mix + "mixer.", _mamba_keys(m))
        else:
            copy(hf, src + "self_attn.", out, mix + "mixer.", ATTENTION_KEYS)
        if channel == "-":
            copy(hf, src + "feed_forward.", out, ffn + "mixer.", MLP_KEYS)
        else:
            out[ffn + "mixer.router.weight"] = hf.pop(src + "feed_forward.router.weight")
            fused = experts_from_hub(hf, src + "feed_forward.experts.", m.moe.num_experts, gated=True)
            out.update({f"{ffn}mixer.experts.{k}": v for k, v in fused.items()})
    return finish_from_hf(hf, m, out)


def state_to_hf(ref: Tensors, m) -> dict:
    out = {"model.embed_tokens.weight": ref.pop("embedding.weight"),
           "model.final_layernorm.weight": ref.pop("final_norm.weight")}
    for j, (mixer, channel) in enumerate(_hf_layers(m)):
        dst, mix, ffn = f"model.layers.{j}.", f"layers.{2 * j}.", f"layers.{2 * j + 1}."
        out[dst + "input_layernorm.weight"] = ref.pop(mix + "norm.weight")
        out[dst + "pre_ff_layernorm.weight"] = ref.pop(ffn + "norm.weight")
        if mixer == "m":
            copy(ref, mix + "mixer.", out, dst + "mamba.", _mamba_keys(m))
        else:
            copy(ref, mix + "mixer.", out, dst + "self_attn.", ATTENTION_KEYS)
        if channel == "-":
            copy(ref, ffn + "mixer.", out, dst + "feed_forward.", MLP_KEYS)
        else:
            out[dst + "feed_forward.router.weight"] = ref.pop(ffn + "mixer.router.weight")
            fused = {k: ref.pop(f"{ffn}mixer.experts.{k}") for k in ("gate_up_proj", "down_proj")}
            out.update(experts_to_hub(fused, dst + "feed_forward.experts.", gated=True))
    return finish_to_hf(ref, m, out)


register(HFArchitecture(
    "jamba", "transformers:JambaForCausalLM", config_from_hf, config_to_hf, state_from_hf, state_to_hf,
    note="each HF layer = 2 blocks (m|* then -|E); attention without RoPE; softmax top-k routing, not "
         "renormalised; per-expert hub keys fused; hidden_act must be silu"))
