"""Tensor parallelism (issue 6), on CPU in float64: every rank's shard run in one process and
combined as the collectives would (`simulate_tp`) == the unsharded mixer, output, input gradient
and every parameter gradient (rank gradients put back with `unshard_grads`), at TP=2 and TP=4;
slicing Mamba2's fused in_proj contiguously instead of per component fails; one-line `check_tp`
errors; and Megatron-Core's ColumnParallelLinear/RowParallelLinear over gloo (2 processes)
computing a SwiGLU MLP == our TP=1 MLP."""

from __future__ import annotations

import os
import socket

import pytest
import torch

from megahybrid.config import (AttentionConfig, Config, ConfigError, DeltaNetConfig, GatedDeltaNetConfig,
                               Mamba2Config, MLPConfig, ModelConfig, MoEConfig, ParallelConfig, RGLRUConfig)
from megahybrid.mixers import by_name
from megahybrid.parallel.tensor import check_tp, shard_state_dict, simulate_tp, unshard_grads
from tests.helpers import assert_close, rel_error

F64 = torch.float64
RTOL = 1e-12


def model(**kw) -> ModelConfig:
    return ModelConfig(hidden_size=16, init_std=0.3, norm_eps=1e-6, **kw)


def build(layer_type: str, config, seed: int = 0):
    """The reference mixer with every parameter random (norm weights, biases included)."""
    torch.manual_seed(seed)
    m = by_name(layer_type).cls()(config).to(F64)
    with torch.no_grad():
        for name, p in m.named_parameters():
            p.copy_(torch.randn_like(p) * 0.3 + (1.0 if "norm" in name else 0.0))
    return m


def reference(full, x, cot):
    x = x.clone().requires_grad_()
    y = full(x)[0]
    (y * cot).sum().backward()
    return y.detach(), x.grad, {k: p.grad for k, p in full.named_parameters()}


def run_tp(layer_type, config, full, x, cot, shards):
    """Simulated TP forward/backward from `shards` ({rank key: shard}); returns y, dx, full grads."""
    x = x.clone().requires_grad_()
    shards = {r: {k: v.clone().requires_grad_() for k, v in s.items()} for r, s in shards.items()}
    y = simulate_tp(layer_type, config, full, shards, x)
    (y * cot).sum().backward()
    tp = 1 + max(r[1] if isinstance(r, tuple) else r for r in shards)
    params = {k: p.detach() for k, p in full.named_parameters()}
    grads = unshard_grads(layer_type, config, params, {r: {k: v.grad for k, v in s.items()}
                                                       for r, s in shards.items()}, tp)
    return y.detach(), x.grad, grads


def check_case(layer_type, config, tp, T=11):
    full = build(layer_type, config)
    torch.manual_seed(1)
    x, cot = torch.randn(2, T, 16, dtype=F64), torch.randn(2, T, 16, dtype=F64)
    y_ref, dx_ref, g_ref = reference(full, x, cot)
    sd = {k: p.detach() for k, p in full.named_parameters()}
    if by_name(layer_type).name == "moe":
        ep = config.parallel.ep
        shards = {(e, r): shard_state_dict(layer_type, config, sd, r, tp, ep_rank=e)
                  for e in range(ep) for r in range(tp)}
    else:
        shards = {r: shard_state_dict(layer_type, config, sd, r, tp) for r in range(tp)}
    y, dx, grads = run_tp(layer_type, config, full, x, cot, shards)
    assert_close("y", y_ref, y, RTOL)
    assert_close("dx", dx_ref, dx, RTOL)
    for k in g_ref:
        assert_close(f"grad {k}", g_ref[k], grads[k], RTOL)


CASES = {
    "attention-mha": ("attention", model(attention=AttentionConfig(num_heads=4, rope_theta=10000.0))),
    "attention-gqa": ("attention", model(attention=AttentionConfig(num_heads=8, num_kv_heads=2, head_dim=4))),
    "attention-gate-qknorm-bias": ("attention", model(attention=AttentionConfig(
        num_heads=4, num_kv_heads=4, output_gate=True, qk_norm=True, bias=True))),
    "mamba2-groups2": ("mamba2", model(mamba2=Mamba2Config(state_size=5, head_dim=4, num_groups=2, chunk_size=4))),
    "mamba2-groups4-bias": ("mamba2", model(mamba2=Mamba2Config(state_size=5, head_dim=4, num_groups=4,
                                                                chunk_size=4, use_bias=True))),
    "gdn": ("gdn", model(gdn=GatedDeltaNetConfig(num_qk_heads=4, num_v_heads=8, qk_head_dim=4, v_head_dim=3,
                                                 chunk_size=4))),
    "deltanet": ("deltanet", model(deltanet=DeltaNetConfig(num_heads=4, chunk_size=4))),
    "deltanet-nogate": ("deltanet", model(deltanet=DeltaNetConfig(num_heads=4, chunk_size=4, output_gate=False))),
    "rglru": ("rglru", model(rglru=RGLRUConfig(num_heads=4))),
    "mlp-swiglu": ("mlp", model(mlp=MLPConfig(ffn_hidden_size=24, activation="swiglu", bias=True))),
    "mlp-relu2": ("mlp", model(mlp=MLPConfig(ffn_hidden_size=24, activation="relu2", bias=True))),
}


@pytest.mark.parametrize("case,tp", [(c, tp) for c in CASES for tp in (2, 4) if (c, tp) != ("mamba2-groups2", 4)])
def test_simulated_tp_equals_unsharded(case, tp):
    """GQA at tp=4 has 2 kv heads: each is replicated on 2 ranks (Megatron's rule). Mamba2 with
    groups 2 runs at tp=2 only and groups 1 not at all (Megatron: ngroups % tp == 0; see
    test_check_tp_errors)."""
    layer_type, config = CASES[case]
    check_case(layer_type, config, tp)


def moe_config(activation: str, tp: int, ep: int, etp) -> Config:
    m = model(moe=MoEConfig(num_experts=4, top_k=2, ffn_hidden_size=8, activation=activation,
                            num_shared_experts=1, shared_ffn_hidden_size=12))
    return Config(model=m, parallel=ParallelConfig(tp=tp, ep=ep, etp=etp))


@pytest.mark.parametrize("activation", ["swiglu", "relu2"])
@pytest.mark.parametrize("tp,ep,etp", [(2, 1, None), (4, 2, None), (2, 2, 1), (2, 4, 2)])
def test_simulated_moe_equals_unsharded(activation, tp, ep, etp):
    check_case("moe", moe_config(activation, tp, ep, etp), tp)


def test_contiguous_mamba2_in_proj_slice_fails():
    """The classic bug: rank r takes rows [r*n/tp, (r+1)*n/tp) of the fused in_proj. Proves the
    comparison above can fail (and by how much)."""
    layer_type, config = CASES["mamba2-groups2"]
    full = build(layer_type, config)
    torch.manual_seed(1)
    x, cot = torch.randn(2, 11, 16, dtype=F64), torch.randn(2, 11, 16, dtype=F64)
    y_ref = reference(full, x, cot)[0]
    sd = {k: p.detach() for k, p in full.named_parameters()}
    tp, rows = 2, sd["in_proj.weight"].shape[0]
    shards = {r: shard_state_dict(layer_type, config, sd, r, tp) for r in range(tp)}
    for r in range(tp):
        shards[r]["in_proj.weight"] = sd["in_proj.weight"][r * rows // tp:(r + 1) * rows // tp]
    y = run_tp(layer_type, config, full, x, cot, shards)[0]
    assert rel_error(y_ref, y) > 0.1
    with pytest.raises(AssertionError, match="relative error"):
        assert_close("y", y_ref, y, RTOL)


@pytest.mark.parametrize("layer_type,config,tp,match", [
    ("attention", model(attention=AttentionConfig(num_heads=6, head_dim=4)), 4,
     r"model\.attention\.num_heads=6: must be divisible by tp \(parallel\.tp=4, attention\)"),
    ("attention", model(attention=AttentionConfig(num_heads=12, num_kv_heads=3, head_dim=4)), 2,
     r"model\.attention\.num_kv_heads=3: must be a multiple or a divisor of tp"),
    ("mamba2", model(mamba2=Mamba2Config(head_dim=4, num_groups=1)), 2,
     r"model\.mamba2\.num_groups=1: must be divisible by tp \(parallel\.tp=2, mamba2\)"),
    ("mamba2", model(mamba2=Mamba2Config(head_dim=4, num_groups=2)), 4, r"model\.mamba2\.num_groups=2"),
    ("mamba2", model(mamba2=Mamba2Config(head_dim=16, num_groups=1)), 4,
     r"model\.mamba2\.head_dim=16: gives 2 heads"),
    ("gdn", model(gdn=GatedDeltaNetConfig(num_qk_heads=2, num_v_heads=6)), 4, r"model\.gdn\.num_qk_heads=2"),
    ("deltanet", model(deltanet=DeltaNetConfig(num_heads=2)), 4, r"model\.deltanet\.num_heads=2"),
    ("rglru", model(rglru=RGLRUConfig(num_heads=2)), 4, r"model\.rglru\.num_heads=2: .*whole block-diagonal"),
    ("mlp", model(mlp=MLPConfig(ffn_hidden_size=30)), 4, r"model\.mlp\.ffn_hidden_size=30"),
    ("moe", Config(model=model(moe=MoEConfig(num_experts=6, ffn_hidden_size=8)), parallel=ParallelConfig(ep=4)),
     1, r"model\.moe\.num_experts=6: must be divisible by parallel\.ep=4 \(moe\)"),
    ("moe", Config(model=model(moe=MoEConfig(num_experts=4, ffn_hidden_size=6)), parallel=ParallelConfig(etp=4)),
     1, r"model\.moe\.ffn_hidden_size=6: must be divisible by parallel\.etp=4"),
    ("mamba1", model(), 2, r"parallel\.tp=2: layer type 'mamba1' has no tensor-parallel rule"),
])
def test_check_tp_errors(layer_type, config, tp, match):
    with pytest.raises(ConfigError, match=match) as info:
        check_tp(config, tp, [layer_type])
    assert "\n" not in str(info.value)


def test_check_tp_reads_the_pattern():
    config = Config(model=model(pattern="M*-", mamba2=Mamba2Config(head_dim=4, num_groups=1),
                                attention=AttentionConfig(num_heads=4)))
    check_tp(config, 1)
    with pytest.raises(ConfigError, match="num_groups=1"):
        check_tp(config, 2)


# ----------------------------------------------------------------------------- Megatron-Core, gloo


def _megatron_worker(rank: int, world: int, port: int, path: str) -> None:
    """One TP rank: Megatron's ColumnParallelLinear (fc1 = [gate_r | up_r]) and RowParallelLinear
    (fc2) with our per-rank MLP shard, forward + backward; saves output and shard grads."""
    import torch.distributed as dist
    import torch.nn.functional as F
    from megatron.core import ModelParallelConfig, parallel_state
    from megatron.core.tensor_parallel import ColumnParallelLinear, RowParallelLinear

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world)
    parallel_state.initialize_model_parallel(tensor_model_parallel_size=world)
    group = parallel_state.get_tensor_model_parallel_group()
    data = torch.load(path + ".in.pt", weights_only=False)
    config, sd, x, cot = data["config"], data["sd"], data["x"], data["cot"]
    shard = shard_state_dict("mlp", config, sd, rank, world)
    W = sd["up_proj.weight"].shape[0]
    mp = ModelParallelConfig(tensor_model_parallel_size=world, use_cpu_initialization=True,
                             params_dtype=F64, perform_initialization=False)
    fc1 = ColumnParallelLinear(16, 2 * W, config=mp, init_method=lambda w: None, bias=True,
                               gather_output=False, tp_group=group)
    fc2 = RowParallelLinear(W, 16, config=mp, init_method=lambda w: None, bias=True, input_is_parallel=True,
                            skip_bias_add=False, tp_group=group)
    with torch.no_grad():
        fc1.weight.copy_(torch.cat([shard["gate_proj.weight"], shard["up_proj.weight"]]))
        fc1.bias.copy_(torch.cat([shard["gate_proj.bias"], shard["up_proj.bias"]]))
        fc2.weight.copy_(shard["down_proj.weight"])
        fc2.bias.copy_(shard["down_proj.bias"])
    x = x.clone().requires_grad_()
    h, _ = fc1(x)
    gate, up = h.chunk(2, dim=-1)
    y, _ = fc2(F.silu(gate) * up)
    (y * cot).sum().backward()
    g1, gb1 = fc1.weight.grad.chunk(2), fc1.bias.grad.chunk(2)
    grads = {"gate_proj.weight": g1[0], "up_proj.weight": g1[1], "gate_proj.bias": gb1[0],
             "up_proj.bias": gb1[1], "down_proj.weight": fc2.weight.grad, "down_proj.bias": fc2.bias.grad}
    torch.save({"y": y.detach(), "dx": x.grad, "grads": grads}, f"{path}.{rank}.pt")
    dist.destroy_process_group()


def test_megatron_parallel_linears_gloo_tp2_equal_tp1(tmp_path):
    import torch.multiprocessing as mp

    config = model(mlp=MLPConfig(ffn_hidden_size=24, activation="swiglu", bias=True))
    full = build("mlp", config)
    torch.manual_seed(1)
    x, cot = torch.randn(2, 5, 16, dtype=F64), torch.randn(2, 5, 16, dtype=F64)
    y_ref, dx_ref, g_ref = reference(full, x, cot)
    sd = {k: p.detach() for k, p in full.named_parameters()}
    path = str(tmp_path / "mlp")
    torch.save({"config": config, "sd": sd, "x": x, "cot": cot}, path + ".in.pt")
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    mp.spawn(_megatron_worker, args=(2, port, path), nprocs=2, join=True)
    outs = [torch.load(f"{path}.{r}.pt") for r in range(2)]
    for r, out in enumerate(outs):
        assert_close(f"rank {r} y", y_ref, out["y"], RTOL)
        assert_close(f"rank {r} dx", dx_ref, out["dx"], RTOL)
    grads = unshard_grads("mlp", config, sd, {r: out["grads"] for r, out in enumerate(outs)}, 2)
    for k in g_ref:
        assert_close(f"grad {k}", g_ref[k], grads[k], RTOL)
