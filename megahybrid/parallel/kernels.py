"""GPU kernels as the local pass of state-passing context parallelism (issue 7).

`state_passing.py` composes each CP slot's summary and corrects its outputs; which function runs a
slot's tokens is its `local=` argument. This module supplies the CUDA kernels for it, with the same
contracts as the reference `local_delta_rule` / `local_ssd` / `local_conv`:

    o, ends = delta_rule_cp(comm, q, k, v, beta, g, h0, docs=docs, local=fla_delta_rule)
    y, ends = ssd_cp(comm, x, dt, A, B, C, D, h0, chunk_size, docs=docs, local=mamba_ssd)
    y_local, state = forward_cp_kernels(mixer, comm.shard(x), comm)   # a whole DeltaNet / GDN / Mamba2 layer
    y, state = forward_kernels(mixer, x)                              # the same kernels, one GPU, no CP

Kernels (all Triton; imported inside the functions, so this module imports on a CPU machine):
- Gated DeltaNet: flash-linear-attention 0.6 `fla.ops.gated_delta_rule.chunk_gated_delta_rule(q, k, v,
  g, beta, scale, initial_state, output_final_state, ..., cu_seqlens)`: note g before beta; layout
  [B, T, H, D]; g is the natural-log decay per token and head (FLA multiplies it by 1/ln 2 itself and
  uses exp2), our `log_decay`; scale defaults to dk^-0.5 as ours (passed explicitly anyway); state
  key-major [N, H, dk, dv] (`state_v_first=False`, our layout); `use_qk_l2norm_in_kernel=False`
  because q/k arrive L2-normalised (`l2norm`, same eps 1e-6); beta already sigmoid'ed
  (`use_beta_sigmoid_in_kernel=False`); chunk size 16/32/64 only, so the kernels always use 64 (the
  chunk size changes rounding only). FLA's Hopper guard on its gated backward (Triton < 3.7.1, FLA
  issue #640) is lifted only through `megahybrid.megatron.gdn_guard.ensure_gdn_backward`, which checks
  the kernel against the reference on this GPU first; the augmented value width (dv + dk) is a tile
  shape that check does not cover, which is why tests/gpu/test_cp_kernels.py checks every gradient.
- DeltaNet (g = None): `fla.ops.delta_rule.chunk_delta_rule(q, k, v, beta, ...)`. It refuses float32
  ("does not support float32"), so float32 inputs take the gated kernel with g = 0 (exp(0) = 1, the
  same recurrence).
- The augmented value [v | 0] is dv + dk wide (256 at dk = dv = 128). FLA tiles V in blocks
  (`BV` 32/64 in `chunk_gated_delta_rule_fwd_h`, up to 128 in `chunk_fwd_o`, a loop over V blocks in
  `recompute_w_u`) with boundary masks and asserts only K <= 256 (`chunk_delta_h.py`); the key side
  (dk) is unchanged, so any dv + dk is accepted.
- Mamba2 SSD: mamba_ssm 2.3 `mamba_chunk_scan_combined(x, dt, A, B, C, chunk_size, D=D, seq_idx=...,
  initial_states=..., return_final_states=True)` with dt already positive (our `chunked_ssd` takes dt
  after softplus and clamp), so `dt_bias=None, dt_softplus=False` and the default dt_limit (0, inf)
  (a no-op for dt > 0); final states come back in float32.
- Short conv halo: flash-linear-attention's `causal_conv1d(x, weight [C, K], bias, initial_state,
  activation)`. Its cache is `[N, C, K]` whose entries 1..K-1 are the last K-1 inputs, oldest first
  (entry 0 is not read: `causal_conv1d_fwd_kernel` loads `initial_state[..., o_x + W]` for o_x in
  [-(K-1), -1]), so the halo [rows, K-1, C] becomes cat([0, halo]) transposed; its backward returns the
  halo's gradient, which the all-gather's backward sends to the previous slot's rank. Measured in
  megahybrid/megatron/NOTES.md: 1.26 ms vs 2.96 ms for PyTorch's depthwise conv in a Mamba layer.

Cast rules: the kernels run on the mixer's activation dtype (bf16, or fp32 in the tests; q/k are
normalised in fp32 first, g, dt, A and D stay fp32); the kernels return their end states in fp32,
and `state_passing` runs the summaries, their exchange, the composition and the corrections in the
end state's dtype, so in fp32; outputs come back in the kernel's dtype. Note that Triton's float32
dots use TF32 by default, so the "fp32" kernels are accurate to ~1e-3, not 1e-6.

Packed documents: supported. FLA takes the slot rows flattened to one `[1, rows * S]` sequence with
`cu_seqlens` at every row start and document start, one initial state per piece (the row's augmented
[0 | I] start on its first piece, zeros after) and returns every piece's end state (a row's is its
last piece's); mamba_ssm takes `seq_idx` = the document number inside each slot (its final state is
the last document's, from zero); the conv takes the same `cu_seqlens` with the (document-masked) halo
on each row's first piece.

Why not flash-linear-attention's own CP (`fla.ops.cp`, `cp_context=` of `chunk_gated_delta_rule`):
(1) it asserts `initial_state is None` and `output_final_state=False`, while a mixer's CP forward must
take the sequence's incoming state and return the final one (the Mixer state contract: generation,
segment-wise runs); (2) it covers the gated delta rule (and conv) only: no `chunk_delta_rule`, no SSD;
(3) it runs its collectives on a real `torch.distributed` group inside its autograd functions, so the
one-process `SimulatedCP` test of the kernels (tests/gpu/test_cp_kernels.py) could not drive it;
(4) it takes packed `[1, T]` varlen batches only. Its algorithm is the same affine summary ([h | M],
`chunk_cp_fwd_h`) computed by a separate kernel, then a second state pass from the composed state;
here one augmented pass gives o_local and q~ together and the correction is one matmul, so no second
pass over the slot is needed. See state_passing.py for the costs.
"""

from __future__ import annotations

from functools import partial
from typing import Optional

import torch
import torch.nn.functional as F

from megahybrid.mixers.base import Mixer, State
from megahybrid.mixers.common import ShortConv, l2norm
from megahybrid.mixers.deltanet import DeltaNet
from megahybrid.mixers.gated_deltanet import GatedDeltaNet
from megahybrid.mixers.mamba2 import Mamba2
from megahybrid.parallel.group import CPGroup
from megahybrid.parallel.mixers import forward_cp
from megahybrid.parallel.state_passing import SlotDocuments, conv_with_halo, delta_rule_cp, ssd_cp

FLA_CHUNK = 64
"""flash-linear-attention's delta-rule chunk (it accepts 16, 32, 64; 64 is its default and tuned size)."""


# ------------------------------------------------------------------------ packed documents


def doc_pieces(docs: SlotDocuments):
    """Slot rows `[rows, S]` cut at every row start and document start, as one flat sequence:
    (cu_seqlens int64 [N+1], index of each row's first piece [rows], of its last piece [rows])."""
    rows, S = docs.starts.shape
    begins = docs.starts.clone()
    begins[:, 0] = True
    flat = begins.flatten()
    piece = flat.long().cumsum(0).view(rows, S) - 1  # piece number of every token
    cu = torch.cat([flat.nonzero()[:, 0], flat.new_tensor([rows * S], dtype=torch.long)])
    return cu, piece[:, 0], piece[:, -1]


def _per_piece(first_state: torch.Tensor, num_pieces: int, first: torch.Tensor) -> torch.Tensor:
    """Initial states of all pieces: row r's `first_state` on its first piece, zeros elsewhere."""
    out = first_state.new_zeros(num_pieces, *first_state.shape[1:])
    return out.index_copy(0, first, first_state)


# ------------------------------------------------------------------------ local passes


def fla_delta_rule(q, k, v, beta, g=None, initial_state=None, chunk_size: int = FLA_CHUNK, scale=None,
                   docs: Optional[SlotDocuments] = None):
    """`local_delta_rule` on flash-linear-attention's chunk kernels (module docstring): q, k [rows, S, H, dk],
    v [rows, S, H, dv], beta, g [rows, S, H] on CUDA, q/k/v/beta in the kernel dtype; initial_state
    [rows, H, dk, dv] or None. `chunk_size` is ignored (FLA_CHUNK). -> (o in q's dtype, end states fp32)."""
    rows, S, H, dk = q.shape
    scale = dk ** -0.5 if scale is None else scale
    beta = beta.to(q.dtype)
    if g is None and q.dtype in (torch.bfloat16, torch.float16):
        from fla.ops.delta_rule import chunk_delta_rule as kernel

        tensors = [q, k, v, beta]
    else:  # the gated kernel; DeltaNet in float32 runs it with g = 0 (chunk_delta_rule refuses float32)
        from fla.ops.gated_delta_rule import chunk_gated_delta_rule

        _ensure_gated_backward()
        g = _f32(torch.zeros_like(beta)) if g is None else _f32(g)

        def kernel(q, k, v, beta, g, **kw):
            return chunk_gated_delta_rule(q, k, v, g, beta, use_qk_l2norm_in_kernel=False, chunk_size=FLA_CHUNK, **kw)
        tensors = [q, k, v, beta, g]
    if initial_state is not None:
        initial_state = _f32(initial_state)
    if docs is None:
        return kernel(*tensors, scale=scale, initial_state=initial_state, output_final_state=True)
    cu, first, last = doc_pieces(docs)
    if initial_state is None:
        initial_state = _f32(q.new_zeros(rows, H, dk, v.shape[-1]))
    o, ends = kernel(*(t.reshape(1, rows * S, *t.shape[2:]) for t in tensors), scale=scale,
                     initial_state=_per_piece(initial_state, len(cu) - 1, first), output_final_state=True,
                     cu_seqlens=cu, cu_seqlens_cpu=cu.cpu())
    return o.reshape(rows, S, *o.shape[2:]), ends[last]


def mamba_ssd(x, dt, A, B, C, D=None, chunk_size: int = 64, docs: Optional[SlotDocuments] = None,
              initial_state=None):
    """`local_ssd` on mamba_ssm's `mamba_chunk_scan_combined` (module docstring): x [rows, S, h, p],
    B, C [rows, S, g, n] in the kernel dtype, dt [rows, S, h] positive, A [h], D [h]; from
    `initial_state` [rows, h, p, n] (None = zeros; with docs it belongs to each row's first document).
    -> (y in x's dtype, end states fp32)."""
    from mamba_ssm.ops.triton.ssd_combined import mamba_chunk_scan_combined

    # mamba_ssm gives the initial state to the tokens of seq_idx 0: each row's first document.
    seq_idx = None if docs is None else (docs.doc - docs.doc[:, :1]).to(torch.int32).contiguous()
    if initial_state is not None:
        initial_state = _f32(initial_state).contiguous()
    y, end = mamba_chunk_scan_combined(x, _f32(dt), _f32(A), B, C, chunk_size,
                                       D=None if D is None else _f32(D), initial_states=initial_state,
                                       seq_idx=seq_idx, return_final_states=True)
    return y, end


def fla_conv(conv: ShortConv, x: torch.Tensor, halo: Optional[torch.Tensor] = None,
             docs: Optional[SlotDocuments] = None):
    """`local_conv` on flash-linear-attention's Triton `causal_conv1d`: `conv`'s weights over rows
    x [rows, S, C] from `halo` [rows, K-1, C] (None = zeros), restarting at every document start ->
    (y, end conv state [rows, K-1, C], the same as `ShortConv`'s)."""
    from fla.modules.causal_conv1d import causal_conv1d

    rows, S, C = x.shape
    k1 = conv.kernel - 1
    if k1 == 0:
        return conv(x, halo)
    halo = x.new_zeros(rows, k1, C) if halo is None else halo.to(x.dtype)
    cache = torch.cat([halo.new_zeros(rows, 1, C), halo], dim=1).transpose(1, 2).contiguous()  # [rows, C, K]
    weight = conv.weight.squeeze(1)
    window = torch.cat([halo, x[:, max(0, S - k1):]], dim=1)[:, -k1:]  # ShortConv's end state
    if docs is None:
        y, _ = causal_conv1d(x.contiguous(), weight, conv.bias, initial_state=cache, activation=conv.activation)
        return y, window
    cu, first, _ = doc_pieces(docs)
    y, _ = causal_conv1d(x.reshape(1, rows * S, C), weight, conv.bias,
                         initial_state=_per_piece(cache, len(cu) - 1, first), activation=conv.activation,
                         cu_seqlens=cu, cu_seqlens_cpu=cu.cpu())
    # The last document started from zeros: keep only its own tokens of the window (the halo is doc 0's).
    doc = docs.doc
    window_doc = torch.cat([doc.new_zeros(rows, k1), doc[:, max(0, S - k1):]], dim=1)[:, -k1:]
    keep = (window_doc == doc[:, -1:])[..., None]
    return y.reshape(rows, S, C), torch.where(keep, window, torch.zeros_like(window))


def _f32(t: torch.Tensor) -> torch.Tensor:
    """`t` in float32 at least (float64 stays float64: CPU checks of this plumbing run in float64)."""
    return t.to(torch.promote_types(t.dtype, torch.float32))


def _ensure_gated_backward() -> None:
    """Lift FLA's Hopper guard on the gated backward after megahybrid's self-check (cached; raises if
    the check fails). The check runs a backward, so grad mode is forced on for it."""
    if not torch.cuda.is_available():
        return
    from megahybrid.megatron.gdn_guard import ensure_gdn_backward

    with torch.enable_grad():
        ensure_gdn_backward()


# ------------------------------------------------------------------------ mixer steps


def delta_rule_heads_kernels(q, k, v, beta, g, state: State, chunk_size: int):
    """`delta_rule_heads` (the mixers' core step, one GPU) on FLA: q/k L2-normalised in fp32, then the
    kernel in v's dtype from `state["recurrent"]`."""
    h0 = None if state is None else state["recurrent"]
    with torch.autocast(v.device.type, enabled=False):
        q, k = (l2norm(_f32(t)).to(v.dtype) for t in (q, k))
        return fla_delta_rule(q, k, v, beta, g, initial_state=h0)


def delta_rule_heads_cp_kernels(comm: CPGroup, q, k, v, beta, g, state: State, chunk_size: int,
                                docs: Optional[SlotDocuments] = None):
    """`delta_rule_heads_cp` with `fla_delta_rule` as the local pass, in v's dtype (the reference
    version runs in fp32 at least)."""
    h0 = None if state is None else state["recurrent"]
    with torch.autocast(v.device.type, enabled=False):
        q, k = (l2norm(_f32(t)).to(v.dtype) for t in (q, k))
        return delta_rule_cp(comm, q, k, v, beta, None if g is None else _f32(g), initial_state=h0,
                             chunk_size=chunk_size, docs=docs, local=fla_delta_rule)


def ssd_scan_kernels(x, dt, A, B, C, D, initial_state, chunk_size: int, dtype: torch.dtype):
    """`chunked_ssd` as `SSDHeads.ssd_branch` calls it (fp32 arguments), on mamba_ssm with x, B, C in
    the activation `dtype`."""
    return mamba_ssd(x.to(dtype), dt, A, B.to(dtype), C.to(dtype), D, chunk_size, initial_state=initial_state)


def ssd_scan_cp_kernels(comm: CPGroup, x, dt, A, B, C, D, initial_state, chunk_size: int, dtype: torch.dtype,
                        docs: Optional[SlotDocuments] = None):
    """`ssd_cp` with `mamba_ssd` as the local pass and x, B, C in the activation `dtype`."""
    return ssd_cp(comm, x.to(dtype), dt, A, B.to(dtype), C.to(dtype), D, initial_state, chunk_size, docs=docs,
                  local=mamba_ssd)


def _qkv(layer, x: torch.Tensor, state: State, conv_step):
    """`short_conv_qkv` with `conv_step([(conv, t, conv state)]) -> [(y, end)]` for the three convs."""
    projected = [getattr(layer, f"{n}_proj")(x) for n in "qkv"]
    convs = [getattr(layer, f"{n}_conv1d", None) for n in "qkv"]
    if convs[0] is None:
        return (*(F.silu(t) for t in projected), {})
    outs = conv_step([(conv, t, None if state is None else state[f"conv_{n}"])
                      for n, conv, t in zip("qkv", convs, projected)])
    return (*(y for y, _ in outs), {f"conv_{n}": s for n, (_, s) in zip("qkv", outs)})


def _whole_convs(convs):
    return [fla_conv(conv, t, s) for conv, t, s in convs]


def forward_kernels(mixer: Mixer, x: torch.Tensor, state: State = None):
    """`mixer(x, state)` for DeltaNet, GDN and Mamba2 with the kernels above, on one GPU (no CP, no
    packed documents): the baseline `forward_cp_kernels` is compared and timed against."""
    if type(mixer) in (DeltaNet, GatedDeltaNet):
        return mixer.forward_segment(x, state, qkv=lambda layer, t, s: _qkv(layer, t, s, _whole_convs),
                                     rule=delta_rule_heads_kernels)
    if type(mixer) is Mamba2:
        return mixer.forward_segment(x, state, conv=lambda conv, t, s: fla_conv(conv, t, s),
                                     scan=partial(ssd_scan_kernels, dtype=x.dtype))
    raise NotImplementedError(f"{type(mixer).__name__}: no kernel path (DeltaNet, GatedDeltaNet, Mamba2 have one)")


def _deltanet_cp(m, x, comm, state, docs):
    return m.forward_segment(
        x, state, qkv=lambda layer, t, s: _qkv(layer, t, s, lambda c: conv_with_halo(comm, c, docs, local=fla_conv)),
        rule=partial(delta_rule_heads_cp_kernels, comm, docs=docs))


def _mamba2_cp(m, x, comm, state, docs):
    return m.forward_segment(x, state, conv=lambda conv, t, s: conv_with_halo(comm, [(conv, t, s)], docs, local=fla_conv)[0],
                             scan=partial(ssd_scan_cp_kernels, comm, dtype=x.dtype, docs=docs))


CP_KERNEL_FORWARDS = {DeltaNet: _deltanet_cp, GatedDeltaNet: _deltanet_cp, Mamba2: _mamba2_cp}
"""Mixer class -> its state-passing forward on the kernels (exact classes, as `CP_FORWARDS`)."""


def forward_cp_kernels(mixer: Mixer, x: torch.Tensor, comm: CPGroup, state: State = None,
                       seq_idx: Optional[torch.Tensor] = None):
    """`forward_cp(mixer, x, comm, state, seq_idx)` with the kernels (same arguments and result).
    Mixers without a kernel entry (token-wise ones, the RG-LRU) run `forward_cp` itself (plain PyTorch
    on the same device)."""
    return forward_cp(mixer, x, comm, state, seq_idx, forward=CP_KERNEL_FORWARDS.get(type(mixer)))
