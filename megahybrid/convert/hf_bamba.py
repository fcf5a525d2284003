"""transformers `BambaForCausalLM` (model_type `bamba`): IBM's Bamba, Mamba2 layers with a few attention
layers (`attn_layer_indices`), each HF layer = mixer + SwiGLU MLP, i.e. two reference blocks ("M-" or "*-").

On disk: `model.{embed_tokens, layers.{i}.{input_layernorm, mamba.* | self_attn.{q,k,v,o}_proj,
pre_ff_layernorm, feed_forward.{gate,up,down}_proj}, final_layernorm}` and `lm_head` (tied if
`tie_word_embeddings`). The Mamba2 mixer has megahybrid's names and layouts.

The HF class fixes: RoPE on half of each head (`partial_rotary_factor` 0.5 -> attention.rotary_fraction),
`hidden_act` both as the MLP gate and the Mamba conv activation (silu only), the gated-norm eps = rms_norm_eps.
The Mamba2 helpers here (`mamba2_from_hf`, `mamba2_to_hf`) also serve GraniteMoeHybrid, whose mixer is Bamba's.
"""

from __future__ import annotations

import math

from megahybrid.convert.base import ConversionError, HFArchitecture, Tensors, register, unsupported
from megahybrid.convert.hf_common import check_hf_mamba2, mamba2_keys, move_pairs, rope_from_hf
from megahybrid.mixers.mamba2 import ssd_sizes
from megahybrid.mixers.mlp import mlp_width
from megahybrid.pattern import resolve_layers

ROTARY_FRACTION = 0.5
"""BambaConfig hard-codes partial_rotary_factor = 0.5."""


# ---------------------------------------------------------------- Mamba2 fields (Bamba, Granite)


def mamba2_from_hf(hf: dict) -> dict:
    """`mamba_*` fields of BambaConfig / GraniteMoeHybridConfig -> `model.mamba2`."""
    if hf.get("hidden_act", "silu") != "silu":
        raise ConversionError(f"HF config: hidden_act={hf['hidden_act']!r}; it is also the Mamba conv activation, "
                              "which megahybrid has as silu only")
    hidden, expand, heads = hf["hidden_size"], hf.get("mamba_expand", 2), hf["mamba_n_heads"]
    head_dim = hf.get("mamba_d_head", "auto")
    head_dim = expand * hidden // heads if head_dim == "auto" else head_dim
    return {
        "state_size": hf["mamba_d_state"], "head_dim": head_dim, "num_groups": hf.get("mamba_n_groups", 1),
        "expand": expand, "conv_kernel": hf.get("mamba_d_conv", 4), "chunk_size": hf.get("mamba_chunk_size", 256),
        "dt_limit": [float(v) for v in (hf.get("time_step_limit") or (0.0, math.inf))],
        "use_conv_bias": hf.get("mamba_conv_bias", True), "use_bias": hf.get("mamba_proj_bias", False),
    }


def mamba2_to_hf(m, cls: str) -> dict:
    """`model.mamba2` -> the `mamba_*` fields; the HF mixer's d_inner is mamba_expand * hidden_size."""
    check_hf_mamba2(m, cls)
    mm = m.mamba2
    d_inner, heads, groups, state, head_dim = ssd_sizes(m)
    if d_inner % m.hidden_size:
        raise unsupported("mamba2.d_inner", d_inner, f"{cls}'s Mamba d_inner is mamba_expand * hidden_size, "
                          f"an integer multiple of hidden_size={m.hidden_size}")
    return {
        "mamba_n_heads": heads, "mamba_d_head": head_dim, "mamba_n_groups": groups, "mamba_d_state": state,
        "mamba_expand": d_inner // m.hidden_size, "mamba_d_conv": mm.conv_kernel, "mamba_chunk_size": mm.chunk_size,
        "mamba_conv_bias": mm.use_conv_bias, "mamba_proj_bias": mm.use_bias, "time_step_limit": list(mm.dt_limit),
    }


def attention_head_dim_check(m, cls: str) -> None:
    """Bamba / Granite attention heads are hidden_size / num_attention_heads wide (no head_dim field)."""
    a = m.attention
    if a.head_dim not in (None, m.hidden_size // a.num_heads) or m.hidden_size % a.num_heads:
        raise unsupported("attention.head_dim", a.head_dim, f"{cls} uses hidden_size / num_heads")
    if a.output_gate or a.qk_norm:
        raise unsupported("attention.output_gate" if a.output_gate else "attention.qk_norm", True,
                          f"{cls} attention has neither an output gate nor QK-norm")


def hf_layers(m, channel: str, cls: str) -> list[str]:
    """The mixer symbol of each HF layer of a pattern made of (mixer, `channel`) pairs."""
    symbols = [s.symbol for s in resolve_layers(m)]
    mixers, channels = symbols[0::2], symbols[1::2]
    if len(mixers) != len(channels) or set(mixers) - {"M", "*"} or set(channels) != {channel}:
        raise unsupported("pattern", m.pattern, f"{cls} layers are a mixer (M or *) followed by '{channel}': "
                          f"e.g. 'M{channel}M{channel}*{channel}'")
    return mixers


# ------------------------------------------------------------------------------------- config


def config_from_hf(hf: dict) -> dict:
    attention = set(hf.get("attn_layer_indices") or [])
    pattern = "".join(("*" if i in attention else "M") + "-" for i in range(hf["num_hidden_layers"]))
    theta, fraction = rope_from_hf(hf, default_fraction=ROTARY_FRACTION)
    return {
        "pattern": pattern, "hidden_size": hf["hidden_size"], "vocab_size": hf["vocab_size"],
        "norm_eps": hf.get("rms_norm_eps", 1e-5), "tie_embeddings": hf.get("tie_word_embeddings", False),
        "max_seq_len": hf.get("max_position_embeddings", 4096),
        "attention": {"num_heads": hf["num_attention_heads"], "num_kv_heads": hf.get("num_key_value_heads"),
                      "rope_theta": theta, "rotary_fraction": fraction, "bias": hf.get("attention_bias", False)},
        "mamba2": mamba2_from_hf(hf),
        "mlp": {"ffn_hidden_size": hf["intermediate_size"], "activation": "swiglu", "bias": hf.get("mlp_bias", False)},
    }


def config_to_hf(m) -> dict:
    mixers = hf_layers(m, "-", "Bamba")
    if m.norm != "rmsnorm" or m.zero_centered_norm:
        raise unsupported("norm", m.norm, "Bamba has a plain RMSNorm (x * w)")
    for name, neutral in (("embedding_scale", 1.0), ("logit_scale", 1.0), ("residual_scale", 1.0),
                          ("logit_softcap", None)):
        if getattr(m, name) != neutral:
            raise unsupported(name, getattr(m, name), f"Bamba has none; it must be {neutral}")
    if m.mlp.activation != "swiglu":
        raise unsupported("mlp.activation", m.mlp.activation, "Bamba's MLP is SwiGLU (hidden_act silu)")
    a = m.attention
    if "*" in mixers:
        attention_head_dim_check(m, "Bamba")
        if a.rope_theta <= 0 or a.rotary_fraction != ROTARY_FRACTION:
            raise unsupported("attention.rotary_fraction", a.rotary_fraction, "Bamba rotates half of each head "
                              f"(fixed); set rotary_fraction={ROTARY_FRACTION} and rope_theta > 0")
        if a.softmax_scale not in (None, (m.hidden_size // a.num_heads) ** -0.5):
            raise unsupported("attention.softmax_scale", a.softmax_scale, "Bamba scales by head_dim**-0.5")
    hf = {
        "model_type": "bamba", "architectures": ["BambaForCausalLM"],
        "num_hidden_layers": len(mixers), "attn_layer_indices": [i for i, s in enumerate(mixers) if s == "*"],
        "hidden_size": m.hidden_size, "vocab_size": m.vocab_size, "rms_norm_eps": m.norm_eps,
        "tie_word_embeddings": m.tie_embeddings, "max_position_embeddings": m.max_seq_len,
        "num_attention_heads": a.num_heads, "num_key_value_heads": a.num_kv_heads or a.num_heads,
        "attention_bias": a.bias, "hidden_act": "silu", "intermediate_size": mlp_width(m), "mlp_bias": m.mlp.bias,
        "rope_parameters": {"rope_type": "default", "rope_theta": a.rope_theta if a.rope_theta > 0 else 10000.0,
                            "partial_rotary_factor": ROTARY_FRACTION},
    }
    hf.update(mamba2_to_hf(m, "Bamba"))  # even without M layers: HF validates the mamba sizes
    return hf


# ------------------------------------------------------------------------------------ tensors


def _pairs(m) -> list[tuple[str, str]]:
    """(HF hub key, ReferenceLM key) for every tensor."""
    pairs = [("model.embed_tokens.weight", "embedding.weight"), ("model.final_layernorm.weight", "final_norm.weight")]
    if not m.tie_embeddings:
        pairs.append(("lm_head.weight", "lm_head.weight"))
    attn = [f"{p}.{w}" for p in ("q_proj", "k_proj", "v_proj", "o_proj")
            for w in (("weight", "bias") if m.attention.bias else ("weight",))]
    mlp = [f"{p}.{w}" for p in ("gate_proj", "up_proj", "down_proj") for w in (("weight", "bias") if m.mlp.bias else ("weight",))]
    for i, symbol in enumerate(hf_layers(m, "-", "Bamba")):
        hf, mixer, channel = f"model.layers.{i}.", f"layers.{2 * i}.", f"layers.{2 * i + 1}."
        pairs += [(hf + "input_layernorm.weight", mixer + "norm.weight"),
                  (hf + "pre_ff_layernorm.weight", channel + "norm.weight")]
        if symbol == "M":
            pairs += [(f"{hf}mamba.{k}", f"{mixer}mixer.{k}") for k in mamba2_keys(m.mamba2)]
        else:
            pairs += [(f"{hf}self_attn.{k}", f"{mixer}mixer.{k}") for k in attn]
        pairs += [(f"{hf}feed_forward.{k}", f"{channel}mixer.{k}") for k in mlp]
    return pairs


def state_from_hf(hf: Tensors, m) -> dict:
    out: dict = {}
    move_pairs(hf, out, _pairs(m))
    if m.tie_embeddings:
        hf.get("lm_head.weight")  # some checkpoints store the tied copy too
    hf.done()
    return out


def state_to_hf(ref: Tensors, m) -> dict:
    out: dict = {}
    move_pairs(ref, out, _pairs(m), reverse=True)
    ref.done()
    return out


register(HFArchitecture(
    "bamba", "transformers:BambaForCausalLM", config_from_hf, config_to_hf, state_from_hf, state_to_hf,
    note="each HF layer = mixer block + SwiGLU MLP block; RoPE on half of each head (fixed by the class)"))
