"""GoldFinch GOLD attention (`f`, arXiv 2407.12077).

The reference is hand-written float64 math in this file: the compression c = W_c x, the TokenCat rows
concat(c, e) through an RMSNorm written out, keys/values/queries from the module's weights, RoPE as
explicit (cos, sin) rotations of the half-split pairs, and a per-query loop of exp / sum softmax over
the visible keys. Also: the writer's cache feeds the readers (changing W_c changes a reader), pieces
== whole (the compressed cache as state), packed == separate, gradients == the reference's, and in
a whole model: causality, state carried over pieces, and the `goldfinch` preset's layout.
"""

from __future__ import annotations

import math

import pytest
import torch

from megahybrid import build_model, load_config
from megahybrid.config import AttentionConfig, ConfigError, GoldFinchConfig, ModelConfig
from megahybrid.describe import describe
from megahybrid.mixers.goldfinch import CACHE_STREAM, GoldAttention
from tests.helpers import assert_close
from tests.mixer_checks import check_grads, check_packing, check_pieces

F64 = torch.float64
HIDDEN, DC = 24, 5


def make_config(rope_theta: float = 0.0, token_cat: bool = True, qk_norm: bool = False) -> ModelConfig:
    return ModelConfig(hidden_size=HIDDEN, init_std=0.2,
                       attention=AttentionConfig(num_heads=4, num_kv_heads=2, rope_theta=rope_theta, qk_norm=qk_norm),
                       goldfinch=GoldFinchConfig(compressed_dim=DC, token_cat=token_cat))


def build(config, n: int = 2, seed: int = 0) -> list[GoldAttention]:
    """n `f` layers built as the model builds them (one shared dict): the first writes the cache."""
    torch.manual_seed(seed)
    shared: dict = {}
    layers = [GoldAttention(config, index=i, shared=shared).double() for i in range(n)]
    with torch.no_grad():
        for layer in layers:
            layer.kv_norm.weight.copy_(1 + 0.3 * torch.randn_like(layer.kv_norm.weight))
    return layers


def rms(x, w, eps):
    return x / torch.sqrt((x * x).mean(-1, keepdim=True) + eps) * w


def rope(x, positions, theta):
    """x [T, H, D]: pairs (i, i + D/2) rotated by positions * theta^(-2i/D)."""
    if theta == 0:
        return x
    half = x.shape[-1] // 2
    freq = theta ** (-torch.arange(half, dtype=F64) * 2 / x.shape[-1])
    ang = positions.to(F64)[:, None, None] * freq
    x1, x2 = x[..., :half], x[..., half:]
    return torch.cat([x1 * ang.cos() - x2 * ang.sin(), x2 * ang.cos() + x1 * ang.sin()], dim=-1)


def reference(layer: GoldAttention, x, c, e, eps: float):
    """Hand-written GOLD attention for one layer: x [B, T, hidden], c [B, T, dc] (the shared cache),
    e [B, T, hidden] or None -> y [B, T, hidden]."""
    B, T, _ = x.shape
    H, Hkv, D = layer.num_heads, layer.num_kv_heads, layer.head_dim
    rows = c if e is None else torch.cat([c, e], dim=-1)
    u = rms(rows, layer.kv_norm.weight, eps)
    q = (x @ layer.q_proj.weight.T).view(B, T, H, D)
    k = (u @ layer.k_proj.weight.T).view(B, T, Hkv, D)
    v = (u @ layer.v_proj.weight.T).view(B, T, Hkv, D)
    if layer.q_norm is not None:
        q, k = rms(q, layer.q_norm.weight, eps), rms(k, layer.k_norm.weight, eps)
    out = torch.zeros(B, T, H, D, dtype=F64)
    for b in range(B):
        qb = rope(q[b], torch.arange(T), layer.rope_theta)
        kb = rope(k[b], torch.arange(T), layer.rope_theta)
        for h in range(H):
            g = h // (H // Hkv)
            for t in range(T):
                scores = torch.stack([qb[t, h] @ kb[s, g] for s in range(t + 1)]) / math.sqrt(D)
                p = torch.exp(scores - scores.max())
                p = p / p.sum()
                out[b, t, h] = sum(p[s] * v[b, s, g] for s in range(t + 1))
    return out.reshape(B, T, H * D) @ layer.o_proj.weight.T


@pytest.mark.parametrize("rope_theta,token_cat,qk_norm", [(0.0, True, False), (500.0, True, True), (500.0, False, False)])
def test_gold_attention_equals_handwritten_softmax_over_the_decompressed_cache(rope_theta, token_cat, qk_norm):
    config = make_config(rope_theta, token_cat, qk_norm)
    writer, reader = build(config)
    assert writer.writes_cache and not reader.writes_cache
    assert writer.side_output == CACHE_STREAM and CACHE_STREAM in reader.side_inputs
    x1, x2, e = torch.randn(3, 2, 11, HIDDEN, dtype=F64)
    e_in = [e] if token_cat else []
    y1c, _ = writer(torch.cat([x1, *e_in], dim=-1))
    y1, c = y1c[..., :HIDDEN], y1c[..., HIDDEN:]
    assert_close("compressed cache c = W_c x", x1 @ writer.compress.weight.T, c, 1e-14)
    assert_close("writer y", reference(writer, x1, c, e if token_cat else None, config.norm_eps), y1, 1e-12)
    y2, _ = reader(torch.cat([x2, c, *e_in], dim=-1))
    assert_close("reader y", reference(reader, x2, c, e if token_cat else None, config.norm_eps), y2, 1e-12)


def test_readers_depend_on_the_writers_cache_only_through_the_stream():
    """In a model `ff`, the second layer's output changes when the first layer's W_c changes, and
    the model equals running the two layers by hand with c passed along."""
    config = load_config({"model": {"pattern": "ff", "hidden_size": HIDDEN, "vocab_size": 50, "init_std": 0.2,
                                    "attention": {"num_heads": 4, "num_kv_heads": 2},
                                    "goldfinch": {"compressed_dim": DC}}})
    torch.manual_seed(0)
    model = build_model(config).double()
    ids = torch.randint(0, 50, (2, 9))
    e = model.embed(ids)
    b0, b1 = model.layers
    y0c, _ = b0.mixer(torch.cat([b0.norm(e), e], dim=-1))
    h = e + y0c[..., :HIDDEN]
    y1, _ = b1.mixer(torch.cat([b1.norm(h), y0c[..., HIDDEN:], e], dim=-1))
    assert_close("model == layers by hand", model.head(h + y1), model(ids), 1e-13)
    before = model(ids)
    with torch.no_grad():
        b0.mixer.compress.weight.mul_(1.5)
    assert (model(ids) - before).abs().max() > 1e-6


@pytest.mark.parametrize("role", ["writer", "reader"])
def test_pieces_equal_whole_and_packing_equals_separate(role):
    config = make_config(rope_theta=100.0, qk_norm=True)
    layer = build(config)[0 if role == "writer" else 1]
    width = HIDDEN + (0 if role == "writer" else DC) + HIDDEN
    x = torch.randn(3, 17, width, dtype=F64)
    state = check_pieces(layer, x, [1, 8, 9], 1e-12)
    assert state["cache"].shape == (3, 17, DC + HIDDEN)  # the compressed rows, not per-layer K and V
    check_packing(layer, x, [[5, 12], [2, 3, 12], [5, 12]], 1e-12)  # equal last documents: equal cache shapes


def test_gradients_match_the_handwritten_reference():
    config = make_config(rope_theta=100.0)
    writer, reader = build(config)
    x1, x2, e = (torch.randn(2, 7, HIDDEN, dtype=F64, requires_grad=True) for _ in range(3))
    y1c, _ = writer(torch.cat([x1, e], dim=-1))
    c = y1c[..., HIDDEN:]
    y2, _ = reader(torch.cat([x2, c, e], dim=-1))
    c_ref = x1 @ writer.compress.weight.T
    ref1 = reference(writer, x1, c_ref, e, config.norm_eps)
    ref2 = reference(reader, x2, c_ref, e, config.norm_eps)
    leaves = {"x1": x1, "x2": x2, "e": e, "W_c": writer.compress.weight, "W_k": reader.k_proj.weight}
    check_grads((ref1, ref2), (y1c[..., :HIDDEN], y2), leaves, 1e-11)


def test_model_is_causal_and_carries_state_over_pieces():
    config = load_config("goldfinch:tiny")
    torch.manual_seed(0)
    model = build_model(config).double().eval()
    ids = torch.randint(0, config.model.vocab_size, (2, 15))
    whole = model(ids)
    changed = ids.clone()
    changed[:, 9] = (changed[:, 9] + 1) % config.model.vocab_size
    out = model(changed)
    assert_close("logits before the changed token", whole[:, :9], out[:, :9], 1e-13)
    assert (out[:, 9] - whole[:, 9]).abs().max() > 1e-6
    first, state = model(ids[:, :6], return_state=True)
    second = model(ids[:, 6:], state=state)
    assert_close("logits in pieces", whole, torch.cat([first, second], dim=1), 1e-12)


def test_preset_layout_and_flops():
    config = load_config("goldfinch")
    symbols = [r["symbol"] for r in describe(config)["layers"]]
    mixers = [s for s in symbols if s not in "-E"]
    assert set(mixers[: 2 * len(mixers) // 3]) == {"k"} and set(mixers[2 * len(mixers) // 3:]) == {"f"}
    m = config.model
    D, H, dc = m.attention.head_dim or m.hidden_size // m.attention.num_heads, m.attention.num_heads, m.hidden_size // 16
    kv = m.attention.num_kv_heads or H
    S = 1024
    expected = 2 * (2 * m.hidden_size * H * D + 2 * (dc + m.hidden_size) * kv * D) + 4 * H * D * S / 2
    assert GoldAttention.flops_per_token(m, S) == expected


def test_config_errors_are_one_line():
    with pytest.raises(ConfigError, match=r"model.goldfinch.compressed_dim=0: must be >= 1"):
        load_config({"model": {"pattern": "f", "goldfinch": {"compressed_dim": 0}}})
    with pytest.raises(ConfigError, match=r"model.attention.output_gate=True"):
        load_config({"model": {"pattern": "f", "attention": {"output_gate": True}}})
