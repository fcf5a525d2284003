"""DeltaNet (`d`): chunked == recurrent delta rule (float64, outputs, final state and grads), both ==
FLA's naive references, the module == HF Qwen3.5's GatedDeltaNet layer with its decay switched off,
and the mixer contract (pieces with state, packed documents) and config errors."""

from __future__ import annotations

import pytest
import torch

from megahybrid.config import ConfigError, DeltaNetConfig, ModelConfig
from megahybrid.mixers.deltanet import DeltaNet
from megahybrid.mixers.delta_rule import chunked_delta_rule, naive_recurrent_delta_rule
from tests.cpu.test_delta_rule import delta_inputs, fla_naive, randomize_, run_hf_parity, to_bhtd
from tests.helpers import assert_close
from tests.mixer_checks import check_grads, check_packing, check_pieces

HIDDEN = 32


def deltanet(**overrides) -> DeltaNet:
    """A small layer: 2 heads, dk 8, dv 12 (expand_v 1.5), chunk 8."""
    c = dict(num_heads=2, head_dim=8, expand_v=1.5, conv_kernel=4, chunk_size=8)
    return DeltaNet(ModelConfig(hidden_size=HIDDEN, deltanet=DeltaNetConfig(**{**c, **overrides})))


@pytest.mark.parametrize("T", [63, 75])
@pytest.mark.parametrize("chunk", [8, 16, 64])
def test_chunked_equals_recurrence(chunk, T):
    inp = delta_inputs(T=T, gated=False)
    o_ref, s_ref = naive_recurrent_delta_rule(**inp)
    o, s = chunked_delta_rule(**inp, chunk_size=chunk)
    assert_close("o", o_ref, o, 1e-10)
    assert_close("final state", s_ref, s, 1e-10)


def test_matches_fla_naive():
    """FLA's `delta_rule_recurrence` ([B, H, T, D], q scaled by dk^-0.5 inside) computes in float32;
    its `delta_rule_chunkwise` keeps float64 but needs T divisible by the chunk and no initial state."""
    fla = fla_naive("delta_rule")
    inp = delta_inputs(T=75, gated=False)
    q, k, v, beta, h0 = (to_bhtd(inp[n]) for n in ("q", "k", "v", "beta", "initial_state"))
    o_ref, s_ref = fla.delta_rule_recurrence(q, k, v, beta, initial_state=inp["initial_state"])
    for name, (o, s) in {"naive": naive_recurrent_delta_rule(**inp),
                         "chunked": chunked_delta_rule(**inp, chunk_size=16)}.items():
        assert_close(f"{name} o vs fla recurrence", to_bhtd(o_ref), o, 2e-5)
        assert_close(f"{name} state vs fla recurrence", s_ref, s, 2e-5)

    inp = {**delta_inputs(T=64, gated=False), "initial_state": None}
    o_ref, s_ref = fla.delta_rule_chunkwise(*(to_bhtd(inp[n]) for n in ("q", "k", "v", "beta")), chunk_size=16)
    for name, (o, s) in {"naive": naive_recurrent_delta_rule(**inp),
                         "chunked": chunked_delta_rule(**inp, chunk_size=8)}.items():
        assert_close(f"{name} o vs fla chunkwise", to_bhtd(o_ref), o, 1e-10)
        assert_close(f"{name} state vs fla chunkwise", s_ref, s, 1e-10)


def test_grads_chunked_equal_recurrence():
    inp = delta_inputs(T=37, gated=False)
    leaves = {n: t.requires_grad_() for n, t in inp.items() if t is not None}
    check_grads(naive_recurrent_delta_rule(**inp), chunked_delta_rule(**inp, chunk_size=8), leaves, 1e-10)


@pytest.mark.parametrize("overrides", [
    dict(),
    dict(output_gate=False, allow_neg_eigval=True),
    dict(conv_kernel=0),
], ids=["gated", "plain-norm-neg-eigval", "no-conv"])
def test_pieces_with_state_equal_whole(overrides):
    """Cuts at 7, 8, 30: a 1-token piece included."""
    x = torch.randn(2, 45, HIDDEN, dtype=torch.float64)
    check_pieces(randomize_(deltanet(**overrides)), x, cuts=(7, 8, 30), rtol=1e-10)


def test_packed_documents_equal_separate():
    """Rows with other boundaries; the incoming state (from 6 earlier tokens) goes to each row's first
    document, the returned one is its last's."""
    m = randomize_(deltanet())
    x = torch.randn(2, 31, HIDDEN, dtype=torch.float64)
    _, state0 = m(torch.randn(2, 6, HIDDEN, dtype=torch.float64))
    check_packing(m, x, [[5, 17, 9], [9, 17, 5]], rtol=1e-10, state0=state0)


def test_flops_per_token():
    """The projection terms are 2 FLOPs per weight of the layer's linears; the rest is the conv and
    the core (4 H dk dv)."""
    config = ModelConfig(hidden_size=HIDDEN, deltanet=DeltaNetConfig(num_heads=2, head_dim=8, expand_v=1.5))
    linears = sum(m.weight.numel() for m in DeltaNet(config).modules() if isinstance(m, torch.nn.Linear))
    conv_and_core = 4 * (2 * 2 * 8 + 2 * 12) + 4 * 2 * 8 * 12
    assert DeltaNet.flops_per_token(config, 4096) == 2 * (linears + conv_and_core)


@pytest.mark.parametrize("output_gate", [False, True])
def test_without_beta_matches_fla_naive_layer(output_gate):
    """use_beta=False (FLA's `use_beta=False`): no b_proj, beta = 1. The layer written out by hand
    (causal conv + silu, L2 norm, FLA's `delta_rule_recurrence` with beta = 1, RMSNorm [* silu(g)])."""
    import torch.nn.functional as F

    fla = fla_naive("delta_rule")
    m = randomize_(deltanet(use_beta=False, output_gate=output_gate))
    assert "b_proj.weight" not in dict(m.named_parameters())
    x = torch.randn(2, 19, HIDDEN, dtype=torch.float64)

    def conv(name):
        w = getattr(m, f"{name}_conv1d").weight
        y = F.conv1d(F.pad(getattr(m, f"{name}_proj")(x).transpose(1, 2), (3, 0)), w, groups=w.shape[0])
        return F.silu(y.transpose(1, 2)).unflatten(-1, (2, -1))  # [B, T, H, d]

    l2 = lambda t: t / torch.sqrt((t * t).sum(-1, keepdim=True) + 1e-6)
    q, k, v = l2(conv("q")), l2(conv("k")), conv("v")
    o, _ = fla.delta_rule_recurrence(*(to_bhtd(t) for t in (q, k, v)), torch.ones(2, 2, 19, dtype=torch.float64))
    o = to_bhtd(o)
    o = o * torch.rsqrt(o.pow(2).mean(-1, keepdim=True) + 1e-5) * m.o_norm.weight
    if output_gate:
        o = o * F.silu(m.g_proj(x).unflatten(-1, (2, -1)))
    ref = m.o_proj(o.flatten(-2))
    with torch.no_grad():
        out, _ = m(x)
    assert_close("y (use_beta=False)", ref.detach(), out, 1e-5)  # FLA's recurrence runs in float32


@pytest.mark.parametrize("overrides, field", [
    (dict(num_heads=0), "model.deltanet.num_heads"),
    (dict(num_heads=3, head_dim=None), "model.deltanet.num_heads"),  # 32 % 3
    (dict(head_dim=0), "model.deltanet.head_dim"),
    (dict(expand_v=1.3), "model.deltanet.expand_v"),  # 8 * 1.3 is no head width
    (dict(conv_kernel=-1), "model.deltanet.conv_kernel"),
    (dict(chunk_size=0), "model.deltanet.chunk_size"),
])
def test_check_errors(overrides, field):
    c = {**dict(num_heads=2, head_dim=8), **overrides}
    with pytest.raises(ConfigError) as err:
        DeltaNet.check(ModelConfig(hidden_size=HIDDEN, deltanet=DeltaNetConfig(**c)))
    message = str(err.value)
    assert message.startswith(f"{field}=") and "\n" not in message, message


def test_matches_hf_qwen3_5_without_decay():
    """Independent model: HF has no ungated DeltaNet, but Qwen3.5's GatedDeltaNet layer with
    A_log = -inf (decay exp(0) = 1) computes exactly DeltaNet with an output gate; torch path,
    float32, on our weights; see `_hf_worker`."""
    run_hf_parity(kind="deltanet", hidden=HIDDEN, Hk=2, Hv=2, dk=8, dv=12, K=4, T=75, seed=1, rtol=1e-5)
