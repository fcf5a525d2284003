"""RG-LRU: parallel scan == token-loop recurrence (float64: output, final state, every gradient),
pieces with the state carried == whole, packed == separate documents, block == transformers'
RecurrentGemmaRecurrentBlock with copied weights, and config errors."""

from __future__ import annotations

import pytest
import torch

from megahybrid.config import ConfigError, ModelConfig, RGLRUConfig
from megahybrid.mixers.rglru import RGLRU, RGLRUBlock, naive_recurrent_rglru, parallel_rglru
from tests.helpers import assert_close
from tests.mixer_checks import check_grads, check_packing, check_pieces, randomize_biases

F64 = torch.float64
HIDDEN, WIDTH, HEADS = 20, 24, 4


def make_config(**rglru) -> ModelConfig:
    return ModelConfig(hidden_size=HIDDEN, init_std=0.3,
                       rglru=RGLRUConfig(**{"width": WIDTH, "num_heads": HEADS, **rglru}))


def build(config, seed: int = 0) -> RGLRUBlock:
    """The block in float64 with random biases too (they init at zero and could hide a bug)."""
    torch.manual_seed(seed)
    return randomize_biases(RGLRUBlock(config).double())


def op_inputs(B: int, T: int, W: int, initial_state: bool):
    torch.manual_seed(T)
    x, gate_x, gate_a = (torch.randn(B, T, W, dtype=F64) for _ in range(3))
    # RecurrentGemma's init plus a spread, so decays range from fast to very slow (a -> 1).
    lam = (RGLRU._init_recurrent_param(W).double() + torch.randn(W, dtype=F64))
    h0 = torch.randn(B, W, dtype=F64) if initial_state else None
    return [t.requires_grad_() if t is not None else None for t in (x, gate_x, gate_a, lam, h0)]


@pytest.mark.parametrize("T", [63, 75])
@pytest.mark.parametrize("initial_state", [False, True])
def test_parallel_matches_naive(T, initial_state):
    """Output, final state and the gradient of every input, float64, rel err <= 1e-10."""
    x, gx, ga, lam, h0 = op_inputs(2, T, 12, initial_state)
    inputs = [t for t in (x, gx, ga, lam, h0) if t is not None]
    ref, ref_last = naive_recurrent_rglru(x, gx, ga, lam, 8.0, h0)
    out, out_last = parallel_rglru(x, gx, ga, lam, 8.0, h0)
    assert_close("h", ref, out, 1e-10)
    assert_close("h_T", ref_last, out_last, 1e-10)
    torch.manual_seed(1)
    names = ["x", "gate_x", "gate_a", "recurrent_param", "h0"]  # zip drops h0 when there is none
    check_grads((ref, ref_last), (out, out_last), dict(zip(names, inputs)), 1e-10)


def test_first_token_of_a_document_is_not_normalised():
    """No state = document start: h_0 = sigmoid(gate_x_0) * x_0 (RecurrentGemma's reset); with a zero
    state the same token is scaled by sqrt(1 - a_0^2)."""
    x, gx, ga, lam, _ = op_inputs(1, 5, 8, False)
    h, _ = parallel_rglru(x, gx, ga, lam, 8.0, None)
    assert_close("h_0", torch.sigmoid(gx[:, 0]) * x[:, 0], h[:, 0], 1e-14)
    h_zero, _ = parallel_rglru(x, gx, ga, lam, 8.0, torch.zeros(1, 8, dtype=F64))
    a0 = torch.sigmoid(-lam) ** (8.0 * torch.sigmoid(ga[:, 0]))
    assert_close("h_0 (zero state)", torch.sqrt(1 - a0 ** 2) * h[:, 0], h_zero[:, 0], 1e-12)


def test_pieces_with_state_equal_whole():
    """Cuts at 1, 17, 18: one-token pieces (decoding) included."""
    check_pieces(build(make_config()), torch.randn(2, 40, HIDDEN, dtype=F64), cuts=(1, 17, 18), rtol=1e-12)


def test_packed_equals_separate():
    """Row 0 packs 3 documents (5/17/9), row 1 is one document; the incoming state belongs to each
    row's first document and the returned state to its last."""
    x = torch.randn(2, 31, HIDDEN, dtype=F64)
    state0 = {"conv": torch.randn(2, 3, WIDTH, dtype=F64), "rnn": torch.randn(2, WIDTH, dtype=F64)}
    check_packing(build(make_config()), x, [[5, 17, 9], [31]], rtol=1e-12, state0=state0)


def test_block_grads_pieces_equal_whole():
    """Parameter gradients through the carried state equal those of the whole sequence."""
    m = build(make_config())
    x = torch.randn(1, 23, HIDDEN, dtype=F64)
    grads = []
    for cuts in [(0, 23), (0, 9, 23)]:
        m.zero_grad()
        state, outs = None, []
        for a, b in zip(cuts[:-1], cuts[1:]):
            y, state = m(x[:, a:b], state)
            outs.append(y)
        (torch.cat(outs, 1).pow(2).sum() + state["rnn"].sum()).backward()
        grads.append({n: p.grad.clone() for n, p in m.named_parameters()})
    for name in grads[0]:
        assert_close(name, grads[0][name], grads[1][name], 1e-10)


def test_matches_transformers_recurrent_block(monkeypatch):
    """Block == HF RecurrentGemmaRecurrentBlock (use_cache=False) with copied weights. HF keeps the
    recurrence in float32 whatever the input dtype, so compare in float32."""
    monkeypatch.setitem(__import__("sys").modules, "fla", None)  # CPU: keep FLA's Triton kernels out
    from transformers import RecurrentGemmaConfig
    from transformers.models.recurrent_gemma.modeling_recurrent_gemma import RecurrentGemmaRecurrentBlock

    m = build(make_config()).float()
    hf_cfg = RecurrentGemmaConfig(hidden_size=HIDDEN, lru_width=WIDTH, num_attention_heads=HEADS,
                                  conv1d_width=4, num_hidden_layers=1, vocab_size=16, intermediate_size=32)
    hf = RecurrentGemmaRecurrentBlock(hf_cfg, layer_idx=0)
    missing, unexpected = hf.load_state_dict(m.state_dict(), strict=True)
    assert not missing and not unexpected
    x = torch.randn(2, 37, HIDDEN)
    position_ids = torch.arange(37)[None].expand(2, -1)
    ref, _ = hf(x, position_ids, attention_mask=None, use_cache=False)
    out, _ = m(x)
    assert_close("y vs transformers", ref, out, 2e-5)


def test_check_errors_are_one_line():
    for field, value, match in [("num_heads", 5, "model.rglru.num_heads=5"),
                                ("width", 0, "model.rglru.width=0"),
                                ("conv_kernel", 0, "model.rglru.conv_kernel=0"),
                                ("c", 0.0, "model.rglru.c=0.0")]:
        with pytest.raises(ConfigError, match=match) as err:
            RGLRUBlock.check(make_config(**{field: value}))
        assert "\n" not in str(err.value)


def test_flops_per_token():
    H, W, nh, K = HIDDEN, WIDTH, HEADS, 4
    expected = 2 * (3 * H * W + 2 * W * (W // nh) + K * W)
    assert RGLRUBlock.flops_per_token(make_config(), 128) == expected
