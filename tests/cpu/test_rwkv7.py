"""RWKV-7 time mixing and its value residual (v_first). References:
- `naive_recurrent_rwkv7`, our token loop with the transition matrix diag(exp w) + b a^T written out;
- flash-linear-attention's own plain-PyTorch DPLR references `dplr_recurrence` and `dplr_chunkwise`
  (`fla/ops/generalized_delta_rule/dplr/naive.py`, loaded from its file; they compute in float32);
- FLA's `RWKV7Attention` layer itself at layer_idx 0 and 1 (v_first given), and FLA's whole
  `RWKV7ForCausalLM` (2 blocks of time mixing + `RWKV7FeedForward`, v_first from block 0 to block 1, whole
  and packed with cu_seqlens), with FLA's Triton ops swapped for FLA's own reference functions
  (token_shift_ref, torch_addcmul_rwkv7, k_update_ref, gate_output_correction_ref, dplr_recurrence per
  document), in one subprocess, on our weights loaded with strict=True; FLA's deterministic init too.
Plus the mixer contract: chunked == naive (float64, output, state, every gradient), pieces with state ==
whole, packed == separate, causality, for a layer and for a whole LM with the value residual; the
layouts that cannot carry v_first refuse it; old checkpoint configs load without it; config errors, FLOPs."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from megahybrid import build_model, load_config
from megahybrid.config import ConfigError, ModelConfig, RWKV7Config
from megahybrid.mixers.rwkv7 import RWKV7, USES_KEY, V_FIRST_STREAM, chunked_rwkv7, naive_recurrent_rwkv7
from tests.helpers import assert_close, rel_error
from tests.mixer_checks import check_causal, check_grads, check_packing, check_pieces, fla_worker_results

F64 = torch.float64
ROOT = Path(__file__).resolve().parents[2]
HIDDEN, HEAD_DIM, VOCAB = 32, 8, 64


def make_config(**rwkv7) -> ModelConfig:
    sizes = {"head_dim": HEAD_DIM, "decay_low_rank_dim": 8, "a_low_rank_dim": 6, "gate_low_rank_dim": 10,
             "v_low_rank_dim": 4}
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


# ------------------------------------------------------------------------------ against FLA


def _patch_fla_ops():
    """FLA's Triton ops in `fla.layers.rwkv7` and `fla.models.rwkv7.modeling_rwkv7` replaced by FLA's own
    reference functions (cu_seqlens handled per document); returns the list the core patch appends to."""
    import fla.layers.rwkv7 as fla_rwkv7
    import fla.models.rwkv7.modeling_rwkv7 as modeling
    from fla.modules.token_shift import token_shift_ref
    from fla.ops.generalized_delta_rule.dplr.naive import dplr_recurrence
    from fla.ops.rwkv7.fused_addcmul import torch_addcmul_rwkv7
    from fla.ops.rwkv7.fused_k_update import k_update_ref
    from fla.ops.rwkv7.gate_output_correction import gate_output_correction_ref

    used = []

    def chunk_rwkv7(r, w, k, v, a, b, scale, initial_state, cu_seqlens=None, **_):
        used.append("dplr_recurrence")
        t = lambda x: x.transpose(1, 2).float()  # noqa: E731  (the naive casts all but alpha to float32)
        bounds = [0, r.shape[1]] if cu_seqlens is None else cu_seqlens.tolist()
        outs, S = [], None
        for s, e in zip(bounds[:-1], bounds[1:]):
            o, S = dplr_recurrence(t(r[:, s:e] * scale * r.shape[-1] ** 0.5), t(k[:, s:e]), t(v[:, s:e]),
                                   t(a[:, s:e]), t(b[:, s:e]), t(w[:, s:e]),
                                   initial_state if cu_seqlens is None else None)
            outs.append(t(o))
        return torch.cat(outs, dim=1).to(r.dtype), S

    def token_shift(x, cu_seqlens=None, cache=None, output_cache=False, **_):
        assert cache is None
        delta = token_shift_ref(x, cu_seqlens)
        return (delta, x[:, -1:]) if output_cache else delta

    def never(*args, **kwargs):
        raise AssertionError("FLA took its fused recurrent kernel path")

    fla_rwkv7.chunk_rwkv7, fla_rwkv7.fused_mul_recurrent_rwkv7 = chunk_rwkv7, never
    fla_rwkv7.token_shift = modeling.token_shift = token_shift
    fla_rwkv7.fused_addcmul_rwkv7 = torch_addcmul_rwkv7
    fla_rwkv7.fused_k_rwkv7 = lambda k, a, ka, **_: k_update_ref(k, a, ka)
    fla_rwkv7.gate_output_correction = gate_output_correction_ref
    return used


FLA_SIZES = dict(hidden_size=HIDDEN, head_dim=HEAD_DIM, decay_low_rank_dim=8, a_low_rank_dim=6, gate_low_rank_dim=10,
                 v_low_rank_dim=4, norm_eps=1e-5)


def lm_config(pattern: str, **rwkv7):
    """A reference LM of RWKV-7 blocks at this file's sizes, FLA RWKV7's norms (LayerNorm with bias)."""
    sizes = {"head_dim": HEAD_DIM, "decay_low_rank_dim": 8, "a_low_rank_dim": 6, "gate_low_rank_dim": 10,
             "v_low_rank_dim": 4}
    return load_config({"model": {"pattern": pattern, "hidden_size": HIDDEN, "vocab_size": VOCAB, "norm": "layernorm",
                                  "norm_eps": 1e-5, "rwkv7": {**sizes, **rwkv7}}})


def _fla_worker() -> None:
    """Runs in the subprocess; prints a JSON dict of relative errors as the last line:
    layer0 / layer1: FLA's RWKV7Attention at layer_idx 0 (value_dim 48) and 1 (reads v_first) vs ours;
    model / model_packed: FLA's RWKV7ForCausalLM, 2 blocks, vs our "kckc" LM, logits, whole and packed;
    init: FLA's deterministic init of a 3-block model vs ours."""
    import warnings

    warnings.filterwarnings("ignore")
    import fla.layers.rwkv7 as fla_rwkv7
    from fla.models.rwkv7.configuration_rwkv7 import RWKV7Config as FLAConfig
    from fla.models.rwkv7.modeling_rwkv7 import RWKV7FeedForward, RWKV7ForCausalLM

    used = _patch_fla_ops()
    out = {}
    # One layer: FLA's layer 0 (no v_lora; value_dim != hidden) and layer 1 (v_lora, v_first input).
    ours = build(0, value_dim=48)
    theirs = fla_rwkv7.RWKV7Attention(**FLA_SIZES, value_dim=48, layer_idx=0, num_hidden_layers=2).double()
    theirs.load_state_dict(ours.state_dict(), strict=True)
    x = torch.randn(2, 70, HIDDEN, dtype=F64)
    with torch.no_grad():
        out["layer0"] = rel_error(theirs(x)[0], ours(x)[0])
        reader = randomize_(RWKV7(make_config(), shared={USES_KEY: 1}), 1)
        theirs = fla_rwkv7.RWKV7Attention(**FLA_SIZES, layer_idx=1, num_hidden_layers=2).double()
        theirs.load_state_dict(reader.state_dict(), strict=True)
        v_first = torch.randn(2, 70, HIDDEN, dtype=F64)
        out["layer1"] = rel_error(theirs(x, v_first=v_first)[0], reader(torch.cat([x, v_first], -1))[0])

    # Two RWKV-7 blocks (time mixing, channel mixing), v_first from block 0 to block 1. FLA's norm_first
    # adds a LayerNorm after the embedding (ln0), which megahybrid does not build: off here.
    torch.manual_seed(2)
    model = randomize_(build_model(lm_config("kckc")), 2, std=0.2)
    fla_config = FLAConfig(**FLA_SIZES, num_hidden_layers=2, vocab_size=VOCAB, hidden_ratio=4, hidden_act="sqrelu",
                           norm_first=False, norm_bias=True, fuse_norm=False, fuse_cross_entropy=False,
                           use_l2warp=False, tie_word_embeddings=False)
    fla_model = RWKV7ForCausalLM(fla_config).double().eval()
    fla_model.load_state_dict(to_fla_lm(model.state_dict()), strict=True)
    ids = torch.randint(0, VOCAB, (2, 70), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        out["model"] = rel_error(fla_model(ids).logits, model(ids))
        lengths = [23, 1, 26, 20]
        cu = torch.tensor([0, 23, 24, 50, 70])
        seq_idx = torch.repeat_interleave(torch.arange(len(lengths)), torch.tensor(lengths))[None]
        out["model_packed"] = rel_error(fla_model(ids[:1], cu_seqlens=cu).logits, model(ids[:1], seq_idx=seq_idx))
    assert used, "the patched reference core was not called"

    # Init of the deterministic parameters, 3 blocks (FLA's ratios at layer_idx 0, 1, 2).
    model = build_model(lm_config("(kc)x3"))
    deterministic = ("x_r", "x_w", "x_k", "x_v", "x_a", "x_g", "k_k", "k_a", "r_k", "w_lora.lora.2.bias",
                     "a_lora.lora.2.bias", "v_lora.lora.2.bias", "g_norm.weight", "g_norm.bias", "o_proj.weight")
    errs = {}
    for i in range(3):
        attn = fla_rwkv7.RWKV7Attention(**FLA_SIZES, layer_idx=i, num_hidden_layers=3).state_dict()
        ffn = RWKV7FeedForward(hidden_size=HIDDEN, layer_idx=i, num_hidden_layers=3).state_dict()
        ours_attn, ours_ffn = model.layers[2 * i].mixer.state_dict(), model.layers[2 * i + 1].mixer.state_dict()
        assert {k: v.shape for k, v in attn.items()} == {k: v.shape for k, v in ours_attn.items()}
        assert {k: v.shape for k, v in ffn.items()} == {k: v.shape for k, v in ours_ffn.items()}
        for name in deterministic:
            if name in attn:
                errs[f"{i}.{name}"] = rel_error(attn[name], ours_attn[name]) if attn[name].any() else \
                    float(ours_attn[name].abs().max())
        errs[f"{i}.ffn.x_k"] = rel_error(ffn["x_k"], ours_ffn["x_k"])
    out["init"] = max(errs.values())
    print(json.dumps(out))


def to_fla_lm(state: dict) -> dict:
    """Our "kc"-block LM's state dict -> FLA RWKV7ForCausalLM's names: sublayer 2j is block j's attention
    (`attn_norm`, `attn`), 2j + 1 its feed-forward (`ffn_norm`, `ffn`)."""
    out = {}
    for key, value in state.items():
        if key.startswith("layers."):
            _, i, part, rest = key.split(".", 3)
            block, ffn = divmod(int(i), 2)
            prefix = f"model.layers.{block}." + ("ffn" if ffn else "attn")
            key = f"{prefix}_norm.{rest}" if part == "norm" else f"{prefix}.{rest}"
        else:
            key = {"embedding.weight": "model.embeddings.weight", "final_norm.weight": "model.norm.weight",
                   "final_norm.bias": "model.norm.bias"}.get(key, key)
        out[key] = value
    return out


@pytest.fixture(scope="module")
def fla():
    return fla_worker_results("tests.cpu.test_rwkv7")


def test_layer_matches_fla_rwkv7_attention(fla):
    """Same parameter names and shapes (strict load), same output, at FLA's layer 0 (value_dim != hidden
    covered) and at layer 1 (v_lora; v_first given). FLA's core runs in float32: float32's tolerance."""
    assert fla["layer0"] <= 1e-6 and fla["layer1"] <= 1e-6, fla


def test_two_block_model_matches_fla_rwkv7(fla):
    """Our "kckc" LM == FLA's RWKV7ForCausalLM (2 layers, norm_first off) on the same weights: the value
    residual from block 0 into block 1, FLA's feed-forward, norms and head; whole and packed (cu_seqlens,
    a 1-token document included)."""
    assert fla["model"] <= 1e-6 and fla["model_packed"] <= 1e-6, fla


def test_init_matches_fla(fla):
    """Per block of 3: the token-shift mixes, k_k, k_a, r_k, the LoRA biases (v_lora's "v0" from block 1 on),
    the GroupNorm weights, o_proj = 0 and the FFN's x_k equal FLA's (float32 init there); shapes equal."""
    assert fla["init"] <= 1e-6, fla


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
                                ("v_low_rank_dim", 0, "model.rwkv7.v_low_rank_dim=0"),
                                ("chunk_size", 0, "model.rwkv7.chunk_size=0")]:
        with pytest.raises(ConfigError, match=match) as err:
            RWKV7.check(make_config(**{field: value}))
        assert "\n" not in str(err.value)


def test_flops_per_token():
    """With the value residual, v_lora (rank 4) is counted in every `k` layer."""
    H, V, heads = HIDDEN, HIDDEN, HIDDEN // HEAD_DIM
    expected = 2 * (2 * H * H + 2 * H * V + 8 * 2 * H + 6 * 2 * H + 10 * (H + V) + 4 * heads * HEAD_DIM * HEAD_DIM)
    assert RWKV7.flops_per_token(make_config(value_residual=False), 128) == expected
    assert RWKV7.flops_per_token(make_config(), 128) == expected + 2 * 4 * (H + V)


# ---------------------------------------------------------------- the value residual (v_first)


def test_reader_layer_contract():
    """A layer that reads v_first (input concat(x, v_first)): pieces with state == whole, packed ==
    separate, causal, for v_first as for x; the writer returns concat(y, v) with v = v_proj(x^v)."""
    reader = randomize_(RWKV7(make_config(), shared={USES_KEY: 1}), 1)
    assert reader.side_inputs == (V_FIRST_STREAM,) and reader.side_output is None and reader.v_lora is not None
    u = torch.randn(2, 40, 2 * HIDDEN, dtype=F64)
    state = check_pieces(reader, u, cuts=(1, 17, 18), rtol=1e-11)
    assert state["shift"].shape == (2, HIDDEN)  # the last token of x, without v_first
    check_packing(reader, u[:, :31], [[5, 17, 9], [31]], rtol=1e-11)
    check_causal(reader, u[:1, :30], 17)
    shared: dict = {}
    writer = randomize_(RWKV7(make_config(), shared=shared), 2)
    assert shared[USES_KEY] == 1 and writer.side_output == V_FIRST_STREAM and writer.v_lora is None
    x = torch.randn(2, 9, HIDDEN, dtype=F64)
    y, _ = writer(x)
    xv = x + (torch.cat([torch.zeros_like(x[:, :1]), x[:, :-1]], 1) - x) * writer.x_v
    assert y.shape == (2, 9, 2 * HIDDEN)
    assert_close("written v_first", xv @ writer.v_proj.weight.T, y[..., HIDDEN:], 1e-14)


MODEL_CASES = {"kckc": {}, "kc*ckc": {}, "kckc post-norm reader": {"post_norm_layers": [2]}}


@pytest.mark.parametrize("case", MODEL_CASES)
def test_model_pieces_packing_causality(case):
    """A whole LM with the value residual (v_first crossing an attention layer; a post-norm reader block):
    logits in pieces with the state carried == whole (v_first needs no state: it is recomputed per
    token); packed rows == each document alone; causal. float64."""
    torch.manual_seed(0)
    config = lm_config(case.split()[0])
    config.model.post_norm_layers = MODEL_CASES[case].get("post_norm_layers")
    config.model.attention.num_heads = 4
    model = randomize_(build_model(config), 0, std=0.2).eval()
    readers = [b.mixer for b in model.layers if isinstance(b.mixer, RWKV7) and b.mixer.reads_v_first]
    assert len(readers) == case.split()[0].count("k") - 1
    ids = torch.randint(0, VOCAB, (2, 40), generator=torch.Generator().manual_seed(1))
    whole = model(ids)
    state, pieces = None, []
    for a, b in [(0, 1), (1, 17), (17, 18), (18, 40)]:
        logits, state = model(ids[:, a:b], state=state, return_state=True)
        pieces.append(logits)
    assert_close("logits in pieces", whole, torch.cat(pieces, 1), 1e-11)
    lengths = [5, 1, 25, 9]
    seq_idx = torch.repeat_interleave(torch.arange(4), torch.tensor(lengths))[None].expand(2, -1)
    for return_state in (False, True):
        packed = model(ids, seq_idx=seq_idx, return_state=return_state)
        packed = packed[0] if return_state else packed
        start = 0
        for n in lengths:
            assert_close(f"document at {start}", model(ids[:, start:start + n]), packed[:, start:start + n], 1e-11)
            start += n
    changed = ids.clone()
    changed[:, 23] = (changed[:, 23] + 1) % VOCAB
    out = model(changed)
    assert torch.equal(out[:, :23], whole[:, :23]) and (out[:, 23] - whole[:, 23]).abs().max() > 1e-6


def test_value_residual_off_is_the_layer0_form():
    """rwkv7.value_residual=false: no v_lora and no side streams in any `k` layer (the layout before)."""
    model = build_model(lm_config("kckc", value_residual=False))
    assert not any("v_lora" in k for k in model.state_dict())
    assert all(not b.side_inputs and not b.side_output for b in model.layers)


def test_checkpoint_config_without_the_field_loads_as_before(tmp_path):
    """A config.yaml saved before `value_residual` existed (its rwkv7 section lacks it) reads back as
    false, so the old weights (no v_lora) load strictly; a saved true stays true."""
    import yaml

    from megahybrid.convert import native
    from megahybrid.train.checkpoint import CONFIG, read_config

    old = lm_config("kckc", value_residual=False)
    native.write(tmp_path, old, build_model(old).state_dict())
    data = yaml.safe_load((tmp_path / CONFIG).read_text())
    del data["model"]["rwkv7"]["value_residual"]
    (tmp_path / CONFIG).write_text(yaml.safe_dump(data))
    config, tensors, _ = native.read(tmp_path)
    assert config.model.rwkv7.value_residual is False and read_config(tmp_path).model.rwkv7.value_residual is False
    build_model(config).load_state_dict(tensors, strict=True)
    data["model"]["rwkv7"]["value_residual"] = True
    (tmp_path / CONFIG).write_text(yaml.safe_dump(data))
    assert read_config(tmp_path).model.rwkv7.value_residual is True


def test_layers_that_cannot_carry_v_first_refuse_it():
    """Parallel branches, the MoDr core, hyper-connections and context parallelism: one-line errors; with
    value_residual=false the first three build."""
    from megahybrid.parallel.model import check_context_parallel

    base = {"hidden_size": HIDDEN, "vocab_size": VOCAB, "rwkv7": {"head_dim": HEAD_DIM}}
    cases = [({"pattern": "kp", "parallel_mixers": {"mixers": ["rwkv7", "attention"]}, "attention": {"num_heads": 4}},
              r"^model.parallel_mixers.mixers=\['rwkv7', 'attention'\]: RWKV7 passes a side stream"),
             ({"pattern": "o", "modr": {"core": "rwkv7"}}, r"^model.modr.core='rwkv7': RWKV7 passes a side stream"),
             ({"pattern": "kk", "hyper_connections": {"streams": 2}}, r"^model.hyper_connections.streams=2: layer 0")]
    for extra, match in cases:
        with pytest.raises(ConfigError, match=match) as err:
            build_model(load_config({"model": {**base, **extra}}))
        assert "\n" not in str(err.value)
        off = {**base, **extra, "rwkv7": {"head_dim": HEAD_DIM, "value_residual": False}}
        build_model(load_config({"model": off}))
    with pytest.raises(ConfigError, match=r"layer 0 'k' \(rwkv7\) has no context-parallel form"):
        check_context_parallel(load_config({"model": {**base, "pattern": "kc"}, "parallel": {"cp": 2}}))
