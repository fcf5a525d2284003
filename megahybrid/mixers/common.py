"""Building blocks shared by several mixers: norms, the short causal conv, rotary embeddings.

Kept here so each mixer file holds only its own math (style.md: no copy with small variations).
"""

from __future__ import annotations

import math
from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn


def linear(in_features: int, out_features: int, std: float, bias: bool = False) -> nn.Linear:
    """nn.Linear with N(0, std) weights and zero bias (GPT-2/Megatron init)."""
    layer = nn.Linear(in_features, out_features, bias=bias)
    nn.init.normal_(layer.weight, std=std)
    if bias:
        nn.init.zeros_(layer.bias)
    return layer


class RMSNorm(nn.Module):
    """RMSNorm (Zhang & Sennrich 2019); `zero_centered` computes x * (1 + w), w initialised at 0
    (Gemma, Qwen3-Next), which keeps weight decay from shrinking the scale towards 0."""

    def __init__(self, dim: int, eps: float = 1e-5, zero_centered: bool = False):
        super().__init__()
        self.eps = eps
        self.zero_centered = zero_centered
        self.weight = nn.Parameter(torch.zeros(dim) if zero_centered else torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        dtype = x.dtype
        x = x.float() if dtype in (torch.float16, torch.bfloat16) else x
        x = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps)
        w = 1 + self.weight if self.zero_centered else self.weight
        return (x * w.to(x.dtype)).to(dtype)


def make_norm(config, dim: Optional[int] = None) -> nn.Module:
    """The model-wide pre-norm (`model.norm`, `model.norm_eps`, `model.zero_centered_norm`)."""
    dim = config.hidden_size if dim is None else dim
    if config.norm == "layernorm":
        return nn.LayerNorm(dim, eps=config.norm_eps)
    return RMSNorm(dim, eps=config.norm_eps, zero_centered=config.zero_centered_norm)


class GatedRMSNorm(nn.Module):
    """RMSNorm with a silu gate, normalised over groups of `group_size` channels (Mamba2's
    `RMSNormGated`). norm_before_gate=False: norm(y * silu(z)); True: norm(y) * silu(z)."""

    def __init__(self, dim: int, eps: float = 1e-5, group_size: Optional[int] = None,
                 norm_before_gate: bool = False):
        super().__init__()
        self.eps = eps
        self.group_size = group_size or dim
        self.norm_before_gate = norm_before_gate
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, y: torch.Tensor, z: Optional[torch.Tensor] = None) -> torch.Tensor:
        dtype = y.dtype
        y = y.float() if dtype in (torch.float16, torch.bfloat16) else y
        if z is not None and not self.norm_before_gate:
            y = y * F.silu(z.to(y.dtype))
        shape = y.shape
        g = y.reshape(*shape[:-1], shape[-1] // self.group_size, self.group_size)
        g = g * torch.rsqrt(g.pow(2).mean(-1, keepdim=True) + self.eps)
        y = g.reshape(shape) * self.weight.to(y.dtype)
        if z is not None and self.norm_before_gate:
            y = y * F.silu(z.to(y.dtype))
        return y.to(dtype)


class ShortConv(nn.Conv1d):
    """Depthwise causal conv1d over time, `[B, T, C] -> [B, T, C]`, with an optional activation.

    An `nn.Conv1d` itself, so its parameters are `weight [C, 1, K]` and `bias [C]` and a mixer's
    `conv1d = ShortConv(...)` has the keys `conv1d.weight`/`conv1d.bias` of mamba_ssm, HF and FLA.
    State: the last `kernel - 1` inputs (`[B, kernel-1, C]`), so a sequence run in pieces equals
    the whole; with no state the sequence is zero-padded on the left (causal_conv1d's semantics)."""

    def __init__(self, channels: int, kernel: int, bias: bool = True, activation: Optional[str] = "silu"):
        super().__init__(channels, channels, kernel, groups=channels, bias=bias)
        self.kernel = kernel
        self.activation = activation

    def forward(self, x: torch.Tensor, state: Optional[torch.Tensor] = None):
        B, T, C = x.shape
        if state is None:
            state = x.new_zeros(B, self.kernel - 1, C)
        xx = torch.cat([state.to(x.dtype), x], dim=1)  # [B, K-1+T, C]
        new_state = xx[:, xx.shape[1] - (self.kernel - 1):]
        y = F.conv1d(xx.transpose(1, 2), self.weight, self.bias, groups=C).transpose(1, 2)
        if self.activation == "silu":
            y = F.silu(y)
        elif self.activation is not None:
            raise ValueError(f"ShortConv activation {self.activation!r}: expected 'silu' or None")
        return y, new_state


def l2norm(x: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    """x / sqrt(sum(x^2) + eps) over the last dim (FLA's `l2norm` convention)."""
    return x * torch.rsqrt(x.pow(2).sum(-1, keepdim=True) + eps)


def rotary(x: torch.Tensor, positions: torch.Tensor, theta: float, fraction: float = 1.0) -> torch.Tensor:
    """Apply RoPE (Su et al. 2021, half-split "NeoX" layout) to `x` `[B, T, H, D]` at integer
    `positions` `[T]` (or `[B, T]`); only the first `fraction` of D is rotated (partial rotary)."""
    if theta <= 0:
        return x
    D = x.shape[-1]
    rot = int(D * fraction) // 2 * 2
    if rot == 0:
        return x
    inv_freq = 1.0 / (theta ** (torch.arange(0, rot, 2, device=x.device, dtype=torch.float64) / rot))
    angles = positions.to(torch.float64)[..., None] * inv_freq  # [..., T, rot/2]
    if angles.dim() == 2:
        angles = angles[None]
    cos = angles.cos()[:, :, None, :].to(x.dtype if x.dtype == torch.float64 else torch.float32)
    sin = angles.sin()[:, :, None, :].to(cos.dtype)
    x_rot, x_pass = x[..., :rot], x[..., rot:]
    x1, x2 = x_rot.float().chunk(2, dim=-1) if x.dtype != torch.float64 else x_rot.chunk(2, dim=-1)
    out = torch.cat([x1 * cos - x2 * sin, x2 * cos + x1 * sin], dim=-1).to(x.dtype)
    return torch.cat([out, x_pass], dim=-1)


def inverse_softplus(x: torch.Tensor) -> torch.Tensor:
    """softplus^-1, used to initialise dt biases (Mamba's `inv_dt`)."""
    return x + torch.log(-torch.expm1(-x))


def init_dt_bias(n: int, dt_min: float, dt_max: float, floor: float) -> torch.Tensor:
    """Mamba's dt bias init: dt ~ logUniform(dt_min, dt_max), clamped below at `floor`."""
    dt = torch.exp(torch.rand(n) * (math.log(dt_max) - math.log(dt_min)) + math.log(dt_min))
    return inverse_softplus(dt.clamp(min=floor))


def positions_in_documents(seq_idx: torch.Tensor) -> torch.Tensor:
    """`[B, T]` document ids (non-decreasing per row) -> each token's offset from its document's start."""
    T = seq_idx.shape[1]
    index = torch.arange(T, device=seq_idx.device).expand_as(seq_idx)
    starts = torch.ones_like(seq_idx, dtype=torch.bool)
    starts[:, 1:] = seq_idx[:, 1:] != seq_idx[:, :-1]
    return index - torch.cummax(torch.where(starts, index, 0), dim=1).values
