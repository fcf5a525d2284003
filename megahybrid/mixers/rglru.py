"""Griffin's recurrent block with the RG-LRU (`r`), De et al. 2024 (arXiv 2402.19427, fig. 2, sec. 2.4).

    y   = gelu_tanh(linear_y x)                          gate branch
    x   = conv_1d(linear_x x)                            depthwise causal conv, no activation
    i_t = sigmoid(x_t W_i + b_i),  r_t = sigmoid(x_t W_a + b_a)     block-diagonal over num_heads
    log a_t = -c * r_t * softplus(recurrent_param)       a_t = sigmoid(L)^(c r_t) with L = -recurrent_param
    h_t = a_t * h_{t-1} + sqrt(1 - a_t^2) * (i_t * x_t)
    out = linear_out(h * y)

Names, shapes and the sign of `recurrent_param` follow RecurrentGemma (HF `RecurrentGemmaRecurrentBlock`),
so its weights copy 1:1: `linear_x/y/out` with biases, `conv_1d.weight [W, 1, K]` + bias,
`rg_lru.recurrent_param [W]`, `rg_lru.{input,recurrent}_gate_weight [nh, W/nh, W/nh]` (applied as
x @ W per head) and `_bias [nh, W/nh]`. GELU is the tanh approximation (`gelu_pytorch_tanh`).

Document start (RecurrentGemma's `reset` at position 0): a call with no incoming state starts a
document, and its first token is NOT scaled by sqrt(1 - a_0^2) (h_0 = i_0 x_0). A call with a state
continues a sequence and scales every token. So pieces with the state carried == the whole sequence,
and packed documents (each started from state None by `run_per_document`) == separate runs. A zeroed
state is therefore not the same as no state: it means "continue after an all-zero history".

The parallel form is a log-space inclusive scan by recursive doubling (Hillis & Steele 1986; for
linear RNNs Martin & Cundy 2018, arXiv 1709.04057): log2(T) vectorised steps, every exponent a sum of
log-decays <= 0, so nothing overflows. State: `{"conv": [B, K-1, W], "rnn": [B, W]}`, the recurrence
kept in float32 for 16-bit inputs (float64 stays float64).
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn

from megahybrid.config import fail
from megahybrid.mixers.base import Mixer, State
from megahybrid.mixers.common import ShortConv, linear

MAX_SQRT_GRADIENT = 1000.0
"""Bound on d sqrt(x)/dx in the normaliser (RecurrentGemma's `_MAX_SQRT_GRADIENT`): as a_t -> 1,
1 - a_t^2 -> 0 and the plain derivative blows up (NaNs in bf16 training)."""


def _model_config(config):
    """Accept a Config or a ModelConfig (check() is called with either)."""
    return getattr(config, "model", config)


class SqrtBoundDerivative(torch.autograd.Function):
    """sqrt(x) whose gradient is clipped at `MAX_SQRT_GRADIENT` (RecurrentGemma)."""

    @staticmethod
    def forward(ctx, x: torch.Tensor) -> torch.Tensor:
        ctx.save_for_backward(x)
        return torch.sqrt(x)

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> torch.Tensor:
        (x,) = ctx.saved_tensors
        return grad / torch.sqrt(torch.clamp(4.0 * x, min=1.0 / MAX_SQRT_GRADIENT ** 2))


def block_diagonal_linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
    """x `[..., W]`, weight `[nh, W/nh, W/nh]` (x @ weight per head), bias `[nh, W/nh]` -> `[..., W]`."""
    nh, bw = bias.shape
    xh = x.unflatten(-1, (nh, bw))
    return (torch.einsum("...hi,hij->...hj", xh, weight) + bias).flatten(-2)


def naive_recurrent_rglru(x: torch.Tensor, gate_x: torch.Tensor, gate_a: torch.Tensor,
                          recurrent_param: torch.Tensor, c: float, h0: Optional[torch.Tensor] = None):
    """The RG-LRU one token at a time, written as the paper's equations (the oracle).

    x, gate_x, gate_a (pre-sigmoid gates) `[B, T, W]`; recurrent_param `[W]`; h0 `[B, W]` or None
    (None = document start: no sqrt(1 - a^2) on the first token). Returns h `[B, T, W]`, h_T `[B, W]`.
    Uses a plain sqrt, so its gradient differs from the bounded one only where 1 - a^2 < 2.5e-7."""
    h = torch.zeros_like(x[:, 0]) if h0 is None else h0
    out = []
    for t in range(x.shape[1]):
        a = torch.sigmoid(-recurrent_param) ** (c * torch.sigmoid(gate_a[:, t]))
        scale = torch.ones_like(a) if (t == 0 and h0 is None) else torch.sqrt(1 - a * a)
        h = a * h + scale * torch.sigmoid(gate_x[:, t]) * x[:, t]
        out.append(h)
    return torch.stack(out, dim=1), h


def rglru_coefficients(x, gate_x, gate_a, recurrent_param, c: float, reset: bool):
    """(log a_t, u_t) of h_t = a_t h_{t-1} + u_t, all positions at once; `reset` = document start."""
    log_a = -c * torch.sigmoid(gate_a) * F.softplus(recurrent_param)
    scale = SqrtBoundDerivative.apply(-torch.expm1(2 * log_a))  # expm1: exact as a -> 1
    if reset:
        scale = torch.cat([torch.ones_like(scale[:, :1]), scale[:, 1:]], dim=1)
    return log_a, scale * torch.sigmoid(gate_x) * x


def scan_linear_recurrence(log_a: torch.Tensor, u: torch.Tensor, h0: Optional[torch.Tensor] = None):
    """h_t = exp(log_a_t) h_{t-1} + u_t along dim 1 by recursive doubling, `[B, T, W]` -> (h, h_T).

    After the step with shift s, position t holds the composition of positions (t-2s, t]:
    its summed log-decay and its output from a zero start. Composing an earlier (A1, H1) with a
    later (A2, H2) gives (A1 + A2, exp(A2) H1 + H2). Finally h0 enters through exp(sum of all log a)."""
    log_cum, h = log_a, u
    shift, T = 1, u.shape[1]
    while shift < T:
        h = torch.cat([h[:, :shift], h[:, shift:] + log_cum[:, shift:].exp() * h[:, :-shift]], dim=1)
        log_cum = torch.cat([log_cum[:, :shift], log_cum[:, shift:] + log_cum[:, :-shift]], dim=1)
        shift *= 2
    if h0 is not None:
        h = h + log_cum.exp() * h0[:, None]
    return h, h[:, -1]


def parallel_rglru(x: torch.Tensor, gate_x: torch.Tensor, gate_a: torch.Tensor,
                   recurrent_param: torch.Tensor, c: float, h0: Optional[torch.Tensor] = None):
    """Same contract as `naive_recurrent_rglru`, computed with `scan_linear_recurrence`."""
    log_a, u = rglru_coefficients(x, gate_x, gate_a, recurrent_param, c, reset=h0 is None)
    return scan_linear_recurrence(log_a, u, h0)


class RGLRU(nn.Module):
    """The gates and parameters of the RG-LRU (`rg_lru.*`)."""

    def __init__(self, width: int, num_heads: int, c: float, std: float):
        super().__init__()
        bw = width // num_heads
        self.c = c
        # Gate weights use the model-wide init_std (RecurrentGemma: variance 0.01 / bw, about the same size).
        self.recurrent_param = nn.Parameter(self._init_recurrent_param(width))
        self.input_gate_weight = nn.Parameter(torch.randn(num_heads, bw, bw) * std)
        self.input_gate_bias = nn.Parameter(torch.zeros(num_heads, bw))
        self.recurrent_gate_weight = nn.Parameter(torch.randn(num_heads, bw, bw) * std)
        self.recurrent_gate_bias = nn.Parameter(torch.zeros(num_heads, bw))

    @staticmethod
    def _init_recurrent_param(width: int) -> torch.Tensor:
        """RecurrentGemma's init: a = sigmoid(-recurrent_param) with a^2 ~ U(0.9^2, 0.999^2), so
        a in [0.9, 0.999] (the paper, sec. 2.4, quotes this range for a^c; we follow the code)."""
        a = torch.empty(width).uniform_(0.9 ** 2, 0.999 ** 2).sqrt()
        return torch.log(1 / a - 1)

    def forward(self, x: torch.Tensor, h0: Optional[torch.Tensor] = None):
        """x `[B, T, W]` -> (h, h_T); the gates run in x's dtype, the recurrence in float32 for
        16-bit inputs (as RecurrentGemma) and in float64 for float64."""
        gate_x = block_diagonal_linear(x, self.input_gate_weight, self.input_gate_bias)
        gate_a = block_diagonal_linear(x, self.recurrent_gate_weight, self.recurrent_gate_bias)
        acc = torch.float64 if x.dtype == torch.float64 else torch.float32
        x, gate_x, gate_a, lam = (t.to(acc) for t in (x, gate_x, gate_a, self.recurrent_param))
        return parallel_rglru(x, gate_x, gate_a, lam, self.c, None if h0 is None else h0.to(acc))


class RGLRUBlock(Mixer):
    """Griffin/Hawk recurrent block (see the module docstring)."""

    def __init__(self, config, index: int = 0, shared: dict | None = None):
        super().__init__()
        config = _model_config(config)
        self.check(config)
        r = config.rglru
        hidden, width, std = config.hidden_size, r.width or config.hidden_size, config.init_std
        self.linear_y = linear(hidden, width, std, r.bias)
        self.linear_x = linear(hidden, width, std, r.bias)
        self.conv_1d = ShortConv(width, r.conv_kernel, bias=True, activation=None)
        self.rg_lru = RGLRU(width, r.num_heads, r.c, std)
        self.linear_out = linear(width, hidden, std, r.bias)

    def forward_segment(self, x: torch.Tensor, state: State = None):
        y = F.gelu(self.linear_y(x), approximate="tanh")
        xb, conv_state = self.conv_1d(self.linear_x(x), None if state is None else state["conv"])
        h, h_last = self.rg_lru(xb, None if state is None else state["rnn"])
        return self.linear_out(h.to(x.dtype) * y), {"conv": conv_state, "rnn": h_last}

    @classmethod
    def check(cls, config) -> None:
        m = _model_config(config)
        r, p = m.rglru, "model.rglru"
        width = r.width or m.hidden_size
        if r.width is not None and r.width < 1:
            fail(f"{p}.width", r.width, "must be >= 1 (or null for hidden_size)")
        if r.num_heads < 1 or width % r.num_heads:
            fail(f"{p}.num_heads", r.num_heads, f"must be >= 1 and divide the recurrence width {width}")
        if r.conv_kernel < 1:
            fail(f"{p}.conv_kernel", r.conv_kernel, "must be >= 1 (1 = no mixing across time in the conv)")
        if not r.c > 0:
            fail(f"{p}.c", r.c, "must be > 0 (Griffin uses 8)")

    @classmethod
    def flops_per_token(cls, config, seq_len: int, causal: bool = True) -> float:
        """Matmul-like terms: linear_x, linear_y, linear_out (H*W each), two block-diagonal gates
        (W*W/nh each) and the conv (K*W); the elementwise recurrence is not counted."""
        m = _model_config(config)
        r = m.rglru
        width = r.width or m.hidden_size
        return 2.0 * (3 * m.hidden_size * width + 2 * width * width // r.num_heads + r.conv_kernel * width)
