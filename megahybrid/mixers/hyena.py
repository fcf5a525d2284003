"""Hyena operator (`y`), Poli et al. 2023, "Hyena Hierarchy" (arXiv 2302.10866), as safari's
`HyenaOperator` + `HyenaFilter` (HazyResearch/safari, standalone_hyena.py), order N (default 2):

    x_0, ..., x_{N-1}, v = split(short_filter(in_proj(u)))     depthwise causal conv, no activation
    for o = 0 .. N-2:  w = v * x_{N-1-o};  v = h_o * w + D_o w     long causal convolution (FFT), skip D
    y = out_proj(v * x_0)

Implicit filter (HyenaFilter), L = filter_len taps, t_i = i / (L - 1):
    z_i = [t_i, cos(2 pi f_b i / L), -sin(2 pi f_b i / L)]_b,   f_b = linspace(1e-4, bands - 1, bands)
    h_i = FFN(z_i) * (exp(-|delta_c| t_i) + shift),   FFN = Linear, sin(w .), [Linear, sin(w .)] x inner, Linear
    delta_c = linspace(ln(target) / slow_pct, ln(target) / fast_pct, channels)   (ExponentialModulation)
Parameter names are safari's (`in_proj`, `short_filter`, `filter_fn.bias` (= D), `filter_fn.pos_emb.z`,
`filter_fn.implicit_filter.{0,1,...}`, `out_proj`); the sine activation is one module reused between the
FFN's layers, as in safari, so its `freq` is one shared parameter.

Where this differs from safari, and why:
- A long filter is an FIR of `filter_len` taps: tokens further apart than that do not interact. safari
  instead crops the whole sequence to `l_max`; an FIR keeps any length well defined and bounds the state.
- `z` is a trained parameter (safari's Pile config trains it at the model lr); `t` and `delta` are
  recomputed in float64 rather than stored as buffers, so a bf16 model never rounds positions.
- The filter FFN and the long convolution run in float32 (float64 for float64 inputs): torch.fft has no
  bf16, and safari also convolves in the filter's float32. No dropout; safari's per-parameter lr/wd
  (`_optim`) is not modelled (one optimiser setting for every parameter).
- StripedHyena (Together 2023) reparameterises the long filter in modal form (h_t = sum_n R_n p_n^t,
  finite recurrent state). Here the `striped_hyena` preset keeps the paper's implicit FFN filter: it is
  the parameterisation StripedHyena itself is distilled from, and one filter keeps one reference. The
  modal/IIR form would be a `filter` option of this mixer; it is not implemented.

State (`forward(x, state)`): {"short_conv": [B, K-1, (N+1) H], "long_conv": [B, P, (N-1) H]} with
P = min(tokens seen, filter_len - 1): the inputs w of each long convolution that later tokens still
reach (a growing cache, capped like a sliding window's KV cache). With it, pieces == whole.
"""

from __future__ import annotations

import math
from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn

from megahybrid.config import fail
from megahybrid.mixers.base import Mixer, State
from megahybrid.mixers.common import ShortConv, linear


def _model_config(config):
    return getattr(config, "model", config)


def hyena_filter_len(config) -> int:
    m = _model_config(config)
    return m.hyena.filter_len or m.max_seq_len


def fft_causal_conv(u: torch.Tensor, h: torch.Tensor) -> torch.Tensor:
    """y_t = sum_{s=0}^{t} h_s u_{t-s} along dim 1: u `[B, T, C]`, h `[Th, C]` with Th <= T (taps past
    Th are zero). One FFT of size 2T: the linear convolution is shorter than that, so nothing wraps."""
    T = u.shape[1]
    n = 2 * T
    y = torch.fft.irfft(torch.fft.rfft(u, n=n, dim=1) * torch.fft.rfft(h, n=n, dim=0), n=n, dim=1)
    return y[:, :T]


class Sin(nn.Module):
    """sin(freq * x) with a trainable per-feature frequency (safari's `Sin`)."""

    def __init__(self, dim: int, w: float):
        super().__init__()
        self.freq = nn.Parameter(w * torch.ones(1, dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.sin(self.freq.to(x.dtype) * x)


class PositionalEmbedding(nn.Module):
    """The filter FFN's input z `[1, L, emb_dim]`: t in [0, 1] and (emb_dim - 1) / 2 complex-exponential
    bands (safari's `PositionalEmbedding`, computed in float64 then stored as the parameter `z`)."""

    def __init__(self, emb_dim: int, seq_len: int):
        super().__init__()
        bands = (emb_dim - 1) // 2
        t = torch.linspace(0, 1, seq_len, dtype=torch.float64)[None, :, None]
        w = 2 * math.pi * torch.linspace(0, seq_len - 1, seq_len, dtype=torch.float64)[None, :, None] / seq_len
        f = torch.linspace(1e-4, bands - 1, bands, dtype=torch.float64)[None, None]
        z = torch.cat([t, torch.cos(f * w), -torch.sin(f * w)], dim=-1)
        self.z = nn.Parameter(z.float())


class HyenaFilter(nn.Module):
    """Implicit long filters h `[L, channels]` and the skip term D (`bias`); see the module docstring."""

    def __init__(self, channels: int, c, filter_len: int):
        super().__init__()
        self.filter_len = filter_len
        self.fast_decay_pct, self.slow_decay_pct = c.fast_decay_pct, c.slow_decay_pct
        self.decay_target, self.shift = c.decay_target, c.modulation_shift
        self.bias = nn.Parameter(torch.randn(channels))
        self.pos_emb = PositionalEmbedding(c.emb_dim, filter_len)
        act = Sin(c.filter_order, c.sin_freq)  # one module, reused: safari shares its frequency
        layers = [nn.Linear(c.emb_dim, c.filter_order), act]
        for _ in range(c.num_inner_mlps):
            layers += [nn.Linear(c.filter_order, c.filter_order), act]
        layers.append(nn.Linear(c.filter_order, channels, bias=False))
        # PyTorch's default Linear init, as safari: the sine expects fan-in-scaled pre-activations.
        self.implicit_filter = nn.Sequential(*layers)

    def decay_rates(self) -> torch.Tensor:
        """delta_c `[channels]` (float64, negative; ExponentialModulation's `deltas`)."""
        target = math.log(self.decay_target)
        return torch.linspace(target / self.slow_decay_pct, target / self.fast_decay_pct, self.bias.numel(),
                              dtype=torch.float64, device=self.bias.device)

    def forward(self, length: int, dtype: torch.dtype) -> torch.Tensor:
        """The first `length` (<= filter_len) taps of every filter, `[length, channels]`, in `dtype`."""
        h = self.pos_emb.z[0, :length].to(dtype)
        for layer in self.implicit_filter:
            if isinstance(layer, nn.Linear):
                h = F.linear(h, layer.weight.to(dtype), None if layer.bias is None else layer.bias.to(dtype))
            else:
                h = layer(h)
        t = torch.linspace(0, 1, self.filter_len, dtype=torch.float64, device=h.device)[:length, None]
        window = torch.exp(-t * self.decay_rates().abs()) + self.shift
        return h * window.to(dtype)


class Hyena(Mixer):
    """Hyena operator; see the module docstring."""

    def __init__(self, config, index: int = 0, shared: Optional[dict] = None):
        super().__init__()
        config = _model_config(config)
        self.check(config)
        c, hidden, std = config.hyena, config.hidden_size, config.init_std
        self.hidden, self.order, self.filter_len = hidden, c.order, hyena_filter_len(config)
        self.in_proj = linear(hidden, (c.order + 1) * hidden, std, c.bias)
        # safari's nn.Conv1d(groups=C, padding=K-1) cropped to T: a causal depthwise conv with bias.
        self.short_filter = ShortConv((c.order + 1) * hidden, c.short_filter_order, bias=True, activation=None)
        self.filter_fn = HyenaFilter((c.order - 1) * hidden, c, self.filter_len)
        self.out_proj = linear(hidden, hidden, std, c.bias)

    def forward_segment(self, x: torch.Tensor, state: State = None):
        H, T = self.hidden, x.shape[1]
        acc = torch.float64 if x.dtype == torch.float64 else torch.float32
        u, short_state = self.short_filter(self.in_proj(x), None if state is None else state["short_conv"])
        *gates, v = u.to(acc).split(H, dim=-1)
        cache = None if state is None else state["long_conv"].to(acc)
        past = 0 if cache is None else cache.shape[1]
        taps = min(self.filter_len, past + T)
        h = self.filter_fn(taps, acc)
        skip = self.filter_fn.bias.to(acc)
        keep = self.filter_len - 1
        new_cache = []
        for o, gate in enumerate(reversed(gates[1:])):
            channels = slice(o * H, (o + 1) * H)
            w = v * gate
            full = w if cache is None else torch.cat([cache[..., channels], w], dim=1)
            v = fft_causal_conv(full, h[:, channels])[:, past:] + skip[channels] * w
            new_cache.append(full[:, max(full.shape[1] - keep, 0):])
        y = self.out_proj((v * gates[0]).to(x.dtype))
        return y, {"short_conv": short_state, "long_conv": torch.cat(new_cache, dim=-1)}

    @classmethod
    def check(cls, config) -> None:
        m = _model_config(config)
        c, p = m.hyena, "model.hyena"
        if c.order < 2:
            fail(f"{p}.order", c.order, "must be >= 2 (order - 1 long convolutions; the paper uses 2)")
        if c.filter_order < 1:
            fail(f"{p}.filter_order", c.filter_order, "must be >= 1 (the filter FFN width; safari uses 64)")
        if c.emb_dim < 3 or c.emb_dim % 2 == 0:
            fail(f"{p}.emb_dim", c.emb_dim, "must be odd and >= 3 (t plus cos/sin pairs)")
        if c.num_inner_mlps < 0:
            fail(f"{p}.num_inner_mlps", c.num_inner_mlps, "must be >= 0")
        if c.short_filter_order < 1:
            fail(f"{p}.short_filter_order", c.short_filter_order, "must be >= 1 (1 = no short conv mixing)")
        if c.filter_len is not None and c.filter_len < 2:
            fail(f"{p}.filter_len", c.filter_len, "must be >= 2 (or null for model.max_seq_len)")
        if c.filter_len is None and m.max_seq_len < 2:
            fail("model.max_seq_len", m.max_seq_len, "must be >= 2 for hyena's filter length (or set model.hyena.filter_len)")
        if not (c.fast_decay_pct > 0 and c.slow_decay_pct > 0):
            fail(f"{p}.fast_decay_pct", (c.fast_decay_pct, c.slow_decay_pct),
                 "fast_decay_pct and slow_decay_pct must be > 0")
        if not 0 < c.decay_target < 1:
            fail(f"{p}.decay_target", c.decay_target, "must be in (0, 1) (safari uses 0.01)")

    @classmethod
    def flops_per_token(cls, config, seq_len: int, causal: bool = True) -> float:
        """2 x MACs of in_proj ((N+1) H^2), out_proj (H^2) and the short conv (K (N+1) H), plus the long
        convolutions as FFTs of size n = 2 seq_len per channel: a forward and an inverse real FFT
        (~2.5 n log2 n FLOPs each) and the complex product (6 (n/2 + 1)), divided over seq_len tokens.
        The filter's own FFT and FFN are per sequence and batch-independent (like weights): not counted.
        FFT counts are FLOPs, not MACs; the elementwise gates are not counted."""
        m = _model_config(config)
        c, H = m.hyena, m.hidden_size
        n = 2 * max(seq_len, 1)
        dense = (c.order + 1) * H * H + H * H + c.short_filter_order * (c.order + 1) * H
        fft_per_channel = 2 * 2.5 * n * math.log2(n) + 6 * (n // 2 + 1)
        return 2.0 * dense + (c.order - 1) * H * fft_per_channel / max(seq_len, 1)
