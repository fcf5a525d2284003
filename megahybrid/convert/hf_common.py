"""Layout moves more than one Hugging Face architecture needs: per-expert <-> fused MoE weights and
prefix-to-prefix copies. Architecture modules compose these; nothing here knows an architecture."""

from __future__ import annotations

from typing import Iterable

import torch

from megahybrid.convert.base import Tensors


def copy(src: Tensors, src_prefix: str, out: dict, dst_prefix: str, names: Iterable[str]) -> None:
    """out[dst_prefix + n] = src.pop(src_prefix + n) for every name."""
    for name in names:
        out[dst_prefix + name] = src.pop(src_prefix + name)


def move_pairs(src: Tensors, out: dict, pairs: Iterable[tuple[str, str]], reverse: bool = False) -> None:
    """out[b] = src.pop(a) for every (a, b) in `pairs` ((b, a) with `reverse`), so one list of
    (hf_key, megahybrid_key) pairs serves both directions of a conversion."""
    for a, b in pairs:
        if reverse:
            a, b = b, a
        out[b] = src.pop(a)


def experts_from_hub(src: Tensors, prefix: str, num_experts: int, gated: bool,
                     names=("gate_proj", "up_proj", "down_proj")) -> dict:
    """Per-expert `{prefix}{e}.{gate,up,down}_proj.weight` -> megahybrid's fused
    `gate_up_proj [E, 2I, H]` (gate rows first) / `up_proj [E, I, H]` and `down_proj [E, H, I]`.
    `names`: the hub's (gate, up, down) names (Mixtral-style hubs say w1, w3, w2)."""
    gate, up, down = names
    ups = [src.pop(f"{prefix}{e}.{up}.weight") for e in range(num_experts)]
    downs = [src.pop(f"{prefix}{e}.{down}.weight") for e in range(num_experts)]
    out = {"down_proj": torch.stack(downs)}
    if gated:
        gates = [src.pop(f"{prefix}{e}.{gate}.weight") for e in range(num_experts)]
        out["gate_up_proj"] = torch.stack([torch.cat([g, u]) for g, u in zip(gates, ups)])
    else:
        out["up_proj"] = torch.stack(ups)
    return out


def experts_to_hub(fused: dict, prefix: str, gated: bool, names=("gate_proj", "up_proj", "down_proj")) -> dict:
    """The inverse of `experts_from_hub`: `fused` holds `gate_up_proj`/`up_proj` and `down_proj`."""
    gate, up, down = names
    out = {}
    down_w = fused["down_proj"]
    for e in range(down_w.shape[0]):
        out[f"{prefix}{e}.{down}.weight"] = down_w[e]
        if gated:
            g, u = fused["gate_up_proj"][e].chunk(2, dim=0)
            out[f"{prefix}{e}.{gate}.weight"], out[f"{prefix}{e}.{up}.weight"] = g, u
        else:
            out[f"{prefix}{e}.{up}.weight"] = fused["up_proj"][e]
    return out


def rope_from_hf(hf: dict, default_fraction: float = 1.0) -> tuple[float, float]:
    """(rope_theta, rotary_fraction) from an HF config, v5 `rope_parameters` or v4 top-level
    `rope_theta` / `partial_rotary_factor` / `rope_scaling`. theta 0.0 = no RoPE (NoPE: OlmoHybrid's
    released checkpoints set no rope_theta). Only plain RoPE converts: scaled variants (yarn, linear,
    dynamic ...) change the frequencies, which megahybrid's `rotary` does not model."""
    from megahybrid.convert.base import ConversionError

    params = hf.get("rope_parameters") or {}
    scaling = hf.get("rope_scaling") or {}
    rope_type = params.get("rope_type") or scaling.get("rope_type") or scaling.get("type") or "default"
    if rope_type != "default":
        raise ConversionError(f"HF config: rope_type={rope_type!r}; only plain RoPE ('default') converts")
    theta = params.get("rope_theta", hf.get("rope_theta"))
    fraction = params.get("partial_rotary_factor", hf.get("partial_rotary_factor", default_fraction))
    return (0.0 if theta is None else float(theta)), float(fraction)


MAMBA2_KEYS = ("in_proj.weight", "conv1d.weight", "dt_bias", "A_log", "D", "norm.weight", "out_proj.weight")
"""A Mamba2 mixer's tensors; HF's Mamba2Mixer, NemotronH, Bamba and GraniteMoeHybrid mixers use
megahybrid's names and layouts (mixers/mamba2.py), so they copy key for key."""


def mamba2_keys(mamba2) -> list[str]:
    """The tensor names of one Mamba2 mixer for `model.mamba2` (conv bias and projection biases optional)."""
    keys = list(MAMBA2_KEYS)
    if mamba2.use_conv_bias:
        keys.append("conv1d.bias")
    if mamba2.use_bias:
        keys += ["in_proj.bias", "out_proj.bias"]
    return keys


def check_hf_mamba2(m, cls: str) -> None:
    """HF's hybrid Mamba2 mixers (NemotronH, Bamba, GraniteMoeHybrid) always have the gated RMSNorm,
    gate before it (norm(y * silu(z)))."""
    from megahybrid.convert.base import unsupported

    if getattr(m.mamba2, "gated_norm", True) is False:
        raise unsupported("mamba2.gated_norm", False, f"{cls}'s Mamba2 mixer always has its gated RMSNorm")
    if m.mamba2.norm_before_gate:
        raise unsupported("mamba2.norm_before_gate", True, f"{cls} gates before its norm: norm(y * silu(z))")


def finish_from_hf(hf: Tensors, m, out: dict, head: str = "lm_head.weight") -> dict:
    """The LM head (a tied model takes none; a tied copy in the file is dropped), then the check
    that every HF tensor was used."""
    if m.tie_embeddings:
        hf.get(head)
    else:
        out["lm_head.weight"] = hf.pop(head)
    hf.done()
    return out


def finish_to_hf(ref: Tensors, m, out: dict, head: str = "lm_head.weight") -> dict:
    """The inverse of `finish_from_hf`: HF classes with tied embeddings store no head."""
    if m.tie_embeddings:
        ref.get("lm_head.weight")
    else:
        out[head] = ref.pop("lm_head.weight")
    ref.done()
    return out
