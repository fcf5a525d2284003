"""Softmax attention (`*`) and sliding-window attention (`w`): MHA/GQA, RoPE, QK-norm, output gate.

Reference math, not a fast path: `attention_core` writes the scores, the mask and the softmax out
explicitly, so it can serve as the oracle for SDPA / flash / TE kernels. `attend_heads` adds QK-norm,
RoPE and the KV cache around it; the Hymba mixer uses it for its attention heads.

Layout of one layer (`[B, T, hidden]` in and out):
    q, gate = q_proj(x) per head [q_h, gate_h]   (gate only with `output_gate`, Qwen3-Next layout)
    k, v    = k_proj(x), v_proj(x)               (num_kv_heads heads; GQA shares them over groups)
    q, k    = q_norm(q), k_norm(k)               (per head, or over all heads with qk_norm_scope="all_heads"; before RoPE; only with `qk_norm`)
    q, k    = RoPE(q, k) at positions past..past+T-1 (first `rotary_fraction` of each head)
    o       = softmax(scale * q k^T + causal/window mask) v
              (with `attention.sparsity` local_global: only the keys of the visible blocks, see
               `block_sparse_attention`)
    y       = o_proj(o * sigmoid(gate))

State (KV cache): `{"k": [B, Tc, Hkv, D], "v": [B, Tc, Hkv, D]}` holding keys after norm and RoPE.
Full attention keeps every past token (Tc = tokens seen, so positions continue from Tc). Sliding
window keeps only the last window-1 tokens and adds `"pos": [B]` (int64, tokens seen), because Tc no
longer tells the position at which the next token's RoPE rotation starts. Block-sparse attention
keeps every token too: the global blocks stay visible to every later query.
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn

from megahybrid.config import fail
from megahybrid.mixers.base import Mixer, State
from megahybrid.mixers.common import RMSNorm, linear, rotary


def attention_core(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *,
                   causal_offset: Optional[int] = None, window: Optional[int] = None,
                   scale: Optional[float] = None) -> torch.Tensor:
    """Causal softmax attention with an explicit mask (matmul + softmax, no fused kernel).

    q `[B, Tq, Hq, D]`, k `[B, Tk, Hkv, D]`, v `[B, Tk, Hkv, Dv]` -> o `[B, Tq, Hq, Dv]`.
    Hq must be a multiple of Hkv (GQA: query head h uses kv head h // (Hq // Hkv)).
    Query i sits at position `causal_offset + i` in the keys' frame (key j at position j); it sees
    key j iff j <= causal_offset + i and, with `window`, causal_offset + i - j < window (itself and
    window-1 before). `causal_offset` None = Tk - Tq (the queries are the last Tq keys, the usual
    case with a KV cache). `scale` None = D ** -0.5. Scores and softmax run in float32 for 16-bit
    inputs, otherwise in the input dtype (float64 stays float64 for exactness tests).
    """
    B, Tq, Hq, D = q.shape
    Tk, Hkv = k.shape[1], k.shape[2]
    if Hq % Hkv:
        raise ValueError(f"attention_core: {Hq} query heads is not a multiple of {Hkv} kv heads")
    offset = Tk - Tq if causal_offset is None else causal_offset
    if offset < 0 or offset + Tq > Tk:
        raise ValueError(f"attention_core: causal_offset={offset} with Tq={Tq} needs 0 <= offset <= Tk-Tq={Tk - Tq}")
    scale = D ** -0.5 if scale is None else scale
    dtype = q.dtype
    compute = torch.float32 if dtype in (torch.float16, torch.bfloat16) else dtype
    groups = Hq // Hkv
    # [B, Hkv, groups, Tq, D]: query heads grouped under the kv head they share.
    qg = q.to(compute).transpose(1, 2).reshape(B, Hkv, groups, Tq, D)
    kt = k.to(compute).permute(0, 2, 3, 1)[:, :, None]  # [B, Hkv, 1, D, Tk]
    vt = v.to(compute).transpose(1, 2)[:, :, None]  # [B, Hkv, 1, Tk, Dv]
    scores = (qg @ kt) * scale  # [B, Hkv, groups, Tq, Tk]
    scores = scores.masked_fill(~attention_mask(Tq, Tk, offset, window, q.device), float("-inf"))
    o = torch.softmax(scores, dim=-1) @ vt  # [B, Hkv, groups, Tq, Dv]
    return o.reshape(B, Hq, Tq, -1).transpose(1, 2).to(dtype)


def attention_mask(Tq: int, Tk: int, offset: int, window: Optional[int], device=None) -> torch.Tensor:
    """Boolean `[Tq, Tk]`, True where query i (at offset + i) may see key j (see `attention_core`)."""
    dist = (torch.arange(Tq, device=device)[:, None] + offset) - torch.arange(Tk, device=device)[None, :]
    visible = dist >= 0
    if window is not None:
        visible &= dist < window
    return visible


def block_sparse_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, block_size: int,
                           local_blocks: int, global_blocks: int, scale: Optional[float] = None) -> torch.Tensor:
    """Causal local + global block-sparse attention that computes only the visible blocks.

    q `[B, Tq, Hq, D]` are the last Tq of the keys k `[B, Tk, Hkv, D]` (v `[B, Tk, Hkv, Dv]`), so query i
    sits at position p = Tk - Tq + i. It sees key j <= p iff j // block_size is one of the first
    `global_blocks` blocks or lies in [p // block_size - local_blocks, p // block_size].
    Each query block gathers its (global_blocks + local_blocks + 1) key blocks once ([B, blocks, slots *
    block_size, Hkv, D]); a global block that the local range already holds is masked in its global slot,
    so no key counts twice. Queries are padded to whole blocks and keys to the last query block; every
    padded row still sees the first key of its own block, so no softmax row is empty. Scores and softmax
    run in float32 for 16-bit inputs, as in `attention_core`. -> o `[B, Tq, Hq, Dv]`.
    """
    B, Tq, Hq, D = q.shape
    Tk, Hkv, Dv = k.shape[1], k.shape[2], v.shape[3]
    if Tq > Tk:
        raise ValueError(f"block_sparse_attention: {Tq} queries but only {Tk} keys")
    bs = block_size
    scale = D ** -0.5 if scale is None else scale
    dtype = q.dtype
    compute = torch.float32 if dtype in (torch.float16, torch.bfloat16) else dtype
    dev = q.device
    first, last = (Tk - Tq) // bs, (Tk - 1) // bs  # query blocks
    n_q, n_k = last - first + 1, last + 1
    G, L = min(global_blocks, n_k), min(local_blocks, last)
    front = Tk - Tq - first * bs  # padding rows before the first query, in the first query block
    qb = torch.arange(first, last + 1, device=dev)
    glob = torch.arange(G, device=dev).expand(n_q, G)
    local = qb[:, None] + torch.arange(-L, 1, device=dev)  # [n_q, L + 1], own block last
    slots = torch.cat([glob, local], dim=1)  # [n_q, S]: the key blocks of each query block
    slot_ok = torch.cat([glob < (qb[:, None] - L), local >= 0], dim=1)
    k_pos = (slots[:, :, None] * bs + torch.arange(bs, device=dev)).flatten(1)  # [n_q, S*bs]
    q_pos = qb[:, None] * bs + torch.arange(bs, device=dev)  # [n_q, bs]
    visible = (slot_ok.repeat_interleave(bs, dim=1)[:, None, :] & (k_pos[:, None, :] <= q_pos[:, :, None])
               & (k_pos < Tk)[:, None, :])  # [n_q, bs, S*bs]
    pad_k = n_k * bs - Tk
    kb = F.pad(k.to(compute), (0, 0, 0, 0, 0, pad_k)).view(B, n_k, bs, Hkv, D)
    vb = F.pad(v.to(compute), (0, 0, 0, 0, 0, pad_k)).view(B, n_k, bs, Hkv, Dv)
    index = slots.clamp(min=0)
    kg = kb[:, index].flatten(2, 3)  # [B, n_q, S*bs, Hkv, D]
    vg = vb[:, index].flatten(2, 3)
    qp = F.pad(q.to(compute), (0, 0, 0, 0, front, n_q * bs - front - Tq)).view(B, n_q, bs, Hkv, Hq // Hkv, D)
    scores = torch.einsum("bnqhgd,bnkhd->bnhgqk", qp, kg) * scale
    scores = scores.masked_fill(~visible[None, :, None, None], float("-inf"))
    o = torch.einsum("bnhgqk,bnkhd->bnqhgd", torch.softmax(scores, dim=-1), vg)
    return o.reshape(B, n_q * bs, Hq, Dv)[:, front:front + Tq].to(dtype)


def attend_heads(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, state: State, *,
                 q_norm: Optional[nn.Module], k_norm: Optional[nn.Module], rope_theta: float,
                 rotary_fraction: float, window: Optional[int], scale: float, sparsity=None):
    """QK-norm, RoPE, KV cache and `attention_core`: the per-head output before any output gate or
    projection, shared by `Attention` (then gate, o_proj) and Hymba's attention heads (then its norm).

    q `[B, T, Hq, D]`, k `[B, T, Hkv, D]`, v `[B, T, Hkv, Dv]` (new tokens only; norms None = no
    QK-norm) -> (o `[B, T, Hq, Dv]`, state). The state follows the module docstring: full attention
    keeps every past token; a window keeps the last window-1 and adds "pos" (tokens seen), which
    then gives the position of the first new token instead of the cache length. `sparsity`: an
    `AttentionSparsityConfig` of kind local_global (with window None) -> `block_sparse_attention`.
    """
    B, T = q.shape[:2]
    if q_norm is not None:
        q, k = q_norm(q), k_norm(k)
    cached = 0 if state is None else state["k"].shape[1]
    if state is not None and "pos" in state:
        start = state["pos"].to(device=q.device, dtype=torch.long)  # [B]: position of the first new token
    else:
        start = torch.full((B,), cached, dtype=torch.long, device=q.device)
    positions = start[:, None] + torch.arange(T, device=q.device)
    q = rotary(q, positions, rope_theta, rotary_fraction)
    k = rotary(k, positions, rope_theta, rotary_fraction)
    if state is not None:
        k = torch.cat([state["k"].to(k.dtype), k], dim=1)
        v = torch.cat([state["v"].to(v.dtype), v], dim=1)
    if sparsity is not None:
        o = block_sparse_attention(q, k, v, block_size=sparsity.block_size, local_blocks=sparsity.local_blocks,
                                   global_blocks=sparsity.global_blocks, scale=scale)
    else:
        o = attention_core(q, k, v, causal_offset=cached, window=window, scale=scale)
    if window is None:
        return o, {"k": k, "v": v}
    keep = max(0, k.shape[1] - (window - 1))  # slice start; window=1 keeps nothing
    return o, {"k": k[:, keep:], "v": v[:, keep:], "pos": start + T}


def _model_config(config):
    """Accept a Config or a ModelConfig (check() is called with either)."""
    return getattr(config, "model", config)


class Attention(Mixer):
    """Causal softmax attention (MHA/GQA) with RoPE, optional QK-norm and Qwen3-Next output gate."""

    window: Optional[int] = None
    """Sliding window in tokens; None = global (set by `SlidingWindowAttention`)."""
    sparsity = None
    """`attention.sparsity` when its kind is not "none" (block-sparse local + global); set in __init__."""

    def __init__(self, config, index: int = 0, shared: dict | None = None, input_size: Optional[int] = None):
        """`input_size`: width of x for q/k/v; None = hidden_size (SharedAttention's concat input is 2 * hidden)."""
        super().__init__()
        self.check(config)
        a = config.attention
        hidden = config.hidden_size
        x_width = input_size or hidden
        self.num_heads = a.num_heads
        self.num_kv_heads = a.num_kv_heads or a.num_heads
        self.head_dim = a.head_dim or hidden // a.num_heads
        self.rope_theta = a.rope_theta
        self.rotary_fraction = a.rotary_fraction
        self.scale = a.softmax_scale if a.softmax_scale is not None else self.head_dim ** -0.5
        self.output_gate = a.output_gate
        if a.sparsity.kind != "none" and self._window_for(config) is None:
            self.sparsity = a.sparsity
        q_width, kv_width = self.num_heads * self.head_dim, self.num_kv_heads * self.head_dim
        std = config.init_std
        # With the gate, q_proj rows are per head [q_h (D), gate_h (D)] (Qwen3-Next, HF layout).
        self.q_proj = linear(x_width, q_width * (2 if a.output_gate else 1), std, a.bias)
        self.k_proj = linear(x_width, kv_width, std, a.bias)
        self.v_proj = linear(x_width, kv_width, std, a.bias)
        self.o_proj = linear(q_width, hidden, std, a.bias if a.out_bias is None else a.out_bias)
        # qk_norm_scope "all_heads": one norm over the whole projection (OLMo2), weights [H*D] / [Hkv*D].
        self.qk_norm_all_heads = a.qk_norm_scope == "all_heads"
        q_dim, k_dim = (q_width, kv_width) if self.qk_norm_all_heads else (self.head_dim, self.head_dim)
        if a.qk_norm:
            self.q_norm = RMSNorm(q_dim, config.norm_eps, config.zero_centered_norm)
            self.k_norm = RMSNorm(k_dim, config.norm_eps, config.zero_centered_norm)
        else:
            self.q_norm = self.k_norm = None

    # ------------------------------------------------------------------ forward, in two halves
    # Split so that SharedAttention can add its LoRA deltas between projection and attention.

    def project(self, x: torch.Tensor):
        """x `[B, T, hidden]` -> q `[B, T, H, D]`, gate (same shape, or None), k, v `[B, T, Hkv, D]`."""
        B, T, _ = x.shape
        q = self.q_proj(x).view(B, T, self.num_heads, -1)
        gate = None
        if self.output_gate:
            q, gate = q.chunk(2, dim=-1)
        k = self.k_proj(x).view(B, T, self.num_kv_heads, self.head_dim)
        v = self.v_proj(x).view(B, T, self.num_kv_heads, self.head_dim)
        return q, gate, k, v

    def norm_qk(self, q, k):
        """QK-norm per head, or over all heads with qk_norm_scope="all_heads"; unchanged without qk_norm."""
        if self.q_norm is None:
            return q, k
        if self.qk_norm_all_heads:
            return self.q_norm(q.flatten(-2)).view_as(q), self.k_norm(k.flatten(-2)).view_as(k)
        return self.q_norm(q), self.k_norm(k)

    def output(self, o: torch.Tensor, gate: Optional[torch.Tensor]) -> torch.Tensor:
        """Per-head output `[B, T, H, Dv]` -> output gate (if any) -> o_proj -> `[B, T, hidden]`."""
        if gate is not None:
            o = o * torch.sigmoid(gate)
        return self.o_proj(o.flatten(-2))

    def attend(self, q, gate, k, v, state: State = None):
        """QK-norm, `attend_heads`, then gate and o_proj: projected heads -> `(y, state)`."""
        q, k = self.norm_qk(q, k)
        o, state = attend_heads(q, k, v, state, q_norm=None, k_norm=None, rope_theta=self.rope_theta,
                                rotary_fraction=self.rotary_fraction, window=self.window, scale=self.scale,
                                sparsity=self.sparsity)
        return self.output(o, gate), state

    def forward_segment(self, x: torch.Tensor, state: State = None):
        return self.attend(*self.project(x), state)

    # ------------------------------------------------------------------------- config, FLOPs

    @classmethod
    def check(cls, config) -> None:
        m = _model_config(config)
        a = m.attention
        p = "model.attention"
        if a.num_heads < 1:
            fail(f"{p}.num_heads", a.num_heads, "must be >= 1")
        kv = a.num_kv_heads
        if kv is not None and (kv < 1 or a.num_heads % kv):
            fail(f"{p}.num_kv_heads", kv, f"must be >= 1 and divide num_heads={a.num_heads} (or null for MHA)")
        if a.head_dim is None and m.hidden_size % a.num_heads:
            fail(f"{p}.num_heads", a.num_heads,
                 f"must divide model.hidden_size={m.hidden_size} when head_dim is null; set head_dim")
        if a.head_dim is not None and a.head_dim < 1:
            fail(f"{p}.head_dim", a.head_dim, "must be >= 1 (or null for hidden_size // num_heads)")
        if not 0 < a.rotary_fraction <= 1:
            fail(f"{p}.rotary_fraction", a.rotary_fraction, "must be in (0, 1]; use rope_theta=0 to disable RoPE")
        if a.rope_theta < 0:
            fail(f"{p}.rope_theta", a.rope_theta, "must be > 0 (or 0 to disable RoPE)")
        if a.softmax_scale is not None and a.softmax_scale <= 0:
            fail(f"{p}.softmax_scale", a.softmax_scale, "must be > 0 (or null for head_dim ** -0.5)")
        sp = a.sparsity
        if sp.block_size < 1:
            fail(f"{p}.sparsity.block_size", sp.block_size, "must be >= 1 (tokens per block)")
        for name in ("local_blocks", "global_blocks"):
            if getattr(sp, name) < 0:
                fail(f"{p}.sparsity.{name}", getattr(sp, name), "must be >= 0 (blocks)")

    @classmethod
    def _window_for(cls, config) -> Optional[int]:
        return None

    @classmethod
    def flops_per_token(cls, config, seq_len: int, causal: bool = True) -> float:
        """2 * (projection MACs) + 4 * H * D * keys, Megatron's convention (softmax, norms not counted).

        projection MACs = hidden * H*D * (2 if output_gate else 1)   (q_proj)
                        + 2 * hidden * Hkv*D + H*D * hidden            (k, v, o)
        keys (mean keys a token attends, QK^T and AV each 2*H*D FLOPs per key):
          causal, no window:  S / 2  (half the square: core = 2*S*H*D; causal=False: S, core = 4*S*H*D)
          causal, window w:   L - L^2 / (2S) with L = min(w, S) (band area / S; S/2 when w >= S)
          causal=False, w:    L
          block-sparse:       `block_sparse_keys` (the visible blocks; S/2 when they cover everything)
        """
        m = _model_config(config)
        a = m.attention
        heads, kv = a.num_heads, a.num_kv_heads or a.num_heads
        d = a.head_dim or m.hidden_size // heads
        proj = m.hidden_size * heads * d * (2 if a.output_gate else 1) + 2 * m.hidden_size * kv * d \
            + heads * d * m.hidden_size
        return 2.0 * proj + 4.0 * heads * d * cls._keys_per_query(m, seq_len, causal)

    @classmethod
    def _keys_per_query(cls, config, seq_len: int, causal: bool) -> float:
        sp = config.attention.sparsity
        window = cls._window_for(config)
        if sp.kind == "local_global" and window is None:
            return block_sparse_keys(seq_len, sp.block_size, sp.local_blocks, sp.global_blocks, causal)
        return mean_keys(seq_len, window, causal)


def block_sparse_keys(seq_len: int, block_size: int, local_blocks: int, global_blocks: int, causal: bool) -> float:
    """Mean keys per query of the local + global block pattern (`block_sparse_attention`), counted as
    `mean_keys` counts causal attention: each query's visible keys less half a key for the diagonal, so
    blocks that cover everything give S / 2. causal=False: every key of the visible blocks."""
    S, bs = seq_len, block_size
    total = 0.0
    for b in range(-(-S // bs)):
        n = min(bs, S - b * bs)  # queries in block b
        lo = max(0, b - local_blocks)  # first local block
        far = min(global_blocks, lo) * bs  # global keys outside the local range
        if causal:  # query b*bs + i sees (b - lo)*bs + i + 1 local keys, less 1/2 for the diagonal
            total += n * ((b - lo) * bs + 0.5 + far) + n * (n - 1) / 2
        else:
            total += n * (min(S, (b + 1) * bs) - lo * bs + far)
    return total / S


def mean_keys(seq_len: int, window: Optional[int], causal: bool) -> float:
    """Mean number of keys per query under Megatron's counting (see `Attention.flops_per_token`)."""
    L = seq_len if window is None else min(window, seq_len)
    if not causal:
        return float(L)
    return L - L * L / (2.0 * seq_len)


class SlidingWindowAttention(Attention):
    """Attention where a token sees itself and `attention.window - 1` tokens before it (Mistral,
    Griffin local attention). The KV cache keeps only those window-1 tokens."""

    def __init__(self, config, index: int = 0, shared: dict | None = None):
        super().__init__(config, index, shared)
        self.window = config.attention.window

    @classmethod
    def check(cls, config) -> None:
        super().check(config)
        w = _model_config(config).attention.window
        if w < 1:
            fail("model.attention.window", w, "must be >= 1 (a token sees itself and window-1 before it)")

    @classmethod
    def _window_for(cls, config) -> Optional[int]:
        return config.attention.window
