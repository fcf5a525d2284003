"""Tensor parallelism (TP) for every shardable mixer, as code: which rows/columns of each reference
parameter rank r holds, the config rules that make a split possible, and a one-process simulation
that runs every rank's shard and combines the outputs as the collectives would (issue 6).

Megatron's two linears (Shoeybi et al. 2019, arXiv 1909.08053, sec. 3):
  column-parallel  W [out, in] split on `out`; each rank computes its own heads/channels, no comm;
  row-parallel     W [out, in] split on `in`; each rank's partial product is all-reduced (summed),
                   and the bias is added once, after the sum ("after_reduce" below).
A mixer is column-parallel in, per-head/per-channel math in the middle, row-parallel out, so the
only collective in a forward is the all-reduce of the output projection.

Fused projections are split PER COMPONENT: Mamba2's in_proj rows [z | x | B | C | dt] give rank r
[z_r | x_r | B_r | C_r | dt_r] and the conv channels [x | B | C] give [x_r | B_r | C_r] (Megatron's
`MambaMixer` does the same; slicing the fused matrix contiguously hands rank 0 all of z and half of
x, which is the classic bug; tests/cpu/test_tensor_parallel.py shows it fails). The same holds for
gated MLP expert weights [gate | up].

Rules (mixer -> what splits; constraint checked by `check_tp`):
  attention   q heads (with their output-gate rows), kv heads; o_proj rows-in. H % tp == 0 and
              kv % tp == 0, or tp % kv == 0: then kv heads are replicated, rank r holding kv head
              r // (tp / kv) (Megatron `Attention.__init__`, `num_query_groups < world_size`).
              q_norm/k_norm weights are replicated (their gradient is a sum over ranks).
  mamba2      heads (x, z, dt, A_log, D, dt_bias, norm) and B/C groups; nheads % tp, ngroups % tp
              (Megatron `MambaMixer`: the gated norm is per group, so a group may not straddle ranks).
  gdn         q/k heads and v heads (a, b, g, A_log, dt_bias per v head); both % tp. o_norm replicated.
  deltanet    heads; heads % tp. o_norm replicated.
  rglru       channels of linear_x/y, conv and recurrence, in whole gate blocks: num_heads % tp.
  mlp         gate/up columns, down rows; ffn width % tp.
  moe         experts over ep (E % ep), each expert's width over etp (width % etp); the router is
              replicated; the shared expert is a TP MLP (width % tp).
Not sharded here: hymba, mamba1, shared_attention (`check_tp` says so for tp > 1).
"""

from __future__ import annotations

import copy
from dataclasses import dataclass
from typing import Literal, Optional

import torch
from torch.func import functional_call

from megahybrid.config import ConfigError, fail
from megahybrid.mixers import by_name
from megahybrid.mixers.mlp import expert_ffn, is_gated, mlp_width


@dataclass(frozen=True)
class ParamShard:
    """Where one rank's shard of a parameter sits in the full tensor."""

    dim: int
    index: Optional[torch.Tensor]
    """Positions along `dim` this rank holds (None = the whole tensor: replicated)."""
    reduce: Literal["sum", "first"] = "sum"
    """How the full gradient comes back from the ranks' gradients: "sum" (split parameters, and
    replicated ones each rank uses on its own heads); "first" (replicated parameters used once on
    the combined result - row-parallel biases after the all-reduce, the MoE router - rank 0's)."""


def _pieces(sizes: list[int], piece: int, num_pieces: int) -> torch.Tensor:
    """Indices of piece `piece` of `num_pieces` equal pieces of EACH component of `sizes` (laid out
    one after another), concatenated: the per-component split of a fused dimension."""
    out, start = [], 0
    for s in sizes:
        w = s // num_pieces
        out.append(torch.arange(start + piece * w, start + (piece + 1) * w))
        start += s
    return torch.cat(out)


def _model(config):
    return getattr(config, "model", config)


def _etp(config, tp: int) -> int:
    p = getattr(config, "parallel", None)
    return tp if p is None or p.etp is None else p.etp


def _ep(config) -> int:
    p = getattr(config, "parallel", None)
    return 1 if p is None else p.ep


# ----------------------------------------------------------------------------- rules per mixer
# Each returns {parameter name: ParamShard, or a tuple of them (one per sliced dim)} for rank `r`
# of `tp`, given the full state dict's keys.
# of `tp`, given the full state dict's keys.


def _column(parts: list[int], r: int, tp: int, bias: bool, name: str) -> dict[str, ParamShard]:
    rows = _pieces(parts, r, tp)
    out = {f"{name}.weight": ParamShard(0, rows)}
    if bias:
        out[f"{name}.bias"] = ParamShard(0, rows)
    return out


def _row(width: int, r: int, tp: int, bias: bool, name: str) -> dict[str, ParamShard]:
    out = {f"{name}.weight": ParamShard(1, _pieces([width], r, tp))}
    if bias:
        out[f"{name}.bias"] = ParamShard(0, None, "first")
    return out


def _attention_rules(config, keys, r: int, tp: int) -> dict[str, ParamShard]:
    m = _model(config)
    a = m.attention
    H, kv = a.num_heads, a.num_kv_heads or a.num_heads
    D = a.head_dim or m.hidden_size // H
    q_rows = H * D * (2 if a.output_gate else 1)  # per head [q_h | gate_h]: whole heads stay together
    rules = {**_column([q_rows], r, tp, a.bias, "q_proj"), **_row(H * D, r, tp, a.bias, "o_proj")}
    kv_piece, kv_pieces = (r, tp) if kv >= tp else (r // (tp // kv), kv)  # replicated kv heads
    for name in ("k_proj", "v_proj"):
        rows = _pieces([kv * D], kv_piece, kv_pieces)
        rules[f"{name}.weight"] = ParamShard(0, rows)
        if a.bias:
            rules[f"{name}.bias"] = ParamShard(0, rows)
    for name in ("q_norm.weight", "k_norm.weight"):
        rules[name] = ParamShard(0, None)
    return rules


def _mamba2_rules(config, keys, r: int, tp: int) -> dict[str, ParamShard]:
    from megahybrid.mixers.mamba2 import ssd_sizes
    m = _model(config)
    d_inner, nh, G, N, _ = ssd_sizes(m)
    bias = m.mamba2.use_bias
    rules = {**_column([d_inner, d_inner, G * N, G * N, nh], r, tp, bias, "in_proj"),  # [z|x|B|C|dt]
             **_column([d_inner, G * N, G * N], r, tp, m.mamba2.use_conv_bias, "conv1d"),  # [x|B|C]
             **_row(d_inner, r, tp, bias, "out_proj")}
    for name in ("dt_bias", "A_log", "D"):
        rules[name] = ParamShard(0, _pieces([nh], r, tp))
    rules["norm.weight"] = ParamShard(0, _pieces([d_inner], r, tp))
    return rules


def _gdn_rules(config, keys, r: int, tp: int) -> dict[str, ParamShard]:
    from megahybrid.mixers.gated_deltanet import gdn_sizes
    m = _model(config)
    Hk, Hv, dk, dv = gdn_sizes(m)
    rules = {}
    for name, width in [("q_proj", Hk * dk), ("k_proj", Hk * dk), ("v_proj", Hv * dv), ("a_proj", Hv),
                        ("b_proj", Hv), ("g_proj", Hv * dv), ("q_conv1d", Hk * dk), ("k_conv1d", Hk * dk),
                        ("v_conv1d", Hv * dv)]:
        rules.update(_column([width], r, tp, False, name))
    rules.update(_row(Hv * dv, r, tp, False, "o_proj"))
    rules["A_log"] = rules["dt_bias"] = ParamShard(0, _pieces([Hv], r, tp))
    rules["o_norm.weight"] = ParamShard(0, None)
    return rules


def _deltanet_rules(config, keys, r: int, tp: int) -> dict[str, ParamShard]:
    from megahybrid.mixers.deltanet import deltanet_sizes
    m = _model(config)
    H, dk, dv = deltanet_sizes(m)
    rules = {}
    for name, width in [("q_proj", H * dk), ("k_proj", H * dk), ("v_proj", H * dv), ("b_proj", H),
                        ("g_proj", H * dv), ("q_conv1d", H * dk), ("k_conv1d", H * dk), ("v_conv1d", H * dv)]:
        rules.update(_column([width], r, tp, False, name))
    rules.update(_row(H * dv, r, tp, False, "o_proj"))
    rules["o_norm.weight"] = ParamShard(0, None)
    return rules


def _rglru_rules(config, keys, r: int, tp: int) -> dict[str, ParamShard]:
    m = _model(config)
    c = m.rglru
    W, nh = c.width or m.hidden_size, c.num_heads
    rules = {**_column([W], r, tp, c.bias, "linear_x"), **_column([W], r, tp, c.bias, "linear_y"),
             **_column([W], r, tp, True, "conv_1d"), **_row(W, r, tp, c.bias, "linear_out")}
    rules["rg_lru.recurrent_param"] = ParamShard(0, _pieces([W], r, tp))
    heads = _pieces([nh], r, tp)  # whole gate blocks: the gate weights are [nh, W/nh, W/nh]
    for name in ("input_gate_weight", "input_gate_bias", "recurrent_gate_weight", "recurrent_gate_bias"):
        rules[f"rg_lru.{name}"] = ParamShard(0, heads)
    return rules


def _mlp_rules(config, keys, r: int, tp: int, prefix: str = "", width: Optional[int] = None,
               activation: Optional[str] = None, bias: Optional[bool] = None) -> dict[str, ParamShard]:
    m = _model(config)
    width = mlp_width(m) if width is None else width
    activation = m.mlp.activation if activation is None else activation
    bias = m.mlp.bias if bias is None else bias
    rules = {**_column([width], r, tp, bias, f"{prefix}up_proj"), **_row(width, r, tp, bias, f"{prefix}down_proj")}
    if is_gated(activation):
        rules.update(_column([width], r, tp, bias, f"{prefix}gate_proj"))
    return rules


def _moe_rules(config, keys, r: int, tp: int, ep_rank: int = 0) -> dict[str, ParamShard]:
    """Rank (`ep_rank`, tp rank `r`): experts of `ep_rank`, width piece `r % etp` of each; the
    shared expert's TP piece r; the router whole (used once, before dispatch)."""
    from megahybrid.mixers.moe import expert_width, shared_expert_width
    m = _model(config)
    moe = m.moe
    ep, etp, E, width = _ep(config), _etp(config, tp), moe.num_experts, expert_width(m)
    experts = _pieces([E], ep_rank, ep)
    in_parts = [width, width] if is_gated(moe.activation) else [width]  # [gate | up]: per component
    w_in = "experts.gate_up_proj" if is_gated(moe.activation) else "experts.up_proj"
    rules = {"router.weight": ParamShard(0, None, "first"),
             # [E, rows, H] and [E, H, I]: the expert dim, then each expert's width.
             w_in: (ParamShard(0, experts), ParamShard(1, _pieces(in_parts, r % etp, etp))),
             "experts.down_proj": (ParamShard(0, experts), ParamShard(2, _pieces([width], r % etp, etp)))}
    if shared_expert_width(m):
        rules.update(_mlp_rules(config, keys, r, tp, "shared_expert.", shared_expert_width(m), moe.activation, False))
    return rules


RULES = {"attention": _attention_rules, "swa": _attention_rules, "mamba2": _mamba2_rules, "gdn": _gdn_rules,
         "deltanet": _deltanet_rules, "rglru": _rglru_rules, "mlp": _mlp_rules, "moe": _moe_rules}
"""Long layer name -> rule function; layer types missing here cannot be tensor-parallel yet."""


def tp_layout(layer_type: str, config, keys, rank: int, tp: int, **kw) -> dict[str, list[ParamShard]]:
    """{parameter name: [ParamShard, ...]} (one per sliced dim) for `rank` of `tp`; every key of
    the state dict must have a rule (a new parameter without one is an error, not a silent copy)."""
    name = by_name(layer_type).name if by_name(layer_type) else layer_type
    if name not in RULES:
        raise ConfigError(f"parallel.tp={tp}: layer type {name!r} has no tensor-parallel rule "
                          f"(shardable: {', '.join(sorted(RULES))})")
    rules = RULES[name](config, keys, rank, tp, **kw)
    out = {k: list(v) if isinstance(v, tuple) else [v] for k, v in rules.items()}
    missing = [k for k in keys if k not in out]
    if missing:
        raise KeyError(f"{name}: no TP rule for parameters {missing}")
    return {k: out[k] for k in keys}


def _slice(t: torch.Tensor, rules: list[ParamShard]) -> torch.Tensor:
    for s in rules:
        if s.index is not None:
            t = t.index_select(s.dim, s.index.to(t.device))
    return t


def shard_state_dict(layer_type: str, config, state_dict: dict, rank: int, tp: int, **kw) -> dict:
    """Rank `rank`'s shard of a reference mixer's state dict (MoE: pass `ep_rank=`)."""
    check_tp(config, tp, [layer_type])
    layout = tp_layout(layer_type, config, list(state_dict), rank, tp, **kw)
    return {k: _slice(v, layout[k]) for k, v in state_dict.items()}


def unshard_grads(layer_type: str, config, full_state_dict: dict, rank_grads: dict, tp: int) -> dict:
    """Full gradients from the ranks' shard gradients: `rank_grads` maps a rank key (`r`, or
    `(ep_rank, r)` for MoE) to {name: grad or None}. Split parts are placed, replicated parts
    summed (what the TP all-reduce of their gradients does), "first" ones taken from one rank."""
    out = {k: torch.zeros_like(v) for k, v in full_state_dict.items()}
    taken: set[str] = set()
    for key, grads in rank_grads.items():
        r, kw = (key[1], {"ep_rank": key[0]}) if isinstance(key, tuple) else (key, {})
        layout = tp_layout(layer_type, config, list(full_state_dict), r, tp, **kw)
        for name, g in grads.items():
            if g is None:
                continue
            rules = layout[name]
            if any(s.reduce == "first" for s in rules):
                if name not in taken:
                    out[name] = g.clone()
                    taken.add(name)
                continue
            sliced = [s for s in rules if s.index is not None]
            # Put g back where the shard came from, undoing the slices innermost first.
            shapes = [out[name].shape]
            for s in sliced[:-1]:
                shapes.append(out[name].index_select(s.dim, s.index).shape)
            for s, shape in zip(reversed(sliced), reversed(shapes)):
                g = g.new_zeros(shape).index_add_(s.dim, s.index, g)
            out[name] += g
    return out


# ----------------------------------------------------------------------------- config rules


def _need(ok: bool, path: str, value, rule: str) -> None:
    if not ok:
        fail(path, value, rule)


def check_tp(config, tp: int, layer_types=None) -> None:
    """Raise a one-line `ConfigError` (mixer, field, constraint) if a layer cannot split over `tp`
    (and, for MoE, `parallel.ep` / `parallel.etp`). `layer_types` None = the config's pattern."""
    m = _model(config)
    if layer_types is None:
        from megahybrid.pattern import resolve_layers
        layer_types = sorted({s.name for s in resolve_layers(config)})
    for lt in layer_types:
        name = by_name(lt).name if by_name(lt) else lt
        where = f"(parallel.tp={tp}, {name})"
        if name in ("attention", "swa"):
            a = m.attention
            kv = a.num_kv_heads or a.num_heads
            _need(a.num_heads % tp == 0, "model.attention.num_heads", a.num_heads, f"must be divisible by tp {where}")
            _need(kv % tp == 0 or tp % kv == 0, "model.attention.num_kv_heads", kv,
                  f"must be a multiple or a divisor of tp {where}; Megatron replicates kv heads only when tp % kv == 0")
        elif name == "mamba2":
            from megahybrid.mixers.mamba2 import ssd_sizes
            _, nh, G, _, _ = ssd_sizes(m)
            _need(nh % tp == 0, "model.mamba2.head_dim", m.mamba2.head_dim,
                  f"gives {nh} heads (expand*hidden_size/head_dim), not divisible by tp {where}")
            _need(G % tp == 0, "model.mamba2.num_groups", G,
                  f"must be divisible by tp {where}: a B/C group and its norm group may not straddle ranks")
        elif name == "gdn":
            from megahybrid.mixers.gated_deltanet import gdn_sizes
            Hk, Hv, _, _ = gdn_sizes(m)
            _need(Hk % tp == 0, "model.gdn.num_qk_heads", Hk, f"must be divisible by tp {where}")
            _need(Hv % tp == 0, "model.gdn.num_v_heads", Hv, f"must be divisible by tp {where}")
        elif name == "deltanet":
            _need(m.deltanet.num_heads % tp == 0, "model.deltanet.num_heads", m.deltanet.num_heads,
                  f"must be divisible by tp {where}")
        elif name == "rglru":
            _need(m.rglru.num_heads % tp == 0, "model.rglru.num_heads", m.rglru.num_heads,
                  f"must be divisible by tp {where}: each rank holds whole block-diagonal gate blocks")
        elif name == "mlp":
            w = mlp_width(m)
            _need(w % tp == 0, "model.mlp.ffn_hidden_size", w, f"must be divisible by tp {where}")
        elif name == "moe":
            from megahybrid.mixers.moe import expert_width, shared_expert_width
            ep, etp = _ep(config), _etp(config, tp)
            _need(m.moe.num_experts % ep == 0, "model.moe.num_experts", m.moe.num_experts,
                  f"must be divisible by parallel.ep={ep} ({name})")
            _need(expert_width(m) % etp == 0, "model.moe.ffn_hidden_size", expert_width(m),
                  f"must be divisible by parallel.etp={etp} ({name})")
            _need(shared_expert_width(m) % tp == 0, "model.moe.shared_ffn_hidden_size", shared_expert_width(m),
                  f"must be divisible by tp {where}")
        elif tp > 1:
            fail("parallel.tp", tp, f"layer type {name!r} has no tensor-parallel rule; use tp=1 "
                 f"(shardable: {', '.join(sorted(RULES))})")


# ----------------------------------------------------------------------------- simulation


def _rank_module(layer_type: str, full, tp: int, rank: int):
    """A copy of the reference module whose size attributes are one rank's (its parameters are
    swapped in by `functional_call`)."""
    name = by_name(layer_type).name
    mod = copy.deepcopy(full)
    if name in ("attention", "swa"):
        mod.num_heads = full.num_heads // tp
        mod.num_kv_heads = max(1, full.num_kv_heads // tp)
    elif name == "mamba2":
        for attr in ("d_inner", "nheads", "ngroups", "conv_dim"):
            setattr(mod, attr, getattr(full, attr) // tp)
    elif name == "gdn":
        mod.num_qk_heads, mod.num_v_heads = full.num_qk_heads // tp, full.num_v_heads // tp
    elif name == "deltanet":
        mod.num_heads = full.num_heads // tp
    return mod


def simulate_tp(layer_type: str, config, full, shards: dict, x: torch.Tensor) -> torch.Tensor:
    """Run every rank's shard in one process and combine as the collectives would: the row-parallel
    outputs are summed (all-reduce) and the "first" parameters (output biases) added once.

    `shards` maps the rank key (`r`, or `(ep_rank, r)` for MoE) to its shard (tensors may require
    grad: gradients reach them). `full` is the reference module, used as a template only."""
    name = by_name(layer_type).name
    if name == "moe":
        return _simulate_moe(config, full, shards, x)
    tp = len(shards)
    keys = list(full.state_dict())
    y = 0
    for r, shard in shards.items():
        layout = tp_layout(name, config, keys, r, tp)
        once = [k for k in keys if any(s.reduce == "first" for s in layout[k])]
        params = {k: (torch.zeros_like(v) if k in once else v) for k, v in shard.items()}
        y = y + functional_call(_rank_module(name, full, tp, r), params, (x,))[0]
    for k in once:  # row-parallel biases: after the all-reduce
        y = y + shards[0][k]
    return y


def _simulate_moe(config, full, shards: dict, x: torch.Tensor) -> torch.Tensor:
    """Routing once with the (replicated) router; each (ep_rank, r) rank runs its experts on their
    tokens with its width piece (the r < etp ranks: with etp < tp the other TP ranks hold copies);
    the shared expert on ep_rank 0's TP ranks; everything summed (the combine all-to-all + TP
    all-reduce)."""
    from megahybrid.mixers.moe import route, sort_by_expert
    moe = full
    tp = 1 + max(r for _, r in shards)
    ep, etp = _ep(config), _etp(config, tp)
    shape = x.shape
    xf = x.reshape(-1, shape[-1])
    logits = xf @ shards[(0, 0)]["router.weight"].T
    weights, experts, _ = route(logits, moe.top_k, moe.router_type, moe.norm_topk_prob)
    order, counts = sort_by_expert(experts, moe.num_experts, moe.capacity(xf.shape[0]))
    token, w = order // moe.top_k, weights.flatten()[order, None]
    starts = [0]
    for c in counts:
        starts.append(starts[-1] + c)
    local = moe.num_experts // ep
    w_in_key = "experts.gate_up_proj" if is_gated(moe.experts.activation) else "experts.up_proj"
    y = torch.zeros_like(xf)
    for (ep_rank, r), shard in shards.items():
        if r < etp:
            for j in range(local):
                e = ep_rank * local + j
                t, wt = token[starts[e]:starts[e + 1]], w[starts[e]:starts[e + 1]]
                if t.numel():
                    out = expert_ffn(xf[t], shard[w_in_key][j], shard["experts.down_proj"][j], moe.experts.activation)
                    y = y.index_add(0, t, out * wt)
        if ep_rank == 0 and moe.shared_expert is not None:
            params = {k[len("shared_expert."):]: v for k, v in shard.items() if k.startswith("shared_expert.")}
            y = y + functional_call(moe.shared_expert, params, (xf,))[0]
    return y.reshape(shape)
