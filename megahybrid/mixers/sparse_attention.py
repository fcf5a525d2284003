"""DeepSeek Sparse Attention (`D`, DeepSeek-V3.2-Exp): a lightning indexer picks top_k keys per query and
the main attention heads attend to only those.

Why: attention's cost per token grows with the prefix; DSA keeps a cheap O(T^2) scorer (a few small
heads, one shared key) and spends the expensive heads on top_k keys, so the main core costs
O(T * top_k). The reference computes every index score (as Megatron's unfused path does); the saving
shows in the main core, which gathers only the selected keys (`topk_attention`).

One layer (`[B, T, hidden]` in and out; x is the layer's normed input):
    q, gate, k, v = `*` attention's projections, QK-norm and RoPE           (GQA, megahybrid's `*`)
    lightning indexer (reads x.detach()):
        q_I = linear_wq_b(x)            [B, T, H_I, D_I]   RoPE on the first index_rope_dim channels
        k_I = k_norm(linear_wk(x))      [B, T, D_I]         LayerNorm, then RoPE; one key shared by the heads
        w_I = linear_weights_proj(x) * H_I^-0.5 * D_I^-0.5   [B, T, H_I]
        I[t, s] = sum_h w_I[t, h] * relu(q_I[t, h] . k_I[s])         for s <= t (ReLU: `scoring_relu`)
    S_t = the top_k keys s <= t by I[t, s] (all of them while t + 1 <= top_k); ties go to the earlier key
    o_t = softmax over s in S_t of (scale * q_t . k_s) v_s;   y = o_proj(o * sigmoid(gate))

DeepSeek-V3.2 builds DSA on MLA; megahybrid's `D` uses plain GQA attention (the `*` layer's code and
parameter names: q_proj, k_proj, v_proj, o_proj, q_norm, k_norm), so a D layer is a `*` layer plus
an `indexer`. Megatron-Core refuses `*` and `D` in one model; pattern.py keeps that rule.

Training signal of the indexer (Megatron's reference path, `compute_dsa_indexer_loss`): its input x
is detached, so the LM loss never reaches it; it learns from a KL loss to the main heads' attention,
    p_t = normalise(sum_heads softmax(scale * q_t . k_s))   over the causal keys (dense warm-up) or
                                                            over S_t (`dsa.sparse_loss`, sparse stage)
    aux_loss = loss_coeff * mean_t KL(p_t || softmax_s I[t, s])       (q and k detached in p_t)
reported as the layer's `aux_loss`, which `ReferenceLM.aux_loss` adds to the LM loss like MoE's
load-balancing loss. It is computed in training with gradients on only (None otherwise). A dense
warm-up in DeepSeek's sense is top_k >= seq_len (attention dense, indexer trained by the KL loss).

State: `{"k", "v"}` as `*` (every past token after norm and RoPE) and `"index_k": [B, Tc, D_I]`
(the indexer's keys after k_norm and RoPE). Packed documents: in training (no state) one pass with a
document mask on both the index scores and the attention, RoPE counted from each document's start;
with a state the base class runs document by document. A query never selects another document's keys.

Megatron-Core 0.19.2 (megatron/core/transformer/experimental_attention_variant/dsa.py) has `DSAIndexer`
and `DSAttention`; this file follows them:
- indexer parameters `linear_wq_b` (reads MLA's q latent; with q_lora_rank None that is the normed
  hidden state, as here), `linear_wk`, `k_norm` (LayerNorm with bias, eps model.norm_eps),
  `linear_weights_proj`, all bias-free; weights scaled by H_I^-0.5 * D_I^-0.5; RoPE on the leading
  `qk_pos_emb_head_dim` channels, non-interleaved (`dsa_indexer_rope_interleaved=False`);
- `fused_qk_topk_naive`: index scores, masked, top-k (Megatron marks -inf picks with index -1; here
  `valid` is False); `unfused_dsa_fn`: softmax over the gathered top-k keys;
- `compute_dsa_indexer_loss`: the KL above (sum over keys, mean over query rows, times the coefficient).
Not carried over: `dsa_indexer_rotate_activation` (a Hadamard rotation of q_I and k_I, orthogonal, so
q_I . k_I is unchanged in exact arithmetic; it spreads outliers before FP8), top-k sharing across layers
(`dsa_indexer_topk_freq`), the fused TileLang / cuDNN kernels. Megatron builds DSAttention only inside
its MLA layer (`AbsorbedMLASelfAttention`), so the megatron backend does not build `D`
(`check_megatron` refuses it); the indexer's names map 1:1 to `self_attention.core_attention.indexer.*`.
"""

from __future__ import annotations

from typing import Optional

import torch
from torch import nn

from megahybrid.config import fail
from megahybrid.mixers.attention import Attention, _model_config, attention_mask, mean_keys
from megahybrid.mixers.base import State
from megahybrid.mixers.common import linear, positions_in_documents, rotary


def index_rope_dim(config) -> int:
    """`dsa.index_rope_dim` resolved: the leading channels of each indexer head that RoPE rotates."""
    d = _model_config(config).dsa
    return d.index_head_dim // 2 if d.index_rope_dim is None else d.index_rope_dim


class LightningIndexer(nn.Module):
    """DSA's lightning indexer (Megatron `DSAIndexer` names): x `[B, T, hidden]` at integer positions
    -> q_I `[B, T, H_I, D_I]`, k_I `[B, T, D_I]`, scaled head weights w_I `[B, T, H_I]`."""

    def __init__(self, config):
        super().__init__()
        d = config.dsa
        self.heads, self.head_dim = d.index_heads, d.index_head_dim
        self.rope_theta = config.attention.rope_theta
        self.rope_dim = index_rope_dim(config)
        std = config.init_std
        self.linear_wq_b = linear(config.hidden_size, d.index_heads * d.index_head_dim, std)
        self.linear_wk = linear(config.hidden_size, d.index_head_dim, std)
        self.k_norm = nn.LayerNorm(d.index_head_dim, eps=config.norm_eps)
        self.linear_weights_proj = linear(config.hidden_size, d.index_heads, std)

    def forward(self, x: torch.Tensor, positions: torch.Tensor):
        B, T, _ = x.shape
        q = self.rope(self.linear_wq_b(x).view(B, T, self.heads, self.head_dim), positions)
        k = self.rope(self.k_norm(self.linear_wk(x))[:, :, None], positions)[:, :, 0]  # RoPE takes a head dim
        w = self.linear_weights_proj(x) * (self.heads ** -0.5 * self.head_dim ** -0.5)
        return q, k, w

    def rope(self, x: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        """RoPE (half-split) on the leading rope_dim channels; the rest pass (Megatron: x_pe first)."""
        if not self.rope_dim:
            return x
        r = self.rope_dim
        return torch.cat([rotary(x[..., :r], positions, self.rope_theta), x[..., r:]], dim=-1)


def index_scores(q: torch.Tensor, k: torch.Tensor, w: torch.Tensor, relu: bool = True) -> torch.Tensor:
    """I[b, t, s] = sum_h w[b, t, h] * relu(q[b, t, h] . k[b, s]); q `[B, Tq, H, D]`, k `[B, Tk, D]`,
    w `[B, Tq, H]` -> `[B, Tq, Tk]`, in float32 for 16-bit inputs (Megatron scores in fp32)."""
    compute = torch.float32 if q.dtype in (torch.float16, torch.bfloat16) else q.dtype
    dots = torch.einsum("bthd,bsd->bths", q.to(compute), k.to(compute))
    if relu:
        dots = torch.relu(dots)
    return (dots * w.to(compute)[..., None]).sum(2)


def select_topk(scores: torch.Tensor, top_k: int):
    """scores `[B, Tq, Tk]` with -inf where a key may not be chosen -> (index `[B, Tq, K]`, valid
    `[B, Tq, K]`), K = min(top_k, Tk). A stable descending sort, so equal scores (e.g. ReLU zeros) go to
    the earlier key whatever the keys' count: a sequence run in pieces selects what the whole selects.
    Picks with score -inf (fewer than K visible keys) are not valid."""
    K = min(top_k, scores.shape[-1])
    values, index = torch.sort(scores, dim=-1, descending=True, stable=True)
    return index[..., :K], values[..., :K] > float("-inf")


def topk_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, index: torch.Tensor, valid: torch.Tensor,
                   scale: float) -> torch.Tensor:
    """Softmax attention of each query over its own selected keys only (GQA; the selection is shared by
    all heads). q `[B, Tq, Hq, D]`, k `[B, Tk, Hkv, D]`, v `[B, Tk, Hkv, Dv]`, index/valid `[B, Tq, K]`
    (every row with >= 1 valid pick) -> `[B, Tq, Hq, Dv]`. Gathers `[B, Tq, K, Hkv, D]`: memory and
    work grow with K, not with Tk (Megatron's `unfused_dsa_fn`, unchunked)."""
    B, Tq, Hq, D = q.shape
    Hkv = k.shape[2]
    compute = torch.float32 if q.dtype in (torch.float16, torch.bfloat16) else q.dtype
    rows = torch.arange(B, device=q.device)[:, None, None]
    ks, vs = k.to(compute)[rows, index], v.to(compute)[rows, index]  # [B, Tq, K, Hkv, D]
    qg = q.to(compute).view(B, Tq, Hkv, Hq // Hkv, D)
    scores = torch.einsum("bthgd,btkhd->bthgk", qg, ks) * scale
    scores = scores.masked_fill(~valid[:, :, None, None, :], float("-inf"))
    o = torch.einsum("bthgk,btkhd->bthgd", torch.softmax(scores, dim=-1), vs)
    return o.reshape(B, Tq, Hq, -1).to(q.dtype)


def indexer_kl(scores: torch.Tensor, q: torch.Tensor, k: torch.Tensor, allowed: torch.Tensor,
               scale: float) -> torch.Tensor:
    """Sum over query rows of KL(p || softmax(scores)) (`compute_dsa_indexer_loss` before its mean):
    p = the main heads' attention probabilities over `allowed` keys summed over heads and normalised.
    scores `[B, Tq, Tk]` (carry the gradient), q `[B, Tq, Hq, D]`, k `[B, Tk, Hkv, D]` (detached by the
    caller), allowed `[B, Tq, Tk]` bool."""
    Hq, Hkv = q.shape[2], k.shape[2]
    compute = torch.float32 if q.dtype in (torch.float16, torch.bfloat16) else q.dtype
    k = k.to(compute).repeat_interleave(Hq // Hkv, dim=2)
    logits = torch.einsum("bthd,bshd->bhts", q.to(compute), k) * scale
    probs = torch.softmax(logits.masked_fill(~allowed[:, None], float("-inf")), dim=-1).sum(1)
    target = probs / probs.sum(-1, keepdim=True).clamp_min(1e-10)
    log_pred = torch.log_softmax(scores.to(compute).masked_fill(~allowed, float("-inf")), dim=-1)
    log_pred = log_pred.masked_fill(~allowed, 0)
    return (target * (torch.log(target.clamp_min(1e-10)) - log_pred)).masked_fill(~allowed, 0).sum()


class DeepSeekSparseAttention(Attention):
    """`D`: `*` attention over the top_k keys its lightning indexer picks per query (module docstring)."""

    def __init__(self, config, index: int = 0, shared: Optional[dict] = None):
        super().__init__(config, index, shared)
        self.sparsity = None  # DSA selects keys with its indexer (check() refuses attention.sparsity)
        d = config.dsa
        self.top_k, self.scoring_relu = d.top_k, d.scoring_relu
        self.loss_coeff, self.sparse_loss = d.loss_coeff, d.sparse_loss
        self.indexer = LightningIndexer(config)
        self.aux_loss: Optional[torch.Tensor] = None
        self._kl: list[tuple[torch.Tensor, int]] = []

    def forward(self, x: torch.Tensor, state: State = None, seq_idx: Optional[torch.Tensor] = None,
                need_state: bool = True):
        """The mixer contract; also sets `aux_loss` (the indexer KL of this forward, or None)."""
        self._kl = []
        if seq_idx is not None and state is None and not need_state:
            y, state = self._attend(x, None, seq_idx)[0], None  # training: one pass, document mask
        else:
            y, state = super().forward(x, state, seq_idx, need_state)
        rows = sum(n for _, n in self._kl)
        self.aux_loss = self.loss_coeff * sum(s for s, _ in self._kl) / rows if self._kl else None
        self._kl = []
        return y, state

    def forward_segment(self, x: torch.Tensor, state: State = None):
        return self._attend(x, state, None)

    def _attend(self, x: torch.Tensor, state: State, seq_idx: Optional[torch.Tensor]):
        """One stretch of tokens after `state` (seq_idx None), or packed rows from no state (seq_idx)."""
        B, T, _ = x.shape
        cached = 0 if state is None else state["k"].shape[1]
        if seq_idx is None:
            positions = cached + torch.arange(T, device=x.device)
            visible = attention_mask(T, cached + T, cached, None, x.device).expand(B, -1, -1)
        else:
            positions = positions_in_documents(seq_idx)
            visible = attention_mask(T, T, 0, None, x.device) & (seq_idx[:, :, None] == seq_idx[:, None, :])
        q, gate, k, v = self.project(x)
        q, k = self.norm_qk(q, k)
        q = rotary(q, positions, self.rope_theta, self.rotary_fraction)
        k = rotary(k, positions, self.rope_theta, self.rotary_fraction)
        q_i, k_i, w_i = self.indexer(x.detach(), positions)
        if state is not None:
            k = torch.cat([state["k"].to(k.dtype), k], dim=1)
            v = torch.cat([state["v"].to(v.dtype), v], dim=1)
            k_i = torch.cat([state["index_k"].to(k_i.dtype), k_i], dim=1)
        scores = index_scores(q_i, k_i, w_i, self.scoring_relu).masked_fill(~visible, float("-inf"))
        index, valid = select_topk(scores.detach(), self.top_k)
        o = topk_attention(q, k, v, index, valid, self.scale)
        if self.training and torch.is_grad_enabled() and self.loss_coeff > 0:
            allowed = visible
            if self.sparse_loss:
                allowed = torch.zeros_like(visible).scatter_(-1, index, valid) & visible
            self._kl.append((indexer_kl(scores, q.detach(), k.detach(), allowed, self.scale), B * T))
        return self.output(o, gate), {"k": k, "v": v, "index_k": k_i}

    # ------------------------------------------------------------------------- config, FLOPs

    @classmethod
    def check(cls, config) -> None:
        super().check(config)
        m = _model_config(config)
        d, p = m.dsa, "model.dsa"
        for name in ("index_heads", "index_head_dim", "top_k"):
            if getattr(d, name) < 1:
                fail(f"{p}.{name}", getattr(d, name), "must be >= 1")
        rope = index_rope_dim(m)
        if not 0 <= rope <= d.index_head_dim or rope % 2:
            fail(f"{p}.index_rope_dim", d.index_rope_dim,
                 f"must be even and in [0, index_head_dim={d.index_head_dim}] (or null for index_head_dim // 2)")
        if d.loss_coeff < 0:
            fail(f"{p}.loss_coeff", d.loss_coeff, "must be >= 0 (0 = no indexer loss: the indexer stays at init)")
        if m.attention.sparsity.kind != "none":
            fail("model.attention.sparsity.kind", m.attention.sparsity.kind, "block sparsity is an option of '*' "
                 "layers; 'D' picks its keys with the indexer and Megatron allows one attention kind per model; "
                 "set it to 'none'")

    @classmethod
    def flops_per_token(cls, config, seq_len: int, causal: bool = True) -> float:
        """`*`'s projections + the indexer + the main core over top_k keys (Megatron's convention):
        indexer projections 2 * hidden * (H_I*D_I + D_I + H_I); index scores 2 * H_I * (D_I + 1) per
        causal key (q.k per head, then the weighted sum; S/2 keys causal, S with causal=False); main core
        4 * H * D * mean_keys(S, top_k): a query sees min(top_k, t + 1) keys, counted as a window of
        top_k tokens (so top_k >= S gives exactly `*`'s count)."""
        m = _model_config(config)
        a, d = m.attention, m.dsa
        heads, kv = a.num_heads, a.num_kv_heads or a.num_heads
        hd = a.head_dim or m.hidden_size // heads
        proj = m.hidden_size * heads * hd * (2 if a.output_gate else 1) + 2 * m.hidden_size * kv * hd \
            + heads * hd * m.hidden_size
        index_proj = m.hidden_size * (d.index_heads * d.index_head_dim + d.index_head_dim + d.index_heads)
        scoring = 2.0 * d.index_heads * (d.index_head_dim + 1) * mean_keys(seq_len, None, causal)
        core = 4.0 * heads * hd * mean_keys(seq_len, d.top_k, causal)
        return 2.0 * (proj + index_proj) + scoring + core
