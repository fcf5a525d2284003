"""The example plug-in's mixer: h_t = a * h_{t-1} + (1 - a) * W_in x_t, y_t = W_out h_t, with a learned
per-channel decay a = sigmoid(decay_logit). Deliberately simple: it shows the contract (constructor
signature, `forward_segment`, state, `check`, `flops_per_token`), not a useful architecture."""

from __future__ import annotations

import torch
from torch import nn

from megahybrid.config import fail
from megahybrid.mixers.base import Mixer, State
from megahybrid.mixers.common import linear


class EMAMixer(Mixer):
    def __init__(self, config, index: int = 0, shared: dict | None = None):
        super().__init__()
        self.check(config)
        hidden = config.hidden_size
        self.in_proj = linear(hidden, hidden, config.init_std)
        self.out_proj = linear(hidden, hidden, config.init_std)
        self.decay_logit = nn.Parameter(torch.linspace(-2.0, 2.0, hidden))

    def forward_segment(self, x: torch.Tensor, state: State = None):
        """State: `{"h": [B, hidden]}`, the running average after the last token."""
        a = torch.sigmoid(self.decay_logit).to(x.dtype)
        u = self.in_proj(x)
        h = u.new_zeros(u.shape[0], u.shape[-1]) if state is None else state["h"].to(u.dtype)
        outs = []
        for t in range(u.shape[1]):
            h = a * h + (1 - a) * u[:, t]
            outs.append(h)
        return self.out_proj(torch.stack(outs, dim=1)), {"h": h}

    @classmethod
    def check(cls, config) -> None:
        m = getattr(config, "model", config)
        if m.hidden_size < 1:
            fail("model.hidden_size", m.hidden_size, "must be >= 1 for the ema_example plug-in")

    @classmethod
    def flops_per_token(cls, config, seq_len: int, causal: bool = True) -> float:
        """Two hidden x hidden projections (2 FLOPs per multiply-add) plus 3 per channel for the EMA."""
        m = getattr(config, "model", config)
        return 4.0 * m.hidden_size ** 2 + 3.0 * m.hidden_size
