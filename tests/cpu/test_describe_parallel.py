"""`describe --parallel`: the per-rank memory model and FLOP-balanced pipeline stages (issue 6).

References, none of them the code under test:
- parameters per rank: hand formulas from the config sizes (Megatron's TP split: heads / groups / ffn
  columns over tp, experts over ep, norms and the embedding's hidden dim whole);
- optimizer bytes: Adam 12 B/param, / dp (dense) and / expert-dp with the distributed optimizer;
- activations: Korthikanti et al. 2022 (arXiv 2205.05198) Table 2's closed forms for its GPT layer;
- pipeline in-flight micro-batches: min(pp - r, m) for 1F1B; Megatron-Core's own
  `get_pp_rank_microbatches` / `get_schedule_table` for the interleaved schedule;
- balanced cuts: brute force over every set of cut positions.
"""

import itertools
import json
import random

import pytest

from megahybrid.config import ConfigError, load_config
from megahybrid.memory import (Assumptions, Layout, block_activation_bytes, memory_model, peak_in_flight,
                               schedule_order)
from megahybrid.pattern import balance_cuts, resolve_layers

H, V = 64, 256


def _config(pattern, *overrides, **parallel):
    base = [f"model.hidden_size={H}", f"model.vocab_size={V}", "model.attention.num_heads=4",
            "model.attention.num_kv_heads=2", "model.mlp.ffn_hidden_size=128", "model.mamba2.head_dim=16",
            "model.mamba2.state_size=16", "model.mamba2.num_groups=2", "model.moe.num_experts=4",
            "model.moe.ffn_hidden_size=32", "train.micro_batch_size=1", "train.seq_len=128",
            "train.global_batch_size=8"]
    base += [f"parallel.{k}={v}" for k, v in parallel.items()]
    return load_config(pattern, base + list(overrides))


def _rank0(config, dp=1, assumptions=Assumptions()):
    return memory_model(config, Layout.from_config(config, dp=dp), assumptions)["ranks"][0]


# ----------------------------------------------------------------------------- parameters


@pytest.mark.parametrize("tp", [1, 2])
def test_attention_mlp_params_per_rank_by_hand(tp):
    """(*-)x2, untied: vocab rows and heads / ffn columns split over tp; norms whole."""
    cfg = _config("(*-)x2", tp=tp)
    D, heads, kv, F = H // 4, 4, 2, 128
    attention = H + H * heads * D // tp + 2 * H * kv * D // tp + heads * D // tp * H
    mlp = H + 3 * H * F // tp  # swiglu: gate, up, down
    hand = 2 * V // tp * H + H + 2 * (attention + mlp)  # embedding + head, final norm
    r = _rank0(cfg, dp=4)
    assert r["params"] == hand
    assert r["param_bytes"] == 2 * hand and r["grad_bytes"] == 4 * hand
    assert r["optimizer_bytes"] == 12 * hand


def test_mamba2_tp2_by_hand():
    """Mamba2 at tp=2: in_proj rows [z|x|B|C|dt], conv channels [x|B|C], the per-head A_log / D / dt_bias
    and the gated norm split (Megatron's MambaMixer holds nheads / tp of each); the block norm replicates."""
    cfg = _config("M", tp=2)
    d_inner, nh, G, N, K = 2 * H, 2 * H // 16, 2, 16, 4
    in_proj = (2 * d_inner + 2 * G * N + nh) // 2 * H
    conv = (d_inner + 2 * G * N) // 2 * (K + 1)
    per_head = 3 * nh // 2
    hand = H + in_proj + conv + per_head + d_inner // 2 + H * d_inner // 2
    r = _rank0(cfg)
    assert r["params"] == hand + 2 * V // 2 * H + H


def test_doubling_tp_halves_sharded_params():
    """P(tp) = replicated + sharded / tp, so P(1) - P(2) == 2 (P(2) - P(4)) for any split."""
    counts = {tp: _rank0(_config("M*-G-", "model.attention.num_kv_heads=4", "model.gdn.num_qk_heads=4",
                                  "model.mamba2.num_groups=4", tp=tp))["params"]
              for tp in (1, 2, 4)}
    assert counts[1] - counts[2] == 2 * (counts[2] - counts[4]) > 0


def test_moe_experts_over_ep_and_distributed_optimizer():
    """*E with ep=2, dp=4, distopt: experts E/ep per rank; dense optimizer / dp, expert optimizer /
    expert-dp = tp*cp*dp / (ep*etp) = 2."""
    cfg = _config("*E", ep=2, distributed_optimizer="true")
    D, F, E = H // 4, 32, 4
    expert = E // 2 * 3 * H * F
    dense = 2 * V * H + H + (H + H * 4 * D + 2 * H * 2 * D + 4 * D * H) + (H + E * H)  # + router
    r = _rank0(cfg, dp=4)
    assert (r["dense_params"], r["expert_params"]) == (dense, expert)
    assert r["optimizer_bytes"] == pytest.approx(12 * dense / 4 + 12 * expert / 2)
    plain = _rank0(_config("*E", ep=2), dp=4)
    assert plain["optimizer_bytes"] == 12 * (dense + expert)


def test_tied_embedding_copy_on_last_stage():
    tied = _config("(*-)x2", "model.tie_embeddings=true", pp=2)
    ranks = memory_model(tied, Layout.from_config(tied, dp=1))["ranks"]
    untied_pp1 = _rank0(_config("(*-)x2", "model.tie_embeddings=true"))
    assert ranks[0]["params"] + ranks[1]["params"] == untied_pp1["params"] + V * H


# ----------------------------------------------------------------------------- activations


GPT_LAYERS = 2


def _gpt(**parallel):
    return _config(f"(*-)x{GPT_LAYERS}", "model.attention.num_kv_heads=4", "model.mlp.activation=gelu",
                   "model.mlp.ffn_hidden_size=256", "train.micro_batch_size=2", **parallel)


def _gpt_blocks(cfg, recompute="none"):
    layout = Layout.from_config(cfg, dp=1)
    paper = Assumptions(flash_attention=False, dropout=True)
    return sum(block_activation_bytes(cfg, spec, layout, paper)[recompute] for spec in resolve_layers(cfg))


@pytest.mark.parametrize("tp,sp,recompute,per_layer", [
    (1, False, "none", lambda s, b, h, a, t: s * b * h * (34 + 5 * a * s / h)),
    (2, False, "none", lambda s, b, h, a, t: s * b * h * (10 + 24 / t + 5 * a * s / (h * t))),
    (4, True, "none", lambda s, b, h, a, t: s * b * h / t * (34 + 5 * a * s / h)),
    (2, False, "selective", lambda s, b, h, a, t: s * b * h * (10 + 24 / t)),
    (4, True, "selective", lambda s, b, h, a, t: 34 * s * b * h / t),
])
def test_activations_match_korthikanti_table2(tp, sp, recompute, per_layer):
    """The paper's GPT layer (MHA, 4h GELU MLP, dropout, materialised softmax) = one '*' + one '-' block."""
    cfg = _gpt(tp=tp, sequence_parallel=str(sp).lower())
    s, b, a = cfg.train.seq_len, cfg.train.micro_batch_size, cfg.model.attention.num_heads
    expected = GPT_LAYERS * per_layer(s, b, H, a, tp)
    assert _gpt_blocks(cfg, recompute) == pytest.approx(expected, rel=1e-12)


def test_full_recompute_keeps_block_inputs():
    """Megatron's uniform full recompute, one layer per checkpoint: 2sbh per block (/t with SP)."""
    cfg = _gpt(tp=2, sequence_parallel="true")
    s, b = cfg.train.seq_len, cfg.train.micro_batch_size
    assert _gpt_blocks(cfg, "full") == 2 * GPT_LAYERS * 2 * s * b * H / 2


def test_full_recompute_of_chosen_symbols():
    """parallel.recompute_symbols: recomputed layers keep their input only, the others everything; the
    extra forward FLOPs are the recomputed layers' (computed here from the per-layer counts)."""
    from megahybrid.flops import layer_flops_per_token

    none, full, part = (_config("M*-E", *extra) for extra in (
        [], ["parallel.recompute=full"], ["parallel.recompute=full", "parallel.recompute_symbols=ME"]))
    layout = Layout.from_config(none, dp=1)
    per_layer = {s.symbol: block_activation_bytes(none, s, layout) for s in resolve_layers(none)}
    want = sum(per_layer[s]["full" if s in "ME" else "none"] for s in "M*-E")
    assert _rank0(part)["activation_bytes_per_microbatch"][0] - _rank0(none)["activation_bytes_per_microbatch"][0] \
        == pytest.approx(want - sum(v["none"] for v in per_layer.values()), rel=1e-12)
    share = part.train.global_batch_size * part.train.seq_len
    extra = sum(layer_flops_per_token(part, s, part.train.seq_len) for s in resolve_layers(part) if s.symbol in "ME")
    r = _rank0(part)
    assert r["flops_per_step_with_recompute"] - r["flops_per_step"] == pytest.approx(extra * share, rel=1e-12)
    assert _rank0(none)["activation_bytes"] > r["activation_bytes"] > _rank0(full)["activation_bytes"]


@pytest.mark.parametrize("pattern", ["M", "G", "-", "E", "*", "r"])
def test_sp_divides_norm_inputs_by_tp(pattern):
    """With SP, the norm input and mixer input (2h + 2h bytes per token) are divided by tp; nothing else moves."""
    ex = ["model.gdn.num_qk_heads=2", "model.rglru.num_heads=2"]
    off, on = (_config(pattern, *ex, tp=2, ep=1, sequence_parallel=v) for v in ("false", "true"))
    spec = resolve_layers(off)[0]
    tokens = off.train.seq_len * off.train.micro_batch_size
    a = block_activation_bytes(off, spec, Layout.from_config(off))["none"]
    b = block_activation_bytes(on, spec, Layout.from_config(on))["none"]
    router = 4 * 4 if pattern == "E" else 0  # fp32 router probabilities, sequence region
    assert a - b == pytest.approx(tokens * (4 * H + router) * (1 - 1 / 2))


def test_cp_divides_sequence():
    one, two = _config("M-"), _config("M-", cp=2)
    spec = resolve_layers(one)[0]
    full = block_activation_bytes(one, spec, Layout.from_config(one))["none"]
    half = block_activation_bytes(two, spec, Layout.from_config(two))["none"]
    assert half == full / 2


# ----------------------------------------------------------------------------- pipeline


@pytest.mark.parametrize("pp,m", [(4, 8), (4, 2), (2, 1), (3, 3)])
def test_1f1b_in_flight(pp, m):
    for r in range(pp):
        _, alive = peak_in_flight(schedule_order(pp, r, None, m), [1.0])
        assert alive == min(pp - r, m)


@pytest.mark.parametrize("pp,vpp,m", [(2, 2, 4), (4, 2, 8), (4, 3, 4), (2, 2, 6)])
def test_interleaved_matches_megatron_schedule(monkeypatch, pp, vpp, m):
    """Peak in-flight chunk micro-batches: Megatron-Core's warm-up count and schedule table, run as
    its loop runs them (warm-up forwards, then forward + backward pairs, then cool-down)."""
    schedules = pytest.importorskip("megatron.core.pipeline_parallel.schedules")

    class Group:
        def __init__(self, rank): self._rank = rank
        def size(self): return pp
        def rank(self): return self._rank

    class Comm:
        def __init__(self, rank):
            self.pp_group, self.virtual_pipeline_model_parallel_size = Group(rank), vpp

    table = schedules.get_schedule_table(m, vpp, pp)
    for r in range(pp):
        total, _, warmup, _ = schedules.get_pp_rank_microbatches(m, vpp, pp, p2p_communicator=Comm(r))
        live = peak = 0
        for k in range(total):
            live += 1  # forward k
            peak = max(peak, live)
            if k >= warmup:
                live -= 1  # backward k - warmup
        chunk_bytes = [1.0] * vpp
        _, alive = peak_in_flight(schedule_order(pp, r, vpp, m), chunk_bytes)
        assert alive == peak, (r, alive, peak)
        assert [c for op, c in schedule_order(pp, r, vpp, m) if op == "F"] == [c for _, c in table]


# ----------------------------------------------------------------------------- balanced stages


def _brute_force(costs, parts, last_extra):
    n, best = len(costs), float("inf")
    for cuts in itertools.combinations(range(1, n), parts - 1):
        bounds = [0, *cuts, n]
        loads = [sum(costs[a:b]) for a, b in zip(bounds, bounds[1:])]
        loads[-1] += last_extra
        best = min(best, max(loads))
    return best


@pytest.mark.parametrize("seed", range(12))
def test_balance_cuts_is_optimal(seed):
    rng = random.Random(seed)
    n = rng.randint(2, 9)
    costs = [float(rng.randint(1, 20)) for _ in range(n)]
    parts = rng.randint(1, n)
    last = float(rng.choice([0, 5, 30]))
    sizes = balance_cuts(costs, parts, last_extra=last)
    assert len(sizes) == parts and min(sizes) >= 1 and sum(sizes) == n
    bounds = [0, *itertools.accumulate(sizes)]
    loads = [sum(costs[a:b]) for a, b in zip(bounds, bounds[1:])]
    loads[-1] += last
    assert max(loads) == _brute_force(costs, parts, last)


@pytest.mark.parametrize("pattern,pp", [("M*M-MM**", 3), ("(MMM*E)x2", 4), ("G-G-*-GE", 2)])
def test_describe_flop_balanced_stages(pattern, pp):
    """describe's per-stage FLOPs (head included) reach the brute-force optimum; the printed pattern has
    the cuts as '|' and gives the same stages when pasted back with pp_balance=layers."""
    from megahybrid.describe import describe

    cfg = _config(pattern, pp=pp, pp_balance="flops")
    info = describe(cfg)
    costs = [r["flops_per_token"] for r in info["layers"]]
    best = _brute_force(costs, pp, info["head_flops_per_token"])
    assert max(s["flops_per_token"] for s in info["stages"]) == pytest.approx(best, rel=1e-12)
    assert info["pattern"].count("|") == pp - 1
    pasted = describe(_config(info["pattern"], pp=pp))
    assert [r["stage"] for r in pasted["layers"]] == [r["stage"] for r in info["layers"]]


def test_layers_balance_is_default_and_keeps_megatron_rule():
    with pytest.raises(ConfigError, match=r"parallel.pp=4: does not divide the 6 layers"):
        _config("M*M-MM", pp=4)


# ----------------------------------------------------------------------------- errors and CLI


@pytest.mark.parametrize("pattern,parallel,dp,match", [
    ("M*", {"pp": 3, "pp_balance": "flops"}, 1, r"^parallel.pp=3: gives 3 pipeline stages .* for 2 layers"),
    ("M*|M*", {"pp": 2, "pp_balance": "flops"}, 1, r"^parallel.pp_balance='flops': .*remove the '\|'"),
    ("*E", {"ep": 3}, 3, r"^model.moe.num_experts=4: must be divisible by parallel.ep=3"),
    ("*E", {"ep": 4}, 2, r"^parallel.ep=4: ep x etp = 4 must divide tp x cp x dp = 2"),
    ("*-", {"tp": 3}, 1, r"^model.attention.num_heads=4: must be divisible by tp"),
    ("*E", {"tp": 2, "ep": 2}, 2, r"^parallel.sequence_parallel=False: Megatron needs sequence parallelism"),
    ("*-", {}, 3, r"^train.global_batch_size=8: must be a multiple of micro-batch x dp = 3"),
])
def test_layout_errors_are_one_line(pattern, parallel, dp, match):
    with pytest.raises(ConfigError, match=match) as err:
        cfg = _config(pattern, **parallel)
        memory_model(cfg, Layout.from_config(cfg, dp=dp))
    assert "\n" not in str(err.value)


def test_cli_parallel_json(capsys):
    from megahybrid.cli import main

    args = ["describe", "(M*-)x2", f"model.hidden_size={H}", "model.attention.num_heads=4",
            "model.mamba2.head_dim=16", "model.mamba2.num_groups=2",
            "--parallel", "tp=2,pp=2,dp=2,sp,distopt,recompute=selective",
            "--micro-batch", "1", "--global-batch", "8", "--seq-len", "256", "--json"]
    assert main(args) == 0
    info = json.loads(capsys.readouterr().out)
    mem = info["parallel"]
    assert mem["layout"]["dp"] == 2 and mem["layout"]["sp"] and mem["layout"]["recompute"] == "selective"
    assert mem["tokens_per_step"] == 8 * 256
    assert [r["microbatches_in_flight"] for r in mem["ranks"]] == [2, 1]
    assert {"stage", "params", "flops_per_token"} <= set(info["stages"][0])
    assert main(args[:-1]) == 0 and "optimizer" in capsys.readouterr().out
    assert main(["describe", "*-", "--parallel", "tq=2"]) == 2
    assert "unknown key" in capsys.readouterr().err
