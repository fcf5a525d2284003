"""`megahybrid describe`: the resolved layer table with params, FLOPs/token and pipeline stage; with
`--parallel`, the per-rank memory and FLOPs of a parallel layout (`megahybrid/memory.py`)."""

from __future__ import annotations

import torch

from megahybrid.flops import head_flops_per_token, layer_flops_per_token
from megahybrid.pattern import pipeline_pattern, stage_of
from megahybrid.taxonomy import block_label


def _count(module, seen: set) -> int:
    """Parameters of `module` not counted before (shared weights count once, at first use)."""
    total = 0
    for p in module.parameters():
        if id(p) not in seen:
            seen.add(id(p))
            total += p.numel()
    return total


def describe(config, seq_len: int | None = None) -> dict:
    """The layer table as a dict (the `--json` contract in design.md)."""
    from megahybrid.reference.model import ReferenceLM

    seq_len = seq_len or config.train.seq_len
    with torch.device("meta"):
        model = ReferenceLM(config)
    parsed = pipeline_pattern(config)
    pp = config.parallel.pp
    seen: set = set()
    rows = []
    embedding = _count(model.embedding, seen)
    for block in model.layers:
        spec = block.spec
        rank, virtual = stage_of(spec, len(parsed.segments), len(parsed.main_layers), pp)
        label, branch = block_label(spec.symbol, config)
        rows.append({
            "index": spec.index, "symbol": spec.symbol, "name": spec.name,
            "block": label, "block_branch": branch,  # MegaCpp taxonomy (megahybrid/taxonomy.py)
            "params": _count(block, seen),
            "flops_per_token": layer_flops_per_token(config, spec, seq_len),
            "stage": rank, "virtual_stage": virtual,
        })
    final = _count(model.final_norm, seen)
    head = _count(model.lm_head, seen) if model.lm_head is not None else 0
    head_flops = head_flops_per_token(config)
    total = embedding + sum(r["params"] for r in rows) + final + head
    # Per pipeline rank, with the embedding on the first and the final norm + head on the last (their
    # FLOPs are what parallel.pp_balance=flops balances).
    stages = {k: {"stage": k, "params": 0, "flops_per_token": 0.0} for k in range(pp)}
    for r in rows:
        stages[r["stage"]]["params"] += r["params"]
        stages[r["stage"]]["flops_per_token"] += r["flops_per_token"]
    stages[0]["params"] += embedding
    stages[pp - 1]["params"] += final + head
    stages[pp - 1]["flops_per_token"] += head_flops
    return {
        "pattern": parsed.main + "".join("/" + parsed.mtp for _ in range(parsed.mtp_depths)),
        "pp_balance": config.parallel.pp_balance,
        "seq_len": seq_len,
        "layers": rows,
        "embedding_params": embedding,
        "final_norm_params": final,
        "head_params": head,
        "head_flops_per_token": head_flops,
        "stages": [stages[k] for k in sorted(stages)],
        "total_params": total,
        "flops_per_token": sum(r["flops_per_token"] for r in rows) + head_flops,
    }


def _human(n: float) -> str:
    for unit, scale in (("T", 1e12), ("G", 1e9), ("M", 1e6), ("K", 1e3)):
        if abs(n) >= scale:
            return f"{n / scale:.2f}{unit}"
    return f"{n:.0f}"


def format_table(info: dict) -> str:
    lines = [f"pattern: {info['pattern']}   (FLOPs at seq_len {info['seq_len']}, forward, causal)",
             f"{'idx':>4} {'sym':>3}  {'name':<17}{'params':>10}{'FLOPs/tok':>11}{'stage':>6}  block"]
    lines.append(f"{'':>4} {'':>3}  {'embedding':<17}{_human(info['embedding_params']):>10}{'0':>11}{'':>6}")
    for r in info["layers"]:
        lines.append(f"{r['index']:>4} {r['symbol']:>3}  {r['name']:<17}{_human(r['params']):>10}"
                     f"{_human(r['flops_per_token']):>11}{r['stage']:>6}  {r['block']} {r['block_branch']}")
    lines.append(f"{'':>4} {'':>3}  {'final norm + head':<17}"
                 f"{_human(info['final_norm_params'] + info['head_params']):>10}"
                 f"{_human(info['head_flops_per_token']):>11}{'':>6}")
    if len(info["stages"]) > 1:
        for s in info["stages"]:
            lines.append(f"stage {s['stage']}: {_human(s['params'])} params, {_human(s['flops_per_token'])} FLOPs/token"
                         " (embedding / head included)")
        if info["pp_balance"] == "flops":
            lines.append(f"FLOP-balanced stages as a Megatron pattern (paste it as model.pattern): {info['pattern']}")
    lines.append(f"total: {info['total_params']:,} params ({_human(info['total_params'])}), "
                 f"{_human(info['flops_per_token'])} FLOPs/token forward")
    return "\n".join(lines)


def describe_parallel(config, dp: int = 1, seq_len: int | None = None) -> dict:
    """`describe` plus the per-rank memory model of config.parallel with `dp` data-parallel ranks."""
    import dataclasses

    from megahybrid.memory import Layout, memory_model

    if seq_len is not None:
        config = dataclasses.replace(config, train=dataclasses.replace(config.train, seq_len=seq_len))
    info = describe(config, seq_len=seq_len)
    info["parallel"] = memory_model(config, Layout.from_config(config, dp=dp))
    return info


def _bytes(n: float) -> str:
    for unit, scale in (("TiB", 2**40), ("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if abs(n) >= scale:
            return f"{n / scale:.2f} {unit}"
    return f"{n:.0f} B"


def format_parallel(mem: dict) -> str:
    """The per-rank memory table of `memory_model`'s dict."""
    L = mem["layout"]
    lines = [f"layout: tp={L['tp']} pp={L['pp']} vpp={L['vpp']} ep={L['ep']} etp={L['etp'] or L['tp']} cp={L['cp']} "
             f"dp={L['dp']} (world {L['world']}, expert-dp {L['expert_dp']}) sp={L['sp']} distopt={L['distopt']} "
             f"recompute={L['recompute']}",
             f"batch: micro-batch {L['micro_batch']} x seq {L['seq_len']}, global batch {L['global_batch']} = "
             f"{L['microbatches']} micro-batches per DP rank, {mem['tokens_per_step']:,} tokens/step",
             "activations of one block per micro-batch (none / selective / full recompute):"]
    for name, act in mem["activation_bytes_per_layer_type"].items():
        lines.append(f"  {name:<12}{_bytes(act['none']):>12}{_bytes(act['selective']):>12}{_bytes(act['full']):>12}")
    lines.append(f"{'rank':>4} {'layers':>7} {'params':>9} {'weights':>11} {'grads':>11} {'optimizer':>11} "
                 f"{'act/mb':>11} {'in-flight':>9} {'acts':>11} {'total':>11} {'FLOPs/step':>11}")
    for R in mem["ranks"]:
        lines.append(f"{R['rank']:>4} {len(R['layers']):>7} {_human(R['params']):>9} {_bytes(R['param_bytes']):>11} "
                     f"{_bytes(R['grad_bytes']):>11} {_bytes(R['optimizer_bytes']):>11} "
                     f"{_bytes(sum(R['activation_bytes_per_microbatch'])):>11} {R['microbatches_in_flight']:>9} "
                     f"{_bytes(R['activation_bytes']):>11} {_bytes(R['total_bytes']):>11} "
                     f"{_human(R['flops_per_step_with_recompute']):>11}")
        if R["unestimated"]:
            lines.append(f"      (activations of {', '.join(R['unestimated'])} not estimated: left out of acts/total)")
    if mem["unruled_params"]:
        lines.append(f"no TP rule, counted replicated: {', '.join(mem['unruled_params'])}")
    lines.append("bf16 weights, fp32 main grads, Adam 12 B/param; model: megahybrid/memory.py")
    return "\n".join(lines)


SPEC_KEYS = {"tp": "parallel.tp", "pp": "parallel.pp", "vpp": "parallel.vpp", "ep": "parallel.ep",
             "etp": "parallel.etp", "cp": "parallel.cp", "cp_layout": "parallel.cp_layout",
             "pp_balance": "parallel.pp_balance", "balance": "parallel.pp_balance",
             "sp": "parallel.sequence_parallel", "sequence_parallel": "parallel.sequence_parallel",
             "distopt": "parallel.distributed_optimizer", "distributed_optimizer": "parallel.distributed_optimizer",
             "recompute": "parallel.recompute", "mbs": "train.micro_batch_size", "gbs": "train.global_batch_size"}
"""`--parallel` keys -> config fields (`dp` is the describe-only data-parallel size); a bare key = true."""


def parse_parallel_spec(spec: str) -> tuple[list[str], int | None]:
    """"tp=2,pp=4,dp=16,sp,distopt,recompute=selective" -> (dotted overrides, dp or None)."""
    from megahybrid.config import ConfigError

    overrides, dp = [], None
    for item in filter(None, (part.strip() for part in spec.split(","))):
        key, _, value = item.partition("=")
        key, value = key.strip(), value.strip() if "=" in item else "true"
        if key == "dp":
            if not value.isdigit() or int(value) < 1:
                raise ConfigError(f"--parallel dp={value!r}: must be a positive integer (data-parallel size)")
            dp = int(value)
        elif key in SPEC_KEYS:
            overrides.append(f"{SPEC_KEYS[key]}={value}")
        else:
            raise ConfigError(f"--parallel {key!r}: unknown key; valid: dp, {', '.join(SPEC_KEYS)} "
                              "(e.g. tp=2,pp=4,dp=16,sp,distopt,recompute=selective)")
    return overrides, dp
