"""Context-parallel forward of the linear-recurrent mixers, built from their own submodules.

`forward_cp(mixer, x, comm, state)` is this rank's part of `mixer(x_whole, state)`: the projections,
norms and gates act per token and run as they are; the short convs take their halo and the
recurrence its incoming state through `state_passing`. Each function below mirrors its mixer's
`forward_segment` line for line with the two CP calls swapped in, because the mixers run their core
inside `forward_segment` (see the report of issue 7 for the hook that would remove the mirroring).
"""

from __future__ import annotations

from typing import Callable

import torch
import torch.nn.functional as F

from megahybrid.mixers.base import Mixer, State
from megahybrid.mixers.common import ShortConv
from megahybrid.mixers.delta_rule import split_heads
from megahybrid.mixers.deltanet import DeltaNet
from megahybrid.mixers.gated_deltanet import GatedDeltaNet
from megahybrid.mixers.mamba2 import Mamba2
from megahybrid.mixers.rglru import RGLRUBlock, block_diagonal_linear
from megahybrid.parallel.group import CPGroup, check_cp_length
from megahybrid.parallel.state_passing import conv_with_halo, delta_rule_heads_cp, rglru_cp, ssd_cp


def forward_cp(mixer: Mixer, x: torch.Tensor, comm: CPGroup, state: State = None):
    """This rank's part of `mixer(x_whole, state)` under context parallelism.

    x: this rank's tokens `[B, T_local, hidden]` as `comm.shard` lays them out (its slots one after
    another; the simulated group stacks every rank on the batch). state: the incoming state of the
    whole sequence, read on the rank that holds its first tokens (others may pass None).
    Returns (y like x, the state after this rank's latest token: on `comm.last_slot_rank`, the final
    state of the whole sequence)."""
    if mixer.token_wise:
        return mixer(x, need_state=False)
    forward = _cp_forward_of(mixer)
    check_cp_length(x.shape[1] * comm.size, comm.size, comm.layout, min_slot=_conv_halo(mixer))
    y, new_state = forward(mixer, comm.to_rows(x), comm, state)
    return comm.from_rows(y), {key: comm.latest(value) for key, value in new_state.items()}


def cp_token_loss(loss: torch.Tensor, mask: torch.Tensor, comm: CPGroup) -> torch.Tensor:
    """This rank's share of the masked token mean over the whole CP group: sum of its valid losses
    divided by the valid-token count of *all* ranks. Summed over ranks (as the data-parallel gradient
    all-reduce sums gradients) it is the global mean. A rank holding only padding contributes 0 with
    finite gradients, where a per-rank mean would be 0/0 = NaN (the Megatron failure issue 7 cites).
    Masked positions are selected out, not multiplied by 0, so a non-finite loss there cannot leak."""
    count = comm.all_reduce_sum_(mask.sum().to(loss.dtype).detach().clone())
    return torch.where(mask, loss, torch.zeros_like(loss)).sum() / count.clamp_min(1)


# ------------------------------------------------------------------------ one function per mixer


def _delta_qkv(mixer, x: torch.Tensor, comm: CPGroup, state: State):
    """`short_conv_qkv` with the three conv halos in one exchange."""
    projected = [getattr(mixer, f"{n}_proj")(x) for n in "qkv"]
    convs = [getattr(mixer, f"{n}_conv1d", None) for n in "qkv"]
    if convs[0] is None:
        return (*(F.silu(t) for t in projected), {})
    outs = conv_with_halo(comm, [(conv, t, None if state is None else state[f"conv_{n}"])
                                 for n, conv, t in zip("qkv", convs, projected)])
    return (*(y for y, _ in outs), {f"conv_{n}": s for n, (_, s) in zip("qkv", outs)})


def _deltanet(m: DeltaNet, x, comm, state):
    q, k, v, conv_state = _delta_qkv(m, x, comm, state)
    beta = m.b_proj(x).sigmoid() * (2.0 if m.allow_neg_eigval else 1.0)
    o, recurrent = delta_rule_heads_cp(comm, split_heads(q, m.head_k_dim), split_heads(k, m.head_k_dim),
                                       split_heads(v, m.head_v_dim), beta, None, state, m.chunk_size)
    if m.output_gate:
        o = m.o_norm(o, split_heads(m.g_proj(x), m.head_v_dim))
    else:
        o = m.o_norm(o)
    return m.o_proj(o.flatten(-2).to(x.dtype)), {**conv_state, "recurrent": recurrent}


def _gated_deltanet(m: GatedDeltaNet, x, comm, state):
    q, k, v, conv_state = _delta_qkv(m, x, comm, state)
    r = m.num_v_heads // m.num_qk_heads
    q = split_heads(q, m.head_k_dim).repeat_interleave(r, dim=2)
    k = split_heads(k, m.head_k_dim).repeat_interleave(r, dim=2)
    beta = m.b_proj(x).sigmoid() * (2.0 if m.allow_neg_eigval else 1.0)
    o, recurrent = delta_rule_heads_cp(comm, q, k, split_heads(v, m.head_v_dim), beta, m.log_decay(x),
                                       state, m.chunk_size)
    o = m.o_norm(o, split_heads(m.g_proj(x), m.head_v_dim))
    return m.o_proj(o.flatten(-2).to(x.dtype)), {**conv_state, "recurrent": recurrent}


def _mamba2(m: Mamba2, x, comm, state):
    """`Mamba2.forward_segment` = in_proj -> `SSDHeads.ssd_branch` -> out_proj."""
    zxbcdt = m.in_proj(x)
    b, T, _ = zxbcdt.shape
    G, N = m.ngroups, m.state_size
    z, xBC, dt = zxbcdt.split([m.d_inner, m.conv_dim, m.nheads], dim=-1)
    [(xBC, conv_state)] = conv_with_halo(comm, [(m.conv1d, xBC, None if state is None else state["conv"])])
    xs, B, C = xBC.split([m.d_inner, G * N, G * N], dim=-1)
    dtype = torch.promote_types(xs.dtype, torch.float32)
    dt = F.softplus(dt.to(dtype) + m.dt_bias.to(dtype))
    if m.dt_limit != (0.0, float("inf")):
        dt = dt.clamp(*m.dt_limit)
    y, ssm_state = ssd_cp(
        comm, xs.reshape(b, T, m.nheads, m.head_dim).to(dtype), dt, -torch.exp(m.A_log.to(dtype)),
        B.reshape(b, T, G, N).to(dtype), C.reshape(b, T, G, N).to(dtype), m.D.to(dtype),
        None if state is None else state["ssm"], m.chunk_size)
    y = m.norm(y.reshape(b, T, m.d_inner).to(zxbcdt.dtype), z)
    return m.out_proj(y), {"conv": conv_state, "ssm": ssm_state}


def _rglru(m: RGLRUBlock, x, comm, state):
    y = F.gelu(m.linear_y(x), approximate="tanh")
    [(xb, conv_state)] = conv_with_halo(comm, [(m.conv_1d, m.linear_x(x), None if state is None else state["conv"])])
    lru = m.rg_lru  # `RGLRU.forward` with the scan under CP
    gate_x = block_diagonal_linear(xb, lru.input_gate_weight, lru.input_gate_bias)
    gate_a = block_diagonal_linear(xb, lru.recurrent_gate_weight, lru.recurrent_gate_bias)
    acc = torch.float64 if xb.dtype == torch.float64 else torch.float32
    xb, gate_x, gate_a, lam = (t.to(acc) for t in (xb, gate_x, gate_a, lru.recurrent_param))
    h, h_last = rglru_cp(comm, xb, gate_x, gate_a, lam, lru.c, None if state is None else state["rnn"].to(acc))
    return m.linear_out(h.to(x.dtype) * y), {"conv": conv_state, "rnn": h_last}


CP_FORWARDS: dict[type, Callable] = {
    DeltaNet: _deltanet,
    GatedDeltaNet: _gated_deltanet,
    Mamba2: _mamba2,
    RGLRUBlock: _rglru,
}
"""Mixer class -> its state-passing forward. Exact classes: a subclass (Hymba's SSD heads sit next
to attention) needs its own entry."""


def _cp_forward_of(mixer: Mixer) -> Callable:
    forward = CP_FORWARDS.get(type(mixer))
    if forward is None:
        supported = ", ".join(cls.__name__ for cls in CP_FORWARDS)
        raise NotImplementedError(
            f"{type(mixer).__name__}: no state-passing context parallelism (supported: {supported}); "
            "attention layers take Transformer Engine's CP in the megatron backend, or set parallel.cp=1")
    return forward


def _conv_halo(mixer: Mixer) -> int:
    """Tokens of halo the mixer's short convs need (kernel - 1; 0 without a conv)."""
    kernels = [mod.kernel for mod in mixer.modules() if isinstance(mod, ShortConv)]
    return max(kernels, default=1) - 1
