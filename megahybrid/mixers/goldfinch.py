"""GoldFinch's GOLD attention (`f`), Goldstein et al. 2024 (arXiv 2407.12077).

GoldFinch stacks full-attention "GOLD" layers on top of RWKV-style (Finch, RWKV-6) recurrent layers.
The GOLD layers keep no per-layer KV cache: the recurrent stack's output is compressed once into a
small per-token vector c (hidden/16 wide), and every GOLD layer regenerates its keys and values from
that one shared cache. With "TokenCat" the cache is read together with the token's own embedding.
So a GoldFinch model's cache is one compressed vector per token, however many GOLD layers it has.

What is built here (the simplest faithful version, in the reference backend):
    first `f` layer (the writer):   c = W_c x                     x: this layer's normed input
    every `f` layer:                u = norm(concat(c, e))        e: the token embedding (token_cat)
                                    q = W_q x,  k = W_k u,  v = W_v u   (per layer)
                                    y = W_o softmax(q k^T / sqrt(D) + causal mask) v
                                    (RoPE and QK-norm as `model.attention` sets them)
This follows the paper's structure (one shared compressed cache, TokenCat, keys and values
regenerated per GOLD layer), not its code line by line (no reference implementation was at hand):
the paper decompresses c with an up-projection before its per-layer key/value maps, and a
decompression followed by a linear map is one linear map of concat(c, e), which is what W_k and W_v
are here. The recurrent part is a separate layer type (RWKV-7 `k`; megahybrid has no RWKV-6 Finch),
see the `goldfinch` preset.

Wiring (reference/model.py, "side streams"): the writer reads concat(x, e) and returns concat(y, c);
its Block stores c as the stream `goldfinch.cache`; later `f` layers read concat(x, c, e). The first
`f` layer built (counted in the model's `shared` dict) is the writer, so the cache is made at the
first GOLD layer's input, i.e. the output of the recurrent stack below it.

State: `{"cache": [B, Tc, compressed_dim (+ hidden with token_cat)]}`, the compressed cache of every
past token; keys and values are regenerated from it on each call (the paper stores token ids instead
of e, which a mixer does not see). Full attention, so positions continue from Tc.
"""

from __future__ import annotations

import torch

from megahybrid.config import fail
from megahybrid.mixers.attention import Attention, _model_config, attention_core, mean_keys
from megahybrid.mixers.base import Mixer, State
from megahybrid.mixers.common import RMSNorm, linear, make_norm, rotary

CACHE_STREAM = "goldfinch.cache"
"""Name of the side stream that carries c from the writer to the later `f` layers."""
USES_KEY = "goldfinch.uses"
"""Key in the `shared` dict counting the `f` layers built so far (the first one writes the cache)."""


def compressed_dim(config) -> int:
    m = _model_config(config)
    return m.goldfinch.compressed_dim or max(1, m.hidden_size // 16)


class GoldAttention(Mixer):
    """One GOLD layer: full causal attention with keys/values regenerated from the compressed cache."""

    def __init__(self, config, index: int = 0, shared: dict | None = None):
        super().__init__()
        self.check(config)
        a, g, hidden, std = config.attention, config.goldfinch, config.hidden_size, config.init_std
        shared = {} if shared is None else shared  # built alone: the layer writes its own cache
        self.use = shared.get(USES_KEY, 0)
        shared[USES_KEY] = self.use + 1
        self.writes_cache = self.use == 0
        self.hidden = hidden
        self.compressed_dim = compressed_dim(config)
        self.token_cat = g.token_cat
        tokens = ("embeddings",) if g.token_cat else ()
        self.side_inputs = tokens if self.writes_cache else (CACHE_STREAM, *tokens)
        self.side_output = CACHE_STREAM if self.writes_cache else None
        self.num_heads = a.num_heads
        self.num_kv_heads = a.num_kv_heads or a.num_heads
        self.head_dim = a.head_dim or hidden // a.num_heads
        self.rope_theta, self.rotary_fraction = a.rope_theta, a.rotary_fraction
        self.scale = a.softmax_scale if a.softmax_scale is not None else self.head_dim ** -0.5
        kv_in = self.compressed_dim + (hidden if g.token_cat else 0)
        self.compress = linear(hidden, self.compressed_dim, std) if self.writes_cache else None
        self.kv_norm = make_norm(config, kv_in)
        self.q_proj = linear(hidden, self.num_heads * self.head_dim, std, a.bias)
        self.k_proj = linear(kv_in, self.num_kv_heads * self.head_dim, std, a.bias)
        self.v_proj = linear(kv_in, self.num_kv_heads * self.head_dim, std, a.bias)
        self.o_proj = linear(self.num_heads * self.head_dim, hidden, std, a.bias if a.out_bias is None else a.out_bias)
        if a.qk_norm:
            self.q_norm = RMSNorm(self.head_dim, config.norm_eps, config.zero_centered_norm)
            self.k_norm = RMSNorm(self.head_dim, config.norm_eps, config.zero_centered_norm)
        else:
            self.q_norm = self.k_norm = None

    def split_input(self, x: torch.Tensor):
        """The Block's input -> (x `[B, T, hidden]`, new cache rows `[B, T, kv_in]`, c `[B, T, dc]`)."""
        h, rest = x[..., :self.hidden], x[..., self.hidden:]
        if self.writes_cache:
            c = self.compress(h)
            return h, torch.cat([c, rest], dim=-1), c
        return h, rest, rest[..., :self.compressed_dim]

    def forward_segment(self, x: torch.Tensor, state: State = None):
        h, rows, c = self.split_input(x)
        B, T, _ = h.shape
        past = 0 if state is None else state["cache"].shape[1]
        cache = rows if state is None else torch.cat([state["cache"].to(rows.dtype), rows], dim=1)
        u = self.kv_norm(cache)  # every key and value regenerated from the compressed cache
        q = self.q_proj(h).view(B, T, self.num_heads, self.head_dim)
        k = self.k_proj(u).view(B, past + T, self.num_kv_heads, self.head_dim)
        v = self.v_proj(u).view(B, past + T, self.num_kv_heads, self.head_dim)
        if self.q_norm is not None:
            q, k = self.q_norm(q), self.k_norm(k)
        q = rotary(q, torch.arange(past, past + T, device=x.device), self.rope_theta, self.rotary_fraction)
        k = rotary(k, torch.arange(past + T, device=x.device), self.rope_theta, self.rotary_fraction)
        o = attention_core(q, k, v, causal_offset=past, scale=self.scale)
        y = self.o_proj(o.reshape(B, T, -1))
        if self.writes_cache:
            y = torch.cat([y, c], dim=-1)
        return y, {"cache": cache}

    @classmethod
    def check(cls, config) -> None:
        Attention.check(config)
        m = _model_config(config)
        a, g = m.attention, m.goldfinch
        if g.compressed_dim is not None and g.compressed_dim < 1:
            fail("model.goldfinch.compressed_dim", g.compressed_dim, "must be >= 1 (or null for hidden_size // 16)")
        if a.output_gate:
            fail("model.attention.output_gate", True, "is not built by goldfinch `f` layers; set it to false")
        if a.qk_norm and a.qk_norm_scope != "head":
            fail("model.attention.qk_norm_scope", a.qk_norm_scope, "goldfinch `f` layers normalise per head; use 'head'")

    @classmethod
    def flops_per_token(cls, config, seq_len: int, causal: bool = True) -> float:
        """Projections (q from hidden; k, v from the compressed_dim (+ hidden) cache rows; o) plus the
        attention core, as `Attention.flops_per_token`; each key/value is computed once per token
        (training). The writer's compression, 2 * hidden * compressed_dim once per model, is not counted."""
        m = _model_config(config)
        a = m.attention
        heads, kv = a.num_heads, a.num_kv_heads or a.num_heads
        d = a.head_dim or m.hidden_size // heads
        kv_in = compressed_dim(m) + (m.hidden_size if m.goldfinch.token_cat else 0)
        proj = 2 * m.hidden_size * heads * d + 2 * kv_in * kv * d
        return 2.0 * proj + 4.0 * heads * d * mean_keys(seq_len, None, causal)
