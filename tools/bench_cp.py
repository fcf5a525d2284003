"""Context parallelism for one GDN and one Mamba2 layer: megahybrid's state passing vs Megatron-Core's all-to-all.

    torchrun --nproc-per-node N tools/bench_cp.py --tokens 32768 131072 --json $OUT/bench_cp.json
    python tools/bench_cp.py --tokens 32768          # one GPU: CP=1 only

Forward + backward time of ONE layer (bf16, batch 1, sequence of T tokens split over CP ranks; CUDA
events, `--warmup` steps then the median of `--steps`), for two methods:
  sp   megahybrid state passing: pre-norm (RMSNorm) -> megahybrid's GatedDeltaNet / Mamba2 mixer run by
       `megahybrid.parallel.kernels.forward_cp_kernels` over `DistributedCP` (NCCL), each rank holding
       T/CP tokens (`--layout contiguous`, or zigzag: two pieces) -> residual add. Projections, convs
       (FLA causal_conv1d with the halo), cores (FLA chunk_gated_delta_rule / mamba_ssm
       mamba_chunk_scan_combined on [v | 0] from [0 | I]), one all-gather of the O(d^2) summaries,
       the correction, norms and the output projection are all timed.
       At CP=1: `forward_kernels`, the same kernels with no CP machinery (no augmented pass), so the
       speed-up is against what one GPU would run.
  a2a  Megatron-Core 0.19's own CP: its hybrid layer specs (TE linears with the pre-norm fused into
       in_proj, hybrid_layer_specs.hybrid_stack_spec) built as `TransformerLayer(GatedDeltaNet)` and
       `MambaLayer(MambaMixer)` under `parallel_state.initialize_model_parallel(context_parallel_size=CP)`:
       an all-to-all from sequence shards to head shards before the conv/core and back after it
       (gated_delta_net/common.py `tensor_a2a_cp2hp`, mamba_context_parallel.py). Megatron expects
       its CP input in the attention load-balanced (zigzag) order and undoes it around the a2a; the
       timing does not depend on the data. MambaMixer runs with `use_mamba_mem_eff_path=False`
       (the fused path needs the causal_conv1d CUDA extension, absent on the GPU machine): its conv is
       then PyTorch's depthwise nn.Conv1d over a transposed copy (2.3x slower than FLA's conv in
       megahybrid/megatron/NOTES.md), a difference between the two Mamba rows unrelated to CP; with
       causal_conv1d installed the fused path is used. Megatron's GDN uses FLA's conv and kernel.
Sizes (Qwen3-Next-80B-A3B's GDN, Nemotron-H-like Mamba2): hidden 2048; GDN 16 q/k heads, 32 v heads,
head dims 128, conv 4; Mamba2 expand 2 (d_inner 4096, 64 heads of 64), state 128, 8 groups, conv 4,
chunk 128 (Megatron's default). Megatron caps a2a CP at the head counts (16 q/k heads: CP <= 16).

CP=1 inside a run of N ranks: every rank runs its own full sequence of T tokens at once (no
communication; all GPUs busy as in the CP runs); reported times are the slowest rank's median. CP=N:
one sequence over all ranks (`--cp` may list other divisors of N: then N/CP sequences run at once).
Reported per (layer, T, CP, method): ms per fwd+bwd step, tokens/s per GPU (T / CP / step time),
speed-up vs CP=1 of the same method (step time at CP=1 / at CP), parallel efficiency (speed-up / CP),
peak allocated memory (max over ranks), or "OOM" (torch.cuda.OutOfMemoryError caught; the script goes
on). Rank 0 prints a table last and writes `--json`. An OOM on some ranks only in the middle of a
collective would hang the others (the NCCL timeout, 10 min, ends the run); the sizes are identical on
every rank, so it is not expected.
"""

from __future__ import annotations

import argparse
import copy
import datetime
import functools
import gc
import json
import os
import statistics
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

HIDDEN = 2048
GDN = dict(num_qk_heads=16, num_v_heads=32, qk_head_dim=128, v_head_dim=128, conv_kernel=4)
MAMBA2 = dict(state_size=128, head_dim=64, num_groups=8, expand=2, conv_kernel=4, chunk_size=128)
NORM_EPS = 1e-6


def parse_args(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tokens", type=int, nargs="+", default=[32768, 131072], help="sequence lengths T")
    ap.add_argument("--layers", nargs="+", default=["gdn", "mamba2"], choices=["gdn", "mamba2"])
    ap.add_argument("--methods", nargs="+", default=["sp", "a2a"], choices=["sp", "a2a"])
    ap.add_argument("--cp", type=int, nargs="+", default=None,
                    help="CP sizes (divisors of the world size); default: 1 and the world size")
    ap.add_argument("--layout", default="contiguous", choices=["contiguous", "zigzag"],
                    help="token layout of the state-passing method (zigzag: rank r holds pieces r and 2CP-1-r)")
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--json", default=None, help="write the results here (rank 0)")
    return ap.parse_args(argv)


# ------------------------------------------------------------------------ process groups


def init_distributed():
    import torch.distributed as dist

    os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
    os.environ.setdefault("MASTER_PORT", str(29500 + os.getpid() % 1000))
    rank, world = int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))
    torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", 0)))
    dist.init_process_group("nccl", rank=rank, world_size=world, timeout=datetime.timedelta(minutes=10))
    return rank, world


@functools.cache
def sp_group(cp: int):
    """This rank's CP group of `cp` consecutive ranks (every rank creates every group, as new_group needs)."""
    import torch.distributed as dist

    world, rank = dist.get_world_size(), dist.get_rank()
    if cp == world:
        return None  # the default group
    mine = None
    for start in range(0, world, cp):
        group = dist.new_group(list(range(start, start + cp)))
        if start <= rank < start + cp:
            mine = group
    return mine


def megatron_parallel(cp: int):
    """(Re)initialise Megatron's parallel state with context_parallel_size=cp; its process groups."""
    from megatron.core import parallel_state, tensor_parallel
    from megatron.core.process_groups_config import ProcessGroupCollection

    if parallel_state.model_parallel_is_initialized():
        if parallel_state.get_context_parallel_world_size() != cp:
            parallel_state.destroy_model_parallel()
    if not parallel_state.model_parallel_is_initialized():
        parallel_state.initialize_model_parallel(context_parallel_size=cp)
    tensor_parallel.model_parallel_cuda_manual_seed(1234)
    return ProcessGroupCollection.use_mpu_process_groups()


# ------------------------------------------------------------------------ the two methods


def have_causal_conv1d() -> bool:
    """Megatron's fused Mamba training path needs the causal_conv1d CUDA extension."""
    import importlib.util

    return importlib.util.find_spec("causal_conv1d") is not None


class SPLayer(torch.nn.Module):
    """megahybrid: x + mixer(RMSNorm(x)), the mixer under state passing on the kernels (CP=1: no CP)."""

    def __init__(self, kind: str, comm):
        super().__init__()
        from megahybrid.config import GatedDeltaNetConfig, Mamba2Config, ModelConfig
        from megahybrid.mixers.common import RMSNorm
        from megahybrid.mixers.gated_deltanet import GatedDeltaNet
        from megahybrid.mixers.mamba2 import Mamba2

        config = ModelConfig(hidden_size=HIDDEN, norm_eps=NORM_EPS, gdn=GatedDeltaNetConfig(**GDN),
                             mamba2=Mamba2Config(**MAMBA2))
        self.norm = RMSNorm(HIDDEN, eps=NORM_EPS)
        self.mixer = GatedDeltaNet(config) if kind == "gdn" else Mamba2(config)
        self.comm = comm

    def forward(self, x):  # x [1, T_local, hidden]
        from megahybrid.parallel.kernels import forward_cp_kernels, forward_kernels

        h = self.norm(x)
        y, _ = forward_kernels(self.mixer, h) if self.comm is None else forward_cp_kernels(self.mixer, h, self.comm)
        return x + y


def build_sp(kind: str, cp: int, layout: str):
    from megahybrid.parallel import DistributedCP

    comm = None if cp == 1 else DistributedCP(sp_group(cp), layout=layout)
    layer = SPLayer(kind, comm).cuda().to(torch.bfloat16)

    def step(x, dy):  # x [1, T_local, hidden] (batch-first)
        layer(x).backward(dy)
    return layer, step, lambda t: torch.randn(1, t, HIDDEN, device="cuda", dtype=torch.bfloat16)


def build_a2a(kind: str, cp: int):
    import torch.nn.functional as F
    from megatron.core.models.hybrid.hybrid_layer_specs import hybrid_stack_spec
    from megatron.core.transformer.spec_utils import build_module
    from megatron.core.transformer.transformer_config import TransformerConfig

    pg = megatron_parallel(cp)
    tc = TransformerConfig(
        num_layers=1, hidden_size=HIDDEN, num_attention_heads=16, context_parallel_size=cp,
        params_dtype=torch.bfloat16, bf16=True, pipeline_dtype=torch.bfloat16, normalization="RMSNorm",
        layernorm_epsilon=NORM_EPS, add_bias_linear=False, hidden_dropout=0.0, attention_dropout=0.0,
        is_hybrid_model=True, activation_func=F.silu, gated_linear_unit=False, bias_activation_fusion=False,
        # GDN (linear_* are Megatron's names), Mamba2 (mamba_*)
        linear_num_key_heads=GDN["num_qk_heads"], linear_num_value_heads=GDN["num_v_heads"],
        linear_key_head_dim=GDN["qk_head_dim"], linear_value_head_dim=GDN["v_head_dim"],
        linear_conv_kernel_dim=GDN["conv_kernel"],
        mamba_state_dim=MAMBA2["state_size"], mamba_head_dim=MAMBA2["head_dim"],
        mamba_num_groups=MAMBA2["num_groups"], mamba_num_heads=MAMBA2["expand"] * HIDDEN // MAMBA2["head_dim"],
        use_mamba_mem_eff_path=have_causal_conv1d(),  # False on the GPU machine (module docstring)
    )
    if kind == "gdn":
        layer = build_module(hybrid_stack_spec.submodules.gdn_layer, config=tc, layer_number=1, pg_collection=pg,
                             add_layer_offset=False)

        def step(x, dy):  # x [T_local, 1, hidden] (sequence-first, Megatron's layout)
            out, _ = layer(hidden_states=x, attention_mask=None)
            out.backward(dy)
    else:
        spec = copy.deepcopy(hybrid_stack_spec.submodules.mamba_layer)
        spec.submodules.mixer.params = {"d_conv": MAMBA2["conv_kernel"], "chunk_size": MAMBA2["chunk_size"]}
        layer = build_module(spec, config=tc, layer_number=1, pg_collection=pg, pp_layer_offset=0)

        def step(x, dy):
            layer(hidden_states=x, attention_mask=None).backward(dy)
    return layer, step, lambda t: torch.randn(t, 1, HIDDEN, device="cuda", dtype=torch.bfloat16)


# ------------------------------------------------------------------------ timing


def time_one(kind, method, T, cp, args):
    """{"ms", "peak_gib"} (slowest rank) or {"status": "OOM" / "error: ..."}; every rank agrees."""
    import torch.distributed as dist

    result, layer, x, dy = {}, None, None, None
    try:
        if method == "sp":
            layer, step, make = build_sp(kind, cp, args.layout)
        else:
            layer, step, make = build_a2a(kind, cp)
        x = make(T // cp).requires_grad_()
        dy = make(T // cp)
        for _ in range(args.warmup):
            step(x, dy)
        torch.cuda.synchronize()
        dist.barrier()
        torch.cuda.reset_peak_memory_stats()
        events = []
        for _ in range(args.steps):
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            step(x, dy)
            end.record()
            events.append((start, end))
        torch.cuda.synchronize()
        result = {"ms": statistics.median(s.elapsed_time(e) for s, e in events),
                  "peak_gib": torch.cuda.max_memory_allocated() / 2**30}
    except torch.cuda.OutOfMemoryError:
        result = {"status": "OOM"}
    except Exception as e:  # a size Megatron rejects, a missing package: record it and go on
        result = {"status": f"error: {type(e).__name__}: {str(e).splitlines()[0][:160] if str(e) else ''}"}
    del layer, x, dy
    gc.collect()
    torch.cuda.empty_cache()
    # Agree across ranks: any failure fails the entry; times and memory are the worst rank's.
    failed = torch.tensor([0.0 if "ms" in result else 1.0], device="cuda")
    dist.all_reduce(failed, op=dist.ReduceOp.MAX)
    if failed.item():
        return result if "status" in result else {"status": "failed on another rank"}
    worst = torch.tensor([result["ms"], result["peak_gib"]], device="cuda")
    dist.all_reduce(worst, op=dist.ReduceOp.MAX)
    return {"ms": worst[0].item(), "peak_gib": worst[1].item()}


def main(argv=None):
    args = parse_args(argv)
    rank, world = init_distributed()
    import torch.distributed as dist

    cps = sorted(set(args.cp or [1, world]))
    for cp in cps:
        if world % cp:
            raise SystemExit(f"--cp {cp}: must divide the world size {world}")
    # Megatron's GDN and ours both run FLA's gated backward, guarded on Hopper with Triton < 3.7.1.
    from megahybrid.megatron.gdn_guard import ensure_gdn_backward

    if rank == 0:  # rank 0 first: its passing check may be recorded for the others (gdn_guard.record_path)
        guard = ensure_gdn_backward()
    dist.barrier()
    if rank != 0:
        guard = ensure_gdn_backward()
    device = torch.cuda.get_device_name()
    if rank == 0:
        print(f"bench_cp: {world} x {device}, torch {torch.__version__}, CP sizes {cps}, tokens {args.tokens}, "
              f"sp layout {args.layout}, GDN guard {guard['guard']}", flush=True)
    for T in args.tokens:
        for cp in cps:
            if T % (2 * cp):
                raise SystemExit(f"--tokens {T}: must be divisible by 2 x CP = {2 * cp}")
    rows = []
    for cp in cps:  # CP outermost: Megatron's parallel state is rebuilt only when CP changes
        for kind in args.layers:
            for T in args.tokens:
                for method in args.methods:
                    r = {"layer": kind, "tokens": T, "cp": cp, "method": method, **time_one(kind, method, T, cp, args)}
                    if "ms" in r:
                        r["tokens_per_s_per_gpu"] = T / cp / (r["ms"] / 1e3)
                    rows.append(r)
                    if rank == 0:
                        print(json.dumps(r), flush=True)
    order = {k: i for i, k in enumerate(args.layers)}
    rows.sort(key=lambda r: (order[r["layer"]], r["tokens"], r["cp"], r["method"] != "sp"))
    for r in rows:  # speed-up against CP=1 of the same layer, T and method
        base = next((b for b in rows if b["cp"] == 1 and "ms" in b and
                     (b["layer"], b["tokens"], b["method"]) == (r["layer"], r["tokens"], r["method"])), None)
        if "ms" in r and base is not None:
            r["speedup_vs_cp1"] = base["ms"] / r["ms"]
            r["efficiency"] = r["speedup_vs_cp1"] / r["cp"]
    if rank == 0:
        print_table(rows, device, world)
        if args.json:
            Path(args.json).parent.mkdir(parents=True, exist_ok=True)
            meta = {"device": device, "world_size": world, "torch": torch.__version__, "hidden": HIDDEN,
                    "gdn": GDN, "mamba2": MAMBA2, "sp_layout": args.layout, "warmup": args.warmup,
                    "steps": args.steps, "gdn_guard": guard.get("guard"), "dtype": "bf16", "batch": 1}
            Path(args.json).write_text(json.dumps({"config": meta, "results": rows}, indent=1))
    dist.barrier()
    dist.destroy_process_group()


def print_table(rows, device, world):
    names = {"sp": "megahybrid state passing", "a2a": "Megatron a2a"}
    print(f"\n== one layer fwd+bwd, bf16, batch 1, {world} x {device} ==")
    print(f"{'layer':7s} {'T':>7s} {'CP':>3s}  {'method':25s} {'ms':>9s} {'tok/s/GPU':>11s} "
          f"{'vs CP=1':>8s} {'eff':>5s} {'peak GiB':>9s}")
    for r in rows:
        if "ms" not in r:
            cells = f"{r['status']}"
        else:
            up = f"{r['speedup_vs_cp1']:7.2f}x {r['efficiency']:5.2f}" if "speedup_vs_cp1" in r else f"{'-':>8s} {'-':>5s}"
            cells = f"{r['ms']:9.2f} {r['tokens_per_s_per_gpu']:11,.0f} {up} {r['peak_gib']:9.2f}"
        print(f"{r['layer']:7s} {r['tokens']:7d} {r['cp']:3d}  {names[r['method']]:25s} {cells}")


if __name__ == "__main__":
    main()
