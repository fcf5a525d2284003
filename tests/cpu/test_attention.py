"""Attention / SlidingWindowAttention against references written here (SDPA on hand-projected heads,
complex-number RoPE, an independently built mask) and against transformers' Llama / Qwen3-Next
attention with copied weights; plus KV-cache pieces == whole, packing, causality and config errors."""

from __future__ import annotations

import dataclasses

import pytest
import torch
import torch.nn.functional as F

from megahybrid.config import AttentionConfig, ConfigError, ModelConfig
from megahybrid.mixers.attention import Attention, SlidingWindowAttention, attention_core
from tests.helpers import assert_close
from tests.mixer_checks import check_grads, check_packing, check_pieces

F64 = torch.float64
HIDDEN = 24


def make_config(zero_centered: bool = False, **attn) -> ModelConfig:
    attn = {"num_heads": 4, "num_kv_heads": 2, **attn}
    return ModelConfig(hidden_size=HIDDEN, init_std=0.2, norm_eps=1e-6, zero_centered_norm=zero_centered,
                       attention=AttentionConfig(**attn))


def build(cls, config, seed: int = 0):
    """The layer in float64 with every parameter random (biases and norm weights included), so no
    term can hide behind its zero/one init."""
    torch.manual_seed(seed)
    m = cls(config).double()
    with torch.no_grad():
        for name, p in m.named_parameters():
            p.copy_(torch.randn_like(p) * 0.3 + (1.0 if "norm" in name and not config.zero_centered_norm else 0.0))
    return m


# ------------------------------------------------------------------ hand-written reference


def hand_rms(x, norm):
    w = 1 + norm.weight if norm.zero_centered else norm.weight
    return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + norm.eps) * w


def hand_rope(x, positions, theta, fraction):
    """RoPE as complex multiplication: pair (x_i, x_{i+rot/2}) is the number x_i + i x_{i+rot/2}."""
    if theta == 0:
        return x
    rot = int(x.shape[-1] * fraction) // 2 * 2
    half = rot // 2
    freqs = theta ** (-torch.arange(half, dtype=F64) * 2 / rot)
    phase = torch.polar(torch.ones(len(positions), half, dtype=F64), positions.to(F64)[:, None] * freqs)
    z = torch.complex(x[..., :half], x[..., half:rot]) * phase[None, :, None, :]
    return torch.cat([z.real, z.imag, x[..., rot:]], dim=-1)


def reference_layer(m: Attention, x, mask):
    """The whole layer from its weights; `mask` [T, T] bool (True = visible); core = torch SDPA."""
    B, T, _ = x.shape
    H, Hkv, D = m.num_heads, m.num_kv_heads, m.head_dim
    q = F.linear(x, m.q_proj.weight, m.q_proj.bias).view(B, T, H, -1)
    gate = q[..., D:] if m.output_gate else None
    q = q[..., :D]
    k = F.linear(x, m.k_proj.weight, m.k_proj.bias).view(B, T, Hkv, D)
    v = F.linear(x, m.v_proj.weight, m.v_proj.bias).view(B, T, Hkv, D)
    if m.q_norm is not None:
        q, k = hand_rms(q, m.q_norm), hand_rms(k, m.k_norm)
    pos = torch.arange(T)
    q, k = hand_rope(q, pos, m.rope_theta, m.rotary_fraction), hand_rope(k, pos, m.rope_theta, m.rotary_fraction)
    k, v = k.repeat_interleave(H // Hkv, dim=2), v.repeat_interleave(H // Hkv, dim=2)
    o = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2),
                                       attn_mask=mask, scale=m.scale).transpose(1, 2)
    if gate is not None:
        o = o * torch.sigmoid(gate)
    return F.linear(o.reshape(B, T, H * D), m.o_proj.weight, m.o_proj.bias)


def band(T: int, window: int | None, offset: int = 0, Tk: int | None = None):
    """Visible iff 0 <= (i + offset) - j < window, built from tril/triu (not the module's arange)."""
    ones = torch.ones(T, T if Tk is None else Tk, dtype=torch.bool)
    mask = ones.tril(diagonal=offset)
    return mask if window is None else mask & ones.triu(diagonal=offset - window + 1)


CONFIGS = {
    "mha": dict(num_kv_heads=None),
    "gqa_bias": dict(bias=True, rope_theta=500.0),
    "gate_qknorm_partial": dict(output_gate=True, qk_norm=True, rotary_fraction=0.5, bias=True),
    "qknorm_zero_centered": dict(qk_norm=True, zero_centered=True),
    "no_rope_scale_headdim": dict(rope_theta=0.0, softmax_scale=0.2, head_dim=10, num_kv_heads=1),
    "out_bias_only": dict(out_bias=True, rotary_fraction=0.5),  # RecurrentGemma: bias on o_proj alone
}


# --------------------------------------------------------------------------------- core


@pytest.mark.parametrize("window", [None, 1, 4])
@pytest.mark.parametrize("offset", [7, 3, 0])
def test_core_matches_sdpa(offset, window):
    """attention_core (GQA by grouping) == SDPA on repeated kv with an independent mask."""
    torch.manual_seed(1)
    Tq, Tk, Hq, Hkv = 5, 12, 6, 2
    q, k = torch.randn(2, Tq, Hq, 8, dtype=F64), torch.randn(2, Tk, Hkv, 8, dtype=F64)
    v = torch.randn(2, Tk, Hkv, 5, dtype=F64)
    out = attention_core(q, k, v, causal_offset=offset, window=window, scale=0.3)
    kr, vr = (t.repeat_interleave(Hq // Hkv, dim=2).transpose(1, 2) for t in (k, v))
    ref = F.scaled_dot_product_attention(q.transpose(1, 2), kr, vr, attn_mask=band(Tq, window, offset, Tk),
                                         scale=0.3).transpose(1, 2)
    assert_close("o", ref, out, 1e-12)


def test_core_default_offset_and_bf16():
    """causal_offset None = Tk - Tq; 16-bit inputs keep their dtype (scores in float32)."""
    torch.manual_seed(2)
    q, k, v = torch.randn(1, 3, 2, 4), torch.randn(1, 7, 1, 4), torch.randn(1, 7, 1, 4)
    assert_close("default offset", attention_core(q, k, v, causal_offset=4), attention_core(q, k, v), 0)
    out = attention_core(q.bfloat16(), k.bfloat16(), v.bfloat16())
    assert out.dtype == torch.bfloat16
    assert_close("bf16", attention_core(q, k, v), out, 2e-2)


# ------------------------------------------------------------------- layer vs references


@pytest.mark.parametrize("name", list(CONFIGS))
def test_layer_matches_hand_reference(name):
    """Output and every gradient == the hand-written layer (covers the output gate and QK-norm)."""
    m = build(Attention, make_config(**CONFIGS[name]))
    x = torch.randn(2, 11, HIDDEN, dtype=F64, requires_grad=True)
    ref = reference_layer(m, x, band(11, None))
    out, _ = m(x)
    assert_close("y", ref, out, 1e-12)
    check_grads(ref, out, {"x": x, **dict(m.named_parameters())}, 1e-11)


def test_output_gate_rows_interleaved_per_head():
    """q_proj rows are per head [q_h, gate_h]: with every gate row zeroed (sigmoid = 1/2) the gated
    layer equals an ungated one built from rows [h*2D, h*2D + D) with o_proj's weight halved."""
    gated = build(Attention, make_config(output_gate=True, bias=True))
    plain = Attention(make_config(bias=True)).double()
    H, D = gated.num_heads, gated.head_dim
    q_rows = torch.cat([torch.arange(h * 2 * D, h * 2 * D + D) for h in range(H)])
    gate_rows = q_rows + D
    with torch.no_grad():
        gated.q_proj.weight[gate_rows] = 0
        gated.q_proj.bias[gate_rows] = 0
        plain.load_state_dict({k: v for k, v in gated.state_dict().items() if not k.startswith("q_proj")},
                              strict=False)
        plain.q_proj.weight.copy_(gated.q_proj.weight[q_rows])
        plain.q_proj.bias.copy_(gated.q_proj.bias[q_rows])
        plain.o_proj.weight.mul_(0.5)
    x = torch.randn(2, 7, HIDDEN, dtype=F64)
    assert_close("gated == plain / 2", plain(x)[0], gated(x)[0], 1e-12)


@pytest.mark.parametrize("family", ["llama", "qwen3_next"])
def test_layer_matches_transformers(family, monkeypatch):
    """Whole layer == transformers' eager attention with copied weights (HF runs norms, RoPE tables
    and softmax in float32, hence 1e-5). qwen3_next: output gate, zero-centred QK-norm, partial RoPE."""
    monkeypatch.setitem(__import__("sys").modules, "fla", None)  # CPU: keep FLA's Triton kernels out
    import transformers
    from transformers.models.llama import modeling_llama
    from transformers.models.qwen3_next import modeling_qwen3_next

    common = dict(hidden_size=HIDDEN, num_attention_heads=4, num_key_value_heads=2, head_dim=8,
                  attention_bias=True, rope_theta=300.0, rms_norm_eps=1e-6)
    if family == "llama":
        cfg = make_config(bias=True, rope_theta=300.0, head_dim=8)
        hf_cfg = transformers.LlamaConfig(**common)
        mod = modeling_llama
        hf = mod.LlamaAttention(hf_cfg, layer_idx=0)
        rope = mod.LlamaRotaryEmbedding(hf_cfg)
    else:
        cfg = make_config(zero_centered=True, bias=True, rope_theta=300.0, output_gate=True, qk_norm=True,
                          rotary_fraction=0.5, head_dim=8)
        hf_cfg = transformers.Qwen3NextConfig(**common, partial_rotary_factor=0.5)
        mod = modeling_qwen3_next
        hf = mod.Qwen3NextAttention(hf_cfg, layer_idx=0)
        rope = mod.Qwen3NextRotaryEmbedding(hf_cfg)
    hf_cfg._attn_implementation = "eager"
    ours = build(Attention, cfg)
    hf.load_state_dict(ours.state_dict())  # same parameter names and layouts
    hf.double()
    T = 13
    x = torch.randn(2, T, HIDDEN, dtype=F64)
    cos, sin = rope(x, torch.arange(T)[None].expand(2, T))
    additive = torch.zeros(T, T, dtype=F64).masked_fill(~band(T, None), float("-inf"))
    ref, _ = hf(x, position_embeddings=(cos.to(F64), sin.to(F64)), attention_mask=additive[None, None])
    assert_close("y vs HF", ref, ours(x)[0], 1e-5)


# -------------------------------------------------------------- sliding window, pieces


@pytest.mark.parametrize("window", [1, 4, 30])
def test_sliding_window_matches_banded_mask(window):
    cfg = make_config(window=window, output_gate=True, qk_norm=True)
    m = build(SlidingWindowAttention, cfg)
    x = torch.randn(2, 17, HIDDEN, dtype=F64)
    assert_close("swa", reference_layer(m, x, band(17, window)), m(x)[0], 1e-12)
    if window >= 17:  # a window longer than the sequence is global attention
        full = Attention(cfg).double()
        full.load_state_dict(m.state_dict())
        assert_close("swa == full", full(x)[0], m(x)[0], 0)


@pytest.mark.parametrize("cls, window, pieces", [
    (Attention, None, [7, 1, 15]),
    (SlidingWindowAttention, 5, [2, 9, 12]),  # pieces shorter and longer than the window
    (SlidingWindowAttention, 5, [1, 1, 21]),  # cache still shorter than window-1 at the second piece
    (SlidingWindowAttention, 1, [3, 1, 5]),  # window 1: empty cache
])
def test_pieces_with_state_equal_whole(cls, window, pieces):
    cfg = make_config(window=window or 4096, qk_norm=True, rotary_fraction=0.5, output_gate=True)
    x = torch.randn(2, sum(pieces), HIDDEN, dtype=F64)
    cuts = [sum(pieces[:i]) for i in range(1, len(pieces))]
    state = check_pieces(build(cls, cfg), x, cuts, rtol=1e-10)  # window 1 keeps an empty cache
    if window is not None:
        assert state["k"].shape[1] == window - 1 and state["pos"].tolist() == [sum(pieces)] * 2


# ------------------------------------------------------------------------ packing, causality


def test_packed_equals_separate_full_attention():
    """3 documents (5, 17, 9) in each of 2 rows == each document alone; the state is the last one's."""
    m = build(Attention, make_config(qk_norm=True, output_gate=True))
    x = torch.randn(2, 31, HIDDEN, dtype=F64)
    check_packing(m, x, [[5, 17, 9]] * 2, rtol=1e-12, state_rtol=0)


def test_packed_equals_separate_sliding_window_rows_differ():
    """Rows with different boundaries; the SWA caches line up but the positions differ per row,
    and decoding on from the packed state equals decoding on from each last document alone."""
    m = build(SlidingWindowAttention, make_config(window=4, rotary_fraction=0.5))
    rows = [[5, 17, 9], [9, 17, 5]]
    x = torch.randn(2, 31, HIDDEN, dtype=F64)
    more = torch.randn(2, 3, HIDDEN, dtype=F64)
    state = check_packing(m, x, rows, rtol=1e-12)
    assert state["pos"].tolist() == [9, 5]
    y_more, _ = m(more, state)
    for b, lengths in enumerate(rows):
        _, ref_state = m(x[b:b + 1, -lengths[-1]:])  # the row's last document alone
        assert_close(f"row {b} next piece", m(more[b:b + 1], ref_state)[0], y_more[b:b + 1], 1e-10)


@pytest.mark.parametrize("cls", [Attention, SlidingWindowAttention])
def test_causality(cls):
    """Changing token t0 changes no output before t0 (and, with a window w, none from t0 + w on)."""
    m = build(cls, make_config(window=3))
    x = torch.randn(1, 16, HIDDEN, dtype=F64)
    t0 = 9
    x2 = x.clone()
    x2[:, t0] += 1.0
    y, y2 = m(x)[0], m(x2)[0]
    assert torch.equal(y[:, :t0], y2[:, :t0])
    assert (y[:, t0] - y2[:, t0]).abs().max() > 1e-3
    if cls is SlidingWindowAttention:
        assert (y[:, t0 + 2] - y2[:, t0 + 2]).abs().max() > 1e-3
        assert torch.equal(y[:, t0 + 3:], y2[:, t0 + 3:])
    else:
        assert (y[:, -1] - y2[:, -1]).abs().max() > 1e-6


# ----------------------------------------------------------------------- FLOPs, config errors


def test_flops():
    """Projections: 2 FLOPs per weight element; causal core 2*S*H*D (half of non-causal); a window
    at least S long changes nothing and a short one tracks the band of the mask."""
    cfg = make_config(output_gate=True, window=64)
    m = Attention(cfg)
    S, HD = 1024, 4 * m.head_dim
    proj = 2 * sum(lin.weight.numel() for lin in (m.q_proj, m.k_proj, m.v_proj, m.o_proj))
    assert Attention.flops_per_token(cfg, S) == proj + 2 * S * HD
    assert Attention.flops_per_token(cfg, S, causal=False) == proj + 4 * S * HD
    assert SlidingWindowAttention.flops_per_token(dataclasses.replace(cfg, attention=dataclasses.replace(
        cfg.attention, window=S)), S) == Attention.flops_per_token(cfg, S)
    band_keys = band(S, 64).sum().item() / S
    swa_core = SlidingWindowAttention.flops_per_token(cfg, S) - proj
    assert abs(swa_core / (4 * HD * band_keys) - 1) < 0.01


@pytest.mark.parametrize("cls, attn, hidden, field", [
    (Attention, dict(num_heads=5), 24, "model.attention.num_heads=5"),
    (Attention, dict(num_heads=4, num_kv_heads=3), 24, "model.attention.num_kv_heads=3"),
    (Attention, dict(num_heads=4, num_kv_heads=0), 24, "model.attention.num_kv_heads=0"),
    (Attention, dict(rotary_fraction=0.0), 24, "model.attention.rotary_fraction=0.0"),
    (Attention, dict(rotary_fraction=1.5), 24, "model.attention.rotary_fraction=1.5"),
    (Attention, dict(head_dim=0), 24, "model.attention.head_dim=0"),
    (Attention, dict(rope_theta=-1.0), 24, "model.attention.rope_theta=-1.0"),
    (Attention, dict(softmax_scale=0.0), 24, "model.attention.softmax_scale=0.0"),
    (SlidingWindowAttention, dict(window=0), 24, "model.attention.window=0"),
])
def test_check_errors_are_one_line(cls, attn, hidden, field):
    cfg = ModelConfig(hidden_size=hidden, attention=AttentionConfig(**attn))
    with pytest.raises(ConfigError) as err:
        cls.check(cfg)
    msg = str(err.value)
    assert msg.startswith(field + ":") and "\n" not in msg, msg
    with pytest.raises(ConfigError):
        cls(cfg)


def test_check_accepts_valid_and_head_dim_override():
    """num_heads need not divide hidden_size when head_dim is set; window only matters for SWA."""
    cfg = ModelConfig(hidden_size=24, attention=AttentionConfig(num_heads=5, head_dim=8, window=0))
    Attention.check(cfg)
    assert Attention(cfg).q_proj.weight.shape == (40, 24)


# ------------------------------------------------------- QK-norm over all heads (OLMo2)


@pytest.mark.parametrize("rope_theta", [300.0, 0.0])
def test_qk_norm_all_heads_matches_transformers_olmo_hybrid(rope_theta, monkeypatch):
    """qk_norm_scope="all_heads" == OlmoHybridAttention (q_norm [H*D], k_norm [Hkv*D] over the whole
    projection, then RoPE or NoPE) with copied weights; a per-head norm of the same weights differs."""
    monkeypatch.setitem(__import__("sys").modules, "fla", None)
    import transformers
    from transformers.models.olmo_hybrid import modeling_olmo_hybrid as mod

    cfg = make_config(qk_norm=True, qk_norm_scope="all_heads", rope_theta=rope_theta, bias=True)
    rope = {"rope_type": "default", "rope_theta": rope_theta} if rope_theta else None
    hf_cfg = transformers.OlmoHybridConfig(hidden_size=HIDDEN, num_attention_heads=4, num_key_value_heads=2,
                                           attention_bias=True, rms_norm_eps=1e-6, rope_parameters=rope,
                                           pad_token_id=0, vocab_size=8)
    hf_cfg._attn_implementation = "eager"
    ours = build(Attention, cfg)
    assert tuple(ours.q_norm.weight.shape) == (4 * 6,) and tuple(ours.k_norm.weight.shape) == (2 * 6,)
    hf = mod.OlmoHybridAttention(hf_cfg, layer_idx=0)
    hf.load_state_dict(ours.state_dict())
    hf.double()
    T = 13
    x = torch.randn(2, T, HIDDEN, dtype=F64)
    pos = None
    if rope_theta:
        cos, sin = mod.OlmoHybridRotaryEmbedding(hf_cfg)(x, torch.arange(T)[None].expand(2, T))
        pos = (cos.to(F64), sin.to(F64))
    additive = torch.zeros(T, T, dtype=F64).masked_fill(~band(T, None), float("-inf"))
    ref, _ = hf(x, position_embeddings=pos, attention_mask=additive[None, None])
    assert_close("y vs HF", ref, ours(x)[0], 1e-5)
    ours.qk_norm_all_heads = False
    ours.q_norm.weight.data, ours.k_norm.weight.data = ours.q_norm.weight[:6], ours.k_norm.weight[:6]
    assert (ours(x)[0] - ref).abs().max() > 1e-3, "per-head norm gave the same output; the check cannot fail"
