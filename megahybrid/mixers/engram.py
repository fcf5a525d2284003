"""Engram conditional memory (`n`), DeepSeek 2026, "Conditional Memory via Scalable Lookup" (arXiv 2601.07372).

A layer that looks up hashed N-gram embeddings of the token ids and adds a gated, convolved copy to
the residual. Per position t (the official demo, deepseek-ai/Engram `engram_demo_v1.py`, does the same):
    g_{t,n}  = (x_t, x_{t-1}, ..., x_{t-n+1})                 suffix N-gram, n = 2..max_ngram
    z_{n,k}  = (x_t*m_0 XOR x_{t-1}*m_1 XOR ...) mod p_{n,k}  multiplicative-XOR hash, head k of order n
    e_t      = concat_{n,k} E_{n,k}[z_{n,k}]                  one table of p_{n,k} rows per head (p distinct primes)
    a_t      = sigmoid(f(<RMSNorm(h_t), RMSNorm(W_k e_t)> / sqrt(d)))   context-aware gate, h_t = the block input
    v~_t     = a_t * W_v e_t
    y_t      = v~_t + SiLU(causal depthwise conv(RMSNorm(v~))_t)      kernel `conv_kernel`, dilation max_ngram
f is the identity (paper, eq. 4) or the signed square root sign(s) sqrt(|s|) of the demo (`gate_signed_sqrt`).
Left out: the demo's tokenizer compression (NFKC/lower-case canonical ids; here the raw ids are hashed)
and its per-stream gates for hyper-connections (one residual stream here).

Multipliers m_j are odd, drawn from `hash_seed` and the layer index (each Engram layer hashes
differently, as in the demo), and bounded so x * m_j < 2^62: every product and XOR is a non-negative int64.
Positions before a document start (and before the first token) read the reserved id `vocab_size`.

Token ids: the reference Block passes them as `token_ids=` because the class sets `reads_token_ids`
(reference/model.py). Packed documents are handled here, not by the base class's splitting (which would
split x but not the ids): every lag (N-gram tap, conv tap) is masked where it crosses a document start.
State: the last max_ngram-1 token ids and the conv window ((conv_kernel-1)*max_ngram normalised values).

`host_tables`: the tables stay in host memory (pinned when CUDA is present) and `.to()` / `.cuda()` leave
their device alone (dtype casts still apply); the rows are gathered on the host and the result moved to
the activations' device. On a CPU-only machine this changes nothing. The conv is written as a loop over
its few taps rather than `F.conv1d` so each tap can carry its own document mask.
"""

from __future__ import annotations

import math
from typing import ClassVar

import torch
import torch.nn.functional as F
from torch import nn

from megahybrid.config import fail
from megahybrid.mixers.attention import _model_config
from megahybrid.mixers.base import Mixer, State
from megahybrid.mixers.common import RMSNorm, linear


def next_primes(start: int, count: int) -> list[int]:
    """The `count` smallest primes >= start (trial division: table sizes are at most ~1e8)."""
    primes, n = [], max(start, 2)
    while len(primes) < count:
        if all(n % d for d in range(2, math.isqrt(n) + 1)):
            primes.append(n)
        n += 1
    return primes


def hash_multipliers(max_ngram: int, vocab_size: int, seed: int, layer: int) -> torch.Tensor:
    """max_ngram odd int64 multipliers, m * (vocab_size + 1) < 2^62 so no product overflows."""
    g = torch.Generator().manual_seed(seed * 1_000_003 + layer)
    bound = (1 << 62) // (vocab_size + 1) // 2
    return torch.randint(1, bound, (max_ngram,), generator=g, dtype=torch.int64) * 2 + 1


def ngram_hashes(grams: torch.Tensor, multipliers: torch.Tensor, primes: torch.Tensor) -> torch.Tensor:
    """grams [..., n] (x_t, x_{t-1}, ...) -> [..., heads]: XOR of x_{t-j} * m_j, mod each head's prime."""
    mix = grams[..., 0] * multipliers[0]
    for j in range(1, grams.shape[-1]):
        mix = torch.bitwise_xor(mix, grams[..., j] * multipliers[j])
    return mix[..., None] % primes


def same_document(doc: torch.Tensor, lag: int) -> torch.Tensor:
    """[B, T] bool: position t - lag lies in t's document (positions before 0 are the carried state,
    which belongs to each row's first document)."""
    ext = torch.cat([doc[:, :1].expand(-1, lag), doc], dim=1)
    return ext[:, :doc.shape[1]] == doc


def _last(ext: torch.Tensor, ext_doc: torch.Tensor, n: int, fill) -> torch.Tensor:
    """The last n entries of ext (dim 1), `fill` where they are not in the row's last document."""
    keep = ext_doc[:, ext.shape[1] - n:] == ext_doc[:, -1:]
    tail = ext[:, ext.shape[1] - n:]
    return torch.where(keep.view(*keep.shape, *([1] * (tail.dim() - 2))), tail, fill)


class HostTables(nn.Embedding):
    """An embedding that `.to()` / `.cuda()` never move off its device (dtype casts still apply):
    `engram.host_tables`. `nn.Module._apply` is what every such call goes through."""

    def __init__(self, rows: int, dim: int):
        super().__init__(rows, dim)
        if torch.cuda.is_available() and self.weight.device.type == "cpu":
            self.weight.data = self.weight.data.pin_memory()

    def _apply(self, fn, recurse=True):
        target = fn(torch.empty(0, dtype=self.weight.dtype))  # what fn does to a host tensor: keep its dtype only
        if target.dtype != self.weight.dtype:
            data = self.weight.data.to(target.dtype)
            self.weight.data = data.pin_memory() if torch.cuda.is_available() and data.device.type == "cpu" else data
        return self


class Engram(Mixer):
    """Hashed N-gram memory with context-aware gating and a short causal conv (module docstring)."""

    reads_token_ids: ClassVar[bool] = True

    def __init__(self, config, index: int = 0, shared: dict | None = None):
        super().__init__()
        self.check(config)
        m = _model_config(config)
        c = m.engram
        if index in (m.post_norm_layers or ()):
            fail("model.post_norm_layers", m.post_norm_layers, f"layer {index} is engram ('n'), which is "
                 "pre-norm only (its gate reads the normalised block input); drop that index")
        self.max_ngram, self.heads, self.pad_id = c.max_ngram, c.heads_per_ngram, m.vocab_size
        self.conv_kernel, self.gate_signed_sqrt = c.conv_kernel, c.gate_signed_sqrt
        primes = next_primes(c.table_size, (c.max_ngram - 1) * c.heads_per_ngram)
        self.register_buffer("primes", torch.tensor(primes).view(c.max_ngram - 1, c.heads_per_ngram),
                             persistent=False)
        self.register_buffer("offsets", torch.tensor([0, *primes[:-1]]).cumsum(0).view_as(self.primes),
                             persistent=False)
        self.register_buffer("multipliers", hash_multipliers(c.max_ngram, m.vocab_size, c.hash_seed, index),
                             persistent=False)
        rows, width = sum(primes), (c.max_ngram - 1) * c.heads_per_ngram * c.head_dim
        self.tables = HostTables(rows, c.head_dim) if c.host_tables else nn.Embedding(rows, c.head_dim)
        nn.init.normal_(self.tables.weight, std=m.init_std)
        d = m.hidden_size
        self.key_proj = linear(width, d, m.init_std)
        self.value_proj = linear(width, d, m.init_std)
        self.query_norm = RMSNorm(d, m.norm_eps)
        self.key_norm = RMSNorm(d, m.norm_eps)
        self.conv_norm = RMSNorm(d, m.norm_eps)
        self.conv = nn.Conv1d(d, d, c.conv_kernel, groups=d, bias=False, dilation=c.max_ngram)  # weights only

    # -- the three steps ------------------------------------------------------------------------------
    def lookup(self, token_ids: torch.Tensor, history: torch.Tensor, doc: torch.Tensor) -> torch.Tensor:
        """[B, T] ids (+ [B, N-1] carried ids) -> e [B, T, (N-1)*heads*head_dim]."""
        N, T = self.max_ngram, token_ids.shape[1]
        ext = torch.cat([history, token_ids], dim=1)
        lags = [torch.where(same_document(doc, k), ext[:, N - 1 - k:N - 1 - k + T], self.pad_id) for k in range(N)]
        grams = torch.stack(lags, dim=-1)  # [B, T, N]: x_t, x_{t-1}, ...
        rows = torch.stack([ngram_hashes(grams[..., :n], self.multipliers, self.primes[n - 2])
                            for n in range(2, N + 1)], dim=-2) + self.offsets  # [B, T, N-1, heads]
        weight = self.tables.weight
        e = F.embedding(rows.to(weight.device), weight)  # host_tables: gathered on the host, then moved
        return e.to(self.key_proj.weight.device, non_blocking=True).flatten(2)

    def gate(self, h: torch.Tensor, e: torch.Tensor) -> torch.Tensor:
        """v~ = sigmoid(f(<norm(h), norm(W_k e)> / sqrt(d))) * W_v e."""
        e = e.to(self.key_proj.weight.dtype)
        s = (self.query_norm(h) * self.key_norm(self.key_proj(e))).sum(-1, keepdim=True) / math.sqrt(h.shape[-1])
        if self.gate_signed_sqrt:
            s = s.abs().clamp_min(1e-6).sqrt() * s.sign()
        return torch.sigmoid(s) * self.value_proj(e)

    def short_conv(self, v: torch.Tensor, window: torch.Tensor, doc: torch.Tensor):
        """v + SiLU(causal dilated depthwise conv(norm(v))); -> (y, ext_u) with the window prepended."""
        u = self.conv_norm(v)
        ext = torch.cat([window, u], dim=1)
        W, T, K = window.shape[1], v.shape[1], self.conv_kernel
        out = torch.zeros_like(u)
        for i in range(K):  # tap i reads lag (K-1-i)*dilation, as nn.Conv1d with left padding
            lag = (K - 1 - i) * self.max_ngram
            tap = ext[:, W - lag:W - lag + T] * same_document(doc, lag)[..., None]
            out = out + tap * self.conv.weight[:, 0, i]
        return v + F.silu(out), ext

    def forward(self, x: torch.Tensor, state: State = None, seq_idx=None, need_state: bool = True,
                token_ids: torch.Tensor | None = None):
        if token_ids is None:
            raise ValueError("engram ('n') reads the token ids: call it with token_ids=[batch, seq] "
                             "(the reference Block passes them when the mixer sets reads_token_ids)")
        B, T = token_ids.shape
        N, W = self.max_ngram, (self.conv_kernel - 1) * self.max_ngram
        doc = torch.zeros_like(token_ids) if seq_idx is None else seq_idx
        if state is None:
            history = token_ids.new_full((B, N - 1), self.pad_id)
            window = x.new_zeros(B, W, x.shape[-1])
        else:
            history, window = state["token_ids"], state["conv"].to(x.dtype)
        y, ext_u = self.short_conv(self.gate(x, self.lookup(token_ids, history, doc)), window, doc)
        if not need_state:
            return y, None
        first = doc[:, :1]
        ids_doc = torch.cat([first.expand(-1, N - 1), doc], dim=1)
        conv_doc = torch.cat([first.expand(-1, W), doc], dim=1)
        return y, {"token_ids": _last(torch.cat([history, token_ids], 1), ids_doc, N - 1, self.pad_id),
                   "conv": _last(ext_u, conv_doc, W, 0.0)}

    @classmethod
    def check(cls, config) -> None:
        m = _model_config(config)
        c = m.engram
        if c.max_ngram < 2:
            fail("model.engram.max_ngram", c.max_ngram, "must be >= 2 (N-grams of orders 2..max_ngram)")
        for name in ("heads_per_ngram", "head_dim", "conv_kernel"):
            if getattr(c, name) < 1:
                fail(f"model.engram.{name}", getattr(c, name), "must be >= 1")
        if c.table_size < 2:
            fail("model.engram.table_size", c.table_size, "must be >= 2 rows per hash head")

    @classmethod
    def flops_per_token(cls, config, seq_len: int, causal: bool = True) -> float:
        """W_k and W_v (e_width x hidden each) and the depthwise conv; lookups and norms are not counted."""
        m = _model_config(config)
        c = m.engram
        width = (c.max_ngram - 1) * c.heads_per_ngram * c.head_dim
        return 2.0 * (2 * width * m.hidden_size + c.conv_kernel * m.hidden_size)

