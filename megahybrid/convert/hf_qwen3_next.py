"""transformers `Qwen3NextForCausalLM` (model_type `qwen3_next`): Gated DeltaNet + gated attention,
each followed by a sparse MoE (shared expert with a sigmoid gate) or a dense SwiGLU MLP.

One HF layer = two megahybrid blocks: the mixer (`layer_types`: linear_attention -> `G`,
full_attention -> `*`) and the channel layer (`E` where `decoder_sparse_step` / `mlp_only_layers`
make it sparse, else `-`). On disk, `model.layers.{i}.`:
    input_layernorm, post_attention_layernorm            zero-centred RMSNorms x * (1 + w)
    linear_attn.in_proj_qkvz [Hk*(2dk + 2r dv), H]      grouped per KEY head g: [q_g | k_g | v_g (r heads) | z_g]
    linear_attn.in_proj_ba   [2 Hv, H]                  per key head g: [b_g (r) | a_g (r)];  r = Hv / Hk
    linear_attn.conv1d [2Hk dk + Hv dv, 1, K]           flat [q | k | v] (no bias), A_log, dt_bias,
    linear_attn.norm [dv] (plain weight), out_proj
    self_attn.q_proj [2 H D, H] (per head [q_h | gate_h]), k/v/o_proj, q_norm/k_norm [D] (zero-centred)
    mlp.{gate,up,down}_proj | mlp.gate (router), mlp.experts.{e}.{gate,up,down}_proj, mlp.shared_expert.*,
    mlp.shared_expert_gate [1, H]
Everything maps onto megahybrid's fields (`zero_centered_norm`, `attention.output_gate`,
`attention.rotary_fraction`, `moe.shared_expert_gate`); nothing is folded. Hub `mtp.*` tensors (the
multi-token-prediction head, which transformers ignores too) are dropped on import. The helpers here
are shared with Qwen3.5 (hf_qwen3_5.py), which differs only in its GDN projections and MoE placement.
"""

from __future__ import annotations

import torch

from megahybrid.convert.base import ConversionError, HFArchitecture, Tensors, register, unsupported
from megahybrid.convert.hf_common import copy, experts_from_hub, experts_to_hub, finish_to_hf, rope_from_hf
from megahybrid.mixers.gated_deltanet import gdn_sizes
from megahybrid.mixers.moe import expert_width, shared_expert_width
from megahybrid.mixers.mlp import mlp_width
from megahybrid.pattern import resolve_layers

MIXERS = {"linear_attention": "G", "full_attention": "*"}
"""HF `layer_types` entry -> megahybrid mixer symbol."""
LAYER_TYPES = {v: k for k, v in MIXERS.items()}
ATTENTION_KEYS = ("q_proj", "k_proj", "v_proj", "o_proj")
MLP_KEYS = ("gate_proj.weight", "up_proj.weight", "down_proj.weight")


# ------------------------------------------------------------------------------ config


def mixer_symbols(hf: dict) -> list[str]:
    layer_types = hf.get("layer_types")
    if layer_types is None:  # v4 configs: every full_attention_interval-th layer is attention
        interval = hf.get("full_attention_interval", 4)
        layer_types = ["full_attention" if (i + 1) % interval == 0 else "linear_attention"
                       for i in range(hf["num_hidden_layers"])]
    bad = sorted(set(layer_types) - set(MIXERS))
    if bad:
        raise ConversionError(f"HF config: layer_types has {bad}; expected {sorted(MIXERS)}")
    return [MIXERS[t] for t in layer_types]


def check_activation(hf: dict) -> None:
    if hf.get("hidden_act", "silu") != "silu":
        raise ConversionError(f"HF config: hidden_act={hf['hidden_act']!r}; the SwiGLU MLPs and the GDN conv "
                              "activation convert only with 'silu'")


def qwen_model_config(hf: dict, channels: list[str]) -> dict:
    """The `model` dict shared by Qwen3-Next and Qwen3.5: `channels[i]` ('-' or 'E') follows HF layer i's mixer."""
    check_activation(hf)
    theta, fraction = rope_from_hf(hf, default_fraction=0.25)  # transformers' default for these classes
    if theta == 0.0:
        raise ConversionError("HF config: rope_theta is not set; Qwen3-Next/Qwen3.5 attention always has RoPE")
    mixers = mixer_symbols(hf)
    model = {
        "pattern": "".join(m + c for m, c in zip(mixers, channels)),
        "hidden_size": hf["hidden_size"], "vocab_size": hf["vocab_size"],
        "norm_eps": hf.get("rms_norm_eps", 1e-6), "zero_centered_norm": True,
        "tie_embeddings": hf.get("tie_word_embeddings", False),
        "max_seq_len": hf.get("max_position_embeddings", 32768),
        "attention": {
            "num_heads": hf["num_attention_heads"], "num_kv_heads": hf["num_key_value_heads"],
            "head_dim": hf.get("head_dim") or hf["hidden_size"] // hf["num_attention_heads"],
            "rope_theta": theta, "rotary_fraction": fraction, "qk_norm": True, "output_gate": True,
            "bias": hf.get("attention_bias", False),
        },
        "gdn": {
            "num_qk_heads": hf["linear_num_key_heads"], "num_v_heads": hf["linear_num_value_heads"],
            "qk_head_dim": hf["linear_key_head_dim"], "v_head_dim": hf["linear_value_head_dim"],
            "conv_kernel": hf.get("linear_conv_kernel_dim", 4),
        },
    }
    if "-" in channels:
        model["mlp"] = {"ffn_hidden_size": hf["intermediate_size"], "activation": "swiglu"}
    if "E" in channels:
        model["moe"] = {
            "num_experts": hf["num_experts"], "top_k": hf["num_experts_per_tok"],
            "ffn_hidden_size": hf["moe_intermediate_size"], "activation": "swiglu", "router": "softmax",
            "norm_topk_prob": hf.get("norm_topk_prob", True), "num_shared_experts": 1,
            "shared_ffn_hidden_size": hf["shared_expert_intermediate_size"], "shared_expert_gate": True,
            "aux_loss_coeff": hf.get("router_aux_loss_coef", 0.001),
        }
    return model


def sparse_layers(hf: dict) -> list[bool]:
    """Qwen3NextDecoderLayer's rule: MoE unless in mlp_only_layers, if num_experts > 0 and (i+1) % step == 0."""
    skip, step = set(hf.get("mlp_only_layers") or ()), hf.get("decoder_sparse_step", 1)
    return [i not in skip and hf.get("num_experts", 0) > 0 and (i + 1) % step == 0
            for i in range(hf["num_hidden_layers"])]


def config_from_hf(hf: dict) -> dict:
    return qwen_model_config(hf, ["E" if s else "-" for s in sparse_layers(hf)])


def layer_pairs(m, arch: str) -> list[tuple[str, str]]:
    """[(mixer, channel)] per HF layer; the pattern must alternate G/* with -/E."""
    symbols = [s.symbol for s in resolve_layers(m)]
    pairs = list(zip(symbols[::2], symbols[1::2]))
    if len(symbols) % 2 or any(a not in LAYER_TYPES or c not in "-E" for a, c in pairs):
        raise unsupported("pattern", m.pattern, f"{arch} layers are a mixer (G or *) followed by a channel "
                                                f"layer (- or E), e.g. 'G-G-G-*E'")
    return pairs


def check_qwen_model(m, arch: str) -> list[tuple[str, str]]:
    """Refuse what Qwen3-Next/Qwen3.5 cannot express; return the layer pairs."""
    pairs = layer_pairs(m, arch)
    a, moe = m.attention, m.moe
    fixed = {  # field: (value, what HF needs)
        "norm": (m.norm, "rmsnorm"), "zero_centered_norm": (m.zero_centered_norm, True),
        "embedding_scale": (m.embedding_scale, 1.0), "logit_softcap": (m.logit_softcap, None),
        "logit_scale": (m.logit_scale, 1.0), "residual_scale": (m.residual_scale, 1.0),
        "post_norm_layers": (m.post_norm_layers or None, None),
        "attention.qk_norm": (a.qk_norm, True), "attention.qk_norm_scope": (a.qk_norm_scope, "head"),
        "attention.output_gate": (a.output_gate, True),
        "attention.out_bias": (getattr(a, "out_bias", None), None),
        "gdn.allow_neg_eigval": (m.gdn.allow_neg_eigval, False),
        "gdn.norm_eps": (m.gdn.norm_eps, None),
    }
    if a.softmax_scale is not None and a.softmax_scale != (a.head_dim or m.hidden_size // a.num_heads) ** -0.5:
        fixed["attention.softmax_scale"] = (a.softmax_scale, None)
    if a.rope_theta <= 0:
        fixed["attention.rope_theta"] = (a.rope_theta, "> 0")
    if any(c == "-" for _, c in pairs):
        fixed |= {"mlp.activation": (m.mlp.activation, "swiglu"), "mlp.bias": (m.mlp.bias, False)}
    if any(c == "E" for _, c in pairs):
        fixed |= {"moe.activation": (moe.activation, "swiglu"), "moe.router": (moe.router, "softmax"),
                  "moe.num_shared_experts": (moe.num_shared_experts, 1),
                  "moe.shared_expert_gate": (moe.shared_expert_gate, True),
                  "moe.capacity_factor": (moe.capacity_factor, None)}
        for name, default in (("score_correction_bias", False), ("routed_scaling_factor", 1.0), ("num_groups", 1)):
            if hasattr(moe, name):  # DeepSeek-style router options (added for NemotronH)
                fixed[f"moe.{name}"] = (getattr(moe, name), default)
    for field, (value, wanted) in fixed.items():
        if value != wanted:
            raise unsupported(field, value, f"{arch} needs {wanted!r}")
    return pairs


def qwen_config_to_hf(m, pairs) -> dict:
    """The config.json fields shared by Qwen3-Next and Qwen3.5 (no MoE fields)."""
    a = m.attention
    Hk, Hv, dk, dv = gdn_sizes(m)
    return {
        "vocab_size": m.vocab_size, "hidden_size": m.hidden_size, "num_hidden_layers": len(pairs),
        "layer_types": [LAYER_TYPES[mixer] for mixer, _ in pairs],
        "rms_norm_eps": m.norm_eps, "tie_word_embeddings": m.tie_embeddings, "hidden_act": "silu",
        "max_position_embeddings": m.max_seq_len,
        "num_attention_heads": a.num_heads, "num_key_value_heads": a.num_kv_heads or a.num_heads,
        "head_dim": a.head_dim or m.hidden_size // a.num_heads, "attention_bias": a.bias,
        "rope_parameters": {"rope_type": "default", "rope_theta": a.rope_theta,
                            "partial_rotary_factor": a.rotary_fraction},
        "linear_num_key_heads": Hk, "linear_num_value_heads": Hv, "linear_key_head_dim": dk,
        "linear_value_head_dim": dv, "linear_conv_kernel_dim": m.gdn.conv_kernel,
        "intermediate_size": mlp_width(m),
    }


def moe_config_to_hf(m) -> dict:
    moe = m.moe
    return {"num_experts": moe.num_experts, "num_experts_per_tok": moe.top_k,
            "moe_intermediate_size": expert_width(m), "shared_expert_intermediate_size": shared_expert_width(m),
            "router_aux_loss_coef": moe.aux_loss_coeff}


def config_to_hf(m) -> dict:
    pairs = check_qwen_model(m, "Qwen3NextForCausalLM")
    hf = qwen_config_to_hf(m, pairs) | moe_config_to_hf(m)
    # The sparse/dense choice per layer, written the explicit way: step 1, dense layers listed.
    hf |= {"decoder_sparse_step": 1, "norm_topk_prob": m.moe.norm_topk_prob,
           "mlp_only_layers": [i for i, (_, c) in enumerate(pairs) if c == "-"]}
    return hf


# ------------------------------------------------------------------------------- state


def qkvz_from_hf(hf: Tensors, src: str, m) -> dict:
    """Qwen3-Next's per-key-head groups -> megahybrid's separate q/k/v/g/b/a projections (weights only)."""
    Hk, Hv, dk, dv = gdn_sizes(m)
    r, H = Hv // Hk, m.hidden_size
    qkvz = hf.pop(src + "in_proj_qkvz.weight", (Hk * (2 * dk + 2 * r * dv), H)).view(Hk, -1, H)
    q, k, v, z = qkvz.split([dk, dk, r * dv, r * dv], dim=1)
    b, a = hf.pop(src + "in_proj_ba.weight", (2 * Hv, H)).view(Hk, 2 * r, H).split([r, r], dim=1)
    return {name: t.reshape(-1, H) for name, t in
            (("q_proj", q), ("k_proj", k), ("v_proj", v), ("g_proj", z), ("b_proj", b), ("a_proj", a))}


def qkvz_to_hf(w: dict, m) -> dict:
    Hk, Hv, dk, dv = gdn_sizes(m)
    H = m.hidden_size
    grouped = lambda name: w[name].reshape(Hk, -1, H)  # noqa: E731  (rows of key head g together)
    qkvz = torch.cat([grouped(n) for n in ("q_proj", "k_proj", "v_proj", "g_proj")], dim=1)
    ba = torch.cat([grouped("b_proj"), grouped("a_proj")], dim=1)
    return {"in_proj_qkvz.weight": qkvz.reshape(-1, H), "in_proj_ba.weight": ba.reshape(-1, H)}


def conv_from_hf(hf: Tensors, key: str, m) -> dict:
    """One flat [q | k | v] depthwise conv -> megahybrid's three."""
    Hk, Hv, dk, dv = gdn_sizes(m)
    conv = hf.pop(key, (2 * Hk * dk + Hv * dv, 1, m.gdn.conv_kernel))
    q, k, v = conv.split([Hk * dk, Hk * dk, Hv * dv], dim=0)
    return {"q_conv1d.weight": q, "k_conv1d.weight": k, "v_conv1d.weight": v}


def conv_to_hf(ref: Tensors, dst: str) -> torch.Tensor:
    return torch.cat([ref.pop(f"{dst}{n}_conv1d.weight") for n in "qkv"], dim=0)


def gdn_from_hf(hf: Tensors, src: str, out: dict, dst: str, m) -> None:
    for name, t in qkvz_from_hf(hf, src, m).items():
        out[f"{dst}{name}.weight"] = t
    for name, t in conv_from_hf(hf, src + "conv1d.weight", m).items():
        out[dst + name] = t
    copy(hf, src, out, dst, ("A_log", "dt_bias"))
    out[dst + "o_norm.weight"] = hf.pop(src + "norm.weight")
    out[dst + "o_proj.weight"] = hf.pop(src + "out_proj.weight")


def gdn_to_hf(ref: Tensors, src: str, out: dict, dst: str, m) -> None:
    proj = {n: ref.pop(f"{src}{n}.weight") for n in ("q_proj", "k_proj", "v_proj", "g_proj", "b_proj", "a_proj")}
    for name, t in qkvz_to_hf(proj, m).items():
        out[dst + name] = t
    out[dst + "conv1d.weight"] = conv_to_hf(ref, src)
    copy(ref, src, out, dst, ("A_log", "dt_bias"))
    out[dst + "norm.weight"] = ref.pop(src + "o_norm.weight")
    out[dst + "out_proj.weight"] = ref.pop(src + "o_proj.weight")


def attention_keys(m) -> list[str]:
    names = [f"{p}.weight" for p in ATTENTION_KEYS] + ["q_norm.weight", "k_norm.weight"]
    return names + ([f"{p}.bias" for p in ATTENTION_KEYS] if m.attention.bias else [])


def channel_from_hf(hf: Tensors, src: str, out: dict, dst: str, channel: str, m) -> None:
    """Dense MLP (same names) or sparse MoE (per-expert hub keys, or fused ones if saved that way)."""
    if channel == "-":
        copy(hf, src, out, dst, MLP_KEYS)
        return
    out[dst + "router.weight"] = hf.pop(src + "gate.weight")
    if src + "experts.gate_up_proj" in hf:  # a checkpoint written in transformers 5's in-memory layout
        copy(hf, src + "experts.", out, dst + "experts.", ("gate_up_proj", "down_proj"))
    else:
        for name, t in experts_from_hub(hf, src + "experts.", m.moe.num_experts, gated=True).items():
            out[f"{dst}experts.{name}"] = t
    copy(hf, src + "shared_expert.", out, dst + "shared_expert.", MLP_KEYS)
    copy(hf, src, out, dst, ("shared_expert_gate.weight",))


def channel_to_hf(ref: Tensors, src: str, out: dict, dst: str, channel: str, m) -> None:
    if channel == "-":
        copy(ref, src, out, dst, MLP_KEYS)
        return
    out[dst + "gate.weight"] = ref.pop(src + "router.weight")
    fused = {n: ref.pop(f"{src}experts.{n}") for n in ("gate_up_proj", "down_proj")}
    out.update(experts_to_hub(fused, dst + "experts.", gated=True))
    copy(ref, src + "shared_expert.", out, dst + "shared_expert.", MLP_KEYS)
    copy(ref, src, out, dst, ("shared_expert_gate.weight",))


def qwen_state_from_hf(hf: Tensors, m, gdn=gdn_from_hf, prefix: str = "model.") -> dict:
    """HF layer i -> blocks 2i (mixer) and 2i+1 (channel); `gdn` maps one linear_attn's tensors."""
    out = {"embedding.weight": hf.pop(prefix + "embed_tokens.weight"),
           "final_norm.weight": hf.pop(prefix + "norm.weight")}
    for i, (mixer, channel) in enumerate(layer_pairs(m, "this checkpoint")):
        src, a, c = f"{prefix}layers.{i}.", f"layers.{2 * i}.", f"layers.{2 * i + 1}."
        out[a + "norm.weight"] = hf.pop(src + "input_layernorm.weight")
        out[c + "norm.weight"] = hf.pop(src + "post_attention_layernorm.weight")
        if mixer == "G":
            gdn(hf, src + "linear_attn.", out, a + "mixer.", m)
        else:
            copy(hf, src + "self_attn.", out, a + "mixer.", attention_keys(m))
        channel_from_hf(hf, src + "mlp.", out, c + "mixer.", channel, m)
    if m.tie_embeddings:
        hf.get("lm_head.weight")  # some checkpoints store the tied copy too
    else:
        out["lm_head.weight"] = hf.pop("lm_head.weight")
    for key in [k for k in hf.tensors if k.startswith("mtp.")]:
        hf.get(key)  # the multi-token-prediction head: transformers ignores it, megahybrid does not build it
    hf.done()
    return out


def qwen_state_to_hf(ref: Tensors, m, pairs, gdn=gdn_to_hf) -> dict:
    out = {"model.embed_tokens.weight": ref.pop("embedding.weight"),
           "model.norm.weight": ref.pop("final_norm.weight")}
    for i, (mixer, channel) in enumerate(pairs):
        dst, a, c = f"model.layers.{i}.", f"layers.{2 * i}.", f"layers.{2 * i + 1}."
        out[dst + "input_layernorm.weight"] = ref.pop(a + "norm.weight")
        out[dst + "post_attention_layernorm.weight"] = ref.pop(c + "norm.weight")
        if mixer == "G":
            gdn(ref, a + "mixer.", out, dst + "linear_attn.", m)
        else:
            copy(ref, a + "mixer.", out, dst + "self_attn.", attention_keys(m))
        channel_to_hf(ref, c + "mixer.", out, dst + "mlp.", channel, m)
    return finish_to_hf(ref, m, out)


def state_from_hf(hf: Tensors, m) -> dict:
    return qwen_state_from_hf(hf, m)


def state_to_hf(ref: Tensors, m) -> dict:
    return qwen_state_to_hf(ref, m, layer_pairs(m, "Qwen3NextForCausalLM"))


register(HFArchitecture(
    "qwen3_next", "transformers:Qwen3NextForCausalLM", config_from_hf, config_to_hf, state_from_hf, state_to_hf,
    note="GDN in_proj_qkvz/ba (grouped per key head) and conv1d split into q/k/v/z(g)/b/a; "
         "zero-centred norms; MoE shared expert with sigmoid gate; mtp.* dropped on import"))
