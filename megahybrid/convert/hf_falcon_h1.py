"""transformers `FalconH1ForCausalLM` (model_type `falcon_h1`, TII 2025): in every layer attention and a
Mamba2 mixer run in parallel on the same normed input and their outputs are summed, then a SwiGLU MLP.
In megahybrid that is two blocks per layer, `p` (model.parallel_mixers.mixers = [attention, mamba2])
then `-`: pattern `(p-)xL`.

On disk: `model.{embed_tokens, final_layernorm}`, `lm_head`, and per layer `model.layers.{i}.`
`{input_layernorm, pre_ff_layernorm}`, `self_attn.{q,k,v,o}_proj` (RoPE, GQA, `head_dim` may differ
from hidden/heads), `mamba.{in_proj [z|x|B|C|dt], conv1d, dt_bias, A_log, D, out_proj}` (+ `norm.weight`
only with `mamba_rms_norm`; `mamba_d_ssm` sets the SSM width apart from expand*hidden),
`feed_forward.{gate,up,down}_proj`.

µP multipliers: `embedding_multiplier` -> `model.embedding_scale`, `lm_head_multiplier` ->
`model.logit_scale`. The per-weight ones are FOLDED into the weights on import (exact up to float
rounding, and their biases too where the multiplier follows the bias):
    attention_in_multiplier a, key_multiplier k, attention_out_multiplier o:
        q_proj.W *= a;  k_proj.W *= a*k, k_proj.b *= k;  v_proj.W *= a;  o_proj.{W,b} *= o
    ssm_in_multiplier s, ssm_multipliers [z, x, B, C, dt] (HF's `mup_vector` per in_proj row block),
    ssm_out_multiplier so:  in_proj.W rows *= s*mup, in_proj.b *= mup;  out_proj.{W,b} *= so
    mlp_multipliers [g, d]:  gate_proj.{W,b} *= g;  down_proj.{W,b} *= d
Export writes these multipliers as 1.0 next to the folded weights, so transformers reloads the same
function. Unsupported: hidden_act other than silu (it is also the Mamba conv activation), rope types
other than default, `mamba_proj_bias != projectors_bias` (megahybrid's Mamba2 has one `use_bias` for
in_proj and out_proj).
"""

from __future__ import annotations

import math

import torch

from megahybrid.convert.base import ConversionError, HFArchitecture, Tensors, register, unsupported
from megahybrid.convert.hf_common import copy, finish_from_hf, finish_to_hf
from megahybrid.mixers.mamba2 import ssd_sizes
from megahybrid.mixers.mlp import mlp_width
from megahybrid.pattern import resolve_layers

BRANCHES = ["attention", "mamba2"]
ATTENTION = ("q_proj", "k_proj", "v_proj", "o_proj")
MLP = ("gate_proj", "up_proj", "down_proj")
MULTIPLIERS = {"attention_in_multiplier": 1.0, "key_multiplier": 1.0, "attention_out_multiplier": 1.0,
               "ssm_in_multiplier": 1.0, "ssm_out_multiplier": 1.0, "ssm_multipliers": [1.0] * 5,
               "mlp_multipliers": [1.0, 1.0]}
"""The per-weight µP multipliers folded into the weights, with their neutral values (written on export)."""


# ------------------------------------------------------------------------------------ config


def _rope_theta(hf: dict) -> float:
    rope = hf.get("rope_parameters") or {}
    if rope.get("rope_type", "default") != "default":
        raise ConversionError(f"HF config: rope_parameters.rope_type={rope['rope_type']!r}: only default RoPE "
                              "converts (megahybrid's attention has no RoPE scaling)")
    return float(rope.get("rope_theta", hf.get("rope_theta", 10000.0)))


def config_from_hf(hf: dict) -> dict:
    if hf.get("hidden_act", "silu") != "silu":
        raise ConversionError(f"HF config: hidden_act={hf['hidden_act']!r}: megahybrid's Falcon-H1 layers "
                              "(SwiGLU MLP, Mamba2 conv) use silu only")
    if hf.get("mamba_proj_bias", False) != hf.get("projectors_bias", False):
        raise ConversionError(f"HF config: mamba_proj_bias={hf.get('mamba_proj_bias')} (in_proj) differs from "
                              f"projectors_bias={hf.get('projectors_bias')} (out_proj); megahybrid's Mamba2 "
                              "has one use_bias for both")
    hidden, heads, expand = hf["hidden_size"], hf["num_attention_heads"], hf.get("mamba_expand", 2)
    d_ssm = hf.get("mamba_d_ssm") or expand * hidden
    n_heads = hf["mamba_n_heads"]
    d_head = hf.get("mamba_d_head", "auto")
    d_head = d_ssm // n_heads if d_head == "auto" else d_head
    if n_heads * d_head != d_ssm:
        raise ConversionError(f"HF config: mamba_n_heads*mamba_d_head={n_heads * d_head} must equal "
                              f"mamba_d_ssm={d_ssm}")
    limit = hf.get("time_step_limit") or (0.0, math.inf)
    return {
        "pattern": f"(p-)x{hf['num_hidden_layers']}",
        "parallel_mixers": {"mixers": list(BRANCHES)},
        "hidden_size": hidden,
        "vocab_size": hf["vocab_size"],
        "norm_eps": hf.get("rms_norm_eps", 1e-5),
        "tie_embeddings": hf.get("tie_word_embeddings", False),
        "init_std": hf.get("initializer_range", 0.02),
        "embedding_scale": float(hf.get("embedding_multiplier", 1.0)),
        "logit_scale": float(hf.get("lm_head_multiplier", 1.0)),
        "attention": {"num_heads": heads, "num_kv_heads": hf.get("num_key_value_heads") or heads,
                      "head_dim": hf.get("head_dim") or hidden // heads, "rope_theta": _rope_theta(hf),
                      "bias": hf.get("attention_bias", False)},
        "mamba2": {"state_size": hf["mamba_d_state"], "head_dim": d_head, "num_groups": hf.get("mamba_n_groups", 1),
                   "expand": expand, "d_inner": None if d_ssm == expand * hidden else d_ssm,
                   "conv_kernel": hf.get("mamba_d_conv", 4), "chunk_size": hf.get("mamba_chunk_size", 256),
                   "dt_limit": [float(v) for v in limit], "use_conv_bias": hf.get("mamba_conv_bias", True),
                   "use_bias": hf.get("mamba_proj_bias", False), "gated_norm": hf.get("mamba_rms_norm", False),
                   "norm_before_gate": hf.get("mamba_norm_before_gate", True)},
        "mlp": {"ffn_hidden_size": hf["intermediate_size"], "activation": "swiglu", "bias": hf.get("mlp_bias", False)},
    }


def _check_expressible(m) -> None:
    symbols = [s.symbol for s in resolve_layers(m)]
    if len(symbols) % 2 or symbols != ["p", "-"] * (len(symbols) // 2):
        raise unsupported("pattern", m.pattern, "FalconH1ForCausalLM layers are parallel attention + Mamba2 "
                          "followed by an MLP: '(p-)xN'")
    if list(m.parallel_mixers.mixers) not in (BRANCHES, ["*", "M"]):
        raise unsupported("parallel_mixers.mixers", m.parallel_mixers.mixers,
                          "Falcon-H1 runs exactly [attention, mamba2] in parallel")
    if m.norm != "rmsnorm" or m.zero_centered_norm:
        raise unsupported("norm", m.norm, "Falcon-H1 has plain RMSNorm (zero_centered_norm=false)")
    for field, value in (("residual_scale", m.residual_scale != 1.0), ("logit_softcap", m.logit_softcap),
                         ("post_norm_layers", getattr(m, "post_norm_layers", None))):
        if value:
            raise unsupported(field, getattr(m, field), "FalconH1ForCausalLM has no such option")
    a = m.attention
    head_dim = a.head_dim or m.hidden_size // a.num_heads
    if a.qk_norm or a.output_gate or a.rotary_fraction != 1.0 or a.rope_theta <= 0:
        raise unsupported("attention", {"qk_norm": a.qk_norm, "output_gate": a.output_gate,
                                        "rotary_fraction": a.rotary_fraction, "rope_theta": a.rope_theta},
                          "Falcon-H1's attention has full RoPE, no QK-norm and no output gate")
    if getattr(a, "out_bias", None) not in (None, a.bias):
        raise unsupported("attention.out_bias", a.out_bias, "Falcon-H1 has one attention_bias for q/k/v/o")
    if a.softmax_scale is not None and a.softmax_scale != head_dim ** -0.5:
        raise unsupported("attention.softmax_scale", a.softmax_scale, "Falcon-H1 scales scores by head_dim**-0.5")
    if m.mlp.activation != "swiglu":
        raise unsupported("mlp.activation", m.mlp.activation, "Falcon-H1's MLP is SwiGLU")


def config_to_hf(m) -> dict:
    _check_expressible(m)
    a, c = m.attention, m.mamba2
    d_inner, nheads, G, N, P = ssd_sizes(m)
    hf = {
        "model_type": "falcon_h1", "architectures": ["FalconH1ForCausalLM"],
        "hidden_size": m.hidden_size, "vocab_size": m.vocab_size, "num_hidden_layers": len(resolve_layers(m)) // 2,
        "intermediate_size": mlp_width(m), "hidden_act": "silu", "mlp_bias": m.mlp.bias,
        "rms_norm_eps": m.norm_eps, "tie_word_embeddings": m.tie_embeddings, "initializer_range": m.init_std,
        "max_position_embeddings": m.max_seq_len,
        "num_attention_heads": a.num_heads, "num_key_value_heads": a.num_kv_heads or a.num_heads,
        "head_dim": a.head_dim or m.hidden_size // a.num_heads, "attention_bias": a.bias,
        "rope_parameters": {"rope_type": "default", "rope_theta": a.rope_theta},
        "mamba_d_ssm": d_inner, "mamba_n_heads": nheads, "mamba_d_head": P, "mamba_n_groups": G,
        "mamba_d_state": N, "mamba_d_conv": c.conv_kernel, "mamba_expand": c.expand,
        "mamba_chunk_size": c.chunk_size, "mamba_conv_bias": c.use_conv_bias, "mamba_proj_bias": c.use_bias,
        "projectors_bias": c.use_bias, "mamba_rms_norm": c.gated_norm, "mamba_norm_before_gate": c.norm_before_gate,
        "time_step_limit": list(c.dt_limit),
        "embedding_multiplier": m.embedding_scale, "lm_head_multiplier": m.logit_scale,
    }
    return hf | {k: (list(v) if isinstance(v, list) else v) for k, v in MULTIPLIERS.items()}


# ------------------------------------------------------------------------------------ state


def _multipliers(hf: dict) -> dict:
    return {k: hf.get(k) if hf.get(k) is not None else v for k, v in MULTIPLIERS.items()}


def _in_proj_scale(mult: dict, m) -> torch.Tensor:
    """HF's `compute_mup_vector` per in_proj row [z | x | B | C | dt], times ssm_in_multiplier (rows only)."""
    d_inner, nheads, G, N, _ = ssd_sizes(m)
    sizes = [d_inner, d_inner, G * N, G * N, nheads]
    return torch.cat([torch.full((n,), float(s), dtype=torch.float64) for n, s in zip(sizes, mult["ssm_multipliers"])])


def _scaled(t: torch.Tensor, scale) -> torch.Tensor:
    """t * scale (a number or a per-row vector), computed in float64 and returned in t's dtype."""
    if not isinstance(scale, torch.Tensor) and scale == 1.0:
        return t
    s = scale if not isinstance(scale, torch.Tensor) else scale.reshape(-1, *([1] * (t.dim() - 1)))
    return (t.double() * s).to(t.dtype)


def _mamba_keys(m) -> list[str]:
    keys = ["in_proj.weight", "conv1d.weight", "dt_bias", "A_log", "D", "out_proj.weight"]
    keys += ["conv1d.bias"] if m.mamba2.use_conv_bias else []
    keys += ["norm.weight"] if m.mamba2.gated_norm else []
    keys += ["in_proj.bias", "out_proj.bias"] if m.mamba2.use_bias else []
    return keys


def _layer_scales(mult: dict, m) -> dict:
    """{(branch, tensor name): multiplier} folded on import: see the module docstring."""
    a, k, o = mult["attention_in_multiplier"], mult["key_multiplier"], mult["attention_out_multiplier"]
    mup = _in_proj_scale(mult, m)
    gate, down = mult["mlp_multipliers"]
    return {
        ("self_attn", "q_proj.weight"): a, ("self_attn", "k_proj.weight"): a * k, ("self_attn", "k_proj.bias"): k,
        ("self_attn", "v_proj.weight"): a, ("self_attn", "o_proj.weight"): o, ("self_attn", "o_proj.bias"): o,
        ("mamba", "in_proj.weight"): mup * mult["ssm_in_multiplier"], ("mamba", "in_proj.bias"): mup,
        ("mamba", "out_proj.weight"): mult["ssm_out_multiplier"], ("mamba", "out_proj.bias"): mult["ssm_out_multiplier"],
        ("feed_forward", "gate_proj.weight"): gate, ("feed_forward", "gate_proj.bias"): gate,
        ("feed_forward", "down_proj.weight"): down, ("feed_forward", "down_proj.bias"): down,
    }


def _pairs(m) -> list[tuple[str, str, list[str]]]:
    """(HF submodule, megahybrid submodule, tensor names) of one layer's mixers and MLP."""
    bias = [".bias"] if m.attention.bias else []
    mlp_bias = [".bias"] if m.mlp.bias else []
    return [("self_attn", "attention", [p + s for p in ATTENTION for s in [".weight", *bias]]),
            ("mamba", "mamba2", _mamba_keys(m)),
            ("feed_forward", None, [p + s for p in MLP for s in [".weight", *mlp_bias]])]


def state_from_hf(hf: Tensors, m) -> dict:
    scales = _layer_scales(_multipliers(hf.source_config), m)
    out = {"embedding.weight": hf.pop("model.embed_tokens.weight"),
           "final_norm.weight": hf.pop("model.final_layernorm.weight")}
    for j in range(len(resolve_layers(m)) // 2):
        src, mix, ffn = f"model.layers.{j}.", f"layers.{2 * j}.", f"layers.{2 * j + 1}."
        out[mix + "norm.weight"] = hf.pop(src + "input_layernorm.weight")
        out[ffn + "norm.weight"] = hf.pop(src + "pre_ff_layernorm.weight")
        for hf_part, branch, names in _pairs(m):
            dst = f"{mix}mixer.{branch}." if branch else f"{ffn}mixer."
            for name in names:
                out[dst + name] = _scaled(hf.pop(f"{src}{hf_part}.{name}"), scales.get((hf_part, name), 1.0))
    return finish_from_hf(hf, m, out)


def state_to_hf(ref: Tensors, m) -> dict:
    """The weights already hold the folded multipliers; config_to_hf writes them as 1.0."""
    out = {"model.embed_tokens.weight": ref.pop("embedding.weight"),
           "model.final_layernorm.weight": ref.pop("final_norm.weight")}
    for j in range(len(resolve_layers(m)) // 2):
        dst, mix, ffn = f"model.layers.{j}.", f"layers.{2 * j}.", f"layers.{2 * j + 1}."
        out[dst + "input_layernorm.weight"] = ref.pop(mix + "norm.weight")
        out[dst + "pre_ff_layernorm.weight"] = ref.pop(ffn + "norm.weight")
        for hf_part, branch, names in _pairs(m):
            copy(ref, f"{mix}mixer.{branch}." if branch else f"{ffn}mixer.", out, f"{dst}{hf_part}.", names)
    return finish_to_hf(ref, m, out)


register(HFArchitecture(
    "falcon_h1", "transformers:FalconH1ForCausalLM", config_from_hf, config_to_hf, state_from_hf, state_to_hf,
    note="each HF layer = 2 blocks: p (attention + Mamba2 summed) then -; embedding/lm_head multipliers -> "
         "embedding_scale/logit_scale; attention/ssm/key/mlp multipliers and ssm_multipliers FOLDED into the "
         "weights (exported as 1.0); mamba_proj_bias must equal projectors_bias; hidden_act silu"))
