"""Per-rank memory and FLOPs of a parallel layout (`megahybrid describe --parallel`, issue 6): bytes
of parameters, gradients, optimizer state and activations on every pipeline rank, so a user can pick
TP / PP / VPP / EP / CP / DP, sequence parallelism (SP), the distributed optimizer and recompute
before launching. Megatron-Core's bf16 mixed precision is the model; t = tp, s = seq_len / cp tokens
per rank, b = micro-batch, h = hidden, V = vocab.

Model state, per rank
  parameters   2 B/param (bf16). Which tensors split over TP / EP is `parallel/tensor.py`'s rules
               (RULES; every rank of a group holds as many as rank 0): a Mamba2 in_proj, conv and the
               per-head A_log / D / dt_bias split with the heads (Megatron's `MambaMixer`), GDN's o_norm
               and attention's q/k norms replicate, experts split over ep then each expert's width over
               etp. Block pre-norms and the final norm replicate. The embedding (and an untied head)
               split vocab rows over TP (`VocabParallelEmbedding`: vocab % tp == 0, no padding here);
               tied embeddings with pp > 1 keep a second copy on the last stage for the head
               (Megatron's `shared_embedding_or_output_weight`). A parameter no rule names replicates.
  gradients    4 B/param: fp32 main grads (`accumulate_allreduce_grads_in_fp32`, on with bf16). The
               distributed optimizer reduce-scatters into the same full-size buffer: not divided.
  optimizer    Adam: fp32 master weight + exp_avg + exp_avg_sq = 12 B/param. The distributed optimizer
               shards it over the data-parallel group with CP (dp * cp) for dense parameters and over
               the expert-data-parallel group (tp * cp * dp / (ep * etp)) for expert parameters (Megatron
               docs/distrib_optimizer.md: bf16 params + fp32 grads = 6 + 12/d B/param).

Activations: what each block stores for backward per micro-batch (Korthikanti et al. 2022, arXiv
2205.05198, sec. 4), 2 B per element (bf16) unless said fp32. Three regions:
  sequence   h-wide tensors outside the TP region: divided by t only with SP (the paper's sec. 4.2.2;
             with SP a linear keeps its sharded input and re-gathers it in backward):
             every block: norm input 2h, mixer input (the norm output, first linear's input) 2h,
             residual dropout mask 1h (only with dropout).
  tensor     inside the TP region, per rank (widths / t); listed per mixer below.
  core       attention's score part, which selective recompute (Megatron `recompute_modules=
             ["core_attn"]`, the paper's sec. 5) drops; Megatron has no selective recompute for the
             other mixers, so theirs stay.
  attention  Q 2aD, K and V 2gD each (a = heads / t, g = kv heads per rank: kv / t, or 1 when tp > kv
             replicates them), o_proj input 2aD; output gate: + gate 2aD + ungated output 2aD; qk norm:
             + pre-norm q, k 2(a + g)D. Core: flash attention (TE / FA, the default) keeps the fp32
             log-sum-exp 4a; the paper's materialised softmax keeps 2a*keys (+ 3a*keys with dropout:
             mask + dropout output), keys = s (sliding window: min(window, s)).
             With the paper's GPT (MHA, 4h GELU MLP, dropout, no flash) the totals are its Table 2:
             sbh(34 + 5as/h) per layer, sbh(10 + 24/t + 5as/(ht)) with TP, sbh/t (34 + 5as/h) with
             SP, 34sbh/t with SP + selective (tests/cpu/test_describe_parallel.py checks them).
  mlp        fc1 output 2F (gated: [gate | up] 4F) and fc2 input 2F, F = width / t.
  moe        balanced routing: each rank computes top_k * etp * s*b/t token copies (its 1/t share of
             the tokens, gathered over etp, spread over ep), each keeping the permuted input 2h, fc1
             output and fc2 input as the MLP (width / etp), and its output 2h (the weighted combine's
             gradient w.r.t. the routing weights needs it); router probabilities fp32 4E per token
             (sequence region); a shared expert as a TP MLP.
  mamba2     mamba-ssm's `mamba_split_conv1d_scan_combined` (Megatron's memory-efficient path) keeps
             the in_proj output zxbcdt 2(2d_inner + 2GN + nheads), the SSM output y 2d_inner and the
             gated norm's fp32 rstd 4G; out_proj keeps its input 2d_inner (all / t). x, B, C, dt and the
             chunk states are recomputed in backward.
  gdn        FLA `chunk_gated_delta_rule` (+ Megatron's GatedDeltaNet around it): the conv input 2(2Hk dk +
             Hv dv); q, k, v after conv 2(2Hk dk + Hv dv); the l2norm rstd fp32 8Hk; g fp32 4Hv, beta (raw
             and sigmoid) 4Hv, the gate input a 2Hv, the WY matrix A 2*64*Hv (chunk 64); the gated output
             norm keeps o 2Hv dv, z 2Hv dv and rstd fp32 4Hv; o_proj input 2Hv dv (all / t).
  deltanet   FLA `chunk_delta_rule`: as gdn with H heads, no g / a, beta 2H (if use_beta), A 2*chunk*H;
             the conv input only with a conv; the output gate z only with output_gate.
  rglru      Griffin's recurrent block: linear_y output 2W and its GELU 2W, the conv input 2W, the
             RG-LRU input 2W, the two gate pre-activations 4W, the gated input 2W, the hidden states 2W
             (a parallel scan's backward reads them) and linear_out's input 2W (W = width / t).
  other mixers (mamba1, hymba, shared attention, ...): no estimate yet; reported as None and left out
             of the totals, which say so.
  recompute=full: each block keeps only its input 2h (sequence region; Megatron's uniform method, one
             layer per checkpoint), plus, once per rank, the working set of the largest block while it
             is recomputed in backward.
  last stage: final norm input 2h and head input 2h (sequence region) and the fp32 logits 4V/t for the
             loss (the paper's sec. 4.3); first stage: the embedding dropout mask 1h with dropout.

Pipeline: rank r holds the activations of the micro-batches in flight at its peak. 1F1B (no vpp):
min(pp - r, m) micro-batches (m = micro-batches per step). Interleaved (vpp): Megatron's order,
simulated here: warm-up (pp - r - 1) * 2 + (vpp - 1) * pp forwards (at most m * vpp), then one forward
and one backward in turn, model chunks from `get_schedule_table` with microbatch_group_size_per_vp_stage
= pp (Megatron-Core 0.19 `schedules.py`). FLOPs per rank and step: 3 x forward (flops.py) of the rank's
layers (+ head on the last) x tokens / (dp * cp * tp); recompute adds a forward (full) or the attention
core's forward (selective).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Optional

import torch

from megahybrid.config import fail
from megahybrid.flops import TRAIN_FACTOR, head_flops_per_token, layer_flops_per_token
from megahybrid.mixers import REGISTRY
from megahybrid.pattern import pipeline_pattern, resolve_layers, stage_of

BF16, FP32, MASK = 2, 4, 1
ADAM_BYTES = 12
"""fp32 master weight + exp_avg + exp_avg_sq."""


@dataclass(frozen=True)
class Layout:
    """One parallel layout and batch shape, as `describe --parallel` is given it."""

    tp: int = 1
    pp: int = 1
    vpp: Optional[int] = None
    ep: int = 1
    etp: Optional[int] = None
    cp: int = 1
    dp: int = 1
    """Data-parallel size (world = tp * pp * cp * dp); not a config field: the launch decides it."""
    sp: bool = False
    distopt: bool = False
    recompute: str = "none"
    recompute_symbols: Optional[str] = None
    """recompute=full only for layers with these pattern symbols (None: all)."""
    micro_batch: int = 1
    seq_len: int = 2048
    global_batch: int = 1

    @classmethod
    def from_config(cls, config, dp: int = 1) -> "Layout":
        p, t = config.parallel, config.train
        return cls(tp=p.tp, pp=p.pp, vpp=p.vpp, ep=p.ep, etp=p.etp, cp=p.cp, dp=dp, sp=p.sequence_parallel,
                   distopt=p.distributed_optimizer, recompute=p.recompute,
                   recompute_symbols=p.recompute_symbols, micro_batch=t.micro_batch_size,
                   seq_len=t.seq_len, global_batch=t.global_batch_size)

    @property
    def expert_tp(self) -> int:
        return self.tp if self.etp is None else self.etp

    @property
    def expert_dp(self) -> int:
        return self.tp * self.cp * self.dp // (self.ep * self.expert_tp)

    @property
    def world(self) -> int:
        return self.tp * self.pp * self.cp * self.dp

    @property
    def microbatches(self) -> int:
        """Micro-batches per step on one data-parallel rank."""
        return self.global_batch // (self.micro_batch * self.dp)


@dataclass(frozen=True)
class Assumptions:
    """How attention's core is stored: flash attention (the fast paths of both backends) and no dropout
    (megahybrid's models have none); `flash_attention=False, dropout=True` is the paper's GPT."""

    flash_attention: bool = True
    dropout: bool = False


# ----------------------------------------------------------------------------- checks


def check_layout(config, layout: Layout) -> None:
    """One-line errors for layouts that cannot be built (the per-mixer TP rules are `check_tp`'s)."""
    from megahybrid.parallel.tensor import check_tp

    L, m = layout, config.model
    if L.dp < 1:
        fail("dp", L.dp, "must be >= 1 (data-parallel size)")
    if L.micro_batch < 1:
        fail("train.micro_batch_size", L.micro_batch, "must be >= 1")
    check_tp(config, L.tp)
    if m.vocab_size % L.tp:
        fail("model.vocab_size", m.vocab_size, f"must be divisible by parallel.tp={L.tp} (the embedding and "
             "head split their vocab rows evenly); pad the vocabulary")
    symbols = {s.symbol for s in resolve_layers(config)}
    experts = any(REGISTRY[s].name == "moe" for s in symbols)
    if experts:
        if (L.tp * L.cp * L.dp) % (L.ep * L.expert_tp):
            fail("parallel.ep", L.ep, f"ep x etp = {L.ep * L.expert_tp} must divide tp x cp x dp = "
                 f"{L.tp * L.cp * L.dp} (experts are laid over the same ranks); change ep, etp or dp")
        if L.ep > 1 and L.tp > 1 and not L.sp:
            fail("parallel.sequence_parallel", False, "Megatron needs sequence parallelism with both expert "
                 "and tensor parallelism (ep > 1, tp > 1); set it to true")
    elif L.ep > 1:
        fail("parallel.ep", L.ep, "the pattern has no MoE ('E') layer to spread over experts; set it to 1")
    if L.global_batch % (L.micro_batch * L.dp):
        need = L.micro_batch * L.dp
        fail("train.global_batch_size", L.global_batch, f"must be a multiple of micro-batch x dp = {need}; "
             f"use e.g. {need * max(L.pp, 1)} (--global-batch)")
    if L.seq_len % L.cp:
        fail("train.seq_len", L.seq_len, f"must be divisible by parallel.cp={L.cp}")
    if L.vpp is not None and L.pp > 1:
        if L.microbatches < L.pp or L.microbatches % L.pp:
            use = L.micro_batch * L.dp * L.pp * max(1, L.microbatches // L.pp)
            fail("train.global_batch_size", L.global_batch, f"gives {L.microbatches} micro-batches per step; "
                 f"the interleaved schedule (parallel.vpp) needs a multiple of parallel.pp={L.pp} (Megatron's "
                 f"microbatch_group_size_per_vp_stage = pp): use {use}")


# ----------------------------------------------------------------------------- parameters


def _shard_numel(shape, rules) -> int:
    sizes = list(shape)
    for r in rules:
        if r.index is not None:
            sizes[r.dim] = len(r.index)
    n = 1
    for s in sizes:
        n *= s
    return n


def mixer_param_shards(config, spec, mixer, tp: int) -> tuple[dict, list[str]]:
    """({parameter: (elements one rank holds, is an expert weight)}, names no rule covers) for `mixer`
    at `tp` (ep / etp from config.parallel): the shard sizes `parallel/tensor.py`'s rules give rank 0.
    A parameter no rule names is counted whole (replicated)."""
    from megahybrid.parallel.tensor import RULES

    named = dict(mixer.named_parameters(remove_duplicate=False))
    use_rules = spec.name in RULES and (tp > 1 or spec.name == "moe")
    rules = RULES[spec.name](config, list(named), 0, tp) if use_rules else {}
    out, unruled = {}, []
    for name, p in named.items():
        rule = rules.get(name)
        if rule is None and use_rules:
            unruled.append(name)
        n = p.numel() if rule is None else _shard_numel(p.shape, rule if isinstance(rule, tuple) else (rule,))
        out[name] = (n, name.startswith("experts."))
    return out, unruled


def _meta_model(config):
    from megahybrid.reference.model import ReferenceLM

    with torch.device("meta"):
        return ReferenceLM(config)


# ----------------------------------------------------------------------------- activations


@dataclass
class Act:
    """Bytes per token of one block, by region (module docstring)."""

    sequence: float = 0.0
    tensor: float = 0.0
    core: float = 0.0


def _attention_act(config, L: Layout, A: Assumptions, s: int, window: Optional[int]) -> Act:
    m = config.model
    a = m.attention
    H, kv = a.num_heads, a.num_kv_heads or a.num_heads
    D = a.head_dim or m.hidden_size // H
    ar, gr = H / L.tp, (kv / L.tp if kv >= L.tp else 1)
    t = BF16 * (ar * D + 2 * gr * D + ar * D)  # Q, K, V, o_proj input
    if a.output_gate:
        t += BF16 * 2 * ar * D
    if a.qk_norm:
        t += BF16 * (ar + gr) * D
    keys = s if window is None else min(window, s)
    if A.flash_attention:
        core = FP32 * ar
    else:
        core = BF16 * ar * keys + ((MASK + BF16) * ar * keys if A.dropout else 0.0)
    return Act(tensor=t, core=core)


def _ffn_tensor_bytes(width_per_rank: float, activation: str) -> float:
    from megahybrid.mixers.mlp import is_gated

    return BF16 * ((2 if is_gated(activation) else 1) * width_per_rank + width_per_rank)


def _mlp_act(config, L: Layout, A: Assumptions, s: int) -> Act:
    from megahybrid.mixers.mlp import mlp_width

    m = config.model
    return Act(tensor=_ffn_tensor_bytes(mlp_width(m) / L.tp, m.mlp.activation))


def _moe_act(config, L: Layout, A: Assumptions, s: int) -> Act:
    from megahybrid.mixers.moe import expert_width, shared_expert_width

    m = config.model
    moe, h, etp = m.moe, m.hidden_size, L.expert_tp
    copies = moe.top_k * etp / L.tp  # token copies per rank per token of the micro-batch
    per_copy = BF16 * h + _ffn_tensor_bytes(expert_width(m) / etp, moe.activation) + BF16 * h
    shared = _ffn_tensor_bytes(shared_expert_width(m) / L.tp, moe.activation) if shared_expert_width(m) else 0.0
    return Act(sequence=FP32 * moe.num_experts, tensor=copies * per_copy + shared)


def _mamba2_act(config, L: Layout, A: Assumptions, s: int) -> Act:
    from megahybrid.mixers.mamba2 import ssd_sizes

    d_inner, nh, G, N, _ = ssd_sizes(config.model)
    t = BF16 * (2 * d_inner + 2 * G * N + nh) + BF16 * d_inner + BF16 * d_inner
    if config.model.mamba2.gated_norm:
        t += FP32 * G
    return Act(tensor=t / L.tp)


def _gdn_act(config, L: Layout, A: Assumptions, s: int) -> Act:
    from megahybrid.mixers.gated_deltanet import gdn_sizes

    Hk, Hv, dk, dv = gdn_sizes(config.model)
    qkv = 2 * Hk * dk + Hv * dv
    chunk = config.model.gdn.chunk_size
    t = (BF16 * qkv * 2 + FP32 * 2 * Hk + FP32 * Hv + BF16 * 2 * Hv + BF16 * Hv + BF16 * chunk * Hv
         + BF16 * 2 * Hv * dv + FP32 * Hv + BF16 * Hv * dv)
    return Act(tensor=t / L.tp)


def _deltanet_act(config, L: Layout, A: Assumptions, s: int) -> Act:
    from megahybrid.mixers.deltanet import deltanet_sizes

    c = config.model.deltanet
    H, dk, dv = deltanet_sizes(config.model)
    qkv = 2 * H * dk + H * dv
    t = BF16 * qkv * ((2 if c.conv_kernel > 0 else 1)) + FP32 * 2 * H + BF16 * c.chunk_size * H
    t += BF16 * H if c.use_beta else 0
    t += BF16 * H * dv * (2 if c.output_gate else 1) + FP32 * H + BF16 * H * dv
    return Act(tensor=t / L.tp)


def _rglru_act(config, L: Layout, A: Assumptions, s: int) -> Act:
    m = config.model
    W = m.rglru.width or m.hidden_size
    return Act(tensor=BF16 * 9 * W / L.tp)


ESTIMATES = {
    "attention": lambda c, L, A, s: _attention_act(c, L, A, s, None),
    "swa": lambda c, L, A, s: _attention_act(c, L, A, s, c.model.attention.window),
    "mlp": _mlp_act, "moe": _moe_act, "mamba2": _mamba2_act, "gdn": _gdn_act, "deltanet": _deltanet_act,
    "rglru": _rglru_act,
}
"""Long layer name -> bytes per token of its mixer (the module docstring derives each)."""


def block_activation_bytes(config, spec, layout: Layout, assumptions: Assumptions = Assumptions()) -> Optional[dict]:
    """{"none", "selective", "full"} -> bytes one block keeps for one micro-batch on one rank
    (None: no estimate for this layer type)."""
    L, A = layout, assumptions
    fn = ESTIMATES.get(spec.name)
    if fn is None:
        return None
    s = L.seq_len // L.cp
    tokens = s * L.micro_batch
    act = fn(config, L, A, s)
    h = config.model.hidden_size
    seq_div = L.tp if L.sp else 1
    sequence = BF16 * h + BF16 * h + (MASK * h if A.dropout else 0) + act.sequence
    base = tokens * (sequence / seq_div + act.tensor)
    return {"none": base + tokens * act.core, "selective": base, "full": tokens * BF16 * h / seq_div}


def edge_activation_bytes(config, layout: Layout, assumptions: Assumptions = Assumptions()) -> tuple[float, float]:
    """(first stage, last stage) extra bytes per micro-batch: the embedding dropout mask; the final norm,
    the head input and the fp32 logits (the paper's sec. 4.3)."""
    L, m = layout, config.model
    tokens = L.seq_len // L.cp * L.micro_batch
    seq_div = L.tp if L.sp else 1
    first = tokens * MASK * m.hidden_size / seq_div if assumptions.dropout else 0.0
    last = tokens * (2 * BF16 * m.hidden_size / seq_div + FP32 * m.vocab_size / L.tp)
    return first, last


# ----------------------------------------------------------------------------- pipeline schedule


def schedule_order(pp: int, rank: int, vpp: Optional[int], microbatches: int) -> list[tuple[str, int]]:
    """The (\"F\" | \"B\", model chunk) sequence rank `rank` runs in one step: Megatron's 1F1B, or its
    interleaved schedule with microbatch_group_size_per_vp_stage = pp."""
    chunks = vpp or 1
    total = microbatches * chunks
    if vpp is None:
        warmup = min(pp - rank - 1, total)
        table = [0] * total
    else:
        warmup = min((pp - rank - 1) * 2 + (chunks - 1) * pp, total)
        table = []
        for start in range(0, microbatches, pp):  # get_schedule_table
            end = microbatches if start + pp >= microbatches else start + pp
            table += [c for c in range(chunks) for _ in range(start, end)]
    order = [("F", table[k]) for k in range(warmup)]
    for k in range(total - warmup):
        order += [("F", table[warmup + k]), ("B", chunks - 1 - table[k])]
    order += [("B", chunks - 1 - table[k]) for k in range(total - warmup, total)]
    return order


def peak_in_flight(order: list[tuple[str, int]], chunk_bytes: list[float]) -> tuple[float, int]:
    """(peak activation bytes, micro-batch chunks alive at that peak) over a schedule order."""
    live = peak = 0.0
    count = peak_count = 0
    for op, chunk in order:
        live += chunk_bytes[chunk] if op == "F" else -chunk_bytes[chunk]
        count += 1 if op == "F" else -1
        if live > peak:
            peak, peak_count = live, count
    return peak, peak_count


# ----------------------------------------------------------------------------- the whole model


def _with_layout(config, layout: Layout):
    """`config` with its parallel section set from `layout` (for the TP rules that read it)."""
    p = dataclasses.replace(config.parallel, tp=layout.tp, pp=layout.pp, vpp=layout.vpp, ep=layout.ep,
                            etp=layout.etp, cp=layout.cp, sequence_parallel=layout.sp,
                            distributed_optimizer=layout.distopt, recompute=layout.recompute,
                            recompute_symbols=layout.recompute_symbols)
    return dataclasses.replace(config, parallel=p)


def _core_flops(config, spec, seq_len: int) -> float:
    """Forward FLOPs/token of attention's score part (what selective recompute re-runs)."""
    from megahybrid.mixers.attention import mean_keys

    if spec.name not in ("attention", "swa"):
        return 0.0
    m = config.model
    a = m.attention
    window = REGISTRY[spec.symbol].cls()._window_for(m)
    return 4.0 * a.num_heads * (a.head_dim or m.hidden_size // a.num_heads) * mean_keys(seq_len, window, True)


def memory_model(config, layout: Layout, assumptions: Assumptions = Assumptions()) -> dict:
    """Per pipeline rank: parameters, gradients, optimizer and activation bytes, FLOPs per step; per
    layer type: activation bytes of one block per micro-batch (the module docstring has the model)."""
    L = layout
    config = _with_layout(config, L)
    check_layout(config, L)
    m = config.model
    parsed = pipeline_pattern(config)
    model = _meta_model(config)
    chunks = L.vpp or 1
    ranks = [{"rank": r, "layers": [], "dense_params": 0, "expert_params": 0, "flops_per_token": 0.0,
              "core_flops_per_token": 0.0, "recomputed_flops_per_token": 0.0,
              "chunk_bytes": [0.0] * chunks, "full_working_bytes": 0.0,
              "unestimated": set(), "seen": set()} for r in range(L.pp)]
    per_type, unruled = {}, set()
    for block in model.layers:
        spec = block.spec
        rank, virtual = stage_of(spec, len(parsed.segments), len(parsed.main_layers), L.pp)
        R = ranks[rank]
        R["layers"].append(spec.index)
        for p in block.norm.parameters() if block.norm is not None else ():
            if id(p) not in R["seen"]:  # pre-norms replicate over TP
                R["seen"].add(id(p))
                R["dense_params"] += p.numel()
        shards, missing = mixer_param_shards(config, spec, block.mixer, L.tp)
        unruled |= {f"{spec.name}.{n}" for n in missing}
        for name, p in block.mixer.named_parameters(remove_duplicate=False):
            if id(p) not in R["seen"]:  # a weight shared between blocks (Zamba) counts once per rank
                R["seen"].add(id(p))
                n, is_expert = shards[name]
                R["expert_params" if is_expert else "dense_params"] += n
        mode = L.recompute  # full recompute may cover only some symbols (parallel.recompute_symbols)
        if mode == "full" and L.recompute_symbols is not None and spec.symbol not in L.recompute_symbols:
            mode = "none"
        layer_flops = layer_flops_per_token(config, spec, L.seq_len)
        R["flops_per_token"] += layer_flops
        R["core_flops_per_token"] += _core_flops(config, spec, L.seq_len)
        R["recomputed_flops_per_token"] += layer_flops if mode == "full" else 0.0
        act = block_activation_bytes(config, spec, L, assumptions)
        if act is None:
            R["unestimated"].add(spec.name)
            continue
        per_type.setdefault(spec.name, act)
        R["chunk_bytes"][virtual] += act[mode]
        if mode == "full":
            R["full_working_bytes"] = max(R["full_working_bytes"], act["none"])
    first_extra, last_extra = edge_activation_bytes(config, L, assumptions)
    embed = m.vocab_size // L.tp * m.hidden_size
    ranks[0]["dense_params"] += embed
    ranks[0]["chunk_bytes"][0] += first_extra
    last = ranks[L.pp - 1]
    last["chunk_bytes"][chunks - 1] += last_extra
    last["dense_params"] += sum(p.numel() for p in model.final_norm.parameters())
    if not m.tie_embeddings or L.pp > 1:
        last["dense_params"] += embed  # the head (or, tied, the last stage's copy of the embedding)
    last["flops_per_token"] += head_flops_per_token(config)

    tokens_per_step = L.global_batch * L.seq_len
    out_ranks = []
    for R in ranks:
        dense, expert = R["dense_params"], R["expert_params"]
        params = dense + expert
        opt_dense = ADAM_BYTES * dense / (L.dp * L.cp if L.distopt else 1)
        opt_expert = ADAM_BYTES * expert / (L.expert_dp if L.distopt else 1)
        order = schedule_order(L.pp, R["rank"], L.vpp if L.pp > 1 else None, L.microbatches)
        peak, alive = peak_in_flight(order, R["chunk_bytes"])
        working = R["full_working_bytes"]  # one recomputed block's activations during its backward
        activations = peak + working
        fwd = R["flops_per_token"]
        extra = {"none": 0.0, "selective": R["core_flops_per_token"], "full": R["recomputed_flops_per_token"]}[L.recompute]
        share = tokens_per_step / (L.dp * L.cp * L.tp)
        out_ranks.append({
            "rank": R["rank"], "layers": R["layers"], "params": params, "dense_params": dense,
            "expert_params": expert, "param_bytes": BF16 * params, "grad_bytes": FP32 * params,
            "optimizer_bytes": opt_dense + opt_expert,
            "activation_bytes_per_microbatch": R["chunk_bytes"], "microbatches_in_flight": alive,
            "activation_bytes": activations,
            "total_bytes": BF16 * params + FP32 * params + opt_dense + opt_expert + activations,
            "flops_per_step": TRAIN_FACTOR * fwd * share,
            "flops_per_step_with_recompute": (TRAIN_FACTOR * fwd + extra) * share,
            "unestimated": sorted(R["unestimated"]),
        })
    return {
        "layout": dataclasses.asdict(L) | {"world": L.world, "expert_dp": L.expert_dp,
                                           "microbatches": L.microbatches},
        "assumptions": dataclasses.asdict(assumptions),
        "tokens_per_step": tokens_per_step,
        "pipeline_pattern": parsed.main,
        "activation_bytes_per_layer_type": per_type,
        "ranks": out_ranks,
        "unruled_params": sorted(unruled),
    }
