"""transformers `NemotronHForCausalLM` (model_type `nemotron_h`): NVIDIA's Nemotron-H / Nemotron-3 hybrids,
one mixer per layer: Mamba2 (`M`), attention without RoPE (`*`), relu2 MLP (`-`) or MoE (`E`).

Layer types: `layers_block_type` (alias `layer_types`: linear_attention / full_attention / mlp / moe) or,
in older configs, `hybrid_override_pattern` ("M-M*-E"), which is already a megahybrid pattern.

On disk: `backbone.{embeddings, layers.{i}.{norm, mixer.*}, norm_f}` and `lm_head` (`model.` in memory).
The Mamba2 mixer has megahybrid's names; d_inner = mamba_num_heads * mamba_head_dim (-> `mamba2.d_inner`
when it is not expand * hidden). MoE: router `mixer.gate.weight` + `gate.e_score_correction_bias`
(-> `moe.score_correction_bias`, buffer `router.expert_bias`), per-expert relu2 FFNs without a gate
`mixer.experts.{e}.{up,down}_proj.weight` (fused here), `mixer.shared_experts.{up,down}_proj.weight`.

Math the HF class fixes and the config must say: the SSM clamps softplus(dt) below at `time_step_min`
(its `time_step_limit` field is ignored) -> `mamba2.dt_limit = [time_step_min, inf]`; no RoPE ->
`attention.rope_theta = 0`; the lm_head is never tied (`tie_word_embeddings` is ignored), so a tied
megahybrid model is exported with a copy of its embedding.
Unsupported: MoE latent projections (`moe_latent_size`), MTP layers, biases on MoE experts.
"""

from __future__ import annotations

import math

from megahybrid.convert.base import ConversionError, HFArchitecture, Tensors, hf_field, register, unsupported
from megahybrid.convert.hf_common import check_hf_mamba2, experts_from_hub, experts_to_hub, mamba2_keys, move_pairs
from megahybrid.mixers.mamba2 import ssd_sizes
from megahybrid.mixers.mlp import is_gated, mlp_width
from megahybrid.mixers.moe import expert_width, shared_expert_width
from megahybrid.pattern import resolve_layers

SYMBOLS = {"linear_attention": "M", "mamba": "M", "full_attention": "*", "attention": "*", "mlp": "-", "moe": "E"}
LAYER_TYPES = {"M": "linear_attention", "*": "full_attention", "-": "mlp", "E": "moe"}
ACTIVATIONS = ("relu2", "silu", "gelu")
"""NemotronHMLP / experts activations megahybrid has under the same name (no gate: up -> act -> down)."""


# ------------------------------------------------------------------------------------- config


def pattern_from_hf(hf: dict) -> str:
    types = hf.get("layers_block_type") or hf.get("layer_types")
    if types:
        unknown = sorted(set(types) - set(SYMBOLS))
        if unknown:
            raise ConversionError(f"HF config: layers_block_type has {unknown}; expected {sorted(SYMBOLS)}")
        return "".join(SYMBOLS[t] for t in types)
    legacy = hf.get("hybrid_override_pattern")
    if not legacy or set(legacy) - set(LAYER_TYPES):
        raise ConversionError(f"HF config: needs layers_block_type or a hybrid_override_pattern of "
                              f"M * - E (got {legacy!r})")
    return legacy


def _activation(hf: dict) -> str:
    act = hf.get("mlp_hidden_act", "relu2")
    if act not in ACTIVATIONS:
        raise ConversionError(f"HF config: mlp_hidden_act={act!r}; supported: {', '.join(ACTIVATIONS)}")
    return act


def _moe_from_hf(hf: dict) -> dict:
    if hf.get("moe_latent_size") is not None:
        raise ConversionError(f"HF config: moe_latent_size={hf['moe_latent_size']} (latent MoE projections) "
                              "is not supported")
    if hf.get("mlp_bias", False):
        raise ConversionError("HF config: mlp_bias=true with MoE layers (biased experts) is not supported")
    return {
        "num_experts": hf_field(hf, "n_routed_experts", "num_local_experts"), "top_k": hf["num_experts_per_tok"],
        "ffn_hidden_size": hf["moe_intermediate_size"], "activation": _activation(hf), "router": "sigmoid",
        "norm_topk_prob": hf.get("norm_topk_prob", True),
        "routed_scaling_factor": float(hf.get("routed_scaling_factor", 1.0)),
        "score_correction_bias": True, "num_groups": hf.get("n_group", 1), "topk_groups": hf.get("topk_group", 1),
        # NemotronHMoE always builds one shared expert of this width, whatever n_shared_experts says.
        "num_shared_experts": 1, "shared_ffn_hidden_size": hf["moe_shared_expert_intermediate_size"],
    }


def config_from_hf(hf: dict) -> dict:
    if hf.get("num_nextn_predict_layers", 0):
        raise ConversionError(f"HF config: num_nextn_predict_layers={hf['num_nextn_predict_layers']} (MTP "
                              "layers) is not supported; the reference LM builds no MTP layers yet")
    if hf.get("mamba_hidden_act", "silu") != "silu":
        raise ConversionError(f"HF config: mamba_hidden_act={hf['mamba_hidden_act']!r}; megahybrid's conv uses silu")
    pattern, hidden = pattern_from_hf(hf), hf["hidden_size"]
    heads, head_dim, expand = hf["mamba_num_heads"], hf["mamba_head_dim"], hf.get("expand", 2)
    model = {
        "pattern": pattern, "hidden_size": hidden, "vocab_size": hf["vocab_size"],
        "norm_eps": hf.get("layer_norm_epsilon", 1e-5), "tie_embeddings": False,  # NemotronH never ties
        "max_seq_len": hf.get("max_position_embeddings", 4096),
        "attention": {"num_heads": hf["num_attention_heads"], "num_kv_heads": hf["num_key_value_heads"],
                      "head_dim": hf.get("head_dim"), "rope_theta": 0.0},
        "mamba2": {
            "state_size": hf["ssm_state_size"], "head_dim": head_dim, "num_groups": hf.get("n_groups", 1),
            "expand": expand, "d_inner": None if heads * head_dim == expand * hidden else heads * head_dim,
            "conv_kernel": hf.get("conv_kernel", 4), "chunk_size": hf.get("chunk_size", 128),
            "dt_limit": [float(hf.get("time_step_min", 0.001)), math.inf],
            "dt_min": hf.get("time_step_min", 0.001), "dt_max": hf.get("time_step_max", 0.1),
            "dt_init_floor": hf.get("time_step_floor", 1e-4),
            "use_conv_bias": hf.get("use_conv_bias", True), "use_bias": hf.get("use_bias", False),
        },
        "mlp": {"ffn_hidden_size": hf["intermediate_size"], "activation": _activation(hf),
                "bias": hf.get("mlp_bias", False)},
    }
    if "E" in pattern:
        model["moe"] = _moe_from_hf(hf)
    return model


def _check_exportable(m, symbols: set) -> None:
    if symbols - set(LAYER_TYPES):
        raise unsupported("pattern", m.pattern, f"NemotronH layers are {' '.join(LAYER_TYPES)} only")
    if m.norm != "rmsnorm" or m.zero_centered_norm:
        raise unsupported("norm", m.norm, "NemotronH has a plain RMSNorm (x * w)")
    for name, neutral in (("embedding_scale", 1.0), ("logit_scale", 1.0), ("residual_scale", 1.0),
                          ("logit_softcap", None)):
        if getattr(m, name) != neutral:
            raise unsupported(name, getattr(m, name), f"NemotronH has none; it must be {neutral}")
    a = m.attention
    if "*" in symbols:
        if a.rope_theta != 0:
            raise unsupported("attention.rope_theta", a.rope_theta, "NemotronH attention has no RoPE; it must be 0")
        head_dim = a.head_dim or m.hidden_size // a.num_heads
        if a.bias or a.output_gate or a.qk_norm or a.softmax_scale not in (None, head_dim ** -0.5):
            raise unsupported("attention", {"bias": a.bias, "output_gate": a.output_gate, "qk_norm": a.qk_norm,
                                            "softmax_scale": a.softmax_scale},
                              "NemotronH attention is bias-free, ungated, without QK-norm, scaled by head_dim**-0.5")
    if "M" in symbols:
        check_hf_mamba2(m, "NemotronH")
        lo, hi = m.mamba2.dt_limit
        if not (lo > 0 and hi == math.inf):
            raise unsupported("mamba2.dt_limit", m.mamba2.dt_limit, "NemotronH clamps softplus(dt) to "
                              "[time_step_min, inf) with time_step_min > 0; set it to [dt_min, inf]")
    activations = {m.mlp.activation} if "-" in symbols else set()
    if "E" in symbols:
        activations.add(m.moe.activation)
        _check_moe_exportable(m)
    if len(activations) > 1 or any(is_gated(act) or act not in ACTIVATIONS for act in activations):
        raise unsupported("mlp.activation", sorted(activations), "NemotronH has one ungated activation "
                          f"(mlp_hidden_act, one of {', '.join(ACTIVATIONS)}) for MLPs and experts")


def _check_moe_exportable(m) -> None:
    moe = m.moe
    if moe.router != "sigmoid":
        raise unsupported("moe.router", moe.router, "NemotronH's router is sigmoid")
    if moe.num_shared_experts == 0:
        raise unsupported("moe.num_shared_experts", 0, "NemotronH's MoE always has a shared expert")
    if moe.capacity_factor is not None:
        raise unsupported("moe.capacity_factor", moe.capacity_factor, "NemotronH routes dropless (null)")
    if getattr(moe, "shared_expert_gate", False):
        raise unsupported("moe.shared_expert_gate", True, "NemotronH's shared expert has no gate")
    if m.mlp.bias:
        raise unsupported("mlp.bias", True, "NemotronH's mlp_bias would also bias the MoE experts")


def config_to_hf(m) -> dict:
    specs = resolve_layers(m)
    symbols = {s.symbol for s in specs}
    _check_exportable(m, symbols)
    a, mm = m.attention, m.mamba2
    d_inner, heads, groups, state, head_dim = ssd_sizes(m)
    act = m.moe.activation if "E" in symbols else m.mlp.activation
    hf = {
        "model_type": "nemotron_h", "architectures": ["NemotronHForCausalLM"],
        "layers_block_type": [LAYER_TYPES[s.symbol] for s in specs],
        "hidden_size": m.hidden_size, "vocab_size": m.vocab_size, "layer_norm_epsilon": m.norm_eps,
        "tie_word_embeddings": False, "max_position_embeddings": m.max_seq_len,
        "num_attention_heads": a.num_heads, "num_key_value_heads": a.num_kv_heads or a.num_heads,
        "head_dim": a.head_dim or m.hidden_size // a.num_heads, "attention_bias": False,
        "intermediate_size": mlp_width(m), "mlp_hidden_act": act if act in ACTIVATIONS else "relu2",
        "mlp_bias": m.mlp.bias,
        "mamba_num_heads": heads, "mamba_head_dim": head_dim, "ssm_state_size": state, "n_groups": groups,
        "expand": mm.expand, "conv_kernel": mm.conv_kernel, "chunk_size": mm.chunk_size,
        "time_step_min": mm.dt_limit[0], "time_step_max": max(mm.dt_max, mm.dt_limit[0]),
        "time_step_floor": mm.dt_init_floor, "time_step_limit": list(mm.dt_limit),
        "use_conv_bias": mm.use_conv_bias, "use_bias": mm.use_bias, "mamba_hidden_act": "silu",
        "residual_in_fp32": False, "num_nextn_predict_layers": 0,
    }
    if "E" in symbols:
        moe = m.moe
        hf.update({
            "n_routed_experts": moe.num_experts, "num_experts_per_tok": moe.top_k,
            "moe_intermediate_size": expert_width(m), "moe_shared_expert_intermediate_size": shared_expert_width(m),
            "n_shared_experts": 1, "norm_topk_prob": moe.norm_topk_prob,
            "routed_scaling_factor": moe.routed_scaling_factor, "n_group": moe.num_groups,
            "topk_group": moe.topk_groups, "moe_latent_size": None,
        })
    return hf


# ------------------------------------------------------------------------------------ tensors


def _pairs(m) -> list[tuple[str, str]]:
    """(HF hub key, ReferenceLM key) for every tensor that moves unchanged (all but routed experts)."""
    pairs = [("backbone.embeddings.weight", "embedding.weight"), ("backbone.norm_f.weight", "final_norm.weight"),
             ("lm_head.weight", "lm_head.weight")]
    mlp_keys = ["up_proj.weight", "down_proj.weight"] + (["up_proj.bias", "down_proj.bias"] if m.mlp.bias else [])
    for i, spec in enumerate(resolve_layers(m)):
        hf, ours = f"backbone.layers.{i}.", f"layers.{i}."
        pairs.append((hf + "norm.weight", ours + "norm.weight"))
        if spec.symbol == "M":
            keys = [(k, k) for k in mamba2_keys(m.mamba2)]
        elif spec.symbol == "*":
            keys = [(f"{p}.weight", f"{p}.weight") for p in ("q_proj", "k_proj", "v_proj", "o_proj")]
        elif spec.symbol == "-":
            keys = [(k, k) for k in mlp_keys]
        else:
            keys = [("gate.weight", "router.weight"), ("gate.e_score_correction_bias", "router.expert_bias")]
            keys += [(f"shared_experts.{k}", f"shared_expert.{k}") for k in ("up_proj.weight", "down_proj.weight")]
        pairs += [(f"{hf}mixer.{a}", f"{ours}mixer.{b}") for a, b in keys]
    return pairs


def _moe_layers(m) -> list[int]:
    return [i for i, spec in enumerate(resolve_layers(m)) if spec.symbol == "E"]


def state_from_hf(hf: Tensors, m) -> dict:
    out: dict = {}
    move_pairs(hf, out, _pairs(m))
    for i in _moe_layers(m):
        fused = experts_from_hub(hf, f"backbone.layers.{i}.mixer.experts.", m.moe.num_experts, gated=False)
        out.update({f"layers.{i}.mixer.experts.{k}": v for k, v in fused.items()})
    hf.done()
    return out


def state_to_hf(ref: Tensors, m) -> dict:
    if m.tie_embeddings:  # NemotronH has its own lm_head: export a copy of the tied embedding
        ref.tensors["lm_head.weight"] = ref.tensors["embedding.weight"].clone()
    if "E" in {s.symbol for s in resolve_layers(m)} and not m.moe.score_correction_bias:
        for i in _moe_layers(m):  # HF always adds the bias: zeros choose exactly as no bias does
            ref.tensors[f"layers.{i}.mixer.router.expert_bias"] = ref.tensors[f"layers.{i}.mixer.router.weight"].new_zeros(m.moe.num_experts)
    out: dict = {}
    move_pairs(ref, out, _pairs(m), reverse=True)
    for i in _moe_layers(m):
        fused = {k: ref.pop(f"layers.{i}.mixer.experts.{k}") for k in ("up_proj", "down_proj")}
        out.update(experts_to_hub(fused, f"backbone.layers.{i}.mixer.experts.", gated=False))
    ref.done()
    return out


register(HFArchitecture(
    "nemotron_h", "transformers:NemotronHForCausalLM", config_from_hf, config_to_hf, state_from_hf, state_to_hf,
    note="dt clamp [time_step_min, inf) -> mamba2.dt_limit; no RoPE; e_score_correction_bias -> "
         "moe.score_correction_bias; lm_head never tied (tied models export a copy); no latent MoE, no MTP"))
