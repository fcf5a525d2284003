"""minGRU: the parallel scan == the token-by-token recurrence written from the paper's equations
(float64: output, final state, every gradient) and == the paper's own log-space scan (Heinsen's
logcumsumexp form, arXiv 2410.01201 appendix B, written here from the paper); pieces with the state
carried == whole; packed == separate documents; causality; config errors; FLOPs."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from megahybrid.config import ConfigError, GRUConfig, ModelConfig
from megahybrid.mixers.gru import MinGRU, naive_recurrent_min_gru, parallel_min_gru
from tests.helpers import assert_close
from tests.mixer_checks import check_causal, check_grads, check_packing, check_pieces, randomize_biases

F64 = torch.float64
HIDDEN = 20


def make_config(**gru) -> ModelConfig:
    return ModelConfig(hidden_size=HIDDEN, init_std=0.3, gru=GRUConfig(**{"expand": 1.5, **gru}))


def build(config, seed: int = 0) -> MinGRU:
    """The layer in float64 with random biases too (they init at zero and could hide a bug)."""
    torch.manual_seed(seed)
    return randomize_biases(MinGRU(config).double())


def op_inputs(B: int, T: int, W: int, initial_state: bool):
    torch.manual_seed(T)
    hidden = torch.randn(B, T, W, dtype=F64)
    gate = torch.randn(B, T, W, dtype=F64) * 2  # decays from ~0.0 to ~1.0
    h0 = torch.rand(B, W, dtype=F64) + 0.1 if initial_state else None  # > 0: the log-space scan needs it
    return [t.requires_grad_() if t is not None else None for t in (hidden, gate, h0)]


@pytest.mark.parametrize("T", [1, 63, 75])
@pytest.mark.parametrize("initial_state", [False, True])
@pytest.mark.parametrize("activation", ["g", "identity"])
def test_parallel_matches_naive(T, initial_state, activation):
    """Output, final state and the gradient of every input, float64, rel err <= 1e-10."""
    hidden, gate, h0 = op_inputs(2, T, 12, initial_state)
    inputs = {"hidden": hidden, "gate": gate, **({"h0": h0} if h0 is not None else {})}
    ref = naive_recurrent_min_gru(hidden, gate, h0, activation)
    out = parallel_min_gru(hidden, gate, h0, activation)
    assert_close("h", ref[0], out[0], 1e-10)
    assert_close("h_T", ref[1], out[1], 1e-10)
    torch.manual_seed(1)
    check_grads(ref, out, inputs, 1e-10)


def heinsen_log_space_min_gru(hidden, gate, h0):
    """The paper's log-space minGRU (appendix B.3.1): log h = a* + logcumsumexp(log values - a*) with
    log coefficients -softplus(k), log values log z + log g(h~), h0 > 0 prepended."""
    log_coeffs = -F.softplus(gate)
    log_values = -F.softplus(-gate) + torch.where(hidden >= 0, (F.relu(hidden) + 0.5).log(), -F.softplus(-hidden))
    log_values = torch.cat([h0.log()[:, None], log_values], dim=1)
    log_coeffs = F.pad(log_coeffs, (0, 0, 1, 0))
    a_star = log_coeffs.cumsum(dim=1)
    return (a_star + (log_values - a_star).logcumsumexp(dim=1)).exp()[:, 1:]


def test_matches_paper_log_space_scan():
    """The paper's own parallel algorithm (an independent formula) gives the same h, float64."""
    hidden, gate, h0 = (t.detach() for t in op_inputs(2, 75, 12, True))
    assert_close("h vs Heinsen log-space scan", heinsen_log_space_min_gru(hidden, gate, h0),
                 parallel_min_gru(hidden, gate, h0, "g")[0], 1e-10)


@pytest.mark.parametrize("conv_kernel", [0, 4])
def test_pieces_with_state_equal_whole(conv_kernel):
    """Cuts at 1, 17, 18: one-token pieces (decoding) included."""
    check_pieces(build(make_config(conv_kernel=conv_kernel)), torch.randn(2, 40, HIDDEN, dtype=F64),
                 cuts=(1, 17, 18), rtol=1e-12)


def test_packed_equals_separate():
    """Row 0 packs 3 documents (5/17/9), row 1 is one document; the incoming state belongs to each
    row's first document and the returned state to its last."""
    width = int(1.5 * HIDDEN)
    x = torch.randn(2, 31, HIDDEN, dtype=F64)
    state0 = {"conv": torch.randn(2, 3, HIDDEN, dtype=F64), "rnn": torch.randn(2, width, dtype=F64)}
    check_packing(build(make_config(conv_kernel=4)), x, [[5, 17, 9], [31]], rtol=1e-12, state0=state0)


def test_causal():
    """Changing token t leaves every output before t unchanged."""
    m = build(make_config(conv_kernel=4))
    check_causal(m, torch.randn(1, 30, HIDDEN, dtype=F64), 17)


def test_layer_matches_naive_with_copied_projections():
    """The whole layer == to_out(naive recurrence(to_hidden_and_gate(x))) written out here."""
    m = build(make_config(conv_kernel=0, bias=True))
    x = torch.randn(2, 33, HIDDEN, dtype=F64)
    hidden, gate = F.linear(x, m.to_hidden_and_gate.weight, m.to_hidden_and_gate.bias).chunk(2, -1)
    h, h_last = naive_recurrent_min_gru(hidden, gate)
    y, state = m(x)
    assert_close("y", F.linear(h, m.to_out.weight, m.to_out.bias), y, 1e-12)
    assert_close("state[rnn]", h_last, state["rnn"], 1e-12)


def test_bfloat16_keeps_float32_state():
    m = build(make_config()).to(torch.bfloat16)
    y, state = m(torch.randn(2, 9, HIDDEN, dtype=torch.bfloat16))
    assert y.dtype == torch.bfloat16 and state["rnn"].dtype == torch.float32


def test_check_errors_are_one_line():
    for field, value, match in [("expand", 0.0, "model.gru.expand=0.0"),
                                ("conv_kernel", -1, "model.gru.conv_kernel=-1")]:
        with pytest.raises(ConfigError, match=match) as err:
            MinGRU.check(make_config(**{field: value}))
        assert "\n" not in str(err.value)


def test_flops_per_token():
    H, W, K = HIDDEN, 30, 4
    assert MinGRU.flops_per_token(make_config(conv_kernel=K), 128) == 2 * (3 * H * W + K * H)
