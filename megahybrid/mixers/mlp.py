"""Dense MLP (`-`) and the FFN math its MoE experts share.

    gated (swiglu, geglu):  y = down_proj(act(gate_proj x) * up_proj x)    (Shazeer 2020, arXiv 2002.05202)
    plain (relu2, gelu, silu): y = down_proj(act(up_proj x))
relu2 is squared ReLU (So et al. 2021 "Primer", arXiv 2109.08668; Nemotron-H). GELU is the exact
(erf) form of Hendrycks & Gimpel 2016 for both gelu and geglu; geglu_tanh uses its tanh
approximation (RecurrentGemma's `gelu_pytorch_tanh`).

Width (`mlp.ffn_hidden_size` None): 4 * hidden for plain activations; for gated ones 8/3 * hidden
rounded up to a multiple of 64, which keeps the parameter count of a 4x plain MLP with three
matrices instead of two (Shazeer 2020, section 2; LLaMA, Touvron et al. 2023, rounds up to 256).
"""

from __future__ import annotations

import math
from typing import Optional

import torch
import torch.nn.functional as F

from megahybrid.config import MLPConfig, fail
from megahybrid.mixers.base import Mixer, State
from megahybrid.mixers.common import linear

ACTIVATIONS = ("swiglu", "geglu", "geglu_tanh", "relu2", "gelu", "silu")
GATED = ("swiglu", "geglu", "geglu_tanh")


def _model_config(config):
    """Accept a Config or a ModelConfig (check() is called with either)."""
    return getattr(config, "model", config)


def is_gated(activation: str) -> bool:
    return activation in GATED


def default_ffn_width(hidden: int, activation: str) -> int:
    """4 * hidden, or for gated activations round(8/3 * hidden) rounded up to a multiple of 64."""
    if is_gated(activation):
        return 64 * math.ceil(round(8 * hidden / 3) / 64)
    return 4 * hidden


def mlp_width(config, mlp: Optional[MLPConfig] = None) -> int:
    """The resolved hidden width of a dense MLP (`model.mlp` unless `mlp` is given)."""
    mlp = _model_config(config).mlp if mlp is None else mlp
    return mlp.ffn_hidden_size or default_ffn_width(_model_config(config).hidden_size, mlp.activation)


def activate(activation: str, up: torch.Tensor, gate: Optional[torch.Tensor] = None) -> torch.Tensor:
    """The nonlinearity between the up and down projections; `gate` only for gated activations."""
    if activation == "swiglu":
        return F.silu(gate) * up
    if activation == "geglu":
        return F.gelu(gate) * up
    if activation == "geglu_tanh":
        return F.gelu(gate, approximate="tanh") * up
    if activation == "relu2":
        return F.relu(up).square()
    if activation == "gelu":
        return F.gelu(up)
    if activation == "silu":
        return F.silu(up)
    raise ValueError(f"activation {activation!r}: expected one of {', '.join(ACTIVATIONS)}")


def expert_ffn(x: torch.Tensor, w_in: torch.Tensor, w_out: torch.Tensor, activation: str) -> torch.Tensor:
    """One FFN from fused weights (the MoE expert layout): x `[N, H]`, w_in `[2I, H]` (gate rows
    first) for gated activations or `[I, H]`, w_out `[H, I]` -> `[N, H]`."""
    h = F.linear(x, w_in)
    if is_gated(activation):
        gate, up = h.chunk(2, dim=-1)
        return F.linear(activate(activation, up, gate), w_out)
    return F.linear(activate(activation, h), w_out)


def ffn_flops_per_token(hidden: int, width: int, activation: str) -> float:
    """2 FLOPs per multiply-add over the two (plain) or three (gated) matrices."""
    return 2.0 * hidden * width * (3 if is_gated(activation) else 2)


def check_mlp(path: str, mlp: MLPConfig) -> None:
    """Shared by `MLP.check` and the MoE shared expert."""
    if mlp.activation not in ACTIVATIONS:
        fail(f"{path}.activation", mlp.activation, f"must be one of {list(ACTIVATIONS)}")
    if mlp.ffn_hidden_size is not None and mlp.ffn_hidden_size < 1:
        fail(f"{path}.ffn_hidden_size", mlp.ffn_hidden_size, "must be >= 1 (or null for the default width)")


class MLP(Mixer):
    """Dense feed-forward layer; `mlp` overrides `config.mlp` (the MoE's shared expert uses it)."""

    token_wise = True

    def __init__(self, config, index: int = 0, shared: dict | None = None, mlp: Optional[MLPConfig] = None):
        super().__init__()
        config = _model_config(config)
        mlp = config.mlp if mlp is None else mlp
        check_mlp("model.mlp", mlp)
        hidden, width, std = config.hidden_size, mlp_width(config, mlp), config.init_std
        self.activation = mlp.activation
        self.gate_proj = linear(hidden, width, std, mlp.bias) if is_gated(mlp.activation) else None
        self.up_proj = linear(hidden, width, std, mlp.bias)
        self.down_proj = linear(width, hidden, std, mlp.bias)

    def forward_segment(self, x: torch.Tensor, state: State = None):
        gate = None if self.gate_proj is None else self.gate_proj(x)
        return self.down_proj(activate(self.activation, self.up_proj(x), gate)), None

    @classmethod
    def check(cls, config) -> None:
        check_mlp("model.mlp", _model_config(config).mlp)

    @classmethod
    def flops_per_token(cls, config, seq_len: int, causal: bool = True) -> float:
        m = _model_config(config)
        return ffn_flops_per_token(m.hidden_size, mlp_width(m), m.mlp.activation)
