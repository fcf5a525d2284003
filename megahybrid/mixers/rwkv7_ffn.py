"""RWKV-7 channel mixing (`c`), Peng et al. 2025 (arXiv 2503.14456), with flash-linear-attention 0.6.0's
`RWKV7FeedForward` semantics and parameter names (`fla/models/rwkv7/modeling_rwkv7.py`), so its weights
copy 1:1:

    x^k_t = x_t + (x_{t-1} - x_t) * x_k           token shift (x_{-1} = 0, or the carried last token)
    y_t = value(relu(key(x^k_t))^2)               squared ReLU (So et al. 2021, "Primer"), no biases

Why a layer of its own rather than the `-` MLP with relu2: the token shift makes each output depend on
the previous token as well, so it is not a per-token layer. It has a state (the last input token) and
the document boundaries of packed rows matter, like a width-2 causal convolution; the base class's
per-document split handles them (`token_wise` stays False). It is a "channel" layer in the pattern
(one FFN slot after a sequence mixer: "(kc)x24" is RWKV-7), and layers that need per-token channel
blocks refuse it: Mixture-of-Depths routing (gathered tokens would change "the previous token"), and
context parallelism until it has a one-token halo exchange (megahybrid/parallel/model.py refuses it).

Width: `rwkv7.ffn_hidden_size`, None = 4 * hidden rounded up to a multiple of 32 (FLA's hidden_ratio 4).
Init: FLA's `_initialize_weights` (official CMix_x070): x_k = 1 - (i / hidden)^(r^4) with r = 1 -
layer / layers at FLA's layer index (`fla_layer_index`), key orthogonal, value zero (the block starts
as the identity). State: `{"shift": [B, hidden]}` (the last input token); no state = zeros.
"""

from __future__ import annotations

import math
from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn

from megahybrid.config import fail
from megahybrid.mixers.base import Mixer, State
from megahybrid.mixers.rwkv7 import fla_layer_index


def _model_config(config):
    return getattr(config, "model", config)


def ffn_width(config) -> int:
    """`rwkv7.ffn_hidden_size`, or FLA's default 32 * ceil(4 * hidden / 32)."""
    m = _model_config(config)
    return m.rwkv7.ffn_hidden_size or 32 * math.ceil(4 * m.hidden_size / 32)


class RWKV7FeedForward(Mixer):
    """RWKV-7 channel mixing; see the module docstring."""

    def __init__(self, config, index: int = 0, shared: Optional[dict] = None):
        super().__init__()
        config = _model_config(config)
        self.check(config)
        hidden, width = config.hidden_size, ffn_width(config)
        self.x_k = nn.Parameter(torch.zeros(hidden))
        self.key = nn.Linear(hidden, width, bias=False)
        self.value = nn.Linear(width, hidden, bias=False)
        self._init_like_fla(*fla_layer_index(config, index))

    @torch.no_grad()
    def _init_like_fla(self, layer: int, num_layers: int) -> None:
        """FLA `RWKV7FeedForward._initialize_weights`."""
        hidden = self.x_k.numel()
        ratio_1_to_almost0 = 1.0 - layer / num_layers
        ddd = torch.arange(hidden, dtype=torch.float64) / hidden
        self.x_k.copy_(1.0 - ddd ** (ratio_1_to_almost0 ** 4))
        nn.init.orthogonal_(self.key.weight)
        nn.init.zeros_(self.value.weight)

    def forward_segment(self, x: torch.Tensor, state: State = None):
        prev = x.new_zeros(x.shape[0], 1, x.shape[-1]) if state is None else state["shift"][:, None].to(x.dtype)
        delta = torch.cat([prev, x[:, :-1]], dim=1) - x  # x_{t-1} - x_t
        k = F.relu(self.key(x.addcmul(delta, self.x_k))).square()
        return self.value(k), {"shift": x[:, -1]}

    @classmethod
    def check(cls, config) -> None:
        m = _model_config(config)
        width = m.rwkv7.ffn_hidden_size
        if width is not None and width < 1:
            fail("model.rwkv7.ffn_hidden_size", width, "must be >= 1 (or null for 4 * hidden_size rounded up to 32)")

    @classmethod
    def flops_per_token(cls, config, seq_len: int, causal: bool = True) -> float:
        """2 * MACs per token of key and value (hidden * width each); the token-shift mix and the squared
        ReLU are elementwise and not counted (as the MLP's activation is not)."""
        m = _model_config(config)
        return 2.0 * 2 * m.hidden_size * ffn_width(m)
