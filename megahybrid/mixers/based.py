"""Based linear attention (`b`), Arora et al. 2024, "Simple linear attention language models balance the
recall-throughput tradeoff" (arXiv 2402.18668), with flash-linear-attention 0.6.0's
`BasedLinearAttention` (fla/layers/based.py) names and semantics:

    q, k = W_q x, W_k x   (num_heads x feature_dim),   v = W_v x   (num_heads x hidden // num_heads)
    phi(x) = [1, x / d^(1/4), x (x) x / (sqrt(2) sqrt(d))]          2nd-order Taylor map of exp(q.k / sqrt(d))
    o_t = sum_{s<=t} phi(q_t).phi(k_s) v_s / (sum_{s<=t} phi(q_t).phi(k_s) + eps);   y = W_o o

phi(q).phi(k) = 1 + s + s^2 / 2 with s = q.k / sqrt(d), always >= 1/2, so the normaliser never vanishes.
phi is stored as FLA's `TaylorFeatureMap` lays it out: [1, x / d^(1/4), x_i^2 / (sqrt(2) sqrt(d)),
x_i x_j / sqrt(d) for i < j], 1 + d + d(d+1)/2 features. eps = 1e-6 is FLA's default (`parallel` mode
and `naive_parallel_based`); its `chunk` mode uses 1e-10 and `forward_reference` its `eps` argument.

Reference form (`chunk_based`): inside a chunk the kernel 1 + s + s^2/2 is applied to the masked score
matrix (FLA's parallel form); across chunks the running sums kv = sum phi(k) v^T and z = sum phi(k)
carry the past (the recurrence). Those sums are the state, {"kv": [B, H, F, dv], "z": [B, H, F]}, kept in
float32 for 16-bit inputs (float64 for float64), so pieces with the state carried == the whole.
The paper's model also has gated short-conv (BaseConv) layers; they are not a megahybrid mixer (see the
`based` preset). GPU kernels (FLA's parallel_based / chunk_linear_attn) are not wired in yet.
"""

from __future__ import annotations

import math
from typing import Optional

import torch

from megahybrid.config import fail
from megahybrid.mixers.base import Mixer, State
from megahybrid.mixers.common import linear


def _model_config(config):
    return getattr(config, "model", config)


def taylor_feature_map(x: torch.Tensor) -> torch.Tensor:
    """FLA's `TaylorFeatureMap`: `[..., d]` -> `[..., 1 + d + d(d+1)/2]`."""
    d = x.shape[-1]
    i, j = torch.triu_indices(d, d, 1, device=x.device)
    return torch.cat([torch.ones_like(x[..., :1]), x / d ** 0.25, x * x / (math.sqrt(2) * math.sqrt(d)),
                      x[..., i] * x[..., j] / math.sqrt(d)], dim=-1)


def chunk_based(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, eps: float, chunk_size: int,
                state: Optional[tuple[torch.Tensor, torch.Tensor]] = None):
    """q, k `[B, T, H, d]`, v `[B, T, H, dv]`, state (kv `[B, H, F, dv]`, z `[B, H, F]`) or None ->
    (o `[B, T, H, dv]`, (kv, z)). Normalised causal Taylor linear attention; see the module docstring."""
    B, T, H, d = q.shape
    fk = taylor_feature_map(k)
    if state is None:
        kv = q.new_zeros(B, H, fk.shape[-1], v.shape[-1])
        z = q.new_zeros(B, H, fk.shape[-1])
    else:
        kv, z = state
    outs = []
    for start in range(0, T, chunk_size):
        c = slice(start, start + chunk_size)
        qc, kc, vc, fkc = q[:, c], k[:, c], v[:, c], fk[:, c]
        n = qc.shape[1]
        s = torch.einsum("bthd,bshd->bhts", qc, kc) / math.sqrt(d)
        scores = (1 + s + 0.5 * s * s) * torch.ones(n, n, dtype=torch.bool, device=q.device).tril()
        fqc = taylor_feature_map(qc)
        num = torch.einsum("bhts,bshe->bthe", scores, vc) + torch.einsum("bthf,bhfe->bthe", fqc, kv)
        den = scores.sum(-1).transpose(1, 2) + torch.einsum("bthf,bhf->bth", fqc, z)
        outs.append(num / (den[..., None] + eps))
        kv = kv + torch.einsum("bshf,bshe->bhfe", fkc, vc)
        z = z + fkc.sum(1)
    return torch.cat(outs, dim=1), (kv, z)


class Based(Mixer):
    """Based linear attention layer; see the module docstring."""

    def __init__(self, config, index: int = 0, shared: Optional[dict] = None):
        super().__init__()
        config = _model_config(config)
        self.check(config)
        c, hidden, std = config.based, config.hidden_size, config.init_std
        self.num_heads, self.head_k_dim = c.num_heads, c.feature_dim
        self.head_v_dim = hidden // c.num_heads
        self.eps, self.chunk_size = c.eps, c.chunk_size
        self.q_proj = linear(hidden, c.num_heads * c.feature_dim, std)
        self.k_proj = linear(hidden, c.num_heads * c.feature_dim, std)
        self.v_proj = linear(hidden, c.num_heads * self.head_v_dim, std)
        self.o_proj = linear(c.num_heads * self.head_v_dim, hidden, std)

    def forward_segment(self, x: torch.Tensor, state: State = None):
        acc = torch.float64 if x.dtype == torch.float64 else torch.float32
        q = self.q_proj(x).unflatten(-1, (self.num_heads, self.head_k_dim)).to(acc)
        k = self.k_proj(x).unflatten(-1, (self.num_heads, self.head_k_dim)).to(acc)
        v = self.v_proj(x).unflatten(-1, (self.num_heads, self.head_v_dim)).to(acc)
        carried = None if state is None else (state["kv"].to(acc), state["z"].to(acc))
        o, (kv, z) = chunk_based(q, k, v, self.eps, self.chunk_size, carried)
        return self.o_proj(o.flatten(-2).to(x.dtype)), {"kv": kv, "z": z}

    @classmethod
    def check(cls, config) -> None:
        m = _model_config(config)
        c, p = m.based, "model.based"
        if c.num_heads < 1 or c.num_heads > m.hidden_size:
            fail(f"{p}.num_heads", c.num_heads, f"must be in [1, model.hidden_size={m.hidden_size}] "
                 "(each value head is hidden_size // num_heads wide)")
        if c.feature_dim < 1:
            fail(f"{p}.feature_dim", c.feature_dim, "must be >= 1 (the paper uses 16)")
        if not c.eps > 0:
            fail(f"{p}.eps", c.eps, "must be > 0 (FLA uses 1e-6)")
        if c.chunk_size < 1:
            fail(f"{p}.chunk_size", c.chunk_size, "must be >= 1 (64 is a good CPU size)")

    @classmethod
    def flops_per_token(cls, config, seq_len: int, causal: bool = True) -> float:
        """2 x MACs of the recurrent form: q/k/v/o projections, the feature maps of q and k (F each),
        the state update and read-out (F dv each per head) and the normaliser (2 F per head), with
        F = 1 + d + d(d+1)/2. Linear in sequence length, so `seq_len` and `causal` do not enter."""
        m = _model_config(config)
        c, hidden = m.based, m.hidden_size
        nh, d, dv = c.num_heads, c.feature_dim, hidden // c.num_heads
        feats = 1 + d + d * (d + 1) // 2
        proj = hidden * nh * (2 * d + dv) + nh * dv * hidden
        core = nh * (2 * feats + 2 * feats * dv + 2 * feats)
        return 2.0 * (proj + core)
