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


# ------------------------------------------------------------- Zamba2 options (concat, MLP, linear, next_input)

ZAMBA2_OPTIONS = dict(concat_embeddings=True, mlp=True, output_projection=True, output_to="next_input")


def zamba2_config(rank: int = 3, blocks: int = 2, **options) -> ModelConfig:
    """HIDDEN=24, 4 heads of 2*24/4 = 12, scores scaled by (12/2)^-0.5 as in Zamba2Attention."""
    from megahybrid.config import MLPConfig

    return ModelConfig(hidden_size=HIDDEN, init_std=0.2, vocab_size=40,
                       attention=AttentionConfig(num_heads=4, head_dim=12, softmax_scale=6 ** -0.5),
                       mlp=MLPConfig(ffn_hidden_size=20, activation="geglu"),
                       shared_attention=SharedAttentionConfig(adapter_rank=rank, num_shared_blocks=blocks,
                                                              mlp_adapter_rank=rank, **{**ZAMBA2_OPTIONS, **options}))


def _hf_zamba2_uses(uses: int, blocks: int, rank: int):
    """transformers' shared blocks (one module per block, as Zamba2 ties them), per-use `linear`s,
    rotary and config, float64, every parameter random."""
    from tests.convert_checks import transformers

    tf = transformers()
    from transformers.models.zamba2 import modeling_zamba2 as hf

    cfg = tf.Zamba2Config(hidden_size=HIDDEN, num_attention_heads=4, intermediate_size=20, hidden_act="gelu",
                          adapter_rank=rank, use_shared_attention_adapter=True, use_mem_rope=True,
                          num_mem_blocks=blocks, layers_block_type=["hybrid"] * uses, num_hidden_layers=uses,
                          n_mamba_heads=4, mamba_d_state=4)
    cfg._attn_implementation = "eager"
    torch.manual_seed(1)
    hf_blocks = [hf.Zamba2AttentionDecoderLayer(cfg, block_id=b).double() for b in range(blocks)]
    linears = [nn.Linear(HIDDEN, HIDDEN, bias=False).double() for _ in range(uses)]
    with torch.no_grad():
        for p in [p for m in (*hf_blocks, *linears) for p in m.parameters()]:
            p.copy_(torch.randn_like(p) * 0.3 + (1.0 if p.dim() == 1 else 0.0))  # norms around 1
    return cfg, hf_blocks, linears, hf.Zamba2RotaryEmbedding(cfg)


def _copy_from_hf(ours: SharedAttention, hf_block, linear: nn.Linear, j: int) -> None:
    """Zamba2's names -> SharedAttention's (gate_up_proj rows are [gate | up])."""
    attn, ff = hf_block.self_attn, hf_block.feed_forward
    pairs = {"input_norm.weight": hf_block.input_layernorm.weight, "mlp_norm.weight": hf_block.pre_ff_layernorm.weight,
             "mlp.down_proj.weight": ff.down_proj.weight, "output_proj.weight": linear.weight,
             "mlp.gate_proj.weight": ff.gate_up_proj.weight.chunk(2)[0],
             "mlp.up_proj.weight": ff.gate_up_proj.weight.chunk(2)[1]}
    for p in "qkvo":
        pairs[f"block.{p}_proj.weight"] = getattr(attn, f"{p}_proj").weight
    for n in (0, 1):
        pairs[f"mlp_adapter.{n}.weight"] = ff.gate_up_proj_adapter_list[j][n].weight
        for p in "qkv":
            pairs[f"{p}_adapter.{n}.weight"] = getattr(attn, f"linear_{p}_adapter_list")[j][n].weight
    params = dict(ours.named_parameters(remove_duplicate=False))
    with torch.no_grad():
        for name, value in pairs.items():
            params[name].copy_(value)


def test_zamba2_options_match_transformers_shared_block():
    """SharedAttention(concat(x, e)) with the Zamba2 options == HF `linear(shared_transformer(x, e))` for
    three uses of two round-robin blocks, each with its own adapter slot (float64 modules, causal, RoPE).
    Each use's output is O(10), so a missing adapter, norm or swapped gate/up moves it far past 1e-6."""
    uses, blocks, rank, T = 3, 2, 3, 11
    cfg, hf_blocks, linears, rotary_emb = _hf_zamba2_uses(uses, blocks, rank)
    shared: dict = {}
    ours = [SharedAttention(zamba2_config(rank, blocks), index=j, shared=shared).double() for j in range(uses)]
    for j, use in enumerate(ours):
        _copy_from_hf(use, hf_blocks[j % blocks], linears[j], j)
    assert ours[0].block is ours[2].block and ours[0].mlp is ours[2].mlp and ours[0].input_norm is ours[2].input_norm
    x, e = torch.randn(2, T, HIDDEN, dtype=F64), torch.randn(2, T, HIDDEN, dtype=F64)
    cos, sin = rotary_emb(x, torch.arange(T)[None])
    mask = torch.full((T, T), float("-inf"), dtype=F64).triu(1)[None, None]
    for j, use in enumerate(ours):
        with torch.no_grad():
            ref = linears[j](hf_blocks[j % blocks](x, original_hidden_states=e, layer_idx=j, attention_mask=mask,
                                                   position_embeddings=(cos, sin)))
            out, _ = use(torch.cat([x, e], dim=-1))
        assert_close(f"use {j}", ref, out, 1e-6)  # HF's RMSNorm and RoPE tables run in float32


def test_zamba2_options_pieces_and_packing():
    """KV cache pieces == whole and packed documents == each alone, with the 2*hidden input."""
    (layer,) = build_uses(zamba2_config(), 1)
    check_pieces(layer, torch.randn(2, 19, 2 * HIDDEN, dtype=F64), cuts=(6, 7), rtol=1e-10)
    check_packing(layer, torch.randn(1, 25, 2 * HIDDEN, dtype=F64), [[4, 13, 8]], rtol=1e-12)


def test_next_input_routing_in_the_model():
    """pattern `s-` with output_to=next_input: logits == final_norm(e + mlp(norm(e + s(concat(e, e))))) @ W^T,
    i.e. the shared block's output reaches the next layer's input but not the residual stream."""
    from megahybrid.reference.model import ReferenceLM

    cfg = zamba2_config()
    cfg.pattern = "s-"
    torch.manual_seed(0)
    model = ReferenceLM(cfg).double()
    ids = torch.randint(0, cfg.vocab_size, (2, 9))
    s_layer, mlp_layer = model.layers
    assert s_layer.norm is None  # the shared block normalises concat(x, e) itself
    with torch.no_grad():
        e = model.embedding(ids)
        t, _ = s_layer.mixer(torch.cat([e, e], dim=-1))
        x = e + mlp_layer.mixer(mlp_layer.norm(e + t))[0]
        ref = model.final_norm(x) @ model.lm_head.weight.t()
        assert_close("logits", ref, model(ids), 1e-12)
        cfg.shared_attention.output_to = "residual"  # the default adds it to the residual: must differ
        model_res = ReferenceLM(cfg).double()
        model_res.load_state_dict(model.state_dict())
        assert (model_res(ids) - ref).abs().max() > 1e-3


def test_zamba2_flops_count_every_added_matrix():
    """The options add 2 FLOPs per weight of every added matrix (wider q/k/v and adapters, MLP and its
    adapter, output projection): counted from the modules' parameters, not from the formula."""
    plain = make_config(rank=3)
    plain.attention = AttentionConfig(num_heads=4, head_dim=12, softmax_scale=6 ** -0.5)
    zamba = zamba2_config(rank=3, blocks=1)
    (p_layer,), (z_layer,) = build_uses(plain, 1), build_uses(zamba, 1)
    weights = lambda layer: sum(p.numel() for n, p in layer.named_parameters() if n.endswith("weight") and p.dim() == 2)
    added = weights(z_layer) - weights(p_layer)
    assert SharedAttention.flops_per_token(zamba, 64) - SharedAttention.flops_per_token(plain, 64) == 2.0 * added


@pytest.mark.parametrize("options, field", [
    ({"mlp": False}, "model.shared_attention.mlp_adapter_rank=3"),
])
def test_zamba2_option_errors(options, field):
    with pytest.raises(ConfigError) as err:
        SharedAttention.check(zamba2_config(**options))
    assert str(err.value).startswith(field + ":"), str(err.value)


def test_next_input_needs_a_next_layer():
    from megahybrid.reference.model import ReferenceLM

    cfg = zamba2_config()
    cfg.pattern = "-s"
    with pytest.raises(ConfigError, match="^model.pattern: the last layer 's' feeds the next layer's input"):
        ReferenceLM(cfg)
