"""transformers `GraniteMoeHybridForCausalLM` (model_type `granitemoehybrid`): IBM Granite 4.0-H, Bamba's
Mamba2 mixer or attention per layer (`layer_types`), then in every layer a softmax top-k MoE plus an
always-on SwiGLU `shared_mlp` (or the shared MLP alone with `num_local_experts` 0). Each HF layer is two
reference blocks: "ME" / "*E" (MoE, shared expert = shared_mlp) or "M-" / "*-" (dense).

On disk (fused, unlike most MoE hubs): `model.layers.{i}.block_sparse_moe.{input_linear.weight [E, 2I, H]
(gate rows first), output_linear.weight [E, H, I], router.layer.weight [E, H]}`, `shared_mlp.{input_linear
[2S, H] (gate | up), output_linear}`, `input_layernorm`, `post_attention_layernorm`, `mamba.*` or
`self_attn.{q,k,v,o}_proj`, `model.{embed_tokens, norm}`, `lm_head` (tied if `tie_word_embeddings`).

µP multipliers become config fields: embedding_multiplier -> model.embedding_scale, residual_multiplier ->
model.residual_scale (both sublayers), logits_scaling -> model.logit_scale = 1 / logits_scaling,
attention_multiplier -> attention.softmax_scale. `position_embedding_type` "rope" or none (NoPE ->
attention.rope_theta = 0). The router's softmax over the top-k logits equals softmax -> top-k -> renormalise
(moe.norm_topk_prob). Unsupported: anything but silu (`hidden_act` also drives the Mamba conv).
"""

from __future__ import annotations

import torch

from megahybrid.convert.base import ConversionError, HFArchitecture, Tensors, register, unsupported
from megahybrid.convert.hf_bamba import attention_head_dim_check, hf_layers, mamba2_from_hf, mamba2_to_hf
from megahybrid.convert.hf_common import mamba2_keys, move_pairs, rope_from_hf
from megahybrid.mixers.mlp import mlp_width
from megahybrid.mixers.moe import expert_width, shared_expert_width
from megahybrid.pattern import resolve_layers

MIXERS = {"linear_attention": "M", "mamba": "M", "full_attention": "*", "attention": "*"}
LAYER_TYPES = {"M": "mamba", "*": "attention"}


# ------------------------------------------------------------------------------------- config


def _mixers_from_hf(hf: dict) -> list[str]:
    types = hf.get("layer_types") or ["mamba"] * hf["num_hidden_layers"]
    unknown = sorted(set(types) - set(MIXERS))
    if unknown or len(types) != hf["num_hidden_layers"]:
        raise ConversionError(f"HF config: layer_types has {unknown or len(types)} (expected num_hidden_layers="
                              f"{hf['num_hidden_layers']} of {sorted(MIXERS)})")
    return [MIXERS[t] for t in types]


def _attention_from_hf(hf: dict) -> dict:
    rope = hf.get("position_embedding_type")
    if rope not in (None, "rope", "nope"):
        raise ConversionError(f"HF config: position_embedding_type={rope!r}; expected 'rope' or none")
    theta, fraction = rope_from_hf(hf) if rope == "rope" else (0.0, 1.0)
    return {"num_heads": hf["num_attention_heads"], "num_kv_heads": hf.get("num_key_value_heads"),
            "rope_theta": theta, "rotary_fraction": fraction, "bias": hf.get("attention_bias", False),
            "softmax_scale": float(hf.get("attention_multiplier", 1.0))}


def config_from_hf(hf: dict) -> dict:
    experts = hf.get("num_local_experts") or 0
    channel = "E" if experts else "-"
    model = {
        "pattern": "".join(s + channel for s in _mixers_from_hf(hf)),
        "hidden_size": hf["hidden_size"], "vocab_size": hf["vocab_size"], "norm_eps": hf.get("rms_norm_eps", 1e-6),
        "tie_embeddings": hf.get("tie_word_embeddings", False), "max_seq_len": hf.get("max_position_embeddings", 4096),
        "embedding_scale": float(hf.get("embedding_multiplier", 1.0)),
        "residual_scale": float(hf.get("residual_multiplier", 1.0)),
        "logit_scale": 1.0 / hf.get("logits_scaling", 1.0),
        "attention": _attention_from_hf(hf),
        "mamba2": mamba2_from_hf(hf),
        # Dense layers: the shared MLP alone.
        "mlp": {"ffn_hidden_size": hf["shared_intermediate_size"], "activation": "swiglu"},
    }
    if experts:
        model["moe"] = {
            "num_experts": experts, "top_k": hf["num_experts_per_tok"], "ffn_hidden_size": hf["intermediate_size"],
            "activation": "swiglu", "router": "softmax", "norm_topk_prob": True,
            "num_shared_experts": 1, "shared_ffn_hidden_size": hf["shared_intermediate_size"],
            "aux_loss_coeff": hf.get("router_aux_loss_coef", 0.001),
        }
    return model


def _check_moe_exportable(m) -> None:
    moe = m.moe
    wrong = {"router": (moe.router, "softmax"), "norm_topk_prob": (moe.norm_topk_prob, True),
             "activation": (moe.activation, "swiglu"), "routed_scaling_factor": (moe.routed_scaling_factor, 1.0),
             "score_correction_bias": (moe.score_correction_bias, False), "num_groups": (moe.num_groups, 1),
             "capacity_factor": (moe.capacity_factor, None),
             "shared_expert_gate": (getattr(moe, "shared_expert_gate", False), False)}
    for name, (value, expected) in wrong.items():
        if value != expected:
            raise unsupported(f"moe.{name}", value, f"GraniteMoeHybrid's MoE needs {expected!r} (softmax top-k, "
                              "renormalised, SwiGLU experts, dropless)")
    if moe.num_shared_experts == 0:
        raise unsupported("moe.num_shared_experts", 0, "GraniteMoeHybrid always adds its shared_mlp")


def config_to_hf(m) -> dict:
    channel = "E" if "E" in {s.symbol for s in resolve_layers(m)} else "-"
    mixers = hf_layers(m, channel, "GraniteMoeHybrid")
    if m.norm != "rmsnorm" or m.zero_centered_norm:
        raise unsupported("norm", m.norm, "GraniteMoeHybrid has a plain RMSNorm (x * w)")
    if m.logit_softcap:
        raise unsupported("logit_softcap", m.logit_softcap, "GraniteMoeHybrid has no soft-cap; set it to null")
    a = m.attention
    if "*" in mixers:
        attention_head_dim_check(m, "GraniteMoeHybrid")
        if a.rope_theta > 0 and a.rotary_fraction != 1.0:
            raise unsupported("attention.rotary_fraction", a.rotary_fraction, "GraniteMoeHybrid rotates whole heads")
    if channel == "E":
        _check_moe_exportable(m)
        shared = shared_expert_width(m)
    else:
        if m.mlp.activation != "swiglu" or m.mlp.bias:
            raise unsupported("mlp.activation", m.mlp.activation, "GraniteMoeHybrid's shared_mlp is SwiGLU, bias-free")
        shared = mlp_width(m)
    head_dim = m.hidden_size // a.num_heads
    hf = {
        "model_type": "granitemoehybrid", "architectures": ["GraniteMoeHybridForCausalLM"],
        "num_hidden_layers": len(mixers), "layer_types": [LAYER_TYPES[s] for s in mixers],
        "hidden_size": m.hidden_size, "vocab_size": m.vocab_size, "rms_norm_eps": m.norm_eps,
        "tie_word_embeddings": m.tie_embeddings, "max_position_embeddings": m.max_seq_len,
        "num_attention_heads": a.num_heads, "num_key_value_heads": a.num_kv_heads or a.num_heads,
        "attention_bias": a.bias, "hidden_act": "silu",
        "attention_multiplier": a.softmax_scale if a.softmax_scale is not None else head_dim ** -0.5,
        "position_embedding_type": "rope" if a.rope_theta > 0 else None,
        "rope_parameters": {"rope_type": "default", "rope_theta": a.rope_theta if a.rope_theta > 0 else 10000.0},
        "embedding_multiplier": m.embedding_scale, "residual_multiplier": m.residual_scale,
        "logits_scaling": 1.0 / m.logit_scale, "shared_intermediate_size": shared,
        "num_local_experts": m.moe.num_experts if channel == "E" else 0,
        "num_experts_per_tok": m.moe.top_k, "intermediate_size": expert_width(m) if channel == "E" else shared,
        "router_aux_loss_coef": m.moe.aux_loss_coeff,
    }
    hf.update(mamba2_to_hf(m, "GraniteMoeHybrid"))
    return hf


# ------------------------------------------------------------------------------------ tensors


def _pairs(m, channel: str) -> list[tuple[str, str]]:
    """(HF hub key, ReferenceLM key) for every tensor that moves unchanged (all but shared_mlp.input_linear)."""
    pairs = [("model.embed_tokens.weight", "embedding.weight"), ("model.norm.weight", "final_norm.weight")]
    if not m.tie_embeddings:
        pairs.append(("lm_head.weight", "lm_head.weight"))
    attn = [f"{p}.{w}" for p in ("q_proj", "k_proj", "v_proj", "o_proj")
            for w in (("weight", "bias") if m.attention.bias else ("weight",))]
    for i, symbol in enumerate(hf_layers(m, channel, "GraniteMoeHybrid")):
        hf, mixer, ffn = f"model.layers.{i}.", f"layers.{2 * i}.", f"layers.{2 * i + 1}."
        pairs += [(hf + "input_layernorm.weight", mixer + "norm.weight"),
                  (hf + "post_attention_layernorm.weight", ffn + "norm.weight")]
        if symbol == "M":
            pairs += [(f"{hf}mamba.{k}", f"{mixer}mixer.{k}") for k in mamba2_keys(m.mamba2)]
        else:
            pairs += [(f"{hf}self_attn.{k}", f"{mixer}mixer.{k}") for k in attn]
        shared = f"{ffn}mixer.shared_expert." if channel == "E" else f"{ffn}mixer."
        pairs.append((f"{hf}shared_mlp.output_linear.weight", f"{shared}down_proj.weight"))
        if channel == "E":
            moe = f"{hf}block_sparse_moe."
            pairs += [(moe + "router.layer.weight", f"{ffn}mixer.router.weight"),
                      (moe + "input_linear.weight", f"{ffn}mixer.experts.gate_up_proj"),
                      (moe + "output_linear.weight", f"{ffn}mixer.experts.down_proj")]
    return pairs


def _shared_mlps(m, channel: str) -> list[tuple[str, str]]:
    """(HF `shared_mlp.` prefix, megahybrid gated-MLP prefix) per layer: input_linear = [gate | up]."""
    prefix = "mixer.shared_expert." if channel == "E" else "mixer."
    return [(f"model.layers.{i}.shared_mlp.", f"layers.{2 * i + 1}.{prefix}")
            for i in range(len(resolve_layers(m)) // 2)]


def _channel(m) -> str:
    return "E" if "E" in {s.symbol for s in resolve_layers(m)} else "-"


def state_from_hf(hf: Tensors, m) -> dict:
    channel, out = _channel(m), {}
    move_pairs(hf, out, _pairs(m, channel))
    for theirs, ours in _shared_mlps(m, channel):
        out[ours + "gate_proj.weight"], out[ours + "up_proj.weight"] = \
            hf.pop(theirs + "input_linear.weight").chunk(2, dim=0)
    if m.tie_embeddings:
        hf.get("lm_head.weight")  # some checkpoints store the tied copy too
    hf.done()
    return out


def state_to_hf(ref: Tensors, m) -> dict:
    channel, out = _channel(m), {}
    move_pairs(ref, out, _pairs(m, channel), reverse=True)
    for theirs, ours in _shared_mlps(m, channel):
        out[theirs + "input_linear.weight"] = torch.cat([ref.pop(ours + "gate_proj.weight"),
                                                         ref.pop(ours + "up_proj.weight")])
    ref.done()
    return out


register(HFArchitecture(
    "granitemoehybrid", "transformers:GraniteMoeHybridForCausalLM", config_from_hf, config_to_hf,
    state_from_hf, state_to_hf,
    note="µP: embedding/residual multipliers -> embedding_scale/residual_scale, logit_scale = 1/logits_scaling, "
         "attention_multiplier -> softmax_scale; MoE + shared_mlp per layer (fused on disk); NoPE -> rope_theta 0"))
