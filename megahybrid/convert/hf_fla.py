"""flash-linear-attention's Hugging Face classes `GatedDeltaNetForCausalLM` (model_type `gated_deltanet`)
and `DeltaNetForCausalLM` (`delta_net`), fla 0.6.0.

Each FLA layer is the mixer plus a SwiGLU MLP, i.e. two megahybrid blocks: pattern `G-` x L or `d-` x L.
On disk: `model.embeddings`, `model.layers.{i}.{attn_norm, attn.*, mlp_norm, mlp.{gate,up,down}_proj}`,
`model.norm`, `lm_head` (absent when tied). The `attn.*` tensors already have megahybrid's names and
layouts (`q/k/v/a/b/g/o_proj`, `{q,k,v}_conv1d.weight [C, 1, K]`, `o_norm`, `A_log`, `dt_bias`;
mixers/gated_deltanet.py, mixers/deltanet.py), so only prefixes move. Nothing is folded.

FLA sizes map as: GDN head_dim -> gdn.qk_head_dim, head_dim * expand_v -> gdn.v_head_dim; DeltaNet
hidden * expand_k / num_heads -> deltanet.head_dim, expand_v / expand_k -> deltanet.expand_v,
use_short_conv=false -> deltanet.conv_kernel = 0, use_gate -> deltanet.output_gate, use_beta ->
deltanet.use_beta. FLA 0.6.0's DeltaNet layer ignores `use_output_norm` (it always has o_norm).
Unsupported (refused with the field named): FLA's hybrid `attn` layers, `attnres_block_size`, GDN
without output gate or short conv or with a sigmoid gate, DeltaNet `qk_norm='sum'` or a
`qk_activation` other than silu, an MLP activation other than swish.
"""

from __future__ import annotations

import math

from megahybrid.convert.base import ConversionError, HFArchitecture, Tensors, register, unsupported
from megahybrid.convert.hf_common import copy, finish_from_hf, finish_to_hf
from megahybrid.mixers.deltanet import deltanet_sizes
from megahybrid.mixers.gated_deltanet import gdn_sizes
from megahybrid.mixers.mlp import mlp_width
from megahybrid.pattern import resolve_layers

MLP_KEYS = ("gate_proj.weight", "up_proj.weight", "down_proj.weight")
CONV_KEYS = ("q_conv1d.weight", "k_conv1d.weight", "v_conv1d.weight")
GDN_KEYS = ("q_proj.weight", "k_proj.weight", "v_proj.weight", "a_proj.weight", "b_proj.weight", "g_proj.weight",
            "o_proj.weight", "o_norm.weight", "A_log", "dt_bias") + CONV_KEYS


# ----------------------------------------------------------------------------- config


def _refuse(hf: dict, field: str, supported, why: str) -> None:
    value = hf.get(field, supported)
    if value != supported:
        raise ConversionError(f"HF config: {field}={value!r}; {why}")


def _common_from_hf(hf: dict, symbol: str) -> dict:
    """The model fields both FLA classes share: embeddings, norms, the SwiGLU MLP."""
    if hf.get("attn"):
        raise ConversionError(f"HF config: attn={hf['attn']!r}; FLA's hybrid softmax-attention layers are not "
                              "converted yet (only pure GDN / DeltaNet stacks)")
    _refuse(hf, "attnres_block_size", None, "attention residuals (AttnRes) have no megahybrid equivalent")
    _refuse(hf, "hidden_act", "swish", "megahybrid converts FLA's SwiGLU MLP only")
    hidden = hf["hidden_size"]
    width = hf.get("intermediate_size")
    if width is None:  # FLA's GatedMLP default: 2/3 * hidden_ratio * hidden, rounded up to 256
        width = int(hidden * (hf.get("hidden_ratio") or 4) * 2 / 3)
        width = 256 * math.ceil(width / 256)
    return {
        "pattern": (symbol + "-") * hf["num_hidden_layers"],
        "hidden_size": hidden,
        "vocab_size": hf["vocab_size"],
        "norm_eps": hf.get("norm_eps", 1e-6),
        "tie_embeddings": hf.get("tie_word_embeddings", False),
        "mlp": {"activation": "swiglu", "ffn_hidden_size": width, "bias": False},
    }


def gdn_config_from_hf(hf: dict) -> dict:
    _refuse(hf, "use_gate", True, "megahybrid's Gated DeltaNet always has the silu output gate")
    _refuse(hf, "use_short_conv", True, "megahybrid's Gated DeltaNet always has the short conv")
    if hf.get("output_gate_activation", "swish") not in ("swish", "silu"):
        raise ConversionError(f"HF config: output_gate_activation={hf['output_gate_activation']!r}; megahybrid's "
                              "Gated DeltaNet gates with silu (swish)")
    head_dim, expand_v = hf.get("head_dim", 256), hf.get("expand_v", 2.0)
    v_head_dim = round(head_dim * expand_v)
    if not math.isclose(head_dim * expand_v, v_head_dim):
        raise ConversionError(f"HF config: head_dim*expand_v={head_dim * expand_v} is not a whole number")
    return {**_common_from_hf(hf, "G"), "gdn": {
        "num_qk_heads": hf.get("num_heads", 6), "num_v_heads": hf.get("num_v_heads"), "qk_head_dim": head_dim,
        "v_head_dim": v_head_dim, "conv_kernel": hf.get("conv_size", 4),
        "allow_neg_eigval": hf.get("allow_neg_eigval", False)}}


def deltanet_config_from_hf(hf: dict) -> dict:
    _refuse(hf, "qk_norm", "l2", "megahybrid's DeltaNet L2-normalises q and k")
    _refuse(hf, "qk_activation", "silu", "megahybrid's DeltaNet applies silu to q and k")
    hidden, heads = hf["hidden_size"], hf.get("num_heads", 16)
    key_dim, value_dim = hidden * hf.get("expand_k", 1.0), hidden * hf.get("expand_v", 1.0)
    if not (math.isclose(key_dim, round(key_dim)) and math.isclose(value_dim, round(value_dim))) \
            or round(key_dim) % heads or round(value_dim) % heads:
        raise ConversionError(f"HF config: hidden_size*expand_k={key_dim} and hidden_size*expand_v={value_dim} "
                              f"must be whole multiples of num_heads={heads}")
    dk, dv = round(key_dim) // heads, round(value_dim) // heads
    return {**_common_from_hf(hf, "d"), "deltanet": {
        "num_heads": heads, "head_dim": dk, "expand_v": dv / dk,
        "conv_kernel": hf.get("conv_size", 4) if hf.get("use_short_conv", True) else 0,
        "output_gate": hf.get("use_gate", False), "use_beta": hf.get("use_beta", True),
        "allow_neg_eigval": hf.get("allow_neg_eigval", False)}}


def _common_to_hf(m, symbol: str, model_type: str) -> dict:
    symbols = "".join(s.symbol for s in resolve_layers(m))
    if not symbols or symbols != (symbol + "-") * (len(symbols) // 2):
        raise unsupported("pattern", m.pattern, f"FLA's {model_type} model is '{symbol}-' repeated (each layer "
                          "the mixer then a SwiGLU MLP)")
    if m.norm != "rmsnorm" or m.zero_centered_norm:
        raise unsupported("norm", m.norm, "FLA models use plain RMSNorm (zero_centered_norm=false)")
    if m.embedding_scale != 1.0 or m.logit_softcap or m.logit_scale != 1.0 or m.residual_scale != 1.0:
        raise unsupported("embedding_scale", m.embedding_scale, "FLA models have no embedding scale, logit "
                          "soft-cap, logit or residual multiplier")
    if m.mlp.activation != "swiglu" or m.mlp.bias:
        raise unsupported("mlp.activation", m.mlp.activation, "FLA's MLP is SwiGLU without biases")
    return {
        "model_type": model_type, "hidden_size": m.hidden_size, "vocab_size": m.vocab_size,
        "num_hidden_layers": len(symbols) // 2, "norm_eps": m.norm_eps, "tie_word_embeddings": m.tie_embeddings,
        "intermediate_size": mlp_width(m), "hidden_act": "swish", "attn": None, "fuse_norm": True,
        "fuse_swiglu": True, "fuse_cross_entropy": True,
    }


def _check_eps(m, mixer_eps) -> None:
    """FLA gives the mixer's o_norm the model's norm_eps."""
    if mixer_eps is not None and mixer_eps != m.norm_eps:
        raise unsupported("gdn.norm_eps", mixer_eps, f"FLA's o_norm uses the model's norm_eps={m.norm_eps}; "
                          "set it to null")


def gdn_config_to_hf(m) -> dict:
    out = _common_to_hf(m, "G", "gated_deltanet")
    _check_eps(m, getattr(m.gdn, "norm_eps", None))
    Hk, Hv, dk, dv = gdn_sizes(m)
    return {**out, "architectures": ["GatedDeltaNetForCausalLM"], "num_heads": Hk, "num_v_heads": Hv,
            "head_dim": dk, "expand_v": dv / dk, "conv_size": m.gdn.conv_kernel, "use_gate": True,
            "use_short_conv": True, "allow_neg_eigval": m.gdn.allow_neg_eigval, "output_gate_activation": "swish"}


def deltanet_config_to_hf(m) -> dict:
    out = _common_to_hf(m, "d", "delta_net")
    c = m.deltanet
    H, dk, dv = deltanet_sizes(m)
    return {**out, "architectures": ["DeltaNetForCausalLM"], "num_heads": H,
            "expand_k": H * dk / m.hidden_size, "expand_v": H * dv / m.hidden_size,
            "use_short_conv": c.conv_kernel > 0, "conv_size": c.conv_kernel or 4, "use_gate": c.output_gate,
            "use_beta": c.use_beta, "allow_neg_eigval": c.allow_neg_eigval, "qk_norm": "l2",
            "qk_activation": "silu", "use_output_norm": True}


# ----------------------------------------------------------------------------- tensors


def _gdn_keys(m) -> tuple[str, ...]:
    return GDN_KEYS


def _deltanet_keys(m) -> tuple[str, ...]:
    c = m.deltanet
    keys = ["q_proj.weight", "k_proj.weight", "v_proj.weight", "o_proj.weight", "o_norm.weight"]
    keys += ["b_proj.weight"] if c.use_beta else []
    keys += ["g_proj.weight"] if c.output_gate else []
    keys += list(CONV_KEYS) if c.conv_kernel else []
    return tuple(keys)


def _state_from_hf(mixer_keys):
    def convert(hf: Tensors, m) -> dict:
        out = {"embedding.weight": hf.pop("model.embeddings.weight"), "final_norm.weight": hf.pop("model.norm.weight")}
        for i in range(len(resolve_layers(m)) // 2):
            src, mixer, mlp = f"model.layers.{i}.", f"layers.{2 * i}.", f"layers.{2 * i + 1}."
            out[mixer + "norm.weight"] = hf.pop(src + "attn_norm.weight")
            out[mlp + "norm.weight"] = hf.pop(src + "mlp_norm.weight")
            copy(hf, src + "attn.", out, mixer + "mixer.", mixer_keys(m))
            copy(hf, src + "mlp.", out, mlp + "mixer.", MLP_KEYS)
        return finish_from_hf(hf, m, out)
    return convert


def _state_to_hf(mixer_keys):
    def convert(ref: Tensors, m) -> dict:
        out = {"model.embeddings.weight": ref.pop("embedding.weight"), "model.norm.weight": ref.pop("final_norm.weight")}
        for i in range(len(resolve_layers(m)) // 2):
            dst, mixer, mlp = f"model.layers.{i}.", f"layers.{2 * i}.", f"layers.{2 * i + 1}."
            out[dst + "attn_norm.weight"] = ref.pop(mixer + "norm.weight")
            out[dst + "mlp_norm.weight"] = ref.pop(mlp + "norm.weight")
            copy(ref, mixer + "mixer.", out, dst + "attn.", mixer_keys(m))
            copy(ref, mlp + "mixer.", out, dst + "mlp.", MLP_KEYS)
        return finish_to_hf(ref, m, out)
    return convert


register(HFArchitecture(
    "gated_deltanet", "fla.models:GatedDeltaNetForCausalLM", gdn_config_from_hf, gdn_config_to_hf,
    _state_from_hf(_gdn_keys), _state_to_hf(_gdn_keys),
    note="FLA GatedDeltaNet: pure G- stack; refuses FLA hybrid attn layers, use_gate/use_short_conv=false, "
         "sigmoid output gate"))
register(HFArchitecture(
    "delta_net", "fla.models:DeltaNetForCausalLM", deltanet_config_from_hf, deltanet_config_to_hf,
    _state_from_hf(_deltanet_keys), _state_to_hf(_deltanet_keys),
    note="FLA DeltaNet: pure d- stack; use_gate/use_beta/use_short_conv/allow_neg_eigval map to deltanet.*; "
         "refuses FLA hybrid attn layers, qk_norm='sum', qk_activation other than silu"))
