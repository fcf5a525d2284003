"""minGRU mixer (`u`), Feng et al. 2024 "Were RNNs All We Needed?" (arXiv 2410.01201, sec. 3.1, app. B):

    x   = conv(x)                                   optional depthwise causal conv (gru.conv_kernel > 0)
    h~_t, z_t = to_hidden_and_gate(x_t)             one fused projection, hidden half first
    z_t = sigmoid(z_t),  h~_t = g(h~_t)             g(u) = u + 0.5 (u >= 0), sigmoid(u) (u < 0); or identity
    h_t = (1 - z_t) * h_{t-1} + z_t * h~_t          h_0 = 0
    y   = to_out(h)

Why minGRU rather than a classic GRU: a classic GRU's gates read h_{t-1} (z_t = sigmoid(W x_t + U h_{t-1}),
and the reset gate inside h~_t), so step t needs step t-1 finished and training is a loop of T
dependent steps; Edifice's GRU backbone is that classic form. minGRU drops h_{t-1} from the gates
and from h~, which leaves h_t = a_t h_{t-1} + u_t, a linear recurrence a parallel scan computes in
log2(T) vectorised steps. We follow minGRU. Names follow lucidrains' minGRU-pytorch
(`to_hidden_and_gate [2W, H]`, `to_out`), except that `to_out` is always a Linear (there it is an
Identity at expansion 1): a mixer that writes into the residual stream wants its own output matrix.

The scan: log a_t = log(1 - z_t) = -softplus(gate) (exact for large gates), u_t = z_t h~_t, through
`scan_linear_recurrence` (recursive doubling in log space, shared with the RG-LRU). The paper's own
log-space form (Heinsen 2023, arXiv 2311.06281: log h = a* + logcumsumexp(log u - a*), a* the cumulative
log-decay) needs h~ > 0 (hence g) and subtracts two numbers of size |a*| ~ T: in float32 at T = 4096
that costs ~1e-4 relative error, while recursive doubling only composes local sums and takes any sign.
So g is kept for the paper's model, not for the scan.

State: `{"rnn": [B, W]}` (plus `"conv": [B, K-1, H]` with a conv); no state = zeros, so pieces with the
state carried == the whole sequence. The recurrence runs in float32 for 16-bit inputs (float64 stays).
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F

from megahybrid.config import fail
from megahybrid.mixers.base import Mixer, State
from megahybrid.mixers.common import ShortConv, linear
from megahybrid.mixers.rglru import scan_linear_recurrence


def _model_config(config):
    """Accept a Config or a ModelConfig (check() is called with either)."""
    return getattr(config, "model", config)


def gru_width(config) -> int:
    m = _model_config(config)
    return int(round(m.gru.expand * m.hidden_size))


def g(x: torch.Tensor) -> torch.Tensor:
    """minGRU's positive, continuous candidate activation (arXiv 2410.01201, appendix B.3)."""
    return torch.where(x >= 0, x + 0.5, torch.sigmoid(x))


def naive_recurrent_min_gru(hidden: torch.Tensor, gate: torch.Tensor, h0: Optional[torch.Tensor] = None,
                            activation: str = "g"):
    """The minGRU one token at a time, as the paper's equations (the oracle).

    hidden, gate (pre-activation) `[B, T, W]`; h0 `[B, W]` or None (zeros). Returns h `[B, T, W]`, h_T."""
    h = torch.zeros_like(hidden[:, 0]) if h0 is None else h0
    out = []
    for t in range(hidden.shape[1]):
        z = torch.sigmoid(gate[:, t])
        candidate = g(hidden[:, t]) if activation == "g" else hidden[:, t]
        h = (1 - z) * h + z * candidate
        out.append(h)
    return torch.stack(out, dim=1), h


def parallel_min_gru(hidden: torch.Tensor, gate: torch.Tensor, h0: Optional[torch.Tensor] = None,
                     activation: str = "g"):
    """Same contract as `naive_recurrent_min_gru`, by a parallel scan over the sequence."""
    candidate = g(hidden) if activation == "g" else hidden
    log_a = -F.softplus(gate)  # log(1 - sigmoid(gate))
    return scan_linear_recurrence(log_a, torch.sigmoid(gate) * candidate, h0)


class MinGRU(Mixer):
    """minGRU layer; see the module docstring."""

    def __init__(self, config, index: int = 0, shared: Optional[dict] = None):
        super().__init__()
        config = _model_config(config)
        self.check(config)
        c, hidden, std = config.gru, config.hidden_size, config.init_std
        width = gru_width(config)
        self.activation = c.candidate_activation
        self.conv1d = ShortConv(hidden, c.conv_kernel, bias=True, activation=None) if c.conv_kernel else None
        self.to_hidden_and_gate = linear(hidden, 2 * width, std, c.bias)
        self.to_out = linear(width, hidden, std, c.bias)

    def forward_segment(self, x: torch.Tensor, state: State = None):
        new_state = {}
        if self.conv1d is not None:
            x, new_state["conv"] = self.conv1d(x, None if state is None else state["conv"])
        hidden, gate = self.to_hidden_and_gate(x).chunk(2, dim=-1)
        acc = torch.float64 if x.dtype == torch.float64 else torch.float32
        h0 = None if state is None else state["rnn"].to(acc)
        with torch.autocast(x.device.type, enabled=False):
            h, new_state["rnn"] = parallel_min_gru(hidden.to(acc), gate.to(acc), h0, self.activation)
        return self.to_out(h.to(x.dtype)), new_state

    @classmethod
    def check(cls, config) -> None:
        m = _model_config(config)
        c, p = m.gru, "model.gru"
        if not c.expand > 0 or gru_width(m) < 1:
            fail(f"{p}.expand", c.expand, "must be > 0 (recurrence width = expand * hidden_size, at least 1)")
        if c.conv_kernel < 0:
            fail(f"{p}.conv_kernel", c.conv_kernel, "must be >= 0 (0 = no short conv)")

    @classmethod
    def flops_per_token(cls, config, seq_len: int, causal: bool = True) -> float:
        """2 * MACs: to_hidden_and_gate (H * 2W), to_out (W * H), the conv (K * H); the elementwise
        recurrence is not counted. Linear in sequence length."""
        m = _model_config(config)
        H, W = m.hidden_size, gru_width(m)
        return 2.0 * (3 * H * W + m.gru.conv_kernel * H)
