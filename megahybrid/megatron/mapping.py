"""Parameter names, reference backend <-> Megatron backend (TP = 1): the one table, and the two
conversions built from it.

Reference names are `ReferenceLM`'s (`layers.{i}.norm` + `layers.{i}.mixer.*`); Megatron names are
those of `megahybrid.megatron.model.MegatronLM`, which keeps stock `HybridModel`'s hierarchy
(`embedding`, `decoder.layers.{i}`, `decoder.final_norm`, `output_layer`), so a stock HybridModel
checkpoint of the same pattern has the same keys. `{a,b}` expands to several reference tensors that
Megatron packs into one; `{e}` is the expert index. Rows whose reference tensor does not exist in a
given model (a LayerNorm bias under RMSNorm, `lm_head` when tied, `q_norm` without QK-norm, the gate
of an ungated MLP, a shared expert) are skipped.

| sym | reference (layers.{i}.)                     | Megatron (decoder.layers.{i}.)              | how   |
|-----|---------------------------------------------|---------------------------------------------|-------|
|     | embedding.weight  (model level)             | embedding.word_embeddings.weight            | same  |
|     | final_norm.{weight,bias}  (model level)     | decoder.final_norm.{weight,bias}            | same  |
|     | lm_head.weight  (model level)               | output_layer.weight                         | same  |
| M   | norm.weight / norm.bias                     | mixer.in_proj.layer_norm_weight / _bias     | same  |
| M   | mixer.in_proj.weight  rows [z|x|B|C|dt]     | mixer.in_proj.weight  (same rows)           | same  |
| M   | mixer.conv1d.weight / .bias                 | mixer.conv1d_weight / mixer.conv1d_bias     | same  |
| M   | mixer.{dt_bias,A_log,D,norm.weight}         | mixer.{dt_bias,A_log,D,norm.weight}         | same  |
| M   | mixer.out_proj.weight                       | mixer.out_proj.weight                       | same  |
| G   | norm.weight / norm.bias                     | self_attention.in_proj.layer_norm_weight    | same  |
| G   | mixer.{q,k,v,g,b,a}_proj.weight             | self_attention.in_proj.weight               | cat   |
|     |   Megatron's rows: [query|key|value|z|beta|alpha] (gdn.py `in_proj_split_sections`) |       |
| G   | mixer.{q,k,v}_conv1d.weight                 | self_attention.conv1d.weight                | cat   |
| G   | mixer.{A_log,dt_bias}                       | self_attention.{A_log,dt_bias}              | same  |
| G   | mixer.o_norm.weight                         | self_attention.out_norm.weight              | norm  |
|     |   out_norm is a TENorm and follows model.zero_centered_norm (stores w - 1); o_norm never does |
| G   | mixer.o_proj.weight                         | self_attention.out_proj.weight              | same  |
| *   | norm.weight / norm.bias                     | self_attention.linear_qkv.layer_norm_weight | same  |
| *   | mixer.{q,k,v}_proj.weight                   | self_attention.linear_qkv.weight            | qkv   |
|     |   Megatron's rows per KV group g: [q heads of g | gate heads of g | k_g | v_g]        |       |
|     |   (attention.py `get_query_key_value_tensors`); the reference's q_proj rows with the  |       |
|     |   output gate are per head [q_h | gate_h] (Qwen3-Next)                               |       |
| *   | mixer.{q_norm,k_norm}.weight                | self_attention.{q,k}_layernorm.weight       | same  |
| *   | mixer.o_proj.weight                         | self_attention.linear_proj.weight           | same  |
| -   | norm.weight / norm.bias                     | mlp.linear_fc1.layer_norm_weight / _bias    | same  |
| -   | mixer.{gate,up}_proj.weight                 | mlp.linear_fc1.weight  (gate rows first)    | cat   |
| -   | mixer.down_proj.weight                      | mlp.linear_fc2.weight                       | same  |
| E   | norm.weight / norm.bias                     | pre_mlp_layernorm.weight / .bias            | same  |
| E   | mixer.router.weight                         | mlp.router.weight                           | same  |
| E   | mixer.experts.{gate_up_proj,up_proj}[e]     | mlp.experts.linear_fc1.weight{e}            | split |
| E   | mixer.experts.down_proj[e]                  | mlp.experts.linear_fc2.weight{e}            | split |
| E   | mixer.shared_expert.{gate,up}_proj.weight   | mlp.shared_experts.linear_fc1.weight        | cat   |
| E   | mixer.shared_expert.down_proj.weight        | mlp.shared_experts.linear_fc2.weight        | same  |

Megatron's gated activations take the first half of fc1's output as the gate
(`fusions/fused_bias_swiglu.py`: silu(y[:half]) * y[half:]), so [gate | up] is also the HF fused
`gate_up_proj` order. With TP > 1 Megatron interleaves these packings per rank; this table is TP = 1.
"""

from __future__ import annotations

import re
from typing import Iterable

import torch

from megahybrid.pattern import resolve_layers

MODEL_ROWS = [
    ("embedding.weight", "embedding.word_embeddings.weight", "same"),
    ("final_norm.weight", "decoder.final_norm.weight", "same"),
    ("final_norm.bias", "decoder.final_norm.bias", "same"),
    ("lm_head.weight", "output_layer.weight", "same"),
]

LAYER_ROWS = {
    "M": [
        ("norm.weight", "mixer.in_proj.layer_norm_weight", "same"),
        ("norm.bias", "mixer.in_proj.layer_norm_bias", "same"),
        ("mixer.in_proj.weight", "mixer.in_proj.weight", "same"),
        ("mixer.conv1d.weight", "mixer.conv1d_weight", "same"),
        ("mixer.conv1d.bias", "mixer.conv1d_bias", "same"),
        ("mixer.dt_bias", "mixer.dt_bias", "same"),
        ("mixer.A_log", "mixer.A_log", "same"),
        ("mixer.D", "mixer.D", "same"),
        ("mixer.norm.weight", "mixer.norm.weight", "same"),
        ("mixer.out_proj.weight", "mixer.out_proj.weight", "same"),
    ],
    "G": [
        ("norm.weight", "self_attention.in_proj.layer_norm_weight", "same"),
        ("norm.bias", "self_attention.in_proj.layer_norm_bias", "same"),
        ("mixer.{q,k,v,g,b,a}_proj.weight", "self_attention.in_proj.weight", "cat"),
        ("mixer.{q,k,v}_conv1d.weight", "self_attention.conv1d.weight", "cat"),
        ("mixer.A_log", "self_attention.A_log", "same"),
        ("mixer.dt_bias", "self_attention.dt_bias", "same"),
        ("mixer.o_norm.weight", "self_attention.out_norm.weight", "norm"),
        ("mixer.o_proj.weight", "self_attention.out_proj.weight", "same"),
    ],
    "*": [
        ("norm.weight", "self_attention.linear_qkv.layer_norm_weight", "same"),
        ("norm.bias", "self_attention.linear_qkv.layer_norm_bias", "same"),
        ("mixer.{q,k,v}_proj.weight", "self_attention.linear_qkv.weight", "qkv"),
        ("mixer.q_norm.weight", "self_attention.q_layernorm.weight", "same"),
        ("mixer.k_norm.weight", "self_attention.k_layernorm.weight", "same"),
        ("mixer.o_proj.weight", "self_attention.linear_proj.weight", "same"),
    ],
    "-": [
        ("norm.weight", "mlp.linear_fc1.layer_norm_weight", "same"),
        ("norm.bias", "mlp.linear_fc1.layer_norm_bias", "same"),
        ("mixer.{gate,up}_proj.weight", "mlp.linear_fc1.weight", "cat"),
        ("mixer.down_proj.weight", "mlp.linear_fc2.weight", "same"),
    ],
    "E": [
        ("norm.weight", "pre_mlp_layernorm.weight", "same"),
        ("norm.bias", "pre_mlp_layernorm.bias", "same"),
        ("mixer.router.weight", "mlp.router.weight", "same"),
        ("mixer.experts.{gate_up_proj,up_proj}", "mlp.experts.linear_fc1.weight{e}", "split"),
        ("mixer.experts.down_proj", "mlp.experts.linear_fc2.weight{e}", "split"),
        ("mixer.shared_expert.{gate,up}_proj.weight", "mlp.shared_experts.linear_fc1.weight", "cat"),
        ("mixer.shared_expert.down_proj.weight", "mlp.shared_experts.linear_fc2.weight", "same"),
    ],
}


def expand(name: str) -> list[str]:
    """'a.{x,y}.w' -> ['a.x.w', 'a.y.w'] (one brace group at most)."""
    match = re.search(r"\{([^}]*)\}", name)
    if not match:
        return [name]
    return [name[:match.start()] + part + name[match.end():] for part in match.group(1).split(",")]


# ------------------------------------------------------------------------ the packings, both ways


def _qkv_sizes(m) -> tuple[int, int, int, bool]:
    a = m.attention
    return a.num_heads, a.num_kv_heads or a.num_heads, a.head_dim or m.hidden_size // a.num_heads, a.output_gate


def pack_qkv(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, m) -> torch.Tensor:
    """Reference q_proj/k_proj/v_proj weights -> Megatron's grouped `linear_qkv.weight`."""
    H, Hkv, D, gated = _qkv_sizes(m)
    r, hidden = H // Hkv, q.shape[-1]
    q = q.reshape(Hkv, r, 2 if gated else 1, D, hidden)  # per head [q_h | gate_h]
    parts = [q[:, :, 0].reshape(Hkv, r * D, hidden)]
    if gated:
        parts.append(q[:, :, 1].reshape(Hkv, r * D, hidden))
    parts += [k.reshape(Hkv, D, hidden), v.reshape(Hkv, D, hidden)]
    return torch.cat(parts, dim=1).reshape(-1, hidden)


def unpack_qkv(w: torch.Tensor, m) -> list[torch.Tensor]:
    """Megatron's `linear_qkv.weight` -> reference [q_proj, k_proj, v_proj] weights."""
    H, Hkv, D, gated = _qkv_sizes(m)
    r, hidden = H // Hkv, w.shape[-1]
    sizes = [r * D] * (2 if gated else 1) + [D, D]
    parts = w.reshape(Hkv, sum(sizes), hidden).split(sizes, dim=1)
    q = parts[0].reshape(Hkv, r, 1, D, hidden)
    if gated:
        q = torch.cat([q, parts[1].reshape(Hkv, r, 1, D, hidden)], dim=2)
    return [q.reshape(-1, hidden), parts[-2].reshape(-1, hidden), parts[-1].reshape(-1, hidden)]


def _norm_shift(m) -> float:
    """GDN out_norm: a TENorm, zero-centred (stores w - 1) when model.zero_centered_norm is set."""
    return 1.0 if m.zero_centered_norm else 0.0


# --------------------------------------------------------------------------------- conversions


def _rows(config) -> Iterable[tuple[str, str, str]]:
    """(reference name, Megatron name, how) for every row of the table, layer prefixes applied."""
    for ref, meg, how in MODEL_ROWS:
        yield ref, meg, how
    for spec in resolve_layers(config):
        for ref, meg, how in LAYER_ROWS[spec.symbol]:
            yield f"layers.{spec.index}.{ref}", f"decoder.layers.{spec.index}.{meg}", how


def reference_shapes(config) -> dict[str, torch.Size]:
    """Names and shapes of the reference model's parameters (built on the meta device: no memory)."""
    from megahybrid.reference.model import ReferenceLM

    with torch.device("meta"):
        model = ReferenceLM(config)
    return {k: v.shape for k, v in model.state_dict().items()}


def to_megatron(ref_sd: dict[str, torch.Tensor], config) -> dict[str, torch.Tensor]:
    """Reference state dict -> Megatron state dict (parameters only; TE's `_extra_state` is not
    touched). Every reference tensor must be used exactly once."""
    m = getattr(config, "model", config)
    out, used = {}, set()
    for ref, meg, how in _rows(config):
        names = [n for n in expand(ref) if n in ref_sd]
        if not names:
            continue
        used.update(names)
        tensors = [ref_sd[n] for n in names]
        if how == "same":
            out[meg] = tensors[0]
        elif how == "cat":
            out[meg] = torch.cat(tensors, dim=0)
        elif how == "qkv":
            out[meg] = pack_qkv(*tensors, m)
        elif how == "norm":
            out[meg] = tensors[0] - _norm_shift(m)
        elif how == "split":
            for e, t in enumerate(tensors[0].unbind(0)):
                out[meg.format(e=e)] = t
    left = sorted(set(ref_sd) - used)
    if left:
        raise KeyError(f"to_megatron: reference tensors with no row in the mapping table: {left[:8]}")
    return out


def to_reference(meg_sd: dict[str, torch.Tensor], config, gradients: bool = False) -> dict[str, torch.Tensor]:
    """Megatron state dict -> reference state dict (the inverse of `to_megatron`). `gradients=True`
    converts gradients, which the zero-centred norm offset does not touch."""
    m = getattr(config, "model", config)
    shapes = reference_shapes(config)
    out: dict[str, torch.Tensor] = {}
    for ref, meg, how in _rows(config):
        names = [n for n in expand(ref) if n in shapes]
        if not names:
            continue
        if how == "split":
            E = shapes[names[0]][0]
            out[names[0]] = torch.stack([meg_sd[meg.format(e=e)] for e in range(E)])
            continue
        w = meg_sd[meg]
        if how == "same":
            out[names[0]] = w
        elif how == "cat":
            out.update(zip(names, w.split([shapes[n][0] for n in names], dim=0)))
        elif how == "qkv":
            out.update(zip(names, unpack_qkv(w, m)))
        elif how == "norm":
            out[names[0]] = w if gradients else w + _norm_shift(m)
    missing = sorted(set(shapes) - set(out))
    if missing:
        raise KeyError(f"to_reference: reference tensors the table did not produce: {missing[:8]}")
    return {k: v.reshape(shapes[k]).contiguous() for k, v in out.items()}


def load_reference_weights(megatron_model: torch.nn.Module, ref_sd: dict[str, torch.Tensor], config) -> None:
    """Copy a reference state dict into a Megatron model (dtype and device follow the model).
    Fails if any Megatron parameter is left unset or any name is unknown."""
    meg_sd = to_megatron(ref_sd, config)
    missing, unexpected = megatron_model.load_state_dict(meg_sd, strict=False)
    missing = [k for k in missing if not k.endswith("_extra_state")]
    if missing or unexpected:
        raise KeyError(f"load_reference_weights: Megatron parameters not set: {missing[:8]}; "
                       f"names Megatron does not have: {unexpected[:8]}")


def megatron_grads(megatron_model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """Megatron parameter gradients by name (Megatron's DDP keeps them in `main_grad`)."""
    out = {}
    for name, p in megatron_model.named_parameters():
        g = getattr(p, "main_grad", None)
        g = p.grad if g is None else g
        if g is not None:
            out[name] = g
    return out

