"""MoE against a dense reference written here (every expert on every token, combined with the top-k
weights masked; float64), against transformers' Qwen3-MoE sparse block with copied weights, the
aux/z losses against their formulas, gradients to the router, capacity dropping, FLOPs and errors."""

from __future__ import annotations

import math
import re

import pytest
import torch

from megahybrid.config import ConfigError, MoEConfig, ModelConfig
from megahybrid.mixers.moe import MoE
from tests.helpers import assert_close

F64 = torch.float64
HIDDEN, WIDTH = 16, 12


def make_config(**moe) -> ModelConfig:
    moe = {"num_experts": 5, "top_k": 2, "ffn_hidden_size": WIDTH, **moe}
    return ModelConfig(hidden_size=HIDDEN, init_std=0.3, moe=MoEConfig(**moe))


def build(config, seed: int = 0) -> MoE:
    """float64, with a router spread wide enough that the top-k choice varies between tokens."""
    torch.manual_seed(seed)
    m = MoE(config).double()
    with torch.no_grad():
        m.router.weight.normal_(std=1.0)
    return m


# ------------------------------------------------------------------ hand-written reference


def silu(v):
    return v / (1 + torch.exp(-v))


def gelu(v):
    return 0.5 * v * (1 + torch.erf(v / math.sqrt(2)))


def hand_ffn(x, w_in, w_out, activation):
    """x [N, H], w_in [2I or I, H] (gate rows first), w_out [H, I]."""
    h = x @ w_in.T
    if activation in ("swiglu", "geglu"):
        gate, up = h[:, : h.shape[1] // 2], h[:, h.shape[1] // 2:]
        h = (silu(gate) if activation == "swiglu" else gelu(gate)) * up
    else:
        h = {"relu2": lambda: torch.clamp(h, min=0) ** 2, "gelu": lambda: gelu(h), "silu": lambda: silu(h)}[activation]()
    return h @ w_out.T


def hand_routing(m: MoE, x):
    """-> logits [N, E], combine weights G [N, E] (top-k weights, zero elsewhere)."""
    logits = x @ m.router.weight.T
    if m.router_type == "softmax":
        scores = torch.exp(logits - logits.max(-1, keepdim=True).values)
        scores = scores / scores.sum(-1, keepdim=True)
    else:
        scores = 1 / (1 + torch.exp(-logits))
    idx = scores.argsort(dim=-1, descending=True)[:, : m.top_k]
    w = scores.gather(1, idx)
    if m.norm_topk_prob:
        w = w / w.sum(-1, keepdim=True)
    return logits, torch.zeros_like(scores).scatter(1, idx, w)


def dense_reference(m: MoE, x, keep=None):
    """Every expert on every token, y = sum_e G[:, e] * expert_e(x) + shared(x); `keep` [N, E] masks
    dropped (token, expert) pairs."""
    xf = x.reshape(-1, x.shape[-1])
    _, G = hand_routing(m, xf)
    if keep is not None:
        G = G * keep
    act = m.experts.activation
    outs = torch.stack([hand_ffn(xf, m.experts.w_in[e], m.experts.down_proj[e], act) for e in range(m.num_experts)])
    y = torch.einsum("ne,enh->nh", G, outs)
    if m.shared_expert is not None:
        s = m.shared_expert
        w_in = s.up_proj.weight if s.gate_proj is None else torch.cat([s.gate_proj.weight, s.up_proj.weight])
        y = y + hand_ffn(xf, w_in, s.down_proj.weight, act)
    return y.reshape(x.shape)


# ---------------------------------------------------------------------------------- tests

CASES = {
    "softmax-swiglu": dict(),
    "sigmoid-relu2-shared": dict(router="sigmoid", activation="relu2", num_shared_experts=1),
    "softmax-geglu-unnormalised-2shared": dict(activation="geglu", norm_topk_prob=False, num_shared_experts=2),
    "sigmoid-silu-top1": dict(router="sigmoid", activation="silu", num_experts=3, top_k=1, norm_topk_prob=False),
    "softmax-gelu-top3-sharedwidth": dict(activation="gelu", top_k=3, num_shared_experts=1, shared_ffn_hidden_size=7),
}


@pytest.mark.parametrize("case", list(CASES))
def test_matches_dense_reference(case):
    m = build(make_config(**CASES[case]))
    x = torch.randn(3, 7, HIDDEN, dtype=F64)
    y, state = m(x)
    assert state is None
    assert_close(f"y ({case})", dense_reference(m, x), y, 1e-12)


def test_parameter_layout():
    gated = build(make_config(num_shared_experts=1))
    shapes = {n: tuple(p.shape) for n, p in gated.named_parameters()}
    assert shapes == {"router.weight": (5, HIDDEN), "experts.gate_up_proj": (5, 2 * WIDTH, HIDDEN),
                      "experts.down_proj": (5, HIDDEN, WIDTH), "shared_expert.gate_proj.weight": (WIDTH, HIDDEN),
                      "shared_expert.up_proj.weight": (WIDTH, HIDDEN), "shared_expert.down_proj.weight": (HIDDEN, WIDTH)}
    plain = build(make_config(activation="relu2"))
    assert {n: tuple(p.shape) for n, p in plain.named_parameters()} == {
        "router.weight": (5, HIDDEN), "experts.up_proj": (5, WIDTH, HIDDEN), "experts.down_proj": (5, HIDDEN, WIDTH)}


@pytest.mark.parametrize("norm_topk_prob", [True, False])
def test_matches_transformers_qwen3_moe(norm_topk_prob, monkeypatch):
    """== Qwen3MoeSparseMoeBlock (fused experts, softmax top-k router) with copied weights, float32."""
    monkeypatch.setitem(__import__("sys").modules, "fla", None)  # CPU: keep FLA's Triton kernels out
    from transformers import Qwen3MoeConfig
    from transformers.models.qwen3_moe.modeling_qwen3_moe import Qwen3MoeSparseMoeBlock

    m = build(make_config(norm_topk_prob=norm_topk_prob)).float()
    hf_cfg = Qwen3MoeConfig(hidden_size=HIDDEN, moe_intermediate_size=WIDTH, num_experts=5, num_experts_per_tok=2,
                            norm_topk_prob=norm_topk_prob, hidden_act="silu")
    hf = Qwen3MoeSparseMoeBlock(hf_cfg)
    with torch.no_grad():
        hf.gate.weight.copy_(m.router.weight)
        hf.experts.gate_up_proj.copy_(m.experts.gate_up_proj)
        hf.experts.down_proj.copy_(m.experts.down_proj)
    x = torch.randn(2, 9, HIDDEN)
    assert_close("y vs transformers", hf(x), m(x)[0], 1e-5)


@pytest.mark.parametrize("router", ["softmax", "sigmoid"])
def test_aux_loss_matches_formula(router):
    m = build(make_config(router=router, aux_loss_coeff=0.01, z_loss_coeff=1e-3))
    x = torch.randn(2, 11, HIDDEN, dtype=F64)
    m(x)
    xf = x.reshape(-1, HIDDEN)
    logits, G = hand_routing(m, xf)
    scores = torch.softmax(logits, -1) if router == "softmax" else torch.sigmoid(logits)
    P = (scores / scores.sum(-1, keepdim=True)).mean(0)
    f = (G > 0).to(F64).sum(0) / (xf.shape[0] * m.top_k)  # fraction of routed (token, expert) pairs
    z = (torch.log(torch.exp(logits).sum(-1)) ** 2).mean()
    assert_close("aux_loss", 0.01 * 5 * (f * P).sum() + 1e-3 * z, m.aux_loss, 1e-12)


def test_aux_loss_of_a_uniform_router_is_its_coefficient():
    """Uniform probabilities: E * sum_i f_i / E = 1 whatever the routing, so the loss is the coefficient."""
    m = build(make_config(aux_loss_coeff=0.03, top_k=3))
    with torch.no_grad():
        m.router.weight.zero_()
    m(torch.randn(2, 6, HIDDEN, dtype=F64))
    assert_close("aux_loss", torch.tensor(0.03, dtype=F64), m.aux_loss, 1e-14)


def test_gradient_reaches_router():
    """Through the top-k combine weights (aux off) and through the aux loss alone."""
    m = build(make_config(aux_loss_coeff=0.0))
    x = torch.randn(2, 5, HIDDEN, dtype=F64)
    m(x)[0].pow(2).sum().backward()
    assert m.router.weight.grad.abs().sum() > 0
    m = build(make_config(aux_loss_coeff=0.1, z_loss_coeff=0.1))
    m(x)
    m.aux_loss.backward()
    assert m.router.weight.grad.abs().sum() > 0
    assert m.experts.down_proj.grad is None  # the aux loss does not touch the experts


def hand_keep(G: torch.Tensor, capacity: int) -> torch.Tensor:
    """Each expert keeps its first `capacity` tokens in flattened (batch, seq) order."""
    keep, taken = torch.zeros_like(G), [0] * G.shape[1]
    for n in range(G.shape[0]):
        for e in torch.nonzero(G[n] > 0).flatten().tolist():
            if taken[e] < capacity:
                keep[n, e], taken[e] = 1.0, taken[e] + 1
    return keep


def test_capacity_drops_latest_tokens():
    m = build(make_config(capacity_factor=0.5, num_shared_experts=1))
    x = torch.randn(3, 7, HIDDEN, dtype=F64)
    capacity = math.ceil(0.5 * 21 * 2 / 5)
    keep = hand_keep(hand_routing(m, x.reshape(-1, HIDDEN))[1], capacity)
    assert keep.sum() < 21 * 2, "the test must actually drop something"
    assert_close("y (capacity)", dense_reference(m, x, keep), m(x)[0], 1e-12)
    m.capacity_factor = 5 / 2  # capacity = N: nothing can overflow
    assert_close("y (ample capacity)", dense_reference(m, x), m(x)[0], 1e-12)


def test_capacity_when_every_token_picks_the_same_experts():
    """All 12 tokens choose experts 0 and 1; capacity ceil(1.0 * 12 * 2 / 5) = 5 keeps tokens 0..4
    (the earliest, in flattened (batch, seq) order), later tokens get nothing (no shared expert)."""
    m = build(make_config(capacity_factor=1.0))
    with torch.no_grad():
        m.router.weight.zero_()
        m.router.weight[0, 0], m.router.weight[1, 0] = 5.0, 4.0
    x = torch.randn(2, 6, HIDDEN, dtype=F64)
    x[..., 0] = 3.0  # dominates the logits, so every token ranks experts 0 > 1 > rest
    y = m(x)[0].reshape(12, HIDDEN)
    m.capacity_factor = None
    full = m(x)[0].reshape(12, HIDDEN)
    assert_close("kept tokens", full[:5], y[:5], 1e-14)
    assert torch.equal(y[5:], torch.zeros_like(y[5:]))


def test_flops_count_active_parameters_only():
    c = make_config(num_experts=8, top_k=2, num_shared_experts=1, shared_ffn_hidden_size=20)
    expected = 2 * HIDDEN * 8 + 2 * (2 * 3 * HIDDEN * WIDTH) + 2 * 3 * HIDDEN * 20
    assert MoE.flops_per_token(c, 256) == expected
    c = make_config(activation="relu2", top_k=1)
    assert MoE.flops_per_token(c, 256) == 2 * HIDDEN * 5 + 2 * 2 * HIDDEN * WIDTH


@pytest.mark.parametrize("moe, match", [
    (dict(top_k=6), "model.moe.top_k=6"),
    (dict(top_k=0), "model.moe.top_k=0"),
    (dict(num_experts=0, top_k=1), "model.moe.num_experts=0"),
    (dict(router="relu"), "model.moe.router='relu'"),
    (dict(activation="tanh"), "model.moe.activation='tanh'"),
    (dict(ffn_hidden_size=0), "model.moe.ffn_hidden_size=0"),
    (dict(capacity_factor=0.0), "model.moe.capacity_factor=0.0"),
    (dict(shared_ffn_hidden_size=32), "model.moe.shared_ffn_hidden_size=32"),
    (dict(num_shared_experts=-1), "model.moe.num_shared_experts=-1"),
    (dict(z_loss_coeff=-1.0), "model.moe.z_loss_coeff=-1.0"),
])
def test_check_errors_are_one_line(moe, match):
    with pytest.raises(ConfigError, match=re.escape(match)) as err:
        MoE.check(make_config(**moe))
    assert "\n" not in str(err.value)
    with pytest.raises(ConfigError):
        MoE(make_config(**moe))


# ------------------------------------------------- DeepSeek-V3 / NemotronH routing options

NEMOTRON_CASES = {
    "bias-groups-scaled": dict(num_groups=4, topk_groups=2, routed_scaling_factor=2.5, norm_topk_prob=True),
    "bias-unnormalised-scaled": dict(num_groups=1, topk_groups=1, routed_scaling_factor=1.7, norm_topk_prob=False),
}


@pytest.mark.parametrize("case", list(NEMOTRON_CASES))
def test_matches_transformers_nemotron_h_moe(case, monkeypatch):
    """== NemotronHMoE (sigmoid router, e_score_correction_bias for the choice only, group-limited
    top-k, routed_scaling_factor, relu2 experts + shared expert) with copied weights, float32. The
    options must matter: switching each off changes the output."""
    monkeypatch.setitem(__import__("sys").modules, "fla", None)
    from transformers import NemotronHConfig
    from transformers.models.nemotron_h.modeling_nemotron_h import NemotronHMoE

    opts = NEMOTRON_CASES[case]
    config = make_config(num_experts=8, router="sigmoid", activation="relu2", num_shared_experts=1,
                         shared_ffn_hidden_size=10, score_correction_bias=True, **opts)
    m = build(config).float()
    with torch.no_grad():
        m.router.expert_bias.normal_(std=0.5)  # large enough to change which experts are chosen
    hf = NemotronHMoE(NemotronHConfig(
        hidden_size=HIDDEN, n_routed_experts=8, num_experts_per_tok=2, moe_intermediate_size=WIDTH,
        moe_shared_expert_intermediate_size=10, n_group=opts["num_groups"], topk_group=opts["topk_groups"],
        routed_scaling_factor=opts["routed_scaling_factor"], norm_topk_prob=opts["norm_topk_prob"],
        mlp_hidden_act="relu2"))
    with torch.no_grad():
        hf.gate.weight.copy_(m.router.weight)
        hf.gate.e_score_correction_bias.copy_(m.router.expert_bias)
        hf.experts.up_proj.copy_(m.experts.up_proj)
        hf.experts.down_proj.copy_(m.experts.down_proj)
        hf.shared_experts.up_proj.weight.copy_(m.shared_expert.up_proj.weight)
        hf.shared_experts.down_proj.weight.copy_(m.shared_expert.down_proj.weight)
    x = torch.randn(2, 9, HIDDEN)
    y = m(x)[0]
    assert_close("y vs transformers NemotronHMoE", hf(x), y, 1e-5)

    def changed(**off):
        saved = {k: getattr(m, k) for k in off}
        for k, v in off.items():
            setattr(m, k, v)
        try:
            return (m(x)[0] - y).abs().max() > 1e-4
        finally:
            for k, v in saved.items():
                setattr(m, k, v)

    assert changed(routed_scaling_factor=1.0)
    if opts["num_groups"] > 1:
        assert changed(num_groups=1)
    bias = m.router.expert_bias.clone()
    with torch.no_grad():
        m.router.expert_bias.zero_()
    assert (m(x)[0] - y).abs().max() > 1e-4, "the bias must change the choice of experts"
    with torch.no_grad():
        m.router.expert_bias.copy_(bias)


def test_expert_bias_is_a_buffer_in_the_state_dict():
    m = MoE(make_config(router="sigmoid", score_correction_bias=True))
    assert "router.expert_bias" in m.state_dict()
    assert "router.expert_bias" not in dict(m.named_parameters())


@pytest.mark.parametrize("field, value, message", [
    ("num_groups", 3, "must be >= 1 and divide num_experts=8"),
    ("num_groups", 8, "leaves 1 expert per group"),
    ("topk_groups", 5, r"must be in \[1, num_groups=4\]"),
    ("routed_scaling_factor", 0.0, "must be > 0"),
])
def test_routing_option_errors(field, value, message):
    opts = {"num_experts": 8, "num_groups": 4, "topk_groups": 2, field: value}
    with pytest.raises(ConfigError, match=f"model.moe.{field}={value!r}: {message}"):
        MoE(make_config(**opts))


# ------------------------------------------------------ Qwen3-Next gated shared expert


@pytest.mark.parametrize("norm_topk_prob", [True, False])
def test_shared_expert_gate_matches_transformers_qwen3_next(norm_topk_prob, monkeypatch):
    """== Qwen3NextSparseMoeBlock (softmax top-k router, shared expert scaled by
    sigmoid(shared_expert_gate x)) with copied weights, float32; without the gate it differs."""
    monkeypatch.setitem(__import__("sys").modules, "fla", None)
    from transformers import Qwen3NextConfig
    from transformers.models.qwen3_next.modeling_qwen3_next import Qwen3NextSparseMoeBlock

    config = make_config(norm_topk_prob=norm_topk_prob, num_shared_experts=1, shared_ffn_hidden_size=7,
                         shared_expert_gate=True)
    m = build(config).float()
    with torch.no_grad():
        m.shared_expert_gate.weight.normal_(std=1.0)
    hf_cfg = Qwen3NextConfig(hidden_size=HIDDEN, moe_intermediate_size=WIDTH, shared_expert_intermediate_size=7,
                             num_experts=5, num_experts_per_tok=2, norm_topk_prob=norm_topk_prob, hidden_act="silu")
    hf = Qwen3NextSparseMoeBlock(hf_cfg)
    with torch.no_grad():
        hf.gate.weight.copy_(m.router.weight)
        hf.experts.gate_up_proj.copy_(m.experts.gate_up_proj)
        hf.experts.down_proj.copy_(m.experts.down_proj)
        for name in ("gate_proj", "up_proj", "down_proj"):
            getattr(hf.shared_expert, name).weight.copy_(getattr(m.shared_expert, name).weight)
        hf.shared_expert_gate.weight.copy_(m.shared_expert_gate.weight)
    x = torch.randn(2, 9, HIDDEN)
    expected = hf(x)
    assert_close("y vs transformers", expected, m(x)[0], 1e-5)
    m.shared_expert_gate = None
    assert (m(x)[0] - expected).abs().max() > 1e-3, "the gate made no difference; the check cannot fail"


def test_shared_expert_gate_parameter_and_error():
    m = MoE(make_config(num_shared_experts=1, shared_expert_gate=True))
    assert tuple(m.state_dict()["shared_expert_gate.weight"].shape) == (1, HIDDEN)
    assert "shared_expert_gate.weight" not in MoE(make_config(num_shared_experts=1)).state_dict()
    with pytest.raises(ConfigError, match=re.escape("model.moe.shared_expert_gate=True: gates the shared expert")):
        MoE(make_config(shared_expert_gate=True))
