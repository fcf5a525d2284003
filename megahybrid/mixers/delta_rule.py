"""The delta rule shared by DeltaNet (`d`) and Gated DeltaNet (`G`): the token-by-token recurrence
(the definition, the oracle) and the chunked WY/UT form (the algorithm fast kernels implement).

Per head, with state S [dk, dv] (key-major: FLA's default and HF's layout), a_t = exp(g_t):
    S_t = a_t (I - b_t k_t k_t^T) S_{t-1} + b_t k_t v_t^T,        o_t = S_t^T (scale * q_t)
g = None (a_t = 1) is DeltaNet (Schlag et al. 2021; Yang et al. 2024, arXiv 2406.06484);
a gate g_t <= 0 is Gated DeltaNet (Yang, Kautz & Hatamizadeh 2024, arXiv 2412.06464).

Shapes: q, k [B, T, H, dk]; v [B, T, H, dv]; beta, g [B, T, H]; state [B, H, dk, dv]. q/k are
used as given (callers L2-normalise them); heads of q/k must already match v's (callers repeat
them for grouped value heads). The math runs in float32 at least (float64 stays float64).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from megahybrid.mixers.base import State
from megahybrid.mixers.common import l2norm


def _work_dtype(t: torch.Tensor) -> torch.dtype:
    """float32 at least: the state sums over the whole sequence (as FLA's kernels accumulate)."""
    return torch.promote_types(t.dtype, torch.float32)


def naive_recurrent_delta_rule(q, k, v, beta, g=None, initial_state=None, scale=None):
    """Token-by-token delta rule; see the module docstring for shapes.

    Returns (o [B, T, H, dv] in q's dtype, final state [B, H, dk, dv] in the working dtype).
    `scale` defaults to dk ** -0.5 (FLA, HF)."""
    B, T, H, dk = q.shape
    dtype, work = q.dtype, _work_dtype(q)
    scale = dk ** -0.5 if scale is None else scale
    q, k, v, beta = (t.to(work) for t in (q * scale, k, v, beta))
    S = q.new_zeros(B, H, dk, v.shape[-1]) if initial_state is None else initial_state.to(work)
    outs = []
    for t in range(T):
        if g is not None:
            S = S * g[:, t].to(work).exp()[..., None, None]
        k_t = k[:, t]
        # The new value replaces what S already predicts for k_t (the "delta"), at rate beta.
        delta = beta[:, t, :, None] * (v[:, t] - torch.einsum("bhk,bhkv->bhv", k_t, S))
        S = S + k_t[..., None] * delta[..., None, :]
        outs.append(torch.einsum("bhk,bhkv->bhv", q[:, t], S))
    o = torch.stack(outs, dim=1) if outs else v.clone()
    return o.to(dtype), S


def _chunks(x: torch.Tensor, size: int) -> torch.Tensor:
    """[B, T, H, ...] -> [B, H, N, size, ...], zero-padding T up to a multiple of `size`."""
    pad = -x.shape[1] % size
    if pad:
        x = torch.cat([x, x.new_zeros(x.shape[0], pad, *x.shape[2:])], dim=1)
    return x.unflatten(1, (-1, size)).movedim(3, 1)


def chunked_delta_rule(q, k, v, beta, g=None, chunk_size=64, initial_state=None, scale=None):
    """The delta rule in chunks of `chunk_size`: same arguments and result as
    `naive_recurrent_delta_rule`, in T/chunk sequential steps instead of T.

    Within a chunk the product of the (I - b k k^T) factors is written in WY form, and the UT
    transform A^-1 (A = I + strictly-lower(diag(b) K K^T)) turns the chunk's updates into matmuls
    (Yang et al. 2024, arXiv 2406.06484, section 3); the gate enters as exp(gamma_i - gamma_j)
    weights (arXiv 2412.06464, section 3). gamma is the cumulative log-decay *within* the chunk,
    so with g <= 0 every exponent is <= 0 and nothing overflows however long the sequence is.
    T need not divide by the chunk: the tail is padded with k = v = 0, beta = 0, g = 0 (no write,
    no decay), which leaves outputs and the final state exact."""
    B, T, H, dk = q.shape
    dtype, work = q.dtype, _work_dtype(q)
    scale = dk ** -0.5 if scale is None else scale
    C = max(1, min(chunk_size, T))  # a short sequence needs no padding to a full chunk
    g = torch.zeros_like(beta) if g is None else g
    q, k, v = (_chunks(t.to(work), C) for t in (q * scale, k, v))  # [B, H, N, C, d]
    beta, g = (_chunks(t.to(work)[..., None], C)[..., 0] for t in (beta, g))  # [B, H, N, C]

    # 1. Decays inside each chunk: decay[i, j] = exp(gamma_i - gamma_j) for j <= i, 0 above the
    #    diagonal (masked to -inf *before* exp, so the upper triangle never overflows).
    gamma = g.cumsum(-1)
    causal = torch.ones(C, C, dtype=torch.bool, device=q.device).tril()
    decay = (gamma[..., :, None] - gamma[..., None, :]).masked_fill(~causal, -torch.inf).exp()

    # 2. UT transform: u = A^-1 (b v) are the chunk's pseudo-values, w = A^-1 (b k exp(gamma)) the
    #    keys that read the entering state; solve_triangular's unit diagonal supplies A's I.
    k_beta = k * beta[..., None]
    A = (k_beta @ k.transpose(-1, -2) * decay).tril(-1)
    u = torch.linalg.solve_triangular(A, v * beta[..., None], upper=False, unitriangular=True)
    w = torch.linalg.solve_triangular(A, k_beta * gamma.exp()[..., None], upper=False, unitriangular=True)

    # 3. Sequential over chunks: correct u by what the entering state S already predicts, read out
    #    the state (decayed to each position) plus the causal intra-chunk term, then advance S.
    attn = q @ k.transpose(-1, -2) * decay  # decay is 0 above the diagonal: causal
    q_in = q * gamma.exp()[..., None]
    k_out = k * (gamma[..., -1:] - gamma).exp()[..., None]
    chunk_decay = gamma[..., -1].exp()[..., None, None]
    S = q.new_zeros(B, H, dk, v.shape[-1]) if initial_state is None else initial_state.to(work)
    outs = []
    for n in range(q.shape[2]):
        v_new = u[:, :, n] - w[:, :, n] @ S
        outs.append(q_in[:, :, n] @ S + attn[:, :, n] @ v_new)
        S = S * chunk_decay[:, :, n] + k_out[:, :, n].transpose(-1, -2) @ v_new

    # 4. Back to [B, T, H, dv], dropping the padded tail.
    o = torch.stack(outs, dim=2).movedim(1, 3).flatten(1, 2)[:, :T]
    return o.to(dtype), S


# ------------------------------------------------------------------- pieces both mixers share


def short_conv_qkv(layer, x: torch.Tensor, state: State):
    """q, k, v of `layer` (`{q,k,v}_proj`, optional `{q,k,v}_conv1d` ShortConvs with silu) and
    their conv windows as state entries `conv_q`, `conv_k`, `conv_v`. With no conv (kernel 0)
    the projections go through silu alone, as FLA does with `use_short_conv=False`."""
    outs, conv_state = [], {}
    for name in "qkv":
        y = getattr(layer, f"{name}_proj")(x)
        conv = getattr(layer, f"{name}_conv1d", None)
        if conv is None:
            y = F.silu(y)
        else:
            y, conv_state[f"conv_{name}"] = conv(y, None if state is None else state[f"conv_{name}"])
        outs.append(y)
    return (*outs, conv_state)


def delta_rule_heads(q, k, v, beta, g, state: State, chunk_size: int):
    """L2-normalise q/k per head (FLA `use_qk_l2norm_in_kernel`) and run the chunked delta rule
    from `state["recurrent"]`; returns (o [B, T, H, dv], final state). All of it in the working
    dtype with autocast off: under bf16 autocast the matmuls would otherwise round the state to
    16 bits every chunk, while FLA's kernels keep it in float32."""
    work = _work_dtype(v)
    h0 = None if state is None else state["recurrent"]
    with torch.autocast(v.device.type, enabled=False):
        q, k = l2norm(q.to(work)), l2norm(k.to(work))
        return chunked_delta_rule(q, k, v.to(work), beta.to(work), None if g is None else g.to(work),
                                  chunk_size=chunk_size, initial_state=h0)


def split_heads(x: torch.Tensor, head_dim: int) -> torch.Tensor:
    """[..., H * d] -> [..., H, d]."""
    return x.unflatten(-1, (-1, head_dim))
