"""Dense MLP against formulas written out here, the default widths, token-wise packing, FLOPs and
config errors."""

from __future__ import annotations

import math

import pytest
import torch

from megahybrid.config import ConfigError, MLPConfig, ModelConfig
from megahybrid.mixers.mlp import MLP, default_ffn_width
from tests.helpers import assert_close

F64 = torch.float64
HIDDEN = 24


def make_config(**mlp) -> ModelConfig:
    return ModelConfig(hidden_size=HIDDEN, init_std=0.3, mlp=MLPConfig(**{"ffn_hidden_size": 40, **mlp}))


def hand_mlp(m: MLP, x: torch.Tensor, activation: str) -> torch.Tensor:
    """The formulas, with x @ W^T + b written out and GELU from erf."""
    def lin(layer, v):
        return v @ layer.weight.T + (0 if layer.bias is None else layer.bias)

    gelu = lambda v: 0.5 * v * (1 + torch.erf(v / math.sqrt(2)))
    silu = lambda v: v / (1 + torch.exp(-v))
    up = lin(m.up_proj, x)
    h = {
        "swiglu": lambda: silu(lin(m.gate_proj, x)) * up,
        "geglu": lambda: gelu(lin(m.gate_proj, x)) * up,
        "relu2": lambda: torch.clamp(up, min=0) ** 2,
        "gelu": lambda: gelu(up),
        "silu": lambda: silu(up),
    }[activation]()
    return lin(m.down_proj, h)


@pytest.mark.parametrize("activation", ["swiglu", "geglu", "relu2", "gelu", "silu"])
@pytest.mark.parametrize("bias", [False, True])
def test_matches_formula(activation, bias):
    torch.manual_seed(0)
    m = MLP(make_config(activation=activation, bias=bias)).double()
    with torch.no_grad():
        for p in m.parameters():
            p.copy_(torch.randn_like(p) * 0.3)
    x = torch.randn(2, 7, HIDDEN, dtype=F64)
    y, state = m(x)
    assert state is None
    assert_close(f"y ({activation})", hand_mlp(m, x, activation), y, 1e-13)
    names = {n for n, _ in m.named_parameters() if n.endswith("weight")}
    gated = activation in ("swiglu", "geglu")
    assert names == {"up_proj.weight", "down_proj.weight"} | ({"gate_proj.weight"} if gated else set())


def test_geglu_tanh_matches_tanh_formula():
    """geglu_tanh = down((gelu_tanh(gate) * up)) with the tanh approximation written out (Hendrycks &
    Gimpel 2016, eq. for GELU ~ 0.5x(1 + tanh(sqrt(2/pi)(x + 0.044715 x^3)))), biases included;
    and it differs from the exact-GELU geglu on the same weights."""
    torch.manual_seed(0)
    m = MLP(make_config(activation="geglu_tanh", bias=True)).double()
    with torch.no_grad():
        for p in m.parameters():
            p.copy_(torch.randn_like(p) * 0.5)
    x = torch.randn(2, 7, HIDDEN, dtype=F64)
    gate = x @ m.gate_proj.weight.T + m.gate_proj.bias
    gelu_tanh = 0.5 * gate * (1 + torch.tanh(math.sqrt(2 / math.pi) * (gate + 0.044715 * gate ** 3)))
    ref = (gelu_tanh * (x @ m.up_proj.weight.T + m.up_proj.bias)) @ m.down_proj.weight.T + m.down_proj.bias
    y, _ = m(x)
    assert_close("y (geglu_tanh)", ref, y, 1e-13)
    assert (y - hand_mlp(m, x, "geglu")).abs().max() > 1e-4


@pytest.mark.parametrize("hidden, activation, width", [
    (96, "swiglu", 256),   # 8/3 * 96 = 256 exactly
    (100, "geglu", 320),   # round(266.67) = 267 -> next multiple of 64
    (4096, "swiglu", 10944),  # round(10922.67) -> 10944 (LLaMA-7B rounds to 256: 11008)
    (100, "relu2", 400),
    (100, "gelu", 400),
])
def test_default_width(hidden, activation, width):
    assert default_ffn_width(hidden, activation) == width
    if hidden > 100:
        return  # no need to allocate the big one
    m = MLP(ModelConfig(hidden_size=hidden, mlp=MLPConfig(activation=activation)))
    assert m.down_proj.weight.shape == (hidden, width)


def test_token_wise_ignores_boundaries():
    m = MLP(make_config()).double()
    x = torch.randn(2, 12, HIDDEN, dtype=F64)
    seq_idx = torch.tensor([[0] * 5 + [1] * 7, [0] * 12])
    assert MLP.token_wise
    assert_close("packed", m(x)[0], m(x, None, seq_idx)[0], 0.0)
    assert_close("per token", m(x)[0][:, 4:5], m(x[:, 4:5])[0], 1e-15)


def test_flops_per_token():
    assert MLP.flops_per_token(make_config(activation="swiglu"), 64) == 2 * 3 * HIDDEN * 40
    assert MLP.flops_per_token(make_config(activation="relu2"), 64) == 2 * 2 * HIDDEN * 40
    assert MLP.flops_per_token(ModelConfig(hidden_size=96), 64) == 2 * 3 * 96 * 256


def test_check_errors_are_one_line():
    bad = make_config()
    bad.mlp.activation = "tanh"  # past the Literal: configs built in code are not type-checked
    for config, match in [(bad, "model.mlp.activation='tanh'"),
                          (make_config(ffn_hidden_size=0), "model.mlp.ffn_hidden_size=0")]:
        with pytest.raises(ConfigError, match=match) as err:
            MLP.check(config)
        assert "\n" not in str(err.value)
    with pytest.raises(ConfigError, match="model.mlp.activation"):
        MLP(bad)
