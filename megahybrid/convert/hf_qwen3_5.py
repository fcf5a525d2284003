"""transformers `Qwen3_5ForCausalLM` (model_type `qwen3_5_text`, dense SwiGLU MLP in every layer) and
`Qwen3_5MoeForCausalLM` (`qwen3_5_moe_text`, the Qwen3-Next MoE block in every layer): Gated DeltaNet
+ gated attention, as Qwen3-Next (hf_qwen3_next.py) except for the GDN projections, stored flat:

    linear_attn.in_proj_qkv [2Hk dk + Hv dv, H] = cat(q, k, v)   in_proj_z [Hv dv, H] = g_proj
    linear_attn.in_proj_b / in_proj_a [Hv, H]                    conv1d [2Hk dk + Hv dv, 1, K] flat [q|k|v]

Norms are zero-centred except the GDN output norm; the MoE always renormalises its top-k weights.
RoPE: the text model's interleaved M-RoPE gets the same position in its t/h/w sections for text,
which is plain RoPE over the first `partial_rotary_factor` of each head, so `mrope_section` is not
kept (an export writes plain RoPE; the text model computes the same).

The multimodal configs (`qwen3_5` / `qwen3_5_moe`, ForConditionalGeneration: a nested `text_config`,
weights under `model.language_model.` next to the vision tower `model.visual.`) import as their
language model: the vision tower and `mtp.*` are dropped. They export only as the text-only
classes (`--arch qwen3_5_text` / `qwen3_5_moe_text`): megahybrid holds no vision tower to write.
"""

from __future__ import annotations

import torch

from megahybrid.convert import hf_qwen3_next as q3n
from megahybrid.convert.base import ConversionError, HFArchitecture, Tensors, register, unsupported
from megahybrid.convert.hf_common import copy
from megahybrid.mixers.gated_deltanet import gdn_sizes

GDN_SPLIT = (("in_proj_z", "g_proj"), ("in_proj_b", "b_proj"), ("in_proj_a", "a_proj"))
"""Qwen3.5's separate GDN projections and their megahybrid names."""
MULTIMODAL = {"qwen3_5": "qwen3_5_text", "qwen3_5_moe": "qwen3_5_moe_text"}
"""Nested (vision-language) model_type -> the text-only one it exports as."""


# ------------------------------------------------------------------------------ config


def dense_config_from_hf(hf: dict) -> dict:
    return q3n.qwen_model_config(hf, ["-"] * hf["num_hidden_layers"])


def moe_config_from_hf(hf: dict) -> dict:
    return q3n.qwen_model_config(hf | {"norm_topk_prob": True}, ["E"] * hf["num_hidden_layers"])


def config_to_hf_for(channel: str, arch: str, model_type: str):
    """config_to_hf of the dense (channel '-') or MoE ('E') class."""

    def config_to_hf(m) -> dict:
        pairs = q3n.check_qwen_model(m, arch)
        if any(c != channel for _, c in pairs):
            raise unsupported("pattern", m.pattern, f"{arch} has a {'dense MLP' if channel == '-' else 'MoE'} "
                                                    f"('{channel}') after every mixer; pick the other Qwen3.5 class "
                                                    "or qwen3_next (which mixes them)")
        hf = q3n.qwen_config_to_hf(m, pairs) | {"model_type": model_type}
        if channel == "E":
            if not m.moe.norm_topk_prob:
                raise unsupported("moe.norm_topk_prob", False, f"{arch} always renormalises the top-k weights")
            hf = {k: v for k, v in hf.items() if k != "intermediate_size"} | q3n.moe_config_to_hf(m)
        return hf

    return config_to_hf


def text_config(hf: dict) -> dict:
    """The language model's config of a nested (multimodal) Qwen3.5 config."""
    text = dict(hf.get("text_config") or {})
    if not text:
        raise ConversionError(f"HF config: model_type {hf['model_type']!r} without a text_config")
    text.setdefault("tie_word_embeddings", hf.get("tie_word_embeddings", False))
    return text


# ------------------------------------------------------------------------------- state


def gdn_from_hf(hf: Tensors, src: str, out: dict, dst: str, m) -> None:
    Hk, Hv, dk, dv = gdn_sizes(m)
    qkv = hf.pop(src + "in_proj_qkv.weight", (2 * Hk * dk + Hv * dv, m.hidden_size))
    for name, t in zip(("q_proj", "k_proj", "v_proj"), qkv.split([Hk * dk, Hk * dk, Hv * dv], dim=0)):
        out[f"{dst}{name}.weight"] = t
    for hf_name, name in GDN_SPLIT:
        out[f"{dst}{name}.weight"] = hf.pop(f"{src}{hf_name}.weight")
    for name, t in q3n.conv_from_hf(hf, src + "conv1d.weight", m).items():
        out[dst + name] = t
    copy(hf, src, out, dst, ("A_log", "dt_bias"))
    out[dst + "o_norm.weight"] = hf.pop(src + "norm.weight")
    out[dst + "o_proj.weight"] = hf.pop(src + "out_proj.weight")


def gdn_to_hf(ref: Tensors, src: str, out: dict, dst: str, m) -> None:
    out[dst + "in_proj_qkv.weight"] = torch.cat([ref.pop(f"{src}{n}_proj.weight") for n in "qkv"], dim=0)
    for hf_name, name in GDN_SPLIT:
        out[f"{dst}{hf_name}.weight"] = ref.pop(f"{src}{name}.weight")
    out[dst + "conv1d.weight"] = q3n.conv_to_hf(ref, src)
    copy(ref, src, out, dst, ("A_log", "dt_bias"))
    out[dst + "norm.weight"] = ref.pop(src + "o_norm.weight")
    out[dst + "out_proj.weight"] = ref.pop(src + "o_proj.weight")


def state_from_hf(hf: Tensors, m) -> dict:
    return q3n.qwen_state_from_hf(hf, m, gdn=gdn_from_hf)


def multimodal_state_from_hf(hf: Tensors, m) -> dict:
    """ForConditionalGeneration's language model: `model.language_model.` -> `model.`, vision dropped."""
    for key in [k for k in hf.tensors if k.startswith("model.visual.")]:
        hf.get(key)
    renamed = {("model." + k[len("model.language_model."):] if k.startswith("model.language_model.") else k): t
               for k, t in hf.tensors.items()}
    return state_from_hf(Tensors(renamed, hf.where), m)


def state_to_hf_for(arch: str):
    def state_to_hf(ref: Tensors, m) -> dict:
        return q3n.qwen_state_to_hf(ref, m, q3n.layer_pairs(m, arch), gdn=gdn_to_hf)

    return state_to_hf


def multimodal_config_to_hf(model_type: str):
    def refuse(m) -> dict:
        raise ConversionError(f"--arch {model_type}: the vision-language class needs a vision tower, which "
                              "megahybrid does not hold; export the language model with "
                              f"--arch {MULTIMODAL[model_type]}")

    return refuse


DENSE, MOE = "Qwen3_5ForCausalLM", "Qwen3_5MoeForCausalLM"
NOTE = ("GDN in_proj_qkv split into q/k/v, in_proj_z/b/a = g/b/a_proj, conv1d split; zero-centred norms; "
        "M-RoPE kept as plain RoPE (equal for text); mtp.* dropped on import")
register(HFArchitecture("qwen3_5_text", f"transformers:{DENSE}", dense_config_from_hf,
                        config_to_hf_for("-", DENSE, "qwen3_5_text"), state_from_hf, state_to_hf_for(DENSE), NOTE))
register(HFArchitecture("qwen3_5_moe_text", f"transformers:{MOE}", moe_config_from_hf,
                        config_to_hf_for("E", MOE, "qwen3_5_moe_text"), state_from_hf, state_to_hf_for(MOE),
                        NOTE + "; MoE shared expert with sigmoid gate"))
for nested, from_text in (("qwen3_5", dense_config_from_hf), ("qwen3_5_moe", moe_config_from_hf)):
    register(HFArchitecture(
        nested, "transformers:" + ("Qwen3_5ForConditionalGeneration" if nested == "qwen3_5"
                                   else "Qwen3_5MoeForConditionalGeneration"),
        lambda hf, from_text=from_text: from_text(text_config(hf)), multimodal_config_to_hf(nested),
        multimodal_state_from_hf, state_to_hf_for(nested),
        note=f"import only: the language model (vision tower dropped); export with --arch {MULTIMODAL[nested]}"))
