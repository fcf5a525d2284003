"""Mixture-of-Depths (arXiv 2404.02258, megahybrid/blocks/mixture_of_depths.py).

References: the plain block's branch scaled by sigmoid(router logit) written out (capacity 100%); a
per-token Python loop for gather/scatter and soft gating; Python's sorted() for the top-k choice;
BCE written out for the auxiliary loss; prefix logits (causality) and separate documents (packing)
for threshold routing; loss falling in a tiny CPU run."""

from __future__ import annotations

import json
import math

import pytest
import torch

from megahybrid.blocks.mixture_of_depths import gather_scatter, soft_gate, topk_mask
from megahybrid.config import ConfigError, load_config
from megahybrid.reference.model import ReferenceLM
from tests.helpers import assert_close

TINY = {"pattern": "M*-d-E", "hidden_size": 32, "vocab_size": 64, "attention": {"num_heads": 4},
        "mamba2": {"head_dim": 8, "state_size": 8, "chunk_size": 4}, "deltanet": {"num_heads": 2, "chunk_size": 4},
        "moe": {"num_experts": 4}}


def tiny_model(**mod):
    torch.manual_seed(0)
    return ReferenceLM(load_config({"model": {**TINY, "mod": mod}})).double()


def plain_branch(block, x):
    return block.mixer(block.norm(x), None, None, False)[0]


@pytest.mark.parametrize("index", [2, 5])  # MLP, MoE
def test_full_capacity_equals_the_plain_block_times_the_gate(index):
    model = tiny_model(layers=[index], capacity=1.0, routing="topk")
    block = model.layers[index]
    x = torch.randn(2, 9, 32, dtype=torch.float64)
    out = block(x)[0]
    gate = torch.sigmoid(x @ block.mod.router.weight[0])
    assert_close("capacity 1.0", x + gate.unsqueeze(-1) * plain_branch(block, x), out, 1e-12)
    assert block.mod.last_fraction == 1.0


def per_token(x, fn, weight, selected):
    y = torch.zeros_like(x)
    for b in range(x.shape[0]):
        for t in range(x.shape[1]):
            if selected[b, t]:
                y[b, t] = weight[b, t] * fn(x[b, t].view(1, 1, -1)).view(-1)
    return y


def test_soft_gating_equals_gather_scatter_when_gates_are_zero_or_one():
    model = tiny_model(layers=[5])
    block = model.layers[5]  # MoE: token-wise, its routing sees only the gathered tokens
    fn = lambda u: plain_branch(block, u)  # noqa: E731
    torch.manual_seed(3)
    x = torch.randn(3, 7, 32, dtype=torch.float64)
    weight = (torch.rand(3, 7) > 0.4).double()
    selected = weight == 1
    ref = per_token(x, fn, weight, selected)
    assert_close("gather/scatter", ref, gather_scatter(x, fn, selected, weight), 1e-12)
    assert_close("soft", ref, soft_gate(x, fn, weight), 1e-12)
    general = torch.rand(3, 7, dtype=torch.float64)
    assert_close("soft, any gate", per_token(x, fn, general, torch.ones_like(selected)), soft_gate(x, fn, general), 1e-12)


def test_topk_picks_the_largest_scores_of_each_row():
    torch.manual_seed(0)
    scores = torch.randn(4, 13)
    mask = topk_mask(scores, 0.25)
    k = math.ceil(0.25 * 13)
    for row, m in zip(scores.tolist(), mask):
        best = sorted(range(13), key=lambda t: -row[t])[:k]
        assert sorted(torch.nonzero(m).flatten().tolist()) == sorted(best)


def test_topk_trains_the_router_to_predict_its_choice():
    """aux_loss = coeff * BCE(logit - threshold, in-top-k), written out."""
    model = tiny_model(layers=[2], capacity=0.25, aux_loss_coeff=0.1, threshold=0.2)
    block = model.layers[2]
    x = torch.randn(2, 8, 32, dtype=torch.float64)
    block(x)
    r = (x @ block.mod.router.weight[0]).detach()
    top = torch.zeros(2, 8)
    for b in range(2):
        for t in sorted(range(8), key=lambda t: -float(r[b, t]))[:2]:
            top[b, t] = 1
    z = r - 0.2
    bce = -(top * torch.log(torch.sigmoid(z)) + (1 - top) * torch.log(1 - torch.sigmoid(z))).mean()
    assert_close("aux", 0.1 * bce, block.mod.aux_loss, 1e-12)
    assert_close("model aux", 0.1 * bce, model.aux_loss(), 1e-12)
    assert block.mod.last_fraction == 0.25


@pytest.mark.parametrize("routing, train", [("threshold", True), ("topk", False)])
def test_threshold_routing_is_causal_and_keeps_documents_apart(routing, train):
    """Threshold routing, and top-k routing at inference (which uses the threshold rule)."""
    model = tiny_model(layers=[2, 5], routing=routing, capacity=0.5)
    model.train(train)
    torch.manual_seed(4)
    ids = torch.randint(0, 64, (2, 14))
    fractions = []
    model(ids)
    fractions = [model.layers[i].mod.last_fraction for i in (2, 5)]
    assert all(0 < f < 1 for f in fractions), fractions  # some tokens skip, some run
    later = ids.clone()
    later[:, 9:] = torch.randint(0, 64, (2, 5))
    assert_close("prefix logits", model(ids)[:, :9], model(later)[:, :9], 1e-12)
    seq_idx = torch.tensor([[0] * 5 + [1] * 9] * 2)
    separate = torch.cat([model(ids[:, :5]), model(ids[:, 5:])], dim=1)
    assert_close("packed", separate, model(ids, seq_idx=seq_idx), 1e-10)


@pytest.mark.parametrize("mod, match", [
    ({"layers": [0]}, r"^model.mod.layers=\[0\]: block 0 is 'M' \(mamba2\), a sequence mixer"),
    ({"layers": [1]}, r"^model.mod.layers=\[1\]: block 1 is '\*' \(attention\), a sequence mixer"),
    ({"layers": [9]}, r"^model.mod.layers=\[9\]: must list distinct block indices in \[0, 6\)"),
    ({"layers": [2], "capacity": 0.0}, r"^model.mod.capacity=0.0: must be in \(0, 1\]"),
])
def test_bad_settings_are_one_line_errors(mod, match):
    with pytest.raises(ConfigError, match=match):
        load_config({"model": {**TINY, "mod": mod}})


def test_megatron_backend_refuses_it():
    pytest.importorskip("megatron.core")
    from megahybrid.megatron.transformer_config import check_megatron
    with pytest.raises(ConfigError, match=r"^model.mod.layers=\[3\]: Mixture-of-Depths .* not built by the megatron"):
        check_megatron(load_config("default:tiny", ["model.mod.layers=[3]"]))


def test_tiny_hybrid_trains_with_topk_routing(tmp_path):
    from megahybrid.train.run import train_from_cli
    args = ["model.pattern='M-G*E'", "model.mod.layers=[1,4]", "model.mod.capacity=0.5", "train.steps=16",
            "train.seq_len=32", "train.micro_batch_size=4", "train.global_batch_size=4", "train.warmup_steps=2",
            "train.log_every=1", "train.eval_every=0", "train.save_every=16", "train.threads=1",
            "data.corpus_bytes=100000", "model.vocab_size=512"]
    assert train_from_cli("default:tiny", str(tmp_path), args) == 0
    records = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    losses = [r["loss"] for r in records]
    assert len(losses) == 16 and sum(losses[-3:]) / 3 < sum(losses[:3]) / 3 - 0.1, losses  # corpus-independent margin
    assert all(r["aux_loss"] > 0 for r in records)  # the router's BCE (and the MoE balance loss)


def test_context_parallel_refuses_block_features():
    from megahybrid.parallel.model import check_context_parallel
    with pytest.raises(ConfigError, match=r"^model.mod.layers=\[3\]: Mixture-of-Depths has no context-parallel"):
        check_context_parallel(load_config("default:tiny", ["model.mod.layers=[3]", "parallel.cp=2"]))
    with pytest.raises(ConfigError, match=r"^model.hyper_connections.streams=2: mHC has no context-parallel"):
        check_context_parallel(load_config("default:tiny", ["model.hyper_connections.streams=2", "parallel.cp=2"]))
