"""`megahybrid describe`: the resolved layer table with params, FLOPs/token and pipeline stage."""

from __future__ import annotations

import torch

from megahybrid.flops import head_flops_per_token, layer_flops_per_token
from megahybrid.pattern import parse, layout_string, stage_of


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
    parsed = parse(*layout_string(config.model))
    pp = config.parallel.pp
    seen: set = set()
    rows = []
    embedding = _count(model.embedding, seen)
    for block in model.layers:
        spec = block.spec
        rank, virtual = stage_of(spec, len(parsed.segments), len(parsed.main_layers), pp)
        rows.append({
            "index": spec.index, "symbol": spec.symbol, "name": spec.name,
            "params": _count(block, seen),
            "flops_per_token": layer_flops_per_token(config, spec, seq_len),
            "stage": rank, "virtual_stage": virtual,
        })
    final = _count(model.final_norm, seen)
    head = _count(model.lm_head, seen) if model.lm_head is not None else 0
    head_flops = head_flops_per_token(config)
    total = embedding + sum(r["params"] for r in rows) + final + head
    stages = {}
    for r in rows:
        s = stages.setdefault(r["stage"], {"stage": r["stage"], "params": 0, "flops_per_token": 0.0})
        s["params"] += r["params"]
        s["flops_per_token"] += r["flops_per_token"]
    return {
        "pattern": parsed.main + "".join("/" + parsed.mtp for _ in range(parsed.mtp_depths)),
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
             f"{'idx':>4} {'sym':>3}  {'name':<17}{'params':>10}{'FLOPs/tok':>11}{'stage':>6}"]
    lines.append(f"{'':>4} {'':>3}  {'embedding':<17}{_human(info['embedding_params']):>10}{'0':>11}{'':>6}")
    for r in info["layers"]:
        lines.append(f"{r['index']:>4} {r['symbol']:>3}  {r['name']:<17}{_human(r['params']):>10}"
                     f"{_human(r['flops_per_token']):>11}{r['stage']:>6}")
    lines.append(f"{'':>4} {'':>3}  {'final norm + head':<17}"
                 f"{_human(info['final_norm_params'] + info['head_params']):>10}"
                 f"{_human(info['head_flops_per_token']):>11}{'':>6}")
    if len(info["stages"]) > 1:
        for s in info["stages"]:
            lines.append(f"stage {s['stage']}: {_human(s['params'])} params, {_human(s['flops_per_token'])} FLOPs/token")
    lines.append(f"total: {info['total_params']:,} params ({_human(info['total_params'])}), "
                 f"{_human(info['flops_per_token'])} FLOPs/token forward")
    return "\n".join(lines)
