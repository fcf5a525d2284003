"""Gated DeltaNet (`G`): chunked == recurrent gated delta rule (float64, outputs, final state and
grads), both == FLA's naive references, the module == HF Qwen3.5's GatedDeltaNet layer, and the
mixer contract (pieces with state, packed documents) and config errors."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch

from megahybrid.config import ConfigError, GatedDeltaNetConfig, ModelConfig
from megahybrid.mixers.delta_rule import chunked_delta_rule, naive_recurrent_delta_rule
from megahybrid.mixers.gated_deltanet import GatedDeltaNet
from tests.cpu.test_delta_rule import ROOT, delta_inputs, fla_naive, randomize_, run_hf_parity
from tests.helpers import assert_close
from tests.mixer_checks import check_grads, check_packing, check_pieces

HIDDEN = 32


def gdn(**overrides) -> GatedDeltaNet:
    """A small GQA layer: 2 q/k heads serving 4 v heads, dk 8 != dv 12, chunk 8."""
    c = dict(num_qk_heads=2, num_v_heads=4, qk_head_dim=8, v_head_dim=12, conv_kernel=4, chunk_size=8)
    return GatedDeltaNet(ModelConfig(hidden_size=HIDDEN, gdn=GatedDeltaNetConfig(**{**c, **overrides})))


@pytest.mark.parametrize("T", [63, 75])
@pytest.mark.parametrize("chunk", [8, 16, 64])
def test_chunked_equals_recurrence(chunk, T):
    inp = delta_inputs(T=T, gated=True)
    o_ref, s_ref = naive_recurrent_delta_rule(**inp)
    o, s = chunked_delta_rule(**inp, chunk_size=chunk)
    assert_close("o", o_ref, o, 1e-10)
    assert_close("final state", s_ref, s, 1e-10)


def test_strong_decay_stays_finite():
    """Cumulative log-decays over a 64-chunk reach -2000 here; exp of an unmasked or cross-chunk
    difference would overflow float32 to inf and the result to NaN."""
    inp = delta_inputs(T=75, gated=True, dtype=torch.float32)
    inp["g"] = -10.0 - 20.0 * torch.rand_like(inp["g"])
    o_ref, s_ref = naive_recurrent_delta_rule(**inp)
    o, s = chunked_delta_rule(**inp, chunk_size=64)
    assert_close("o", o_ref, o, 1e-5)
    assert_close("final state", s_ref, s, 1e-5)


def test_matches_fla_naive():
    """FLA's naive references compute in float32 whatever the input, hence the tolerance.
    Argument orders differ: recurrent (q, k, v, beta, g, ...), chunk (q, k, v, g, beta, ...)."""
    fla = fla_naive("gated_delta_rule")
    inp = delta_inputs(T=75, gated=True)
    q, k, v, beta, g, h0 = (inp[n] for n in ("q", "k", "v", "beta", "g", "initial_state"))
    refs = {
        "fla recurrent": fla.naive_recurrent_gated_delta_rule(q, k, v, beta, g, initial_state=h0,
                                                              output_final_state=True),
        "fla chunk": fla.naive_chunk_gated_delta_rule(q, k, v, g, beta, chunk_size=16, initial_state=h0,
                                                      output_final_state=True),
    }
    ours = {"naive": naive_recurrent_delta_rule(**inp), "chunked": chunked_delta_rule(**inp, chunk_size=16)}
    for ref_name, (o_ref, s_ref) in refs.items():
        for name, (o, s) in ours.items():
            assert_close(f"{name} o vs {ref_name}", o_ref, o, 2e-5)
            assert_close(f"{name} state vs {ref_name}", s_ref, s, 2e-5)


def test_grads_chunked_equal_recurrence():
    inp = delta_inputs(T=37, gated=True)
    leaves = {n: t.requires_grad_() for n, t in inp.items() if t is not None}
    check_grads(naive_recurrent_delta_rule(**inp), chunked_delta_rule(**inp, chunk_size=8), leaves, 1e-10)


@pytest.mark.parametrize("allow_neg_eigval", [False, True])
def test_pieces_with_state_equal_whole(allow_neg_eigval):
    """Cuts at 7, 8, 30: a 1-token piece included."""
    x = torch.randn(2, 45, HIDDEN, dtype=torch.float64)
    check_pieces(randomize_(gdn(allow_neg_eigval=allow_neg_eigval)), x, cuts=(7, 8, 30), rtol=1e-10)


def test_packed_documents_equal_separate():
    """Rows with other boundaries; the incoming state (from 6 earlier tokens) goes to each row's first
    document, the returned one is its last's."""
    m = randomize_(gdn())
    x = torch.randn(2, 31, HIDDEN, dtype=torch.float64)
    _, state0 = m(torch.randn(2, 6, HIDDEN, dtype=torch.float64))
    check_packing(m, x, [[5, 17, 9], [9, 17, 5]], rtol=1e-10, state0=state0)


def test_flops_per_token():
    """The projection terms are 2 FLOPs per weight of the layer's linears; the rest is Megatron's
    conv and core terms."""
    layer, config = gdn(), ModelConfig(hidden_size=HIDDEN, gdn=GatedDeltaNetConfig(
        num_qk_heads=2, num_v_heads=4, qk_head_dim=8, v_head_dim=12, conv_kernel=4))
    linears = sum(m.weight.numel() for m in layer.modules() if isinstance(m, torch.nn.Linear))
    conv_and_core = 4 * (2 * 2 * 8 + 4 * 12) + 4 * 4 * 8 * 12
    assert GatedDeltaNet.flops_per_token(config, 4096) == 2 * (linears + conv_and_core)


@pytest.mark.parametrize("overrides, field", [
    (dict(num_qk_heads=3, num_v_heads=4), "model.gdn.num_v_heads"),
    (dict(num_qk_heads=3, qk_head_dim=None), "model.gdn.num_qk_heads"),  # 32 % 3
    (dict(qk_head_dim=0), "model.gdn.qk_head_dim"),
    (dict(v_head_dim=-4), "model.gdn.v_head_dim"),
    (dict(conv_kernel=0), "model.gdn.conv_kernel"),
    (dict(chunk_size=0), "model.gdn.chunk_size"),
])
def test_check_errors(overrides, field):
    c = {**dict(num_qk_heads=2, qk_head_dim=8), **overrides}
    with pytest.raises(ConfigError) as err:
        GatedDeltaNet.check(ModelConfig(hidden_size=HIDDEN, gdn=GatedDeltaNetConfig(**c)))
    message = str(err.value)
    assert message.startswith(f"{field}=") and "\n" not in message, message


def test_matches_hf_qwen3_5():
    """Independent model: HF Qwen3.5's GatedDeltaNet layer (its torch path, float32) on our weights
    (GQA 2 -> 4 heads, dk 8 != dv 12, T = 75, our chunk 16 vs HF's 64); see `_hf_worker`."""
    run_hf_parity(kind="gdn", hidden=HIDDEN, Hk=2, Hv=4, dk=8, dv=12, K=4, T=75, seed=0, rtol=1e-5)


def _olmo_hybrid_worker(spec: dict) -> None:
    """Subprocess body (fla blocked): ours with `norm_eps` / `allow_neg_eigval` vs HF
    OlmoHybridGatedDeltaNet (FLA names, output-norm eps fixed at 1e-5, beta * 2) on the same weights;
    then the same layer with model.norm_eps for the output norm must differ from HF."""
    from transformers import OlmoHybridConfig
    from transformers.models.olmo_hybrid import modeling_olmo_hybrid as hf

    cells = dict(zip(hf.torch_chunk_gated_delta_rule.__code__.co_freevars,
                     (c.cell_contents for c in hf.torch_chunk_gated_delta_rule.__closure__)))
    assert cells["implementation"] is cells["torch_function"], "the delta rule is bound to a kernel"
    torch.manual_seed(0)
    c = dict(num_qk_heads=2, num_v_heads=4, qk_head_dim=8, v_head_dim=12, conv_kernel=4, chunk_size=16,
             allow_neg_eigval=spec["neg"], norm_eps=1e-5)
    ours = randomize_(GatedDeltaNet(ModelConfig(hidden_size=HIDDEN, norm_eps=0.5, gdn=GatedDeltaNetConfig(**c))))
    theirs = hf.OlmoHybridGatedDeltaNet(OlmoHybridConfig(
        hidden_size=HIDDEN, num_attention_heads=4, linear_num_key_heads=2, linear_num_value_heads=4,
        linear_key_head_dim=8, linear_value_head_dim=12, linear_allow_neg_eigval=spec["neg"], pad_token_id=0,
        vocab_size=8, num_hidden_layers=2, layer_types=["linear_attention", "full_attention"]), layer_idx=0)
    sd = ours.state_dict()
    conv = torch.cat([sd.pop(f"{n}_conv1d.weight") for n in "qkv"])
    theirs.load_state_dict({**sd, "conv1d.weight": conv})
    x = torch.randn(2, 45, HIDDEN, dtype=torch.float64)
    with torch.no_grad():
        ref = theirs(x.float())
        assert_close("gdn vs HF OlmoHybridGatedDeltaNet", ref, ours(x)[0], 1e-5)
        ours.o_norm.eps = 0.5  # model.norm_eps, what the layer would use without gdn.norm_eps
        assert (ours(x)[0] - ref).abs().max() > 1e-3, "the norm eps made no difference; the check cannot fail"


@pytest.mark.parametrize("neg", [True, False])
def test_norm_eps_and_neg_eigval_match_hf_olmo_hybrid(neg):
    code = ("import sys, json; sys.modules['fla'] = None; sys.path.insert(0, sys.argv[1]); "
            "from tests.cpu.test_gated_deltanet import _olmo_hybrid_worker; "
            "_olmo_hybrid_worker(json.loads(sys.argv[2]))")
    proc = subprocess.run([sys.executable, "-c", code, str(ROOT), json.dumps({"neg": neg})], cwd=ROOT,
                          capture_output=True, text=True, timeout=120, env={**os.environ, "HF_HUB_OFFLINE": "1"})
    assert proc.returncode == 0, f"HF parity subprocess failed:\n{proc.stderr[-3000:]}"


def test_norm_eps_must_be_positive():
    with pytest.raises(ConfigError, match=r"model.gdn.norm_eps=0.0: must be > 0"):
        gdn(norm_eps=0.0)
