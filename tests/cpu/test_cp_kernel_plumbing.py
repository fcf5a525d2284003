"""The kernel path of state-passing CP (megahybrid/parallel/kernels.py) with its Triton kernels
replaced by plain-PyTorch stand-ins, in float64 on the CPU.

What this proves is the plumbing around the kernels: slot rows flattened to varlen `cu_seqlens`, one
initial state per document piece, FLA's conv cache layout ([N, C, K], entries 1..K-1 the last inputs),
mamba_ssm's `seq_idx` / `initial_states` rule, cast rules, and that every gradient flows through it.
Each stand-in implements its kernel's documented contract with megahybrid's *naive recurrent* oracles
(one token at a time), not the chunked code the CP path uses, and the whole mixer under CP is compared
with the mixer's own float64 forward (tests/cpu/test_context_parallel.py's harness). That the real
kernels keep those contracts is what tests/gpu/test_cp_kernels.py checks on a GPU.
"""

from __future__ import annotations

import sys
import types

import pytest
import torch
import torch.nn.functional as F

from megahybrid.mixers.delta_rule import naive_recurrent_delta_rule
from megahybrid.mixers.mamba2 import naive_recurrent_ssd
from megahybrid.parallel import kernels
from tests.cpu.test_context_parallel import check_cp_equals_whole, leaves
from tests.helpers import assert_close

TOL = 1e-9  # float64 throughout: only summation order differs


def _pieces(T: int, cu) -> list[tuple[int, int]]:
    if cu is None:
        return [(0, T)]
    cu = cu.tolist()
    return list(zip(cu[:-1], cu[1:]))


def fake_gated_delta_rule(q, k, v, g, beta, scale=None, initial_state=None, output_final_state=False,
                          cu_seqlens=None, use_qk_l2norm_in_kernel=False, **_):
    """FLA `chunk_gated_delta_rule`: [B, T, H, D], g before beta, one initial state per varlen piece."""
    assert not use_qk_l2norm_in_kernel
    if cu_seqlens is None:
        return naive_recurrent_delta_rule(q, k, v, beta, g, initial_state, scale)
    outs, ends = [], []
    for i, (a, b) in enumerate(_pieces(q.shape[1], cu_seqlens)):
        o, s = naive_recurrent_delta_rule(q[:, a:b], k[:, a:b], v[:, a:b], beta[:, a:b], g[:, a:b],
                                          initial_state[i:i + 1], scale)
        outs.append(o)
        ends.append(s)
    return torch.cat(outs, 1), torch.cat(ends)


def fake_delta_rule(q, k, v, beta, scale=None, initial_state=None, output_final_state=False, cu_seqlens=None, **_):
    return fake_gated_delta_rule(q, k, v, torch.zeros_like(beta), beta, scale, initial_state, output_final_state,
                                 cu_seqlens)


def _conv_piece(x, weight, bias, cache, activation):
    xx = torch.cat([cache[:, :, 1:].transpose(1, 2), x], 1)  # FLA's cache: entries 1..K-1, oldest first
    y = F.conv1d(xx.transpose(1, 2), weight[:, None], bias, groups=x.shape[-1]).transpose(1, 2)
    return F.silu(y) if activation == "silu" else y


def fake_causal_conv1d(x, weight=None, bias=None, residual=None, initial_state=None, output_final_state=False,
                       activation=None, cu_seqlens=None, **_):
    """FLA `causal_conv1d`: weight [C, K], cache [N, C, K], varlen pieces each from their own cache."""
    B, T, C = x.shape
    if initial_state is None:
        initial_state = x.new_zeros(B, C, weight.shape[1])
    if cu_seqlens is None:
        return torch.cat([_conv_piece(x[i:i + 1], weight, bias, initial_state[i:i + 1], activation)
                          for i in range(B)]), None
    return torch.cat([_conv_piece(x[:, a:b], weight, bias, initial_state[i:i + 1], activation)
                      for i, (a, b) in enumerate(_pieces(T, cu_seqlens))], 1), None


def fake_mamba_chunk_scan_combined(x, dt, A, B, C, chunk_size, D=None, initial_states=None, seq_idx=None,
                                   return_final_states=False, **_):
    """mamba_ssm: a new document at every change of seq_idx; only seq_idx 0 reads initial_states; the
    final state is the last document's."""
    ys, ends = [], []
    for r in range(x.shape[0]):
        bounds = [0] if seq_idx is None else \
            [0] + (torch.nonzero(seq_idx[r, 1:] != seq_idx[r, :-1])[:, 0] + 1).tolist()
        bounds.append(x.shape[1])
        row, end = [], None
        for a, b in zip(bounds[:-1], bounds[1:]):
            reads = initial_states is not None and (seq_idx is None or int(seq_idx[r, a]) == 0)
            y, end = naive_recurrent_ssd(x[r:r + 1, a:b], dt[r:r + 1, a:b], A, B[r:r + 1, a:b], C[r:r + 1, a:b], D,
                                         initial_states[r:r + 1] if reads else None)
            row.append(y)
        ys.append(torch.cat(row, 1))
        ends.append(end)
    return torch.cat(ys), torch.cat(ends)


@pytest.fixture
def stand_ins(monkeypatch):
    """The kernel modules kernels.py imports, holding the stand-ins (restored after the test)."""
    modules = {
        "fla": {}, "fla.ops": {}, "fla.ops.gated_delta_rule": {"chunk_gated_delta_rule": fake_gated_delta_rule},
        "fla.ops.delta_rule": {"chunk_delta_rule": fake_delta_rule}, "fla.modules": {},
        "fla.modules.causal_conv1d": {"causal_conv1d": fake_causal_conv1d},
        "mamba_ssm": {}, "mamba_ssm.ops": {}, "mamba_ssm.ops.triton": {},
        "mamba_ssm.ops.triton.ssd_combined": {"mamba_chunk_scan_combined": fake_mamba_chunk_scan_combined},
    }
    for name, attrs in modules.items():
        module = types.ModuleType(name)
        module.__dict__.update(attrs)
        monkeypatch.setitem(sys.modules, name, module)


CASES = [(2, "contiguous", False, False), (4, "zigzag", True, False), (2, "contiguous", True, True),
         (4, "zigzag", False, True)]


@pytest.mark.parametrize("cp,layout,with_state,packed", CASES)
@pytest.mark.parametrize("name", ["deltanet", "gdn", "mamba2"])
def test_kernel_path_plumbing(stand_ins, name, cp, layout, with_state, packed):
    whole = check_cp_equals_whole(name, cp, layout, with_state, packed, forward=kernels.forward_cp_kernels, rtol=TOL)
    if not packed:  # the same kernels without CP
        state = None if whole["state"] is None else {k: v.detach() for k, v in whole["state"].items()}
        x, state = leaves(whole["x"], state)
        y, end = kernels.forward_kernels(whole["module"], x, state)
        assert_close("y (no CP)", whole["y"], y, TOL)
        for k in whole["final"]:
            assert_close(f"final state[{k}] (no CP)", whole["final"][k], end[k], TOL)
