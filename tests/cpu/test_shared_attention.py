"""SharedAttention: one weight set per shared block (identity, counted once, grads from every use
add up), per-use LoRA adapters (== plain Attention with merged weights W + B A), round-robin blocks,
KV-cache pieces == whole, packing, config errors."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from megahybrid.config import AttentionConfig, ConfigError, ModelConfig, SharedAttentionConfig
from megahybrid.mixers.attention import Attention
from megahybrid.mixers.shared_attention import SharedAttention
from tests.helpers import assert_close
from tests.mixer_checks import check_packing, check_pieces

F64 = torch.float64
HIDDEN = 24


def make_config(rank: int = 3, blocks: int = 1, **attn) -> ModelConfig:
    attn = {"num_heads": 4, "num_kv_heads": 2, "qk_norm": True, **attn}
    return ModelConfig(hidden_size=HIDDEN, init_std=0.2, attention=AttentionConfig(**attn),
                       shared_attention=SharedAttentionConfig(adapter_rank=rank, num_shared_blocks=blocks))


def build_uses(config, n: int, seed: int = 0) -> list[SharedAttention]:
    """n `s` layers built the way the model does (one shared dict), float64, adapters' zero-init
    up-projections randomised so each use really differs."""
    torch.manual_seed(seed)
    shared: dict = {}
    layers = [SharedAttention(config, index=3 * i + 1, shared=shared).double() for i in range(n)]
    with torch.no_grad():
        for layer in layers:
            for name, p in layer.named_parameters():
                if "adapter" in name:
                    p.copy_(torch.randn_like(p) * 0.3)
    return layers


def adapter_params(layer):
    return [p for n, p in layer.named_parameters() if "adapter" in n]


def test_uses_share_one_block_and_own_adapters():
    a, b = build_uses(make_config(), 2)
    assert a.block is b.block and a.block.q_proj.weight is b.block.q_proj.weight
    for pa, pb in zip(adapter_params(a), adapter_params(b)):
        assert pa is not pb and not torch.equal(pa, pb)
    x = torch.randn(1, 6, HIDDEN, dtype=F64)
    assert (a(x)[0] - b(x)[0]).abs().max() > 1e-3  # the adapters make the uses differ


def test_fresh_uses_start_identical():
    """LoRA up-projections start at zero, so at init every use of a block is the same function."""
    torch.manual_seed(0)
    shared: dict = {}
    a, b = (SharedAttention(make_config(), shared=shared).double() for _ in range(2))
    x = torch.randn(1, 5, HIDDEN, dtype=F64)
    assert_close("fresh uses", a(x)[0], b(x)[0], 0)


def test_parameters_counted_once_first_use_owns_them():
    a, b = build_uses(make_config(), 2)
    model = nn.ModuleList([a, b])
    n_block = sum(p.numel() for p in a.block.parameters())
    n_adapters = sum(p.numel() for p in adapter_params(a))
    assert sum(p.numel() for p in model.parameters()) == n_block + 2 * n_adapters
    names = [n for n, _ in model.named_parameters()]
    assert "0.block.q_proj.weight" in names and not any(n.startswith("1.block.") for n in names)
    # state_dict does not dedup: both prefixes, one storage (documented in the module).
    sd = model.state_dict()
    assert sd["0.block.q_proj.weight"].data_ptr() == sd["1.block.q_proj.weight"].data_ptr()


def test_round_robin_blocks():
    layers = build_uses(make_config(blocks=2), 5)
    assert [layer.block_id for layer in layers] == [0, 1, 0, 1, 0]
    assert layers[0].block is layers[2].block is layers[4].block
    assert layers[1].block is layers[3].block and layers[0].block is not layers[1].block
    model = nn.ModuleList(layers)
    n_blocks = sum(p.numel() for p in layers[0].block.parameters()) * 2
    n_adapters = sum(p.numel() for p in adapter_params(layers[0])) * 5
    assert sum(p.numel() for p in model.parameters()) == n_blocks + n_adapters


def test_grads_from_both_uses_accumulate_in_shared_weights():
    a, b = build_uses(make_config(output_gate=True), 2)
    xa, xb = torch.randn(2, 7, HIDDEN, dtype=F64), torch.randn(2, 7, HIDDEN, dtype=F64)
    ga, gb = torch.randn_like(xa), torch.randn_like(xb)
    shared_params = list(a.block.parameters())
    only_a = torch.autograd.grad((a(xa)[0] * ga).sum(), shared_params)
    only_b = torch.autograd.grad((b(xb)[0] * gb).sum(), shared_params)
    ((a(xa)[0] * ga).sum() + (b(xb)[0] * gb).sum()).backward()
    for (name, p), ra, rb in zip(a.block.named_parameters(), only_a, only_b):
        assert ra.abs().max() > 0 and rb.abs().max() > 0, name
        assert_close(f"grad block.{name}", ra + rb, p.grad, 1e-12)
    for p in adapter_params(a) + adapter_params(b):
        assert p.grad is not None and p.grad.abs().max() > 0


@pytest.mark.parametrize("gate", [False, True])
def test_equals_attention_with_merged_lora(gate):
    """q_proj + B_q A_q etc. merged into a plain Attention gives the same output; with the output
    gate, the adapter adds to the query rows of each head only, not to the gate rows."""
    cfg = make_config(output_gate=gate, bias=True)
    (layer,) = build_uses(cfg, 1)
    merged = Attention(cfg).double()
    merged.load_state_dict(layer.block.state_dict())
    D, H = layer.block.head_dim, layer.block.num_heads
    with torch.no_grad():
        for proj, adapter in (("q_proj", layer.q_adapter), ("k_proj", layer.k_adapter), ("v_proj", layer.v_adapter)):
            delta = adapter[1].weight @ adapter[0].weight  # [out, hidden]
            w = getattr(merged, proj).weight
            if proj == "q_proj" and gate:
                w.view(H, 2, D, HIDDEN)[:, 0] += delta.view(H, D, HIDDEN)
            else:
                w += delta
    x = torch.randn(2, 9, HIDDEN, dtype=F64)
    assert_close("y", merged(x)[0], layer(x)[0], 1e-12)


def test_rank_zero_is_the_block():
    (layer,) = build_uses(make_config(rank=0), 1)
    assert layer.q_adapter is None and not adapter_params(layer)
    x = torch.randn(1, 8, HIDDEN, dtype=F64)
    assert_close("y", layer.block(x)[0], layer(x)[0], 0)
    assert SharedAttention.flops_per_token(make_config(rank=0), 512) == Attention.flops_per_token(make_config(), 512)


def test_pieces_and_packing():
    """KV cache pieces (7, 1, 15) == whole; packed documents (5, 17, 9) == each alone."""
    (layer,) = build_uses(make_config(rotary_fraction=0.5), 1)
    check_pieces(layer, torch.randn(2, 23, HIDDEN, dtype=F64), cuts=(7, 8), rtol=1e-10)
    check_packing(layer, torch.randn(1, 31, HIDDEN, dtype=F64), [[5, 17, 9]], rtol=1e-12)


@pytest.mark.parametrize("rank, blocks, attn, field", [
    (-1, 1, {}, "model.shared_attention.adapter_rank=-1"),
    (3, 0, {}, "model.shared_attention.num_shared_blocks=0"),
    (3, 1, {"num_kv_heads": 3}, "model.attention.num_kv_heads=3"),
])
def test_check_errors_are_one_line(rank, blocks, attn, field):
    cfg = make_config(rank=rank, blocks=blocks, **attn)
    with pytest.raises(ConfigError) as err:
        SharedAttention.check(cfg)
    msg = str(err.value)
    assert msg.startswith(field + ":") and "\n" not in msg, msg
    with pytest.raises(ConfigError):
        SharedAttention(cfg, shared={})
