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
