"""transformers `RecurrentGemmaForCausalLM` (model_type `recurrent_gemma`; Griffin, De et al. 2024,
arXiv 2402.19427; RecurrentGemma, Botev et al. 2024, arXiv 2404.07839).

Each HF layer is a temporal block plus an MLP, i.e. two megahybrid blocks: `block_types` (cycled over
num_hidden_layers) gives `r-` for "recurrent" (RG-LRU block) and `w-` for "attention" (local attention,
window `attention_window_size`). The math differences are model fields: (1 + w) RMSNorm
(`zero_centered_norm`), embeddings x sqrt(hidden) held by HF as a **bfloat16** buffer (so
`embedding_scale` is the bf16-rounded value, e.g. 6.9375 for hidden 48), `logit_softcap`, partial
rotary (`attention.rotary_fraction`, 0.5), o_proj-only bias (`attention.out_bias`), gated MLP with
biases and the tanh GELU (`mlp.activation = geglu_tanh`, width intermediate_size // 2).
Only hidden_activation `gelu_pytorch_tanh` (every published checkpoint): HF also applies it in the
recurrent block, whose GELU megahybrid fixes to the tanh form.

On disk: `model.{embed_tokens, final_norm}`, `model.layers.{i}.{temporal_pre_norm, channel_pre_norm}`,
`model.layers.{i}.temporal_block.*` (RG-LRU names = megahybrid's `rglru` mixer; attention
`q/k/v_proj` [+ bias with attention_bias], `o_proj` + bias), `model.layers.{i}.mlp_block.{gate,up,
down}_proj` (+ bias), `lm_head` (tied by default, then not stored).
Unsupported: RG-LRU heads apart from attention heads (HF uses num_attention_heads for both), a head
width other than hidden_size // num_attention_heads, c != 8, anything without the soft-cap.
"""

from __future__ import annotations

import math

import torch

from megahybrid.convert.base import ConversionError, HFArchitecture, Tensors, register, unsupported
from megahybrid.convert.hf_common import copy, finish_from_hf, finish_to_hf
from megahybrid.mixers.mlp import mlp_width
from megahybrid.pattern import resolve_layers

BLOCKS = {"recurrent": "r", "attention": "w"}
HIDDEN_ACTIVATION = "gelu_pytorch_tanh"
"""The only HF hidden_activation converted: HF applies it to the MLP gate *and* to the recurrent
block's y branch, and megahybrid's RG-LRU block has the tanh GELU there (Griffin's)."""
RG_LRU_C = 8.0
"""HF hard-codes c = 8 in a_t = a^(c r_t)."""
RG_LRU_KEYS = ("linear_x.weight", "linear_x.bias", "linear_y.weight", "linear_y.bias", "linear_out.weight",
               "linear_out.bias", "conv_1d.weight", "conv_1d.bias", "rg_lru.recurrent_param",
               "rg_lru.input_gate_weight", "rg_lru.input_gate_bias", "rg_lru.recurrent_gate_weight",
               "rg_lru.recurrent_gate_bias")
MLP_KEYS = tuple(f"{p}_proj.{w}" for p in ("gate", "up", "down") for w in ("weight", "bias"))


def embedding_normalizer(hidden: int) -> float:
    """sqrt(hidden) rounded to bfloat16: HF's `normalizer` buffer is created in bf16 whatever the
    model dtype, so this is the factor a float32 HF model really applies."""
    return float(torch.tensor(hidden ** 0.5, dtype=torch.bfloat16))


def _rope(hf: dict) -> tuple[float, float]:
    """(rope_theta, partial_rotary_factor) from transformers 5's `rope_parameters` or v4's top level."""
    rope = hf.get("rope_parameters") or {}
    if rope.get("rope_type", "default") != "default":
        raise ConversionError(f"HF config: rope_parameters.rope_type={rope['rope_type']!r}; RecurrentGemma "
                              "supports only 'default' RoPE")
    theta = rope.get("rope_theta", hf.get("rope_theta", 10000.0))
    return float(theta), float(rope.get("partial_rotary_factor", hf.get("partial_rotary_factor", 0.5)))


def config_from_hf(hf: dict) -> dict:
    hidden, heads, layers = hf["hidden_size"], hf["num_attention_heads"], hf["num_hidden_layers"]
    block_types = list(hf.get("block_types", ("recurrent", "recurrent", "attention")))
    if not block_types or any(t not in BLOCKS for t in block_types):
        raise ConversionError(f"HF config: block_types={block_types!r}; each must be one of {sorted(BLOCKS)}")
    act = hf.get("hidden_activation", HIDDEN_ACTIVATION)
    if act != HIDDEN_ACTIVATION:
        raise ConversionError(f"HF config: hidden_activation={act!r}; only {HIDDEN_ACTIVATION!r} is supported "
                              "(it is also the recurrent block's gate activation, fixed in megahybrid)")
    if hf.get("logits_soft_cap") is None:
        raise ConversionError("HF config: logits_soft_cap is null; RecurrentGemma always soft-caps its logits")
    theta, rotary_fraction = _rope(hf)
    types = (block_types * layers)[:layers]
    return {
        "pattern": "".join(BLOCKS[t] + "-" for t in types),
        "hidden_size": hidden,
        "vocab_size": hf["vocab_size"],
        "norm_eps": hf.get("rms_norm_eps", 1e-6),
        "zero_centered_norm": True,
        "embedding_scale": embedding_normalizer(hidden),
        "logit_softcap": float(hf["logits_soft_cap"]),
        "tie_embeddings": hf.get("tie_word_embeddings", True),
        "attention": {
            "num_heads": heads, "num_kv_heads": hf.get("num_key_value_heads") or heads,
            "head_dim": hidden // heads, "rope_theta": theta, "rotary_fraction": rotary_fraction,
            "window": hf.get("attention_window_size", 2048), "bias": hf.get("attention_bias", False),
            "out_bias": True,
        },
        "rglru": {"width": hf.get("lru_width") or hidden, "num_heads": heads,
                  "conv_kernel": hf.get("conv1d_width", 4), "c": RG_LRU_C, "bias": True},
        "mlp": {"activation": "geglu_tanh", "ffn_hidden_size": hf["intermediate_size"] // 2, "bias": True},
    }


def _block_types(m) -> list[str]:
    """The HF block type of each layer, checking the pattern is (r|w, -) pairs."""
    symbols = [s.symbol for s in resolve_layers(m)]
    pairs = [symbols[i:i + 2] for i in range(0, len(symbols), 2)]
    if not pairs or any(len(p) != 2 or p[0] not in "rw" or p[1] != "-" for p in pairs):
        raise unsupported("pattern", m.pattern, "RecurrentGemma layers are a temporal block (r or w) followed "
                          "by an MLP (-), e.g. 'r-r-w-'")
    names = {v: k for k, v in BLOCKS.items()}
    return [names[p[0]] for p in pairs]


def _shortest_period(types: list[str]) -> list[str]:
    """HF cycles `block_types`; write the shortest list that cycles to the layer list."""
    for n in range(1, len(types) + 1):
        if all(t == types[i % n] for i, t in enumerate(types)):
            return types[:n]
    return types


def _check_model(m, types: list[str]) -> None:
    if m.norm != "rmsnorm" or not m.zero_centered_norm:
        raise unsupported("zero_centered_norm", m.zero_centered_norm, "RecurrentGemma's RMSNorm is x * (1 + w)")
    expected = embedding_normalizer(m.hidden_size)
    if not math.isclose(m.embedding_scale, expected, rel_tol=1e-6):
        raise unsupported("embedding_scale", m.embedding_scale, f"RecurrentGemma scales embeddings by "
                          f"bf16(sqrt(hidden_size)) = {expected}")
    if not m.logit_softcap:
        raise unsupported("logit_softcap", m.logit_softcap, "RecurrentGemma always soft-caps its logits")
    if m.logit_scale != 1.0 or m.residual_scale != 1.0:
        raise unsupported("logit_scale", (m.logit_scale, m.residual_scale),
                          "RecurrentGemma has no logit or residual multipliers (both must be 1)")
    if m.mlp.activation != "geglu_tanh" or not m.mlp.bias:
        raise unsupported("mlp.activation", m.mlp.activation, "RecurrentGemma's MLP is geglu_tanh with biases "
                          "(one hidden_activation serves the MLP and the recurrent block)")
    r, a = m.rglru, m.attention
    if "recurrent" in types and (r.c != RG_LRU_C or not r.bias):
        raise unsupported("rglru.c", r.c, "RecurrentGemma's RG-LRU has c = 8 and biases on linear_x/y/out")
    if "recurrent" in types and "attention" in types and r.num_heads != a.num_heads:
        raise unsupported("rglru.num_heads", r.num_heads, f"RecurrentGemma uses num_attention_heads for the "
                          f"RG-LRU gate blocks too; it must equal attention.num_heads={a.num_heads}")
    if "attention" in types:
        if (a.head_dim or m.hidden_size // a.num_heads) != m.hidden_size // a.num_heads:
            raise unsupported("attention.head_dim", a.head_dim, "RecurrentGemma's head width is "
                              "hidden_size // num_heads")
        if a.qk_norm or a.output_gate or a.rope_theta <= 0:
            raise unsupported("attention", {"qk_norm": a.qk_norm, "output_gate": a.output_gate, "rope_theta":
                              a.rope_theta}, "RecurrentGemma attention has RoPE, no QK-norm, no output gate")
        if a.softmax_scale is not None and not math.isclose(a.softmax_scale, (m.hidden_size // a.num_heads) ** -0.5):
            raise unsupported("attention.softmax_scale", a.softmax_scale, "RecurrentGemma uses head_dim ** -0.5")
        if not (a.bias if a.out_bias is None else a.out_bias):
            raise unsupported("attention.out_bias", a.out_bias, "RecurrentGemma's o_proj always has a bias")


def config_to_hf(m) -> dict:
    types = _block_types(m)
    _check_model(m, types)
    heads = m.attention.num_heads if "attention" in types else m.rglru.num_heads
    return {
        "model_type": "recurrent_gemma", "architectures": ["RecurrentGemmaForCausalLM"],
        "hidden_size": m.hidden_size, "vocab_size": m.vocab_size, "num_hidden_layers": len(types),
        "block_types": _shortest_period(types), "num_attention_heads": heads,
        "num_key_value_heads": m.attention.num_kv_heads or heads, "attention_bias": m.attention.bias,
        "attention_window_size": m.attention.window, "lru_width": m.rglru.width or m.hidden_size,
        "conv1d_width": m.rglru.conv_kernel, "intermediate_size": 2 * mlp_width(m),
        "hidden_activation": HIDDEN_ACTIVATION,
        "logits_soft_cap": m.logit_softcap, "rms_norm_eps": m.norm_eps, "tie_word_embeddings": m.tie_embeddings,
        "rope_parameters": {"rope_type": "default", "rope_theta": m.attention.rope_theta,
                            "partial_rotary_factor": m.attention.rotary_fraction},
    }


def _temporal_keys(block_type: str, m) -> tuple[str, ...]:
    if block_type == "recurrent":
        return RG_LRU_KEYS
    keys = ["q_proj.weight", "k_proj.weight", "v_proj.weight", "o_proj.weight", "o_proj.bias"]
    if m.attention.bias:
        keys += ["q_proj.bias", "k_proj.bias", "v_proj.bias"]
    return tuple(keys)


def _layer_pairs(m):
    """(HF layer index, temporal block type, megahybrid index of its mixer block)."""
    return [(i, t, 2 * i) for i, t in enumerate(_block_types(m))]


def state_from_hf(hf: Tensors, m) -> dict:
    out = {"embedding.weight": hf.pop("model.embed_tokens.weight"),
           "final_norm.weight": hf.pop("model.final_norm.weight")}
    for i, block_type, j in _layer_pairs(m):
        src = f"model.layers.{i}."
        out[f"layers.{j}.norm.weight"] = hf.pop(src + "temporal_pre_norm.weight")
        out[f"layers.{j + 1}.norm.weight"] = hf.pop(src + "channel_pre_norm.weight")
        copy(hf, src + "temporal_block.", out, f"layers.{j}.mixer.", _temporal_keys(block_type, m))
        copy(hf, src + "mlp_block.", out, f"layers.{j + 1}.mixer.", MLP_KEYS)
    return finish_from_hf(hf, m, out)


def state_to_hf(ref: Tensors, m) -> dict:
    out = {"model.embed_tokens.weight": ref.pop("embedding.weight"),
           "model.final_norm.weight": ref.pop("final_norm.weight")}
    for i, block_type, j in _layer_pairs(m):
        dst = f"model.layers.{i}."
        out[dst + "temporal_pre_norm.weight"] = ref.pop(f"layers.{j}.norm.weight")
        out[dst + "channel_pre_norm.weight"] = ref.pop(f"layers.{j + 1}.norm.weight")
        copy(ref, f"layers.{j}.mixer.", out, dst + "temporal_block.", _temporal_keys(block_type, m))
        copy(ref, f"layers.{j + 1}.mixer.", out, dst + "mlp_block.", MLP_KEYS)
    return finish_to_hf(ref, m, out)


register(HFArchitecture(
    "recurrent_gemma", "transformers:RecurrentGemmaForCausalLM", config_from_hf, config_to_hf,
    state_from_hf, state_to_hf,
    note="embeddings x bf16(sqrt(hidden)) (HF's bf16 normaliser); (1+w) RMSNorm; soft-cap; RG-LRU heads = "
         "attention heads; compare full-sequence logits (HF's cached path diverges past the window)"))
