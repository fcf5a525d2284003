"""RWKV-7 time mixing. References:
- `naive_recurrent_rwkv7`, our token loop with the transition matrix diag(exp w) + b a^T written out;
- flash-linear-attention's own plain-PyTorch DPLR references `dplr_recurrence` and `dplr_chunkwise`
  (`fla/ops/generalized_delta_rule/dplr/naive.py`, loaded from its file; they compute in float32);
- FLA's `RWKV7Attention` layer itself (layer_idx=0) with its Triton ops swapped for FLA's own
  reference functions (token_shift_ref, torch_addcmul_rwkv7, k_update_ref, gate_output_correction_ref,
  dplr_recurrence), in a subprocess, on our weights loaded with strict=True.
Plus the mixer contract: chunked == naive (float64, output, state, every gradient), pieces with state ==
whole, packed == separate, causality; config errors and FLOPs."""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from megahybrid.config import ConfigError, ModelConfig, RWKV7Config
from megahybrid.mixers.rwkv7 import RWKV7, chunked_rwkv7, naive_recurrent_rwkv7
from tests.helpers import assert_close
from tests.mixer_checks import check_causal, check_grads, check_packing, check_pieces

F64 = torch.float64
ROOT = Path(__file__).resolve().parents[2]
HIDDEN, HEAD_DIM = 32, 8


def make_config(**rwkv7) -> ModelConfig:
    sizes = {"head_dim": HEAD_DIM, "decay_low_rank_dim": 8, "a_low_rank_dim": 6, "gate_low_rank_dim": 10}
    return ModelConfig(hidden_size=HIDDEN, rwkv7=RWKV7Config(**{**sizes, **rwkv7}))


def randomize_(module: torch.nn.Module, seed: int = 0, std: float = 0.3) -> torch.nn.Module:
    """Float64 and every weight random: FLA's init zeroes o_proj and the LoRA down projections, which
    would hide most of the layer."""
    module.double()
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.copy_(torch.randn(p.shape, generator=gen, dtype=p.dtype) * std)
    return module


def build(seed: int = 0, **rwkv7) -> RWKV7:
    torch.manual_seed(seed)
    return randomize_(RWKV7(make_config(**rwkv7)), seed)


def core_inputs(B=2, T=75, H=3, K=8, V=6, seed=0, dtype=F64):
    """r, w in (-0.607, 0) (RWKV-7's range), k, v, a = -kk, b = kk * iclr as the layer builds them, S0."""
    gen = torch.Generator().manual_seed(seed)
    rand = lambda *s: torch.randn(*s, generator=gen, dtype=dtype)  # noqa: E731
    kk = F.normalize(rand(B, T, H, K), dim=-1)
    return dict(r=rand(B, T, H, K), w=-0.6065 * torch.sigmoid(rand(B, T, H, K)), k=rand(B, T, H, K),
                v=rand(B, T, H, V), a=-kk, b=kk * torch.sigmoid(rand(B, T, H, K)),
                initial_state=0.5 * rand(B, H, K, V))


def fla_dplr_naive():
    """FLA's `generalized_delta_rule/dplr/naive.py`, from its file (no `import fla`: its Triton kernels)."""
    package = Path(importlib.util.find_spec("fla").submodule_search_locations[0])
    spec = importlib.util.spec_from_file_location(
        "fla_naive_dplr", package / "ops" / "generalized_delta_rule" / "dplr" / "naive.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def to_fla(inputs: dict, dtype=torch.float32):
    """Our [B, T, H, d] inputs -> FLA naive's (q, k, v, alpha, beta, gk) [B, H, T, d]. Its q is scaled by
    K^-0.5 inside, RWKV-7 uses scale 1: pass r * K^0.5."""
    K = inputs["r"].shape[-1]
    t = lambda x: x.transpose(1, 2).contiguous().to(dtype)  # noqa: E731
    return (t(inputs["r"] * K ** 0.5), t(inputs["k"]), t(inputs["v"]), t(inputs["a"]), t(inputs["b"]),
            t(inputs["w"])), inputs["initial_state"].to(dtype)


# ------------------------------------------------------------------------------- the core


@pytest.mark.parametrize("T", [1, 63, 75])
@pytest.mark.parametrize("initial_state", [False, True])
def test_chunked_matches_naive(T, initial_state):
    """Output, final state and every gradient (r, w, k, v, a, b, state), float64, rel err <= 1e-10."""
    inputs = {n: t.requires_grad_() for n, t in core_inputs(T=T).items()}
    h0 = inputs["initial_state"] if initial_state else None
    args = [inputs[n] for n in "rwkvab"]
    ref = naive_recurrent_rwkv7(*args, initial_state=h0)
    out = chunked_rwkv7(*args, chunk_size=16, initial_state=h0)
    assert_close("o", ref[0], out[0], 1e-10)
    assert_close("state", ref[1], out[1], 1e-10)
    leaves = {n: inputs[n] for n in "rwkvab"} | ({"initial_state": h0} if initial_state else {})
    torch.manual_seed(1)
    check_grads(ref, out, leaves, 1e-10)


@pytest.mark.parametrize("chunk_size", [1, 5, 64])
def test_chunk_size_does_not_matter(chunk_size):
    """Chunk 1 (pure recurrence of the chunk algebra), odd and longer-than-T chunks."""
    inputs = core_inputs(T=37)
    args = [inputs[n] for n in "rwkvab"]
    ref = naive_recurrent_rwkv7(*args, initial_state=inputs["initial_state"])
    out = chunked_rwkv7(*args, chunk_size=chunk_size, initial_state=inputs["initial_state"])
    assert_close("o", ref[0], out[0], 1e-10)
    assert_close("state", ref[1], out[1], 1e-10)


def test_naive_matches_fla_dplr_recurrence():
    """Our float64 token loop == FLA's `dplr_recurrence` (float32 inside) on the same inputs."""
    inputs = core_inputs(T=75)
    args, h0 = to_fla(inputs)
    o_fla, s_fla = fla_dplr_naive().dplr_recurrence(*args, initial_state=h0)
    o, s = naive_recurrent_rwkv7(*(inputs[n] for n in "rwkvab"), initial_state=inputs["initial_state"])
    assert_close("o vs FLA dplr_recurrence", o_fla.transpose(1, 2), o, 2e-5)
    assert_close("state vs FLA dplr_recurrence", s_fla, s, 2e-5)


def test_chunked_matches_fla_dplr_chunkwise():
    """Our chunked form == FLA's `dplr_chunkwise` (float32, T a multiple of its chunk)."""
    inputs = core_inputs(T=64)
    args, h0 = to_fla(inputs)
    o_fla, s_fla = fla_dplr_naive().dplr_chunkwise(*args, initial_state=h0, chunk_size=16)
    o, s = chunked_rwkv7(*(inputs[n] for n in "rwkvab"), chunk_size=16, initial_state=inputs["initial_state"])
    assert_close("o vs FLA dplr_chunkwise", o_fla.transpose(1, 2), o, 2e-5)
    assert_close("state vs FLA dplr_chunkwise", s_fla, s, 2e-5)


# ------------------------------------------------------------------------- the layer vs FLA


def _fla_worker(spec: dict) -> None:
    """Runs in the subprocess: FLA's RWKV7Attention with its Triton ops replaced by FLA's reference
    functions, on our layer's weights; compares outputs and the final recurrent state."""
    import warnings

    warnings.filterwarnings("ignore")
    import fla.layers.rwkv7 as fla_rwkv7
    from fla.modules.token_shift import token_shift_ref
    from fla.ops.generalized_delta_rule.dplr.naive import dplr_recurrence
    from fla.ops.rwkv7.fused_addcmul import torch_addcmul_rwkv7
    from fla.ops.rwkv7.fused_k_update import k_update_ref
    from fla.ops.rwkv7.gate_output_correction import gate_output_correction_ref

    used = []

    def chunk_rwkv7(r, w, k, v, a, b, scale, initial_state, **_):
        used.append("dplr_recurrence")
        t = lambda x: x.transpose(1, 2).float()  # noqa: E731  (the naive casts all but alpha to float32)
        o, S = dplr_recurrence(t(r * scale * r.shape[-1] ** 0.5), t(k), t(v), t(a), t(b), t(w), initial_state)
        return t(o).to(r.dtype), S

    def token_shift(x, cu_seqlens=None, cache=None, output_cache=False, **_):
        assert cache is None and cu_seqlens is None
        return token_shift_ref(x), x[:, -1:]

    def never(*args, **kwargs):
        raise AssertionError("FLA took its fused recurrent kernel path")

    fla_rwkv7.chunk_rwkv7, fla_rwkv7.fused_mul_recurrent_rwkv7 = chunk_rwkv7, never
    fla_rwkv7.token_shift = token_shift
    fla_rwkv7.fused_addcmul_rwkv7 = torch_addcmul_rwkv7
    fla_rwkv7.fused_k_rwkv7 = lambda k, a, ka, **_: k_update_ref(k, a, ka)
    fla_rwkv7.gate_output_correction = gate_output_correction_ref

    ours = build(spec["seed"], value_dim=spec["value_dim"])
    theirs = fla_rwkv7.RWKV7Attention(
        hidden_size=HIDDEN, head_dim=HEAD_DIM, value_dim=spec["value_dim"], decay_low_rank_dim=8,
        a_low_rank_dim=6, gate_low_rank_dim=10, v_low_rank_dim=4, norm_eps=1e-5, layer_idx=0,
        num_hidden_layers=2).double()
    theirs.load_state_dict(ours.state_dict(), strict=True)
    x = torch.randn(2, spec["T"], HIDDEN, dtype=F64)
    with torch.no_grad():
        ref, _, _, _ = theirs(x)
        out, _ = ours(x)
    assert used, "the patched reference core was not called"
    assert_close("y vs FLA RWKV7Attention", ref, out, spec["rtol"])


def run_fla_worker(**spec) -> None:
    code = ("import sys, json; sys.path.insert(0, sys.argv[1]); "
            "from tests.cpu.test_rwkv7 import _fla_worker; _fla_worker(json.loads(sys.argv[2]))")
    proc = subprocess.run([sys.executable, "-c", code, str(ROOT), json.dumps(spec)], cwd=ROOT,
                          capture_output=True, text=True, timeout=300, env={**os.environ, "HF_HUB_OFFLINE": "1"})
    assert proc.returncode == 0, f"FLA parity subprocess failed:\n{proc.stderr[-3000:]}"


def test_layer_matches_fla_rwkv7_attention():
    """Same parameter names and shapes (strict load), same output; value_dim != hidden covered. FLA's
    core runs in float32, so the tolerance is float32's."""
    run_fla_worker(seed=0, T=70, value_dim=48, rtol=1e-6)


# ------------------------------------------------------------------------ the mixer contract


def test_pieces_with_state_equal_whole():
    """Cuts at 1, 17, 18: one-token pieces (decoding) included; token shift and recurrent state carried."""
    check_pieces(build(), torch.randn(2, 40, HIDDEN, dtype=F64), cuts=(1, 17, 18), rtol=1e-11)


def test_packed_equals_separate():
    """Row 0 packs 3 documents (5/17/9), row 1 is one document; the incoming state belongs to each
    row's first document and the returned state to its last."""
    x = torch.randn(2, 31, HIDDEN, dtype=F64)
    state0 = {"shift": torch.randn(2, HIDDEN, dtype=F64),
              "recurrent": torch.randn(2, HIDDEN // HEAD_DIM, HEAD_DIM, HEAD_DIM, dtype=F64)}
    check_packing(build(), x, [[5, 17, 9], [31]], rtol=1e-11, state0=state0)


def test_causal():
    """Changing token t leaves every output before t unchanged."""
    m = build()
    check_causal(m, torch.randn(1, 30, HIDDEN, dtype=F64), 17)


def test_fla_init_trains_from_zero_output():
    """FLA's init: o_proj = 0 (the layer starts as the identity block), decays spread over (0.55, 1)."""
    m = RWKV7(make_config())
    y, _ = m(torch.randn(2, 5, HIDDEN))
    assert torch.equal(y, torch.zeros_like(y))
    decay = torch.exp(-0.6065306597126334 * torch.sigmoid(m.w_lora.lora[2].bias))
    assert decay.min() < 0.6 and decay.max() > 0.99


def test_bfloat16_keeps_float32_state():
    m = build().to(torch.bfloat16)
    y, state = m(torch.randn(2, 9, HIDDEN, dtype=torch.bfloat16))
    assert y.dtype == torch.bfloat16 and state["recurrent"].dtype == torch.float32


def test_check_errors_are_one_line():
    for field, value, match in [("head_dim", 5, "model.rwkv7.head_dim=5"),
                                ("value_dim", 30, "model.rwkv7.value_dim=30"),
                                ("decay_low_rank_dim", 0, "model.rwkv7.decay_low_rank_dim=0"),
                                ("chunk_size", 0, "model.rwkv7.chunk_size=0")]:
        with pytest.raises(ConfigError, match=match) as err:
            RWKV7.check(make_config(**{field: value}))
        assert "\n" not in str(err.value)


def test_flops_per_token():
    H, V, heads = HIDDEN, HIDDEN, HIDDEN // HEAD_DIM
    expected = 2 * (2 * H * H + 2 * H * V + 8 * 2 * H + 6 * 2 * H + 10 * (H + V) + 4 * heads * HEAD_DIM * HEAD_DIM)
    assert RWKV7.flops_per_token(make_config(), 128) == expected
