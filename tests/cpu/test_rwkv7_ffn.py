"""RWKV-7 channel mixing (`c`, mixers/rwkv7_ffn.py). References:
- `loop_reference` below: the token shift and squared ReLU written out one token at a time in float64
  (the previous token from the carried state or zero);
- flash-linear-attention's own `RWKV7FeedForward` (fla/models/rwkv7/modeling_rwkv7.py) in a subprocess,
  with its Triton token shift swapped for FLA's `token_shift_ref` and torch.compile off (its squared ReLU
  then runs eagerly; it computes in float32), on our weights loaded with strict=True; also its width
  formula and its depth-dependent init of x_k.
Plus the mixer contract: pieces with state == whole, packed == separate, causality (and that the shift
reaches exactly one token ahead), gradients == the loop's; config errors, FLOPs, the layers that refuse
a non-per-token channel layer (Mixture-of-Depths, context parallelism)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from megahybrid import build_model, load_config
from megahybrid.config import ConfigError, ModelConfig, RWKV7Config
from megahybrid.mixers.rwkv7_ffn import RWKV7FeedForward, ffn_width
from tests.helpers import assert_close, rel_error
from tests.mixer_checks import check_causal, check_grads, check_packing, check_pieces, fla_worker_results

F64 = torch.float64
ROOT = Path(__file__).resolve().parents[2]
HIDDEN, WIDTH = 32, 72


def make_config(**rwkv7) -> ModelConfig:
    return ModelConfig(hidden_size=HIDDEN, rwkv7=RWKV7Config(**{"ffn_hidden_size": WIDTH, **rwkv7}))


def build(seed: int = 0, **rwkv7) -> RWKV7FeedForward:
    """Float64, every weight random (FLA's init zeroes `value`, which would hide the layer)."""
    torch.manual_seed(seed)
    module = RWKV7FeedForward(make_config(**rwkv7)).double()
    with torch.no_grad():
        for p in module.parameters():
            p.copy_(torch.randn_like(p) * 0.3)
    return module


def loop_reference(m: RWKV7FeedForward, x: torch.Tensor, shift: torch.Tensor | None = None):
    """One token at a time: xk = x_t + (x_{t-1} - x_t) * x_k, y_t = W_v relu(W_k xk)^2."""
    prev = torch.zeros_like(x[:, 0]) if shift is None else shift
    ys = []
    for t in range(x.shape[1]):
        xk = x[:, t] + (prev - x[:, t]) * m.x_k
        h = torch.clamp(xk @ m.key.weight.T, min=0)
        ys.append((h * h) @ m.value.weight.T)
        prev = x[:, t]
    return torch.stack(ys, dim=1), prev


# ------------------------------------------------------------------------------ against the loop


@pytest.mark.parametrize("with_state", [False, True])
def test_matches_loop_with_grads(with_state):
    """Output, returned state and the gradients of x, the carried token and every weight, rel err <= 1e-12."""
    m = build()
    x = torch.randn(2, 37, HIDDEN, dtype=F64, requires_grad=True)
    shift = torch.randn(2, HIDDEN, dtype=F64, requires_grad=True) if with_state else None
    ref, ref_last = loop_reference(m, x, shift)
    out, state = m(x, None if shift is None else {"shift": shift})
    assert_close("y", ref, out, 1e-12)
    assert_close("state[shift]", ref_last, state["shift"], 0)
    leaves = {"x": x, "x_k": m.x_k, "key": m.key.weight, "value": m.value.weight} | (
        {"shift": shift} if with_state else {})
    torch.manual_seed(1)
    check_grads(ref, out, leaves, 1e-12)


# ------------------------------------------------------------------------------- the contract


def test_pieces_with_state_equal_whole():
    """Cuts at 1, 17, 18: one-token pieces (decoding) included; the last token is the state."""
    check_pieces(build(), torch.randn(2, 40, HIDDEN, dtype=F64), cuts=(1, 17, 18), rtol=1e-13)


def test_packed_equals_separate():
    """Row 0 packs 3 documents (5/17/9): each document's first token sees zero, not the previous
    document's last token; the incoming state belongs to each row's first document."""
    x = torch.randn(2, 31, HIDDEN, dtype=F64)
    check_packing(build(), x, [[5, 17, 9], [31]], rtol=1e-13, state0={"shift": torch.randn(2, HIDDEN, dtype=F64)})


def test_causal_and_one_token_reach():
    """Changing token t leaves outputs before t unchanged, changes t and t + 1 (the shift), not t + 2."""
    m = build()
    x = torch.randn(1, 30, HIDDEN, dtype=F64)
    check_causal(m, x, 17)
    x2 = x.clone()
    x2[:, 17] += 1.0
    y, y2 = m(x)[0], m(x2)[0]
    assert (y[:, 18] - y2[:, 18]).abs().max() > 1e-3
    assert torch.equal(y[:, 19:], y2[:, 19:])


def test_fla_init_starts_as_identity_block():
    """FLA's init: value = 0 (the block adds nothing at first), key orthogonal."""
    m = RWKV7FeedForward(make_config())
    y, _ = m(torch.randn(2, 5, HIDDEN))
    assert torch.equal(y, torch.zeros_like(y))
    gram = m.key.weight.T @ m.key.weight  # [72, 32] with orthonormal columns
    assert_close("key^T key", torch.eye(HIDDEN), gram, 1e-5)


# ----------------------------------------------------------------------------- against FLA


def _fla_worker() -> None:
    """Runs in the subprocess: FLA's RWKV7FeedForward (Triton token shift replaced by FLA's reference)
    against ours on the same weights, whole and packed; FLA's width formula and init. Prints a JSON dict
    of relative errors (and FLA's widths) as the last line."""
    import warnings

    warnings.filterwarnings("ignore")
    import fla.models.rwkv7.modeling_rwkv7 as modeling
    from fla.modules.token_shift import token_shift_ref

    def token_shift(x, cu_seqlens=None, cache=None, output_cache=False, **_):
        assert cache is None
        delta = token_shift_ref(x, cu_seqlens)
        return (delta, x[:, -1:]) if output_cache else delta

    modeling.token_shift = token_shift
    out = {}
    ours = build()
    theirs = modeling.RWKV7FeedForward(hidden_size=HIDDEN, intermediate_size=WIDTH, hidden_act="sqrelu",
                                       layer_idx=0, num_hidden_layers=2).double()
    theirs.load_state_dict(ours.state_dict(), strict=True)
    x = torch.randn(1, 45, HIDDEN, dtype=F64)
    with torch.no_grad():
        out["whole"] = rel_error(theirs(x)[0], ours(x)[0])
        lengths = [12, 1, 20, 12]
        cu = torch.tensor([0, 12, 13, 33, 45])
        seq_idx = torch.repeat_interleave(torch.arange(len(lengths)), torch.tensor(lengths))[None]
        out["packed"] = rel_error(theirs(x, cu_seqlens=cu)[0], ours(x, seq_idx=seq_idx)[0])
    out["widths"] = {h: modeling.RWKV7FeedForward(hidden_size=h, layer_idx=0, num_hidden_layers=1).intermediate_size
                     for h in (32, 36, 100)}
    # Init: x_k of every block of a 3-block model; FLA's layer_idx = the block index.
    model = build_model(load_config({"model": {"pattern": "(kc)x3", "hidden_size": HIDDEN, "vocab_size": 64,
                                               "rwkv7": {"head_dim": 8, "ffn_hidden_size": WIDTH}}}))
    errs = []
    for i, block in enumerate(model.layers[1::2]):
        fla_ffn = modeling.RWKV7FeedForward(hidden_size=HIDDEN, intermediate_size=WIDTH, layer_idx=i,
                                            num_hidden_layers=3)
        errs.append(rel_error(fla_ffn.x_k, block.mixer.x_k))
    out["init_x_k"] = max(errs)
    print(json.dumps(out))


@pytest.fixture(scope="module")
def fla():
    return fla_worker_results("tests.cpu.test_rwkv7_ffn")


def test_matches_fla_feed_forward(fla):
    """Same names and shapes (strict load), same output, whole and packed (cu_seqlens, a 1-token document
    included). FLA's squared ReLU computes in float32, hence float32's tolerance."""
    assert fla["whole"] <= 1e-6 and fla["packed"] <= 1e-6, fla


def test_width_and_init_match_fla(fla):
    """Default width 4 * hidden rounded up to 32, and x_k = 1 - (i/hidden)^((1 - layer/layers)^4) per block."""
    assert {int(h): w for h, w in fla["widths"].items()} == {h: ffn_width(ModelConfig(hidden_size=h))
                                                            for h in (32, 36, 100)}
    assert fla["init_x_k"] <= 1e-6, fla


# -------------------------------------------------------------------------- config and layout


def test_config_errors_are_one_line():
    with pytest.raises(ConfigError, match=r"^model.rwkv7.ffn_hidden_size=0: must be >= 1") as err:
        RWKV7FeedForward.check(make_config(ffn_hidden_size=0))
    assert "\n" not in str(err.value)


def test_flops_per_token():
    assert RWKV7FeedForward.flops_per_token(make_config(), 128) == 2 * 2 * HIDDEN * WIDTH


def test_channel_slot_and_refusals():
    """`c` fills the channel slot of backbone layouts; Mixture-of-Depths and context parallelism refuse it
    (it reads the previous token)."""
    from megahybrid.parallel.model import check_context_parallel
    from megahybrid.pattern import resolve_layers

    base = {"hidden_size": 32, "vocab_size": 64, "rwkv7": {"head_dim": 8}}
    config = load_config({"model": {**base, "backbone": "rwkv7", "num_layers": 2, "mlp_after_mixer": "c"}})
    assert "".join(s.symbol for s in resolve_layers(config)) == "kckc"
    with pytest.raises(ConfigError, match=r"^model.mod.layers=\[1\]: block 1 is 'c' \(rwkv7_ffn\), a channel layer"):
        load_config({"model": {**base, "pattern": "kc", "mod": {"layers": [1]}}})
    with pytest.raises(ConfigError, match=r"layer 1 'c' \(rwkv7_ffn\) has no context-parallel form"):
        check_context_parallel(load_config({"model": {**base, "pattern": "*c"}, "parallel": {"cp": 2}}))
    with pytest.raises(ConfigError, match=r"^model.mlp_after_mixer='swa': must be a channel layer: .*'c' \(rwkv7_ffn\)"):
        load_config({"model": {**base, "backbone": "rwkv7", "num_layers": 2, "mlp_after_mixer": "swa"}})
