"""transformers `Mamba2ForCausalLM` (model_type `mamba2`): a pure Mamba2 stack, pattern `M` x L.

On disk: `backbone.{embeddings, layers.{i}.{norm, mixer.*}, norm_f}` and `lm_head`; the mixer's
tensors already have megahybrid's names and layouts (mixers/mamba2.py), so only prefixes move.
"""

from __future__ import annotations

import math

from megahybrid.convert.base import ConversionError, HFArchitecture, Tensors, register, unsupported
from megahybrid.convert.hf_common import finish_from_hf, finish_to_hf, mamba2_keys, move_pairs
from megahybrid.pattern import resolve_layers


def config_from_hf(hf: dict) -> dict:
    hidden, expand, head_dim = hf["hidden_size"], hf.get("expand", 2), hf.get("head_dim", 64)
    if hf["num_heads"] * head_dim != expand * hidden:
        raise ConversionError(f"HF config: num_heads*head_dim={hf['num_heads'] * head_dim} must equal "
                              f"expand*hidden_size={expand * hidden} (megahybrid derives d_inner from expand)")
    if not hf.get("rms_norm", True):
        raise ConversionError("HF config: rms_norm=false (Mamba2 without its gated norm) is not supported")
    return {
        "pattern": "M" * hf["num_hidden_layers"],
        "hidden_size": hidden,
        "vocab_size": hf["vocab_size"],
        "norm_eps": hf.get("layer_norm_epsilon", 1e-5),
        "tie_embeddings": hf.get("tie_word_embeddings", False),
        "mamba2": {
            "state_size": hf["state_size"], "head_dim": head_dim, "num_groups": hf.get("n_groups", 1),
            "expand": expand, "conv_kernel": hf.get("conv_kernel", 4), "chunk_size": hf.get("chunk_size", 256),
            "dt_limit": [float(v) for v in hf.get("time_step_limit", (0.0, math.inf))],
            "use_conv_bias": hf.get("use_conv_bias", True), "use_bias": hf.get("use_bias", False),
            "dt_min": hf.get("time_step_min", 0.001), "dt_max": hf.get("time_step_max", 0.1),
            "dt_init_floor": hf.get("time_step_floor", 1e-4),
        },
    }


def config_to_hf(m) -> dict:
    if set(s.symbol for s in resolve_layers(m)) != {"M"}:
        raise unsupported("pattern", m.pattern, "Mamba2ForCausalLM holds Mamba2 layers only; pick another --arch")
    if m.norm != "rmsnorm" or m.zero_centered_norm or m.embedding_scale != 1.0 or m.logit_softcap:
        raise unsupported("norm", m.norm, "Mamba2ForCausalLM has plain RMSNorm, no embedding scale or softcap")
    if m.mamba2.norm_before_gate:
        raise unsupported("mamba2.norm_before_gate", True, "HF Mamba2 gates before its norm")
    mm = m.mamba2
    d_inner = mm.expand * m.hidden_size
    return {
        "model_type": "mamba2", "architectures": ["Mamba2ForCausalLM"],
        "hidden_size": m.hidden_size, "vocab_size": m.vocab_size, "num_hidden_layers": len(resolve_layers(m)),
        "layer_norm_epsilon": m.norm_eps, "tie_word_embeddings": m.tie_embeddings,
        "num_heads": d_inner // mm.head_dim, "head_dim": mm.head_dim, "state_size": mm.state_size,
        "n_groups": mm.num_groups, "expand": mm.expand, "conv_kernel": mm.conv_kernel,
        "chunk_size": mm.chunk_size, "time_step_limit": list(mm.dt_limit), "use_conv_bias": mm.use_conv_bias,
        "use_bias": mm.use_bias, "time_step_min": mm.dt_min, "time_step_max": mm.dt_max,
        "time_step_floor": mm.dt_init_floor, "rms_norm": True, "residual_in_fp32": True,
    }


def _pairs(m) -> list[tuple[str, str]]:
    """(HF key, megahybrid key) of every tensor but the LM head; drives both directions."""
    pairs = [("backbone.embeddings.weight", "embedding.weight"), ("backbone.norm_f.weight", "final_norm.weight")]
    for i in range(len(resolve_layers(m))):
        hf, ref = f"backbone.layers.{i}.", f"layers.{i}."
        pairs.append((hf + "norm.weight", ref + "norm.weight"))
        pairs += [(f"{hf}mixer.{k}", f"{ref}mixer.{k}") for k in mamba2_keys(m.mamba2)]
    return pairs


def state_from_hf(hf: Tensors, m) -> dict:
    out: dict = {}
    move_pairs(hf, out, _pairs(m))
    return finish_from_hf(hf, m, out)


def state_to_hf(ref: Tensors, m) -> dict:
    out: dict = {}
    move_pairs(ref, out, _pairs(m), reverse=True)
    return finish_to_hf(ref, m, out)


register(HFArchitecture("mamba2", "transformers:Mamba2ForCausalLM", config_from_hf, config_to_hf,
                        state_from_hf, state_to_hf))
