"""Hyena (`y`). References, all float64:
- the FFT long convolution == the direct causal sum y_t = sum_s h_s u_{t-s} (O(T^2) token loop);
- the operator == safari's standalone_hyena.py `HyenaOperator.forward` re-typed here on the module's
  weights (its PositionalEmbedding with the complex exponential, ExponentialModulation, `fftconv` with its
  own normalisation, Conv1d(padding=K-1) cropped), at T <= filter_len where safari's crop and our FIR agree;
  past filter_len the same reference with a direct sum over filter_len taps;
- pieces with the state carried == whole, packed == separate documents, config errors, FLOPs."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from megahybrid.config import ConfigError, HyenaConfig, ModelConfig
from megahybrid.mixers.hyena import Hyena, fft_causal_conv
from tests.helpers import assert_close
from tests.mixer_checks import check_grads, check_packing, check_pieces

F64 = torch.float64
HIDDEN, FILTER_LEN = 8, 24


def make_config(**hyena) -> ModelConfig:
    fields = {"filter_order": 8, "emb_dim": 5, "filter_len": FILTER_LEN, "sin_freq": 1.0, **hyena}
    return ModelConfig(hidden_size=HIDDEN, init_std=0.3, hyena=HyenaConfig(**fields))


def build(config, seed: int = 0) -> Hyena:
    """Float64, with random projection biases (they init at zero and could hide a bug)."""
    torch.manual_seed(seed)
    m = Hyena(config).double()
    with torch.no_grad():
        for p in (m.in_proj.bias, m.out_proj.bias):
            p.copy_(torch.randn_like(p) * 0.3)
    return m


def direct_causal_conv(u: torch.Tensor, h: torch.Tensor) -> torch.Tensor:
    """y_t = sum_{s < min(t+1, taps)} h_s u_{t-s}, one term at a time."""
    y = torch.zeros_like(u)
    for t in range(u.shape[1]):
        for s in range(min(t + 1, h.shape[0])):
            y[:, t] = y[:, t] + h[s] * u[:, t - s]
    return y


# ------------------------------------------------------------- safari's forward, re-typed


def safari_fftconv(u, k, D):
    """safari standalone_hyena.py `fftconv`: u `[B, D, L]`, k `[D, L]`."""
    seqlen = u.shape[-1]
    fft_size = 2 * seqlen
    k_f = torch.fft.rfft(k, n=fft_size) / fft_size
    u_f = torch.fft.rfft(u.to(dtype=k.dtype), n=fft_size)
    y = torch.fft.irfft(u_f * k_f, n=fft_size, norm="forward")[..., :seqlen]
    return y + u * D.unsqueeze(-1)


def direct_conv_bdl(u, k, D):
    """The same contract as `safari_fftconv` by the direct sum (k may have fewer taps than u)."""
    return direct_causal_conv(u.transpose(1, 2), k.transpose(0, 1)).transpose(1, 2) + u * D.unsqueeze(-1)


def safari_filter(m: Hyena, length: int) -> torch.Tensor:
    """HyenaFilter.filter(length)[0] `[length, channels]`: PositionalEmbedding (complex exponential) and
    ExponentialModulation exactly as safari builds them, through the module's FFN weights."""
    c, L = m.filter_fn, m.filter_len
    emb_dim = c.pos_emb.z.shape[-1]
    t = torch.linspace(0, 1, L, dtype=F64)[None, :, None]
    bands = (emb_dim - 1) // 2
    t_rescaled = torch.linspace(0, L - 1, L, dtype=F64)[None, :, None]
    w = 2 * math.pi * t_rescaled / L
    f = torch.linspace(1e-4, bands - 1, bands, dtype=F64)[None, None]
    z = torch.exp(-1j * f * w)
    z = torch.cat([t, z.real, z.imag], dim=-1)
    assert_close("pos_emb.z init == safari's", z.float(), c.pos_emb.z.detach().float(), 0)
    h = c.implicit_filter(c.pos_emb.z[:, :length])  # the module's z: trained like safari's (lr_pos_emb)
    max_decay = math.log(c.decay_target) / c.fast_decay_pct
    min_decay = math.log(c.decay_target) / c.slow_decay_pct
    deltas = torch.linspace(min_decay, max_decay, c.bias.numel(), dtype=F64)[None, None]
    decay = torch.exp(-t[:, :length] * deltas.abs())
    return (h * (decay + c.shift))[0]


def safari_forward(m: Hyena, u: torch.Tensor, conv=safari_fftconv) -> torch.Tensor:
    """safari `HyenaOperator.forward` on `m`'s weights; past filter_len, pass `conv=direct_conv_bdl`
    (an FIR of filter_len taps: safari would crop the sequence instead)."""
    d, order, l = m.hidden, m.order, u.shape[1]
    u = F.linear(u, m.in_proj.weight, m.in_proj.bias).transpose(1, 2)
    K = m.short_filter.weight.shape[-1]
    uc = F.conv1d(u, m.short_filter.weight, m.short_filter.bias, padding=K - 1, groups=u.shape[1])[..., :l]
    *x, v = uc.split(d, dim=1)
    k = safari_filter(m, min(l, m.filter_len))
    k = k.transpose(0, 1).reshape(order - 1, d, -1)  # 'l (o d) -> o d l'
    bias = m.filter_fn.bias.reshape(order - 1, d)
    for o, x_i in enumerate(reversed(x[1:])):
        v = v * x_i
        v = conv(v, k[o], bias[o])
    y = (v * x[0]).transpose(1, 2)
    return F.linear(y, m.out_proj.weight, m.out_proj.bias)


# ------------------------------------------------------------------------------------ tests


@pytest.mark.parametrize("T,taps", [(63, 63), (75, 20), (40, 1)])
def test_fft_conv_matches_direct_sum(T, taps):
    """Output and both gradients, float64, rel err <= 1e-10; filters shorter than the input included."""
    torch.manual_seed(T)
    u = torch.randn(2, T, 6, dtype=F64, requires_grad=True)
    h = torch.randn(taps, 6, dtype=F64, requires_grad=True)
    ref, out = direct_causal_conv(u, h), fft_causal_conv(u, h)
    assert_close("long conv", ref, out, 1e-10)
    check_grads(ref, out, {"u": u, "h": h}, 1e-10)


@pytest.mark.parametrize("order", [2, 3])
@pytest.mark.parametrize("T", [FILTER_LEN, 17])
def test_operator_matches_safari(order, T):
    """Module == safari's forward (its fftconv) at T <= filter_len, output and the gradients of the input
    and of every parameter kind (projections, short conv, z, FFN, shared sine frequency, D)."""
    m = build(make_config(order=order))
    x = torch.randn(2, T, HIDDEN, dtype=F64, requires_grad=True)
    ref, out = safari_forward(m, x), m(x)[0]
    assert_close("y vs safari", ref, out, 1e-10)
    leaves = {"x": x, **{n: p for n, p in m.named_parameters()}}
    torch.manual_seed(1)
    check_grads(ref, out, leaves, 1e-10)


def test_longer_than_filter_is_a_fir_of_filter_len():
    """T = 2.5 x filter_len: == safari's forward with a direct sum over the filter_len taps."""
    m = build(make_config())
    x = torch.randn(2, 60, HIDDEN, dtype=F64)
    assert_close("y (T > filter_len)", safari_forward(m, x, conv=direct_conv_bdl), m(x)[0], 1e-10)


@pytest.mark.parametrize("cuts", [(1, 17, 18), (5, 30), (23, 24, 25)])
def test_pieces_with_state_equal_whole(cuts):
    """T = 40 > filter_len = 24, so the long-conv cache reaches its cap; one-token pieces included."""
    state = check_pieces(build(make_config(order=3)), torch.randn(2, 40, HIDDEN, dtype=F64), cuts, rtol=1e-10)
    assert state["long_conv"].shape == (2, FILTER_LEN - 1, 2 * HIDDEN)
    assert state["short_conv"].shape == (2, 2, 4 * HIDDEN)


def test_packed_equals_separate():
    """Rows pack documents 5/17/9 (equal last documents: the cache's length is the last document's);
    an incoming state goes to each row's first document."""
    x = torch.randn(2, 31, HIDDEN, dtype=F64)
    state0 = {"short_conv": torch.randn(2, 2, 3 * HIDDEN, dtype=F64),
              "long_conv": torch.randn(2, 7, HIDDEN, dtype=F64)}
    check_packing(build(make_config()), x, [[5, 17, 9]] * 2, rtol=1e-10, state0=state0)


def test_bfloat16_tracks_float64():
    m = build(make_config())
    x = torch.randn(2, 30, HIDDEN, dtype=F64)
    ref = m(x)[0]
    out = m.to(torch.bfloat16)(x.to(torch.bfloat16))[0]
    assert_close("bf16 vs float64", ref, out, 5e-2)


def test_check_errors_are_one_line():
    for field, value in [("order", 1), ("emb_dim", 4), ("filter_order", 0), ("short_filter_order", 0),
                         ("filter_len", 1), ("decay_target", 1.5), ("num_inner_mlps", -1)]:
        with pytest.raises(ConfigError, match=f"model.hyena.{field}={value!r}") as err:
            Hyena.check(make_config(**{field: value}))
        assert "\n" not in str(err.value)


def test_flops_per_token():
    H, N, K, T = HIDDEN, 2, 3, 128
    n = 2 * T
    expected = 2 * ((N + 1) * H * H + H * H + K * (N + 1) * H) + (N - 1) * H * (5 * n * math.log2(n) + 6 * (n // 2 + 1)) / T
    assert Hyena.flops_per_token(make_config(), T) == pytest.approx(expected)
