"""Mamba1 selective scan (`m`, Jamba's mixer), Gu & Dao 2023 (arXiv 2312.00752).

Per channel d and state index n (dt already softplus'd, A[d, n] < 0, B/C shared by all channels):
    S_t[d, n] = exp(dt_t[d] A[d, n]) S_{t-1}[d, n] + dt_t[d] x_t[d] B_t[n],   y_t[d] = S_t[d] . C_t + D[d] x_t[d]
`naive_recurrent_selective_scan` is that loop (the oracle); `chunked_selective_scan` is what `forward` runs.

Parameters have HF Jamba's `JambaMambaMixer` names and layouts (shared/notes/hf-conversion.md):
    in_proj [2*d_inner, H] (rows [x | z]), conv1d [d_inner, 1, K] (+bias), x_proj [R + 2N, d_inner]
    (rows [dt | B | C]), dt_proj [d_inner, R] + bias, A_log [d_inner, N], D [d_inner], out_proj [H, d_inner],
    and with `inner_layernorms` dt_layernorm [R], b_layernorm [N], c_layernorm [N].
State: {"conv": [batch, K-1, d_inner], "ssm": [batch, d_inner, N]} (HF's cache layout).
"""

from __future__ import annotations

import math
from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn

from megahybrid.config import fail
from megahybrid.mixers.base import Mixer, State
from megahybrid.mixers.common import RMSNorm, ShortConv, init_dt_bias, linear
from megahybrid.mixers.mamba2 import segsum

DT_MIN, DT_MAX, DT_FLOOR = 1e-3, 1e-1, 1e-4
"""dt ~ logUniform(0.001, 0.1), floored at 1e-4: mamba_ssm `Mamba` defaults (paper, section 3.6)."""


# ----------------------------------------------------------------------------- the math


def naive_recurrent_selective_scan(x, dt, A, B, C, D=None, initial_state=None):
    """Token-by-token selective scan.

    x [b, t, d]; dt [b, t, d] (already softplus'd); A [d, n] (negative); B, C [b, t, n]; D [d] or None;
    initial_state [b, d, n] or None -> (y [b, t, d], final_state [b, d, n])."""
    b, T, d = x.shape
    S = x.new_zeros(b, d, A.shape[-1]) if initial_state is None else initial_state.to(x.dtype)
    ys = []
    for t in range(T):
        S = torch.exp(dt[:, t, :, None] * A) * S + (dt[:, t] * x[:, t])[..., None] * B[:, t, None, :]
        ys.append(torch.einsum("bdn,bn->bd", S, C[:, t]))
    y = torch.stack(ys, dim=1) if ys else x.clone()
    if D is not None:
        y = y + D * x
    return y, S


def scan_chunk(x, dt, A, B, C, S):
    """One chunk of the scan in parallel form, from state S [b, d, n]; returns (y without D, end state).

    The decay from s to t is exp(sum_{s<r<=t} dt_r A), built with `segsum` (a masked cumsum, -inf above
    the diagonal before exp), so nothing can overflow whatever dt is; that is why it costs
    [b, d, n, l, l] memory per chunk instead of using exp(cumsum) / exp(cumsum) ratios."""
    a = (dt[..., None] * A).permute(0, 2, 3, 1)  # [b, d, n, l] log-decays
    decay = torch.exp(segsum(a))  # [b, d, n, t, s]
    u = (dt * x)[..., None] * B[:, :, None, :]  # [b, s, d, n] inputs
    states = torch.einsum("bdnts,bsdn->btdn", decay, u)
    states = states + torch.exp(a.cumsum(-1)).permute(0, 3, 1, 2) * S[:, None]  # the entering state
    return torch.einsum("btdn,btn->btd", states, C), states[:, -1]


def chunked_selective_scan(x, dt, A, B, C, D=None, initial_state=None, chunk_size: int = 16):
    """The selective scan chunk by chunk (parallel within a chunk, the state carried between chunks);
    same shapes and result as `naive_recurrent_selective_scan`, any T."""
    b, T, d = x.shape
    S = x.new_zeros(b, d, A.shape[-1]) if initial_state is None else initial_state.to(x.dtype)
    ys = []
    for s in range(0, T, chunk_size):
        part = slice(s, s + chunk_size)
        y, S = scan_chunk(x[:, part], dt[:, part], A, B[:, part], C[:, part], S)
        ys.append(y)
    y = torch.cat(ys, dim=1) if ys else x.clone()
    if D is not None:
        y = y + D * x
    return y, S


# ----------------------------------------------------------------------------- the module


def mamba1_sizes(config) -> tuple[int, int, int]:
    """(d_inner, dt_rank, N) from `config.mamba1`."""
    c = config.mamba1
    dt_rank = math.ceil(config.hidden_size / 16) if c.dt_rank is None else c.dt_rank
    return c.expand * config.hidden_size, dt_rank, c.state_size


class Mamba1(Mixer):
    """Mamba1 mixer: in_proj -> conv1d(x) -> x_proj (dt, B, C) -> selective scan -> y * silu(z) -> out_proj."""

    def __init__(self, config, index: int = 0, shared: Optional[dict] = None):
        self.check(config)
        super().__init__()
        c = config.mamba1
        H, std = config.hidden_size, config.init_std
        self.d_inner, self.dt_rank, self.state_size = d_inner, R, N = mamba1_sizes(config)
        self.chunk_size = c.chunk_size
        self.in_proj = linear(H, 2 * d_inner, std, bias=c.use_bias)
        self.conv1d = ShortConv(d_inner, c.conv_kernel, bias=c.use_conv_bias)
        self.x_proj = linear(d_inner, R + 2 * N, std)
        self.dt_proj = nn.Linear(R, d_inner, bias=True)
        nn.init.uniform_(self.dt_proj.weight, -R ** -0.5, R ** -0.5)  # mamba_ssm dt_init="random", dt_scale=1
        with torch.no_grad():
            self.dt_proj.bias.copy_(init_dt_bias(d_inner, DT_MIN, DT_MAX, DT_FLOOR))
        # S4D-real init A[d, n] = -(n + 1) (paper, section 3.6).
        self.A_log = nn.Parameter(torch.arange(1, N + 1, dtype=torch.float32).log().repeat(d_inner, 1))
        self.D = nn.Parameter(torch.ones(d_inner))
        for p in (self.A_log, self.D):
            p._no_weight_decay = True  # as mamba_ssm
        self.out_proj = linear(d_inner, H, std, bias=c.use_bias)
        if c.inner_layernorms:  # Jamba (Lieber et al. 2024, arXiv 2403.19887): stabilises training at scale
            self.dt_layernorm = RMSNorm(R, eps=config.norm_eps)
            self.b_layernorm = RMSNorm(N, eps=config.norm_eps)
            self.c_layernorm = RMSNorm(N, eps=config.norm_eps)
        self.inner_layernorms = c.inner_layernorms

    def forward_segment(self, x: torch.Tensor, state: State = None):
        xs, z = self.in_proj(x).chunk(2, dim=-1)
        xs, conv_state = self.conv1d(xs, None if state is None else state["conv"])
        dt, B, C = self.x_proj(xs).split([self.dt_rank, self.state_size, self.state_size], dim=-1)
        if self.inner_layernorms:
            dt, B, C = self.dt_layernorm(dt), self.b_layernorm(B), self.c_layernorm(C)
        dtype = torch.promote_types(x.dtype, torch.float32)  # the state sums over the sequence
        dt = F.softplus(self.dt_proj(dt).to(dtype))
        y, ssm_state = chunked_selective_scan(
            xs.to(dtype), dt, -torch.exp(self.A_log.to(dtype)), B.to(dtype), C.to(dtype), self.D.to(dtype),
            None if state is None else state["ssm"], self.chunk_size)
        y = y * F.silu(z.to(dtype))
        return self.out_proj(y.to(x.dtype)), {"conv": conv_state, "ssm": ssm_state}

    @classmethod
    def check(cls, config) -> None:
        c = getattr(config, "model", config).mamba1
        for name in ("state_size", "expand", "conv_kernel", "chunk_size"):
            if getattr(c, name) < 1:
                fail(f"model.mamba1.{name}", getattr(c, name), "must be >= 1")
        if c.dt_rank is not None and c.dt_rank < 1:
            fail("model.mamba1.dt_rank", c.dt_rank, "must be >= 1, or null for ceil(hidden_size/16)")

    @classmethod
    def flops_per_token(cls, config, seq_len: int, causal: bool = True) -> float:
        """Projections at 2 per multiply-add: in_proj 2*H*2*d_inner, x_proj 2*d_inner*(R+2N),
        dt_proj 2*R*d_inner, out_proj 2*d_inner*H; scan 7*d_inner*N as Megatron counts Mamba's scan
        (`mamba_layer_flops`). The conv is left out, as there."""
        d_inner, R, N = mamba1_sizes(config)
        H = config.hidden_size
        return float(4 * H * d_inner + 2 * d_inner * (R + 2 * N) + 2 * R * d_inner + 7 * d_inner * N
                     + 2 * d_inner * H)
