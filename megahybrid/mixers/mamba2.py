"""Mamba2 / SSD mixer (`M`), Dao & Gu 2024 (arXiv 2405.21060).

Per head h with state S [P, N] (dt already softplus'd, A_h < 0, B/C shared by the heads of a group):
    S_t = exp(dt_t A_h) S_{t-1} + dt_t x_t B_t^T,        y_t = S_t C_t + D_h x_t
`naive_recurrent_ssd` is that loop (the oracle); `chunked_ssd` is the matmul form of mamba-ssm's
`ssd_minimal.py` and is what `forward` runs.

Parameters have mamba_ssm's `Mamba2` / HF `Mamba2Mixer` / Megatron `MambaMixer` (TP=1) names and
layouts (shared/notes/hf-conversion.md), so conversion is a key-for-key copy:
    in_proj.weight [2*d_inner + 2*G*N + nh, H], rows [z | x | B | C | dt]
    conv1d.weight [conv_dim, 1, K], conv1d.bias [conv_dim], channels [x | B | C]
    A_log [nh], D [nh], dt_bias [nh], norm.weight [d_inner], out_proj.weight [H, d_inner]
    (no norm.weight with `gated_norm=false`; d_inner = `d_inner` if set, else expand * H)
State: {"conv": [batch, K-1, conv_dim], "ssm": [batch, nh, P, N]}.
"""

from __future__ import annotations

import math
from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn

from megahybrid.config import fail
from megahybrid.mixers.base import Mixer, State
from megahybrid.mixers.common import GatedRMSNorm, ShortConv, init_dt_bias, linear

A_INIT_RANGE = (1.0, 16.0)
"""A = -U(1, 16) per head: mamba_ssm Mamba2 / Megatron MambaMixer `A_init_range`."""


# ----------------------------------------------------------------------------- the math


def expand_groups(t: torch.Tensor, num_heads: int) -> torch.Tensor:
    """[b, t, g, n] -> [b, t, h, n]; head h reads group h // (h/g) (mamba_ssm's "(g h)" repeat)."""
    return t.repeat_interleave(num_heads // t.shape[2], dim=2)


def naive_recurrent_ssd(x, dt, A, B, C, D=None, initial_state=None):
    """Token-by-token SSD recurrence.

    x [b, t, h, p]; dt [b, t, h] (already softplus'd); A [h] (negative); B, C [b, t, g, n];
    D [h] or None; initial_state [b, h, p, n] or None -> (y [b, t, h, p], final_state [b, h, p, n])."""
    b, T, h, p = x.shape
    B, C = expand_groups(B, h), expand_groups(C, h)
    S = x.new_zeros(b, h, p, B.shape[-1]) if initial_state is None else initial_state.to(x.dtype)
    ys = []
    for t in range(T):
        decay = torch.exp(dt[:, t] * A)[..., None, None]  # [b, h, 1, 1]
        S = decay * S + (dt[:, t, :, None] * x[:, t])[..., None] * B[:, t, :, None, :]
        ys.append(torch.einsum("bhpn,bhn->bhp", S, C[:, t]))
    y = torch.stack(ys, dim=1) if ys else x.clone()
    if D is not None:
        y = y + D[:, None] * x
    return y, S


def segsum(a: torch.Tensor) -> torch.Tensor:
    """a [..., L] -> [..., L, L]: out[i, j] = a[j+1] + ... + a[i] (the log-decay from j to i) for
    j <= i, -inf above the diagonal. A masked cumsum, not a difference of cumsums, so it stays exact
    (ssd_minimal.py's `segsum`)."""
    L = a.shape[-1]
    a = a[..., None].expand(*a.shape, L)  # [..., i, j] = a[i]
    below = torch.tril(torch.ones(L, L, dtype=torch.bool, device=a.device), diagonal=-1)
    s = a.masked_fill(~below, 0).cumsum(dim=-2)
    on_or_below = torch.tril(torch.ones(L, L, dtype=torch.bool, device=a.device))
    return s.masked_fill(~on_or_below, -torch.inf)


def chunked_ssd(x, dt, A, B, C, D=None, initial_state=None, chunk_size: int = 64):
    """The SSD recurrence in chunks (mamba-ssm `ssd_minimal.py`'s four steps); same shapes and result
    as `naive_recurrent_ssd`. T need not divide by `chunk_size` (the tail is padded with dt = 0:
    no input and decay 1, so the final state is untouched)."""
    b, T, h, p = x.shape
    L = max(1, min(chunk_size, T))  # a short document needs no padding to a full chunk
    pad = -T % L
    X = F.pad(x * dt[..., None], (0, 0, 0, 0, 0, pad))
    a = F.pad(dt * A, (0, 0, 0, pad))
    Bh = F.pad(expand_groups(B, h), (0, 0, 0, 0, 0, pad))
    Ch = F.pad(expand_groups(C, h), (0, 0, 0, 0, 0, pad))
    X, a, Bh, Ch = [t.reshape(b, -1, L, *t.shape[2:]) for t in (X, a, Bh, Ch)]  # b c l ...
    a = a.permute(0, 3, 1, 2)  # [b, h, c, l]
    a_cum = a.cumsum(dim=-1)

    # 1. Intra-chunk output (diagonal blocks): causal "attention" C_l . B_s weighted by the decay s -> l.
    y_diag = torch.einsum("bclhn,bcshn,bhcls,bcshp->bclhp", Ch, Bh, torch.exp(segsum(a)), X)
    # 2. Each chunk's own contribution to the state at its end (starting from zero).
    decay_to_end = torch.exp(a_cum[..., -1:] - a_cum)
    states = torch.einsum("bclhn,bhcl,bclhp->bchpn", Bh, decay_to_end, X)
    # 3. Inter-chunk recurrence: the state entering each chunk, from the initial state and earlier chunks.
    init = torch.zeros_like(states[:, :1]) if initial_state is None else initial_state[:, None].to(states.dtype)
    states = torch.cat([init, states], dim=1)
    decay_chunk = torch.exp(segsum(F.pad(a_cum[..., -1], (1, 0))))  # [b, h, c+1, c+1]
    states = torch.einsum("bhzc,bchpn->bzhpn", decay_chunk, states)
    states, final_state = states[:, :-1], states[:, -1]
    # 4. State -> output: the entering state, decayed to each position and read out by C.
    y_off = torch.einsum("bclhn,bchpn,bhcl->bclhp", Ch, states, torch.exp(a_cum))

    y = (y_diag + y_off).reshape(b, -1, h, p)[:, :T]
    if D is not None:
        y = y + D[:, None] * x
    return y, final_state


# ----------------------------------------------------------------------------- the module


def ssd_sizes(config) -> tuple[int, int, int, int, int]:
    """(d_inner, nheads, G, N, P) from `config.mamba2`, without checking them."""
    c = config.mamba2
    d_inner = c.expand * config.hidden_size if c.d_inner is None else c.d_inner
    return d_inner, d_inner // c.head_dim, c.num_groups, c.state_size, c.head_dim


def check_ssd(config) -> None:
    """The `model.mamba2.*` rules shared by Mamba2 and Hymba's SSM heads (Config or ModelConfig)."""
    config = getattr(config, "model", config)
    c = config.mamba2
    for name in ("state_size", "head_dim", "num_groups", "expand", "conv_kernel", "chunk_size"):
        if getattr(c, name) < 1:
            fail(f"model.mamba2.{name}", getattr(c, name), "must be >= 1")
    if c.d_inner is not None and c.d_inner < 1:
        fail("model.mamba2.d_inner", c.d_inner, "must be >= 1, or null for expand*hidden_size")
    d_inner = ssd_sizes(config)[0]
    if d_inner % c.head_dim:
        fail("model.mamba2.head_dim", c.head_dim,
             f"must divide d_inner {d_inner} (mamba2.d_inner, or expand*hidden_size); e.g. {math.gcd(d_inner, 64)}")
    nheads = d_inner // c.head_dim
    if nheads % c.num_groups:
        fail("model.mamba2.num_groups", c.num_groups,
             f"must divide the number of heads {nheads} (= expand*hidden_size/head_dim)")
    if not 0 < c.dt_min <= c.dt_max:
        fail("model.mamba2.dt_min", c.dt_min, f"must satisfy 0 < dt_min <= dt_max ({c.dt_max})")
    lo, hi = c.dt_limit
    if not 0 <= lo < hi:
        fail("model.mamba2.dt_limit", c.dt_limit, "must be [low, high] with 0 <= low < high")


class SSDHeads(Mixer):
    """Mamba2's SSM heads without the projections: conv1d, dt_bias, A_log, D and the gated norm.
    Shared by `Mamba2` and `Hymba`, which add their own in_proj/out_proj around `ssd_branch`."""

    def __init__(self, config):
        super().__init__()
        c = config.mamba2
        self.d_inner, self.nheads, self.ngroups, self.state_size, self.head_dim = ssd_sizes(config)
        self.conv_dim = self.d_inner + 2 * self.ngroups * self.state_size
        self.chunk_size = c.chunk_size
        self.dt_limit = tuple(c.dt_limit)
        self.conv1d = ShortConv(self.conv_dim, c.conv_kernel, bias=c.use_conv_bias)
        self.dt_bias = nn.Parameter(init_dt_bias(self.nheads, c.dt_min, c.dt_max, c.dt_init_floor))
        self.A_log = nn.Parameter(torch.empty(self.nheads).uniform_(*A_INIT_RANGE).log())
        self.D = nn.Parameter(torch.ones(self.nheads))
        for p in (self.dt_bias, self.A_log, self.D):
            p._no_weight_decay = True  # mamba_ssm / Megatron exclude these from weight decay
        # gated_norm=False (Falcon-H1): y * silu(z) with no norm, so no `norm.weight` either.
        self.norm = GatedRMSNorm(self.d_inner, eps=config.norm_eps, group_size=self.d_inner // self.ngroups,
                                 norm_before_gate=c.norm_before_gate) if c.gated_norm else None

    @property
    def ssd_width(self) -> int:
        """Width of the in_proj rows this block reads: [z | x | B | C | dt]."""
        return self.d_inner + self.conv_dim + self.nheads

    def ssd_branch(self, zxbcdt: torch.Tensor, state: State, conv=None, scan=chunked_ssd):
        """in_proj rows [z | x | B | C | dt] `[b, t, ssd_width]` -> (gated, normed y `[b, t, d_inner]`, state).
        The scan runs in float32 at least: the state sums over the whole sequence (as in mamba_ssm).
        `conv(conv1d, xBC, conv_state)` and `scan` default to the local steps; context parallelism
        passes its own (megahybrid/parallel/mixers.py)."""
        b, T, _ = zxbcdt.shape
        G, N = self.ngroups, self.state_size
        z, xBC, dt = zxbcdt.split([self.d_inner, self.conv_dim, self.nheads], dim=-1)
        conv_state = None if state is None else state["conv"]
        xBC, conv_state = self.conv1d(xBC, conv_state) if conv is None else conv(self.conv1d, xBC, conv_state)
        x, B, C = xBC.split([self.d_inner, G * N, G * N], dim=-1)
        dtype = torch.promote_types(x.dtype, torch.float32)
        dt = F.softplus(dt.to(dtype) + self.dt_bias.to(dtype))
        if self.dt_limit != (0.0, float("inf")):
            dt = dt.clamp(*self.dt_limit)
        y, ssm_state = scan(
            x.reshape(b, T, self.nheads, self.head_dim).to(dtype), dt, -torch.exp(self.A_log.to(dtype)),
            B.reshape(b, T, G, N).to(dtype), C.reshape(b, T, G, N).to(dtype), self.D.to(dtype),
            None if state is None else state["ssm"], self.chunk_size)
        y = y.reshape(b, T, self.d_inner)
        if self.norm is None:
            y = (y * F.silu(z.to(y.dtype))).to(zxbcdt.dtype)
        else:
            y = self.norm(y.to(zxbcdt.dtype), z)
        return y, {"conv": conv_state, "ssm": ssm_state}


class Mamba2(SSDHeads):
    """Mamba2 mixer: in_proj -> conv1d(x, B, C) -> SSD -> norm(y * silu(z)) -> out_proj."""

    def __init__(self, config, index: int = 0, shared: Optional[dict] = None):
        self.check(config)
        super().__init__(config)
        bias = config.mamba2.use_bias
        self.in_proj = linear(config.hidden_size, self.ssd_width, config.init_std, bias=bias)
        self.out_proj = linear(self.d_inner, config.hidden_size, config.init_std, bias=bias)

    def forward_segment(self, x: torch.Tensor, state: State = None, conv=None, scan=chunked_ssd):
        y, state = self.ssd_branch(self.in_proj(x), state, conv, scan)
        return self.out_proj(y), state

    @classmethod
    def check(cls, config) -> None:
        check_ssd(config)

    @classmethod
    def flops_per_token(cls, config, seq_len: int, causal: bool = True) -> float:
        """Megatron's `mamba_layer_flops` per token (training.py), independent of seq_len:
        2*H*(2*d_inner + 2*G*N + nh)  in_proj  +  7*d_inner*N  scan  +  2*d_inner*H  out_proj.
        The conv (2*K*conv_dim) is left out, as Megatron does, so MFUs of both backends agree."""
        d_inner, nh, G, N, _ = ssd_sizes(config)
        H = config.hidden_size
        return float(2 * H * (2 * d_inner + 2 * G * N + nh) + 7 * d_inner * N + 2 * d_inner * H)
