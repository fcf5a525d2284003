"""Based (`b`). References, all float64:
- a token-by-token recurrence written here (state kv += phi(k) v^T, z += phi(k); o = phi(q) kv / (phi(q) z
  + eps)) with the feature map built element by element in FLA's layout: output, final state, every grad;
- flash-linear-attention 0.6.0's `fla/ops/based/naive.py` (`naive_parallel_based`, `naive_chunk_based`),
  loaded from its file;
- FLA's `BasedLinearAttention.forward_reference` with copied weights (the layer as a whole);
- pieces with the state carried == whole, packed == separate documents, config errors, FLOPs."""

from __future__ import annotations

import itertools
import math

import pytest
import torch

from megahybrid.config import BasedConfig, ConfigError, ModelConfig
from megahybrid.mixers.based import Based, chunk_based, taylor_feature_map
from tests.cpu.test_delta_rule import fla_naive, to_bhtd
from tests.helpers import assert_close
from tests.mixer_checks import check_grads, check_packing, check_pieces

F64 = torch.float64
HIDDEN, HEADS, FEAT = 24, 4, 6
EPS = 1e-6


def make_config(**based) -> ModelConfig:
    fields = {"num_heads": HEADS, "feature_dim": FEAT, "chunk_size": 16, **based}
    return ModelConfig(hidden_size=HIDDEN, init_std=0.3, based=BasedConfig(**fields))


def build(config, seed: int = 0) -> Based:
    torch.manual_seed(seed)
    return Based(config).double()


def phi_by_hand(x: torch.Tensor) -> torch.Tensor:
    """[1, x_i / d^(1/4) for i, x_i^2 / sqrt(2 d) for i, x_i x_j / sqrt(d) for i < j] (FLA's order)."""
    d = x.shape[-1]
    feats = [torch.ones_like(x[..., 0])]
    feats += [x[..., i] / d ** 0.25 for i in range(d)]
    feats += [x[..., i] ** 2 / math.sqrt(2 * d) for i in range(d)]
    feats += [x[..., i] * x[..., j] / math.sqrt(d) for i, j in itertools.combinations(range(d), 2)]
    return torch.stack(feats, dim=-1)


def recurrent_based(q, k, v, eps, state=None):
    """One token at a time; q, k `[B, T, H, d]`, v `[B, T, H, dv]`."""
    B, T, H, _ = q.shape
    fq, fk = phi_by_hand(q), phi_by_hand(k)
    if state is None:
        kv = q.new_zeros(B, H, fq.shape[-1], v.shape[-1])
        z = q.new_zeros(B, H, fq.shape[-1])
    else:
        kv, z = state
    outs = []
    for t in range(T):
        kv = kv + fk[:, t, :, :, None] * v[:, t, :, None, :]
        z = z + fk[:, t]
        num = (fq[:, t, :, :, None] * kv).sum(-2)
        den = (fq[:, t] * z).sum(-1)
        outs.append(num / (den[..., None] + eps))
    return torch.stack(outs, dim=1), (kv, z)


def qkv(B, T, seed=0, dv=5):
    g = torch.Generator().manual_seed(seed)
    q, k = (torch.randn(B, T, 3, FEAT, dtype=F64, generator=g) for _ in range(2))
    v = torch.randn(B, T, 3, dv, dtype=F64, generator=g)
    return [t.requires_grad_() for t in (q, k, v)]


def test_feature_map_is_the_taylor_kernel():
    """phi(q).phi(k) == 1 + s + s^2/2, s = q.k / sqrt(d); and phi == the element-by-element map."""
    q, k, _ = qkv(2, 9)
    s = (q * k).sum(-1) / math.sqrt(FEAT)
    assert_close("kernel", 1 + s + s * s / 2, (taylor_feature_map(q) * taylor_feature_map(k)).sum(-1), 1e-13)
    assert_close("phi layout", phi_by_hand(q), taylor_feature_map(q), 1e-15)


@pytest.mark.parametrize("T", [63, 75])
@pytest.mark.parametrize("initial_state", [False, True])
def test_chunked_matches_recurrence(T, initial_state):
    """Output, final (kv, z) and the gradient of q, k, v (and of the incoming state), rel err <= 1e-10;
    the incoming state is the recurrence's own state after a random 11-token prefix."""
    q, k, v = qkv(2, T, seed=T)
    leaves = {"q": q, "k": k, "v": v}
    state = None
    if initial_state:
        pq, pk, pv = qkv(2, 11, seed=99)
        _, (kv0, z0) = recurrent_based(pq.detach(), pk.detach(), pv.detach(), EPS)
        state = (kv0.requires_grad_(), z0.requires_grad_())
        leaves.update(kv0=kv0, z0=z0)
    ref, (ref_kv, ref_z) = recurrent_based(q, k, v, EPS, state)
    out, (kv, z) = chunk_based(q, k, v, EPS, 16, state)
    assert_close("o", ref, out, 1e-10)
    assert_close("kv", ref_kv, kv, 1e-10)
    assert_close("z", ref_z, z, 1e-10)
    torch.manual_seed(1)
    check_grads((ref, ref_kv, ref_z), (out, kv, z), leaves, 1e-10)


def test_matches_fla_naive_parallel():
    """FLA's naive_parallel_based (scale d^-0.5, use_norm: o / (z + 1e-6)), layout [B, H, T, d]; grads too."""
    naive = fla_naive("based")
    q, k, v = qkv(2, 75, seed=3)
    ref = naive.naive_parallel_based(to_bhtd(q), to_bhtd(k), to_bhtd(v)).transpose(1, 2)
    out, _ = chunk_based(q, k, v, EPS, 16)
    assert_close("o vs naive_parallel_based", ref, out, 1e-10)
    check_grads(ref, out, {"q": q, "k": k, "v": v}, 1e-10)


def test_matches_fla_naive_chunk():
    """FLA's naive_chunk_based (its chunk size 16; T must be a multiple there), eps 1e-6."""
    naive = fla_naive("based")
    q, k, v = qkv(2, 64, seed=4)
    ref = naive.naive_chunk_based(to_bhtd(q), to_bhtd(k), to_bhtd(v), chunk_size=16).transpose(1, 2)
    out, _ = chunk_based(q, k, v, EPS, 24)
    assert_close("o vs naive_chunk_based", ref, out, 1e-10)


def test_layer_matches_fla_based_linear_attention():
    """The layer == FLA's BasedLinearAttention.forward_reference (eps 1e-6) with copied weights; FLA's
    parameter names load strictly."""
    from fla.layers.based import BasedLinearAttention

    m = build(make_config())
    fla = BasedLinearAttention(HIDDEN, feature_dim=FEAT, num_heads=HEADS, num_key_value_heads=HEADS,
                               eps=EPS).double()
    fla.load_state_dict(m.state_dict(), strict=True)
    x = torch.randn(2, 37, HIDDEN, dtype=F64)
    assert_close("y vs FLA forward_reference", fla.forward_reference(x), m(x)[0], 1e-10)


@pytest.mark.parametrize("cuts", [(1, 17, 18), (16, 32)])
def test_pieces_with_state_equal_whole(cuts):
    check_pieces(build(make_config()), torch.randn(2, 40, HIDDEN, dtype=F64), cuts, rtol=1e-10)


def test_packed_equals_separate():
    """Row 0 packs 3 documents (5/17/9), row 1 is one; the incoming state (from a real prefix) goes to
    each row's first document and the returned state is each row's last document's."""
    m = build(make_config())
    _, state0 = m(torch.randn(2, 7, HIDDEN, dtype=F64))
    check_packing(m, torch.randn(2, 31, HIDDEN, dtype=F64), [[5, 17, 9], [31]], rtol=1e-10, state0=state0)


def test_bfloat16_tracks_float64():
    m = build(make_config())
    x = torch.randn(2, 30, HIDDEN, dtype=F64)
    ref = m(x)[0]
    out = m.to(torch.bfloat16)(x.to(torch.bfloat16))[0]
    assert_close("bf16 vs float64", ref, out, 5e-2)


def test_check_errors_are_one_line():
    for field, value in [("num_heads", 0), ("num_heads", 25), ("feature_dim", 0), ("eps", 0.0), ("chunk_size", 0)]:
        with pytest.raises(ConfigError, match=f"model.based.{field}={value!r}") as err:
            Based.check(make_config(**{field: value}))
        assert "\n" not in str(err.value)


def test_flops_per_token():
    H, nh, d = HIDDEN, HEADS, FEAT
    dv, feats = H // nh, 1 + d + d * (d + 1) // 2
    expected = 2 * (H * nh * (2 * d + dv) + nh * dv * H + nh * (4 * feats + 2 * feats * dv))
    assert Based.flops_per_token(make_config(), 128) == expected
