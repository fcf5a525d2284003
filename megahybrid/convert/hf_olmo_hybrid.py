"""transformers `OlmoHybridForCausalLM` (model_type `olmo_hybrid`): Gated DeltaNet layers and OLMo
attention layers, each followed by a SwiGLU MLP; plain RMSNorms (weight w).

One HF layer = two megahybrid blocks (`layer_types`: linear_attention -> `G-`, full_attention -> `*-`).
The two layer kinds place their norms differently, so the attention layers' two blocks are listed in
`model.post_norm_layers`:
    GDN layer:        x + gdn(attention_layer_norm(x));  x + mlp(feedforward_layer_norm(x))        (pre-norm)
    attention layer:  x + feedforward_layer_norm(attn(x));  x + post_feedforward_layernorm(mlp(x)) (post-norm)
(on-disk names; transformers renames attention_layer_norm/feedforward_layer_norm to input_layernorm /
post_attention_layernorm in memory). On disk, `model.layers.{i}.`:
    linear_attn.{q,k,v,a,b,g,o}_proj, {q,k,v}_conv1d [C, 1, K], o_norm [dv], A_log, dt_bias  = megahybrid's names
    (transformers' own save_pretrained splits the convs into equal thirds: see `convs_from_hf`)
    self_attn.{q,k,v,o}_proj, q_norm [H*D], k_norm [Hkv*D]   QK-norm over the whole projection
                                                            (`attention.qk_norm_scope: all_heads`)
    mlp.{gate,up,down}_proj
`linear_allow_neg_eigval` (beta * 2) is `gdn.allow_neg_eigval`; the GDN output norm's eps is fixed
at 1e-5 in transformers (`gdn.norm_eps`). No rope_theta = NoPE (`attention.rope_theta: 0`), as in
the released checkpoints. Nothing is folded. Export writes no special-token ids (megahybrid keeps none).
"""

from __future__ import annotations

import torch

from megahybrid.convert.base import ConversionError, HFArchitecture, Tensors, check_shape, register, unsupported
from megahybrid.convert.hf_common import copy, finish_from_hf, finish_to_hf, rope_from_hf
from megahybrid.convert.hf_qwen3_next import LAYER_TYPES, MLP_KEYS, check_activation, mixer_symbols
from megahybrid.mixers.gated_deltanet import gdn_sizes
from megahybrid.mixers.mlp import mlp_width
from megahybrid.pattern import resolve_layers

GDN_NORM_EPS = 1e-5
"""OlmoHybridGatedDeltaNet's `o_norm` eps, hard-coded (FLA's FusedRMSNormGated default)."""
GDN_KEYS = tuple(f"{p}.weight" for p in ("q_proj", "k_proj", "v_proj", "a_proj", "b_proj", "g_proj", "o_proj",
                                          "o_norm")) + ("A_log", "dt_bias")
CONVS = tuple(f"{n}_conv1d.weight" for n in "qkv")
ATTENTION_KEYS = ("q_proj", "k_proj", "v_proj", "o_proj")
NORMS = {  # mixer symbol -> on-disk names of (the mixer block's norm, the MLP block's norm)
    "G": ("attention_layer_norm", "feedforward_layer_norm"),
    "*": ("feedforward_layer_norm", "post_feedforward_layernorm"),
}


def post_norm_blocks(mixers: list[str]) -> list[int]:
    """Both blocks of every attention layer (HF layer i = blocks 2i, 2i+1)."""
    return [b for i, s in enumerate(mixers) if s == "*" for b in (2 * i, 2 * i + 1)]


def config_from_hf(hf: dict) -> dict:
    check_activation(hf)
    mixers = mixer_symbols(hf)
    theta, fraction = rope_from_hf(hf)
    heads = hf["num_attention_heads"]
    if hf.get("head_dim") not in (None, hf["hidden_size"] // heads):
        raise ConversionError(f"HF config: head_dim={hf['head_dim']}; OlmoHybrid's rotary embedding assumes "
                              f"hidden_size // num_attention_heads = {hf['hidden_size'] // heads}")
    k_heads = hf.get("linear_num_key_heads") or heads
    k_dim = hf.get("linear_key_head_dim") or int(0.75 * hf["hidden_size"] / k_heads)  # the config's defaults
    return {
        "pattern": "".join(s + "-" for s in mixers),
        "hidden_size": hf["hidden_size"], "vocab_size": hf["vocab_size"],
        "norm_eps": hf.get("rms_norm_eps", 1e-6), "tie_embeddings": hf.get("tie_word_embeddings", False),
        "max_seq_len": hf.get("max_position_embeddings", 65536),
        "post_norm_layers": post_norm_blocks(mixers),
        "attention": {
            "num_heads": heads, "num_kv_heads": hf.get("num_key_value_heads") or heads,
            "rope_theta": theta, "rotary_fraction": fraction, "qk_norm": True, "qk_norm_scope": "all_heads",
            "bias": hf.get("attention_bias", False),
        },
        "gdn": {
            "num_qk_heads": k_heads, "num_v_heads": hf.get("linear_num_value_heads") or heads,
            "qk_head_dim": k_dim, "v_head_dim": hf.get("linear_value_head_dim") or 2 * k_dim,
            "conv_kernel": hf.get("linear_conv_kernel_dim", 4),
            "allow_neg_eigval": hf.get("linear_allow_neg_eigval", True), "norm_eps": GDN_NORM_EPS,
        },
        "mlp": {"ffn_hidden_size": hf["intermediate_size"], "activation": "swiglu"},
    }


def layer_mixers(m) -> list[str]:
    """The mixer of each HF layer; the pattern must be (G|*) each followed by '-'."""
    symbols = [s.symbol for s in resolve_layers(m)]
    mixers, channels = symbols[::2], symbols[1::2]
    if len(symbols) % 2 or any(s not in LAYER_TYPES for s in mixers) or set(channels) != {"-"}:
        raise unsupported("pattern", m.pattern, "OlmoHybridForCausalLM layers are a mixer (G or *) followed by an "
                                                "MLP (-), e.g. 'G-G-G-*-'")
    return mixers


def config_to_hf(m) -> dict:
    mixers = layer_mixers(m)
    if set(mixers) != {"G", "*"}:
        raise unsupported("pattern", m.pattern, "OlmoHybridForCausalLM needs at least one G and one * layer")
    a, heads = m.attention, m.attention.num_heads
    fixed = {  # field: (value, what HF needs)
        "norm": (m.norm, "rmsnorm"), "zero_centered_norm": (m.zero_centered_norm, False),
        "embedding_scale": (m.embedding_scale, 1.0), "logit_softcap": (m.logit_softcap, None),
        "logit_scale": (m.logit_scale, 1.0), "residual_scale": (m.residual_scale, 1.0),
        "post_norm_layers": (sorted(m.post_norm_layers or []), post_norm_blocks(mixers)),
        "attention.qk_norm": (a.qk_norm, True), "attention.qk_norm_scope": (a.qk_norm_scope, "all_heads"),
        "attention.output_gate": (a.output_gate, False), "attention.rotary_fraction": (a.rotary_fraction, 1.0),
        "attention.head_dim": (a.head_dim or m.hidden_size // heads, m.hidden_size // heads),
        "attention.out_bias": (getattr(a, "out_bias", None), None),
        "gdn.norm_eps": (m.gdn.norm_eps, GDN_NORM_EPS),
        "mlp.activation": (m.mlp.activation, "swiglu"), "mlp.bias": (m.mlp.bias, False),
    }
    if a.softmax_scale is not None and a.softmax_scale != (m.hidden_size // heads) ** -0.5:
        fixed["attention.softmax_scale"] = (a.softmax_scale, None)
    for field, (value, wanted) in fixed.items():
        if value != wanted:
            raise unsupported(field, value, f"OlmoHybridForCausalLM needs {wanted!r}")
    Hk, Hv, dk, dv = gdn_sizes(m)
    return {
        "vocab_size": m.vocab_size, "hidden_size": m.hidden_size, "num_hidden_layers": len(mixers),
        "layer_types": [LAYER_TYPES[s] for s in mixers], "intermediate_size": mlp_width(m),
        "rms_norm_eps": m.norm_eps, "tie_word_embeddings": m.tie_embeddings, "hidden_act": "silu",
        "max_position_embeddings": m.max_seq_len,
        "num_attention_heads": heads, "num_key_value_heads": a.num_kv_heads or heads, "attention_bias": a.bias,
        "rope_parameters": ({"rope_type": "default", "rope_theta": a.rope_theta} if a.rope_theta > 0 else None),
        "linear_num_key_heads": Hk, "linear_num_value_heads": Hv, "linear_key_head_dim": dk,
        "linear_value_head_dim": dv, "linear_conv_kernel_dim": m.gdn.conv_kernel,
        "linear_allow_neg_eigval": m.gdn.allow_neg_eigval,
        "pad_token_id": None, "bos_token_id": None, "eos_token_id": None,  # the class defaults exceed small vocabs
    }


def attention_keys(m) -> list[str]:
    names = [f"{p}.weight" for p in ATTENTION_KEYS] + ["q_norm.weight", "k_norm.weight"]
    return names + ([f"{p}.bias" for p in ATTENTION_KEYS] if m.attention.bias else [])


def mixer_keys(symbol: str, m) -> tuple[str, list[str]]:
    return ("linear_attn.", list(GDN_KEYS)) if symbol == "G" else ("self_attn.", attention_keys(m))


def convs_from_hf(hf: Tensors, src: str, out: dict, dst: str, m) -> None:
    """q/k/v_conv1d, re-split by their true widths [Hk dk, Hk dk, Hv dv]. transformers 5.24 loads them
    concatenated but its save_pretrained splits the concatenation into equal thirds, so with
    Hv dv != Hk dk its own files carry wrongly-sized (though self-consistent) q/k/v convs; the
    released (OLMo-core / FLA) checkpoints carry the true widths. Concatenate-then-split reads both."""
    Hk, Hv, dk, dv = gdn_sizes(m)
    conv = torch.cat([hf.pop(src + name) for name in CONVS], dim=0)
    check_shape(src + "{q,k,v}_conv1d.weight (concatenated)", conv, (2 * Hk * dk + Hv * dv, 1, m.gdn.conv_kernel))
    for name, t in zip(CONVS, conv.split([Hk * dk, Hk * dk, Hv * dv], dim=0)):
        out[dst + name] = t


def state_from_hf(hf: Tensors, m) -> dict:
    out = {"embedding.weight": hf.pop("model.embed_tokens.weight"),
           "final_norm.weight": hf.pop("model.norm.weight")}
    for i, symbol in enumerate(layer_mixers(m)):
        src, a, c = f"model.layers.{i}.", f"layers.{2 * i}.", f"layers.{2 * i + 1}."
        mixer_norm, mlp_norm = NORMS[symbol]
        out[a + "norm.weight"] = hf.pop(f"{src}{mixer_norm}.weight")
        out[c + "norm.weight"] = hf.pop(f"{src}{mlp_norm}.weight")
        part, names = mixer_keys(symbol, m)
        copy(hf, src + part, out, a + "mixer.", names)
        if symbol == "G":
            convs_from_hf(hf, src + part, out, a + "mixer.", m)
        copy(hf, src + "mlp.", out, c + "mixer.", MLP_KEYS)
    return finish_from_hf(hf, m, out)


def state_to_hf(ref: Tensors, m) -> dict:
    out = {"model.embed_tokens.weight": ref.pop("embedding.weight"),
           "model.norm.weight": ref.pop("final_norm.weight")}
    for i, symbol in enumerate(layer_mixers(m)):
        dst, a, c = f"model.layers.{i}.", f"layers.{2 * i}.", f"layers.{2 * i + 1}."
        mixer_norm, mlp_norm = NORMS[symbol]
        out[f"{dst}{mixer_norm}.weight"] = ref.pop(a + "norm.weight")
        out[f"{dst}{mlp_norm}.weight"] = ref.pop(c + "norm.weight")
        part, names = mixer_keys(symbol, m)
        copy(ref, a + "mixer.", out, dst + part, names + (list(CONVS) if symbol == "G" else []))
        copy(ref, c + "mixer.", out, dst + "mlp.", MLP_KEYS)
    return finish_to_hf(ref, m, out)


register(HFArchitecture(
    "olmo_hybrid", "transformers:OlmoHybridForCausalLM", config_from_hf, config_to_hf, state_from_hf, state_to_hf,
    note="attention layers post-norm (model.post_norm_layers), QK-norm over all heads, GDN norm eps 1e-5, "
         "beta*2 = gdn.allow_neg_eigval; special-token ids not exported"))
