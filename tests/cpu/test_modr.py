"""MoDr (`o`): one shared core applied `repeats` times with per-token routed LoRA branches.

References (independent of megahybrid/mixers/modr.py's routing and LoRA code):
- zero-initialised branches: the core module called `repeats` times by hand, h <- h + core(h);
- random branches: a token-by-token loop in float64 that computes each router softmax, picks the
  top-k with Python's `sorted`, applies each chosen branch as two matrix-vector products and counts
  the branches in a Counter; only the core itself (its own tests check it) is shared with the layer;
- the balance loss: the Switch formula (arXiv 2101.03961 eq. 4) written out on the recorded statistics.
Plus the mixer contract (pieces, packing, causality), one parameter set for every `o` position, config
errors, the Megatron backend's refusal and a tiny CPU training run of a hybrid with `o` layers.
"""

from __future__ import annotations

import json
import math
from collections import Counter

import pytest
import torch

from megahybrid.config import ConfigError, GatedDeltaNetConfig, ModelConfig, MoDrConfig, load_config
from megahybrid.mixers.modr import MoDr
from megahybrid.reference.model import ReferenceLM
from tests.helpers import assert_close
from tests.mixer_checks import check_causal, check_grads, check_packing, check_pieces

HIDDEN = 32
GDN = GatedDeltaNetConfig(num_qk_heads=2, num_v_heads=4, qk_head_dim=8, v_head_dim=12, conv_kernel=4, chunk_size=8)


def model_config(**modr) -> ModelConfig:
    c = dict(core="gdn", repeats=3, num_branches=4, top_k=1, lora_rank=4, aux_loss_coeff=0.01)
    return ModelConfig(hidden_size=HIDDEN, gdn=GDN, modr=MoDrConfig(**{**c, **modr}))


def layer(random_branches: bool = True, **modr) -> MoDr:
    torch.manual_seed(0)
    mod = MoDr(model_config(**modr)).double()
    if random_branches:  # up-projections start at zero, which would hide every branch
        with torch.no_grad():
            for name, p in mod.named_parameters():
                if name.endswith(".up"):
                    p.copy_(torch.randn_like(p) * 0.3)
    return mod


def naive_modr(mod: MoDr, x: torch.Tensor):
    """Token-by-token reference: returns (y, counts [repeats] of Counter, mean probs [repeats, E])."""
    b, core = mod.block, mod.block.core
    B, T, H = x.shape
    h = x
    counts, mean_probs = [], []
    for i in range(mod.repeats):
        W = b.routers[i].weight
        lin, lout = b.lora_in[i], b.lora_out[i]
        u = torch.empty_like(h)
        choices = {}
        count, psum = Counter(), torch.zeros(mod.num_branches, dtype=x.dtype)
        for n in range(B):
            for t in range(T):
                logits = W @ h[n, t]
                p = torch.exp(logits - logits.max())
                p = p / p.sum()
                psum += p
                chosen = sorted(range(mod.num_branches), key=lambda e: -float(p[e].detach()))[:mod.top_k]
                w = [p[e] for e in chosen]
                if mod.top_k > 1:
                    w = [v / sum(w) for v in w]
                choices[n, t] = list(zip(chosen, w))
                count.update(chosen)
                u[n, t] = h[n, t] + sum(wj * (lin.up[e] @ (lin.down[e] @ h[n, t])) for e, wj in choices[n, t])
        c, _ = core(u)
        c_out = torch.empty_like(c)
        for n in range(B):
            for t in range(T):
                c_out[n, t] = c[n, t] + sum(wj * (lout.up[e] @ (lout.down[e] @ c[n, t])) for e, wj in choices[n, t])
        h = h + c_out
        counts.append(count)
        mean_probs.append(psum / (B * T))
    return h - x, counts, torch.stack(mean_probs)


def test_zero_branches_equal_core_applied_repeats_times():
    mod = layer(random_branches=False)
    x = torch.randn(2, 19, HIDDEN, dtype=torch.float64)
    y, _ = mod(x)
    h = x
    for _ in range(mod.repeats):
        h = h + mod.block.core(h)[0]
    assert_close("y (zero branches) vs core x repeats", h - x, y, 1e-12)


@pytest.mark.parametrize("top_k", [1, 2])
def test_matches_token_by_token_reference_and_hand_counts(top_k):
    mod = layer(top_k=top_k)
    x = torch.randn(2, 11, HIDDEN, dtype=torch.float64, requires_grad=True)
    y, _ = mod(x)
    y_ref, counts, probs = naive_modr(mod, x)
    assert_close("y", y_ref, y, 1e-10)
    check_grads(y_ref, mod(x)[0], {"x": x}, 1e-10)
    hand = torch.tensor([[c[e] for e in range(mod.num_branches)] for c in counts])
    assert torch.equal(mod.branch_counts, hand), (mod.branch_counts, hand)
    assert int(hand.sum()) == mod.repeats * x.shape[0] * x.shape[1] * top_k
    assert (hand > 0).sum() > mod.repeats, hand  # more than one branch used per application
    assert_close("branch_load", hand.double() / hand.sum(-1, keepdim=True), mod.branch_load, 1e-15)
    assert_close("router_probs", probs, mod.router_probs, 1e-12)


def test_balance_loss_is_switch_formula_on_recorded_statistics():
    mod = layer(top_k=2, aux_loss_coeff=0.05)
    x = torch.randn(3, 10, HIDDEN, dtype=torch.float64)
    mod(x)
    E = mod.num_branches
    per_application = [E * sum(float(mod.branch_load[i, e]) * float(mod.router_probs[i, e]) for e in range(E))
                       for i in range(mod.repeats)]
    expected = 0.05 * sum(per_application) / mod.repeats
    assert math.isclose(float(mod.aux_loss.detach()), expected, rel_tol=1e-12), (float(mod.aux_loss.detach()), expected)
    mod.block.routers[0].weight.grad = None
    mod(x)[0].sum().mul(0).add(mod.aux_loss).backward()
    assert mod.block.routers[0].weight.grad.abs().max() > 0, "the balance loss does not reach the router"
    off = layer(aux_loss_coeff=0.0)
    off(x)
    assert off.aux_loss is None and off.branch_counts is not None  # counts kept, no loss


def test_pieces_packing_and_causality():
    mod = layer()
    x = torch.randn(3, 23, HIDDEN, dtype=torch.float64)
    check_pieces(mod, x, (5, 14), 1e-10)
    check_packing(mod, x, [[7, 16], [7, 16], [23]], 1e-10)
    check_causal(mod, x, 9)


def test_mlp_core_is_token_wise_and_equals_mlp_applied_twice():
    torch.manual_seed(1)
    mod = MoDr(model_config(core="mlp", repeats=2)).double()
    assert mod.token_wise and mod(torch.zeros(1, 2, HIDDEN, dtype=torch.float64))[1] is None
    x = torch.randn(2, 9, HIDDEN, dtype=torch.float64)
    h = x
    for _ in range(2):
        h = h + mod.block.core(h)[0]
    assert_close("mlp core x 2", h - x, mod(x)[0], 1e-12)


def test_every_o_position_shares_one_parameter_set():
    base = dict(hidden_size=HIDDEN, vocab_size=64, gdn=GDN, modr=MoDrConfig(repeats=2, lora_rank=4))
    three = ReferenceLM(ModelConfig(pattern="o-o-o-", **base))
    one = ReferenceLM(ModelConfig(pattern="o-", **base))
    blocks = [l.mixer.block for l in three.layers if l.spec.symbol == "o"]
    assert blocks[0] is blocks[1] is blocks[2]
    ids = [{id(p) for p in l.mixer.parameters()} for l in three.layers if l.spec.symbol == "o"]
    assert ids[0] == ids[1] == ids[2]
    count = lambda m: sum(p.numel() for p in m.parameters())  # noqa: E731  (parameters() dedups)
    mlp_and_norms = count(three.layers[1]) + count(three.layers[0].norm)
    assert count(three) - count(one) == 2 * mlp_and_norms
    # gradients of every use add up in the one copy
    loss = three(torch.randint(0, 64, (1, 8))).sum() + three.aux_loss()
    loss.backward()
    assert blocks[0].routers[1].weight.grad is not None


def test_config_errors_are_one_line():
    for field, value, match in [("core", "moe", r"^model.modr.core='moe': must name a layer type"),
                                ("core", "modr", r"^model.modr.core='modr'"),
                                ("repeats", 0, r"^model.modr.repeats=0: must be >= 1"),
                                ("top_k", 5, r"^model.modr.top_k=5: must be in \[1, num_branches=4\]"),
                                ("lora_rank", 0, r"^model.modr.lora_rank=0")]:
        with pytest.raises(ConfigError, match=match) as err:
            MoDr(model_config(**{field: value}))
        assert "\n" not in str(err.value)


def test_megatron_backend_refuses_modr():
    from megahybrid.megatron.transformer_config import check_megatron

    with pytest.raises(ConfigError, match=r"^model.pattern=.*'o'.*megatron backend does not build") as err:
        check_megatron(load_config({"model": {"pattern": "Mo-"}}))
    assert "\n" not in str(err.value)


def test_flops_and_describe():
    from megahybrid.describe import describe

    config = load_config({"model": {"pattern": "o-*-", "hidden_size": HIDDEN, "vocab_size": 64,
                                    "gdn": {"num_qk_heads": 2}, "modr": {"repeats": 2}}})
    info = describe(config, seq_len=16)
    row = info["layers"][0]
    assert row["name"] == "modr" and row["params"] > 0
    from megahybrid.mixers.gated_deltanet import GatedDeltaNet

    core = GatedDeltaNet.flops_per_token(config.model, 16)
    md = config.model.modr
    assert row["flops_per_token"] == pytest.approx(
        md.repeats * (core + 2 * HIDDEN * md.num_branches + md.top_k * 2 * 2 * md.lora_rank * 2 * HIDDEN))


def test_tiny_hybrid_with_modr_trains(tmp_path):
    from megahybrid.data.prepare import prepare
    from megahybrid.train.run import train_from_cli

    prefix, tok = prepare([], str(tmp_path / "corpus"), None, 512, corpus_bytes=200_000)
    args = ["model.vocab_size=512", "model.hidden_size=64", "model.gdn.num_qk_heads=4", "model.attention.num_heads=4",
            "model.modr.repeats=2", "model.modr.aux_loss_coeff=0.01",
            "train.steps=10", "train.seq_len=32", "train.micro_batch_size=4", "train.global_batch_size=4",
            "train.warmup_steps=2", "train.log_every=1", "train.eval_every=0", "train.save_every=10",
            "train.threads=1", "data.valid_fraction=0.1", f"data.paths=[{prefix}]", f"data.tokenizer={tok}"]
    out = tmp_path / "run"
    assert train_from_cli("o-*-o-", str(out), args) == 0
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    losses = [r["loss"] for r in records]
    assert len(losses) == 10 and min(losses[-3:]) < losses[0] - 0.3, losses
    assert all(r["aux_loss"] > 0 for r in records), "the MoDr balance loss is not logged"
