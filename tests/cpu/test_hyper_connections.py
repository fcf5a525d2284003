"""mHC hyper-connections (arXiv 2512.24880, megahybrid/blocks/hyper_connections.py).

References: Sinkhorn's row/column sums and, for 2x2, its closed-form limit (a doubly-stochastic 2x2 matrix
is [[a, 1-a], [1-a, a]] and Sinkhorn keeps the cross ratio k00 k11 / (k01 k10) = a^2 / (1-a)^2); the plain
residual model (same weights, streams=1) for the init; a per-token float64 formula written out for n=2;
logits of a prefix for causality; separate documents for packing; loss falling in a tiny CPU run."""

from __future__ import annotations

import json
import math

import pytest
import torch

from tests.helpers import assert_close
from megahybrid.blocks.hyper_connections import HyperConnection, sinkhorn
from megahybrid.config import ConfigError, load_config
from megahybrid.reference.model import ReferenceLM

TINY = {"pattern": "M*-d-E", "hidden_size": 32, "vocab_size": 64, "attention": {"num_heads": 4},
        "mamba2": {"head_dim": 8, "state_size": 8, "chunk_size": 4}, "deltanet": {"num_heads": 2, "chunk_size": 4},
        "moe": {"num_experts": 4}}


def tiny_model(**hc):
    torch.manual_seed(0)
    return ReferenceLM(load_config({"model": {**TINY, "hyper_connections": hc}})).double()


def perturb(model):
    """Move every mHC parameter off its init so the tests see non-trivial mixing."""
    torch.manual_seed(1)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.startswith("hyper."):
                p.add_(0.5 * torch.randn_like(p))


def test_sinkhorn_rows_and_columns_sum_to_one():
    torch.manual_seed(0)
    m = sinkhorn(torch.randn(6, 4, 4, dtype=torch.float32), iters=20)
    assert (m >= 0).all()
    assert (m.sum(-1) - 1).abs().max() < 1e-6 and (m.sum(-2) - 1).abs().max() < 1e-6


def test_sinkhorn_2x2_matches_its_closed_form():
    torch.manual_seed(0)
    logits = torch.randn(5, 2, 2, dtype=torch.float64)
    k = logits.exp()
    g, h = (k[:, 0, 0] * k[:, 1, 1]).sqrt(), (k[:, 0, 1] * k[:, 1, 0]).sqrt()
    a = g / (g + h)
    ref = torch.stack([torch.stack([a, 1 - a], -1), torch.stack([1 - a, a], -1)], -2)
    assert_close("sinkhorn 2x2", ref, sinkhorn(logits, iters=200), 1e-12)


@pytest.mark.parametrize("dynamic", [False, True])
def test_init_equals_the_plain_residual_model(dynamic):
    """Equal logits (the init): every stream equals the plain residual, so logits match the n=1 model."""
    plain, hc = tiny_model(), tiny_model(streams=4, dynamic=dynamic)
    missing, unexpected = hc.load_state_dict(plain.state_dict(), strict=False)
    assert not unexpected and missing and all(k.startswith("hyper.") for k in missing)
    ids = torch.randint(0, 64, (2, 11))
    assert_close("logits", plain(ids), hc(ids), 1e-12)


def test_one_stream_is_the_plain_residual():
    torch.manual_seed(0)
    x = torch.randn(2, 5, 1, 8, dtype=torch.float64)
    hc = HyperConnection(8, 1, dynamic=False, sinkhorn_iters=20, norm_eps=1e-5).double()
    f = torch.nn.Linear(8, 8).double()
    out, _ = hc(x, lambda h: (f(h), None))
    assert_close("n=1", x[..., 0, :] + f(x[..., 0, :]), out[..., 0, :], 1e-14)


def two_stream_formula(hc, x, f):
    """The n=2 block written out per token in float64: pre = softmax, post = 2 sigmoid, H from the 2x2
    closed form, dynamic terms alpha * (RMSNorm(x_0 ++ x_1) @ W)."""
    out = torch.empty_like(x)
    for b in range(x.shape[0]):
        for t in range(x.shape[1]):
            x0, x1 = x[b, t, 0], x[b, t, 1]
            pre, post, res = hc.pre_logits.clone(), hc.post_logits.clone(), hc.res_logits.clone()
            if hc.dynamic:
                flat = torch.cat([x0, x1])
                d = (flat / math.sqrt(float((flat ** 2).mean()) + hc.eps) * hc.norm_weight) @ hc.proj
                pre, post = pre + hc.alpha[0] * d[0:2], post + hc.alpha[1] * d[2:4]
                res = res + hc.alpha[2] * d[4:8].reshape(2, 2)
            e = pre.exp()
            p0, p1 = e[0] / e.sum(), e[1] / e.sum()
            q0, q1 = 2 / (1 + math.exp(-post[0])), 2 / (1 + math.exp(-post[1]))
            k = res.exp()
            g, h = math.sqrt(k[0, 0] * k[1, 1]), math.sqrt(k[0, 1] * k[1, 0])
            a = g / (g + h)
            y = f(p0 * x0 + p1 * x1)
            out[b, t, 0] = a * x0 + (1 - a) * x1 + q0 * y
            out[b, t, 1] = (1 - a) * x0 + a * x1 + q1 * y
    return out


@pytest.mark.parametrize("dynamic", [False, True])
def test_two_streams_match_the_written_out_formula(dynamic):
    torch.manual_seed(0)
    # Sinkhorn converges slowly for lopsided per-token logits: 2000 iterations reach float64 precision.
    hc = HyperConnection(6, 2, dynamic=dynamic, sinkhorn_iters=2000, norm_eps=1e-5).double()
    with torch.no_grad():
        for p in hc.parameters():
            p.add_(0.7 * torch.randn_like(p))
    f = torch.nn.Linear(6, 6).double()
    x = torch.randn(2, 3, 2, 6, dtype=torch.float64)
    out, _ = hc(x, lambda h: (torch.tanh(f(h)), None))
    with torch.no_grad():
        assert_close("n=2 block", two_stream_formula(hc, x, lambda h: torch.tanh(f(h))), out, 1e-12)


def test_causal_and_packed_documents_stay_apart():
    model = tiny_model(streams=3, dynamic=True)
    perturb(model)
    torch.manual_seed(2)
    ids = torch.randint(0, 64, (1, 14))
    later = ids.clone()
    later[0, 8:] = torch.randint(0, 64, (6,))
    assert_close("prefix logits", model(ids)[:, :8], model(later)[:, :8], 1e-12)
    seq_idx = torch.tensor([[0] * 6 + [1] * 8])
    packed = model(ids, seq_idx=seq_idx)
    separate = torch.cat([model(ids[:, :6]), model(ids[:, 6:])], dim=1)
    assert_close("packed", separate, packed, 1e-10)


def test_generation_in_pieces_equals_whole():
    model = tiny_model(streams=2)
    perturb(model)
    ids = torch.randint(0, 64, (2, 10))
    whole = model(ids)
    first, state = model(ids[:, :6], return_state=True)
    second = model(ids[:, 6:], state=state)
    assert_close("pieces", whole, torch.cat([first, second], 1), 1e-10)


@pytest.mark.parametrize("extra, match", [
    ({"residual_scale": 0.5}, r"^model.residual_scale=0.5: mHC"),
    ({"post_norm_layers": [1]}, r"^model.post_norm_layers=\[1\]: mHC"),
    ({"hyper_connections": {"streams": 0}}, r"^model.hyper_connections.streams=0: must be >= 1"),
])
def test_conflicts_are_one_line_errors(extra, match):
    with pytest.raises(ConfigError, match=match):
        load_config({"model": {**TINY, "hyper_connections": {"streams": 2}, **extra}})


def test_layers_that_own_their_residual_are_refused():
    config = load_config({"model": {**TINY, "pattern": "M*s-", "hyper_connections": {"streams": 2},
                                    "shared_attention": {"output_to": "next_input"}}})
    with pytest.raises(ConfigError, match=r"^model.hyper_connections.streams=2: layer 2 \('s'\) manages"):
        ReferenceLM(config)


def test_megatron_backend_refuses_it():
    pytest.importorskip("megatron.core")
    from megahybrid.megatron.transformer_config import check_megatron
    with pytest.raises(ConfigError, match=r"^model.hyper_connections.streams=2: mHC .* not built by the megatron"):
        check_megatron(load_config("default:tiny", ["model.hyper_connections.streams=2"]))


def test_tiny_hybrid_trains_with_dynamic_mhc(tmp_path):
    from megahybrid.train.run import train_from_cli
    args = ["model.hyper_connections.streams=2", "model.hyper_connections.dynamic=true", "train.steps=16",
            "train.seq_len=32", "train.micro_batch_size=4", "train.global_batch_size=4", "train.warmup_steps=2",
            "train.log_every=1", "train.eval_every=0", "train.save_every=16", "train.threads=1",
            "data.corpus_bytes=100000", "model.vocab_size=512"]
    assert train_from_cli("default:tiny", str(tmp_path), args) == 0
    losses = [json.loads(line)["loss"] for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert len(losses) == 16 and sum(losses[-3:]) / 3 < sum(losses[:3]) / 3 - 0.1, losses  # corpus-independent margin
