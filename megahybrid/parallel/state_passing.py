"""State passing: each CP slot runs from a zero state, summarises itself as an affine map of its
incoming state, the summaries are all-gathered once, and each slot composes its incoming state and
corrects its outputs. Plain PyTorch on top of the reference math in `megahybrid/mixers/`.

Every recurrence here is linear in its state: S_out = F(S_in) + L with F linear, and every output is
o_t = o_t^local + (read-out of S_in at t). So per slot c (of `num_slots`, in time order):

  1. local:   run the slot's tokens from S = 0 -> outputs o^local, end state L_c; also the linear
              map F_c and what each output reads of the incoming state;
  2. gather:  one all-gather of (L_c, F_c) -- O(d^2) per head, independent of the slot's length;
  3. compose: S_in(0) = the sequence's incoming state, S_in(c+1) = F_c(S_in(c)) + L_c (num_slots-1
              small steps, done redundantly on every rank: cheaper than a second collective);
  4. correct: o_t += read-out of S_in(c) at t;  S_out = F_c(S_in(c)) + L_c.
Step 1 (and the conv) is a `local=` argument: the reference math below by default (`local_delta_rule`,
`local_ssd`, `local_conv`), flash-linear-attention / mamba_ssm kernels on CUDA (`kernels.py`).

The incoming state of the whole sequence rides in the same all-gather (zeros on every slot but the
first). Besides saving a message, that makes every rank's outputs depend on the gathered tensor, so
autograd runs the all-gather's backward collective on every rank: a rank whose outputs skipped it
(the first rank needs nothing from the others) would leave the rest waiting in backward.

Delta rule (DeltaNet, GDN), per head, key-major state S [dk, dv], a_t = exp(g_t):
    S_t = A_t S_{t-1} + b_t k_t v_t^T,   A_t = a_t (I - b_t k_t k_t^T),   o_t = S_t^T (scale q_t)
  so with P_t = A_t A_{t-1} ... A_1 (product from the slot's first token):
    S_t = P_t S_in + S_t^local,   o_t = o_t^local + S_in^T (P_t^T scale q_t),   M_c = P_last.
  q~_t = P_t^T scale q_t and M_c come from the *same* chunked kernel, without forming any P_t: the
  recurrence acts on each value column independently, so running it on dv + dk columns,
  v' = [v | 0] from S_0' = [0 | I], gives o' = [o^local | q~] and S_last' = [L | M] in one pass
  (FLA's CP summary has this [h_local | M] layout, `fla/ops/cp/chunk_fwd.py`). The correction is then
  one [T, dk] x [dk, dv] matmul per head.
  Cost per head and slot of n tokens (chunk C): the augmented pass widens the value side from dv to
  dv + dk columns -- u = A^-1 (b v'), w S, q S, attn v_new and the state update, about
  n dk (C + 3 dk) extra MACs, i.e. 2x the value-side work when dk = dv; the key-side work (K K^T, the
  UT solve for w) is shared. Correction: n dk dv MACs; composition: num_slots dk^2 dv; memory: the
  widened per-chunk states (dv + dk columns) and q~ [n, dk] kept for backward; communication:
  dk (2 dv + dk) numbers per head per slot, all-gathered. FLA's CUDA path instead computes
  [h_local | M] in a separate kernel (`chunk_cp_fwd_h`: dk^2 per token for M) and then reruns the
  state pass and the output from the composed state (same order of work, no q~ kept).
Mamba2 SSD, per head (scalar decay a_t = exp(dt_t A)), state S [P, N]:
    S_t = exp(cum_t) S_in + S_t^local,  y_t = y_t^local + exp(cum_t) S_in C_t,  cum_t = sum_{s<=t} dt_s A
  M_c = exp(cum_last) per head; correction n P N MACs per head (SSD's "state -> output" step).
RG-LRU, per channel: h_t = exp(cum_t) h_in + h_t^local, cum_t = sum_{s<=t} log a_s; M_c = exp(cum_last).
Short causal conv: its state is the last K-1 inputs, so a slot's incoming state (the halo) is the
previous slot's last K-1 inputs: the tails are all-gathered (a neighbour send/recv would move
R times less; with K-1 = 3 rows per slot it does not matter for the reference).

Packed documents (`seq_idx`, the base class's contract: nothing crosses a document boundary, the
incoming state belongs to each row's first document). A token *starts* a document when its
document differs from the token's before it; a slot's token 0 starts one when the previous slot's
last token is in another document (never on the chain's first slot). With b the slot's first start
(S if none), the steps above change only in what the local pass returns:
  1. local: every document piece of the slot runs from zero, the first (tokens < b) from the
     augmented [0 | I] start, so L_c is the end state of the slot's last document; the pieces after
     b read nothing of the incoming state: q~_t = 0 (SSD / RG-LRU: the decay weight is 0) for t >= b;
  2.-4. M_c = 0 when the slot holds a start (b < S), else the product as before. The composition
     and the correction are the same formulas: a document spanning several slots chains through
     them (M_c of each slot without a start), and one that starts on a slot boundary (b = 0) gets
     no correction and hands on only its own L_c.
  Conv: the halo keeps only the previous slot's tail tokens of the document the slot's token 0 is
  in (all of them lie in the previous slot, as slots hold >= K-1 tokens), and inside a slot the conv
  restarts at every start. RG-LRU: every start is a reset (its first token is not scaled by
  sqrt(1 - a^2)), as a document run from state None.
  Cost: one more all-gather, of K integers per row and slot (each slot's last K-1 and first document
  ids; no autograd, so no backward collective), and in this reference one local pass per document
  piece rather than per slot (a fast path gives its kernels `cu_seqlens`). Summaries, their exchange
  and the composition are unchanged.

Why not FLA's CP ops here: `fla.ops.cp` (summaries `chunk_cp_fwd_h`, merge `chunk_cp_merge`, conv
halos `fla.modules.causal_conv1d.cp`) are Triton kernels that refuse non-CUDA devices
(`_check_cp_device`), cover the delta-rule family only (no SSD, no RG-LRU), take packed `[1, T]`
varlen batches and assert no incoming state. This file is the float64 oracle a fast path is tested
against, on any device and in one process (`SimulatedCP`); kernels.py says why the kernel path does
not use them either.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Optional, Sequence

import torch

from megahybrid.mixers.base import run_per_document
from megahybrid.mixers.common import ShortConv, l2norm
from megahybrid.mixers.delta_rule import chunked_delta_rule
from megahybrid.mixers.mamba2 import chunked_ssd
from megahybrid.mixers.rglru import rglru_coefficients, scan_linear_recurrence
from megahybrid.parallel.group import CPGroup


def exchange(comm: CPGroup, tensors: Sequence[torch.Tensor]) -> list[torch.Tensor]:
    """One all-gather for several tensors of this rank's rows `[rows, ...]`: each comes back as
    `[num_slots, B, ...]` in chain order. They travel as one flat buffer in their promoted dtype
    (exact: promotion only widens) and come back in their own."""
    work = tensors[0].dtype
    for t in tensors[1:]:
        work = torch.promote_types(work, t.dtype)
    flat = torch.cat([t.to(work).flatten(1) for t in tensors], dim=1)
    gathered = comm.all_gather(flat)  # [num_slots, B, total]
    parts = gathered.split([t[0].numel() for t in tensors], dim=-1)
    return [p.reshape(p.shape[0], p.shape[1], *t.shape[1:]).to(t.dtype) for p, t in zip(parts, tensors)]


@dataclass
class SlotDocuments:
    """Where packed documents start in this rank's slots (rows `[rows, S]`); see the module docstring."""

    starts: torch.Tensor
    """Bool `[rows, S]`: the token starts a document (token 0: the previous slot ends another one)."""
    halo_keep: torch.Tensor
    """Bool `[rows, H]`: which of the previous slot's last H tokens are in the document of this slot's
    token 0 (all True on the chain's first slot: the incoming conv state belongs to its first document)."""

    @property
    def doc(self) -> torch.Tensor:
        """Document number of every token inside its slot, `[rows, S]` (a `seq_idx` for the slot)."""
        return self.starts.long().cumsum(dim=1)

    @property
    def reads_incoming(self) -> torch.Tensor:
        """Bool `[rows, S]`: the token comes before the slot's first start, so sees the incoming state."""
        return self.doc == 0


def slot_documents(comm: CPGroup, seq_idx: torch.Tensor, halo: int) -> SlotDocuments:
    """`SlotDocuments` of this rank's `seq_idx` rows `[rows, S]` (document ids, as the base class
    reads them: a change between neighbours is a boundary). One all-gather of each slot's last
    max(halo, 1) ids and its first; `halo` = the largest conv's kernel - 1."""
    rows, S = seq_idx.shape
    h = max(halo, 1)
    if S < h:
        raise ValueError(f"CP slot of {S} tokens is shorter than the conv halo ({h}); "
                         "see megahybrid.parallel.check_cp_length")
    seq_idx = seq_idx.detach()
    edges = comm.all_gather(torch.cat([seq_idx[:, S - h:], seq_idx[:, :1]], dim=1))  # [slots, B, h+1]
    prev_tail = comm.own(torch.cat([edges[:1, :, :h], edges[:-1, :, :h]]))  # slot c: slot c-1's tail
    window = torch.cat([prev_tail, seq_idx[:, :1]], dim=1)  # [rows, h+1], ends with this slot's token 0
    same = window[:, :-1] == window[:, 1:]
    # A tail token is in token 0's document when no boundary lies between them (suffix AND).
    keep = same.flip(1).long().cumprod(dim=1).flip(1).bool()
    keep |= comm.is_first_slot(rows, seq_idx.device)[:, None]
    starts = torch.cat([~keep[:, -1:], seq_idx[:, 1:] != seq_idx[:, :-1]], dim=1)
    return SlotDocuments(starts=starts, halo_keep=keep)


def run_slot_documents(fn: Callable, tensors: Sequence[torch.Tensor], docs: SlotDocuments,
                       state: Optional[torch.Tensor] = None):
    """`fn(*pieces, state) -> (out [n, L, ...], end state)` once per document piece of each slot row
    (`run_per_document`, the base class's packing): the first piece of a row from its row of `state`
    (None = zeros), later pieces from None. `tensors` `[rows, S, ...]` travel as one flat tensor in
    their promoted dtype (exact) and reach `fn` in their own. Returns (out `[rows, S, ...]`, each row's
    end state)."""
    work = tensors[0].dtype
    for t in tensors[1:]:
        work = torch.promote_types(work, t.dtype)
    widths = [t[0, 0].numel() for t in tensors]
    out_shape = []

    def flat_fn(packed, s):
        pieces = [p.reshape(*packed.shape[:2], *t.shape[2:]).to(t.dtype)
                  for p, t in zip(packed.split(widths, dim=-1), tensors)]
        out, end = fn(*pieces, None if s is None else s["s"])
        out_shape[:] = out.shape[2:]
        return out.flatten(2), {"s": end}

    packed = torch.cat([t.to(work).flatten(2) for t in tensors], dim=-1)
    out, end = run_per_document(flat_fn, packed, None if state is None else {"s": state}, docs.doc)
    return out.unflatten(2, out_shape), end["s"]


def incoming_states(apply_map: Callable[[int, torch.Tensor], torch.Tensor], local_end: torch.Tensor,
                    first: torch.Tensor) -> torch.Tensor:
    """The state entering every slot: S_in(0) = `first`, S_in(c+1) = apply_map(c, S_in(c)) +
    local_end[c]. `local_end` `[num_slots, B, ...]`; returns `[num_slots, B, ...]`."""
    states = [first]
    for c in range(local_end.shape[0] - 1):
        states.append(apply_map(c, states[-1]) + local_end[c])
    return torch.stack(states)


def local_conv(conv: ShortConv, x: torch.Tensor, halo: torch.Tensor, docs: Optional[SlotDocuments] = None):
    """The reference local conv step: `conv` over rows `x` [rows, S, C] from `halo` [rows, K-1, C],
    restarting from zeros at every document start of `docs` -> (y, each row's end conv state)."""
    return conv(x, halo) if docs is None else run_slot_documents(conv, [x], docs, halo)


def conv_with_halo(comm: CPGroup, convs: Sequence[tuple[ShortConv, torch.Tensor, Optional[torch.Tensor]]],
                   docs: Optional[SlotDocuments] = None, local: Callable = local_conv):
    """`[(conv, x rows [rows, S, C], incoming conv state [B, K-1, C] or None), ...]` -> `[(y, end
    conv state), ...]`: each slot's conv starts from the previous slot's last K-1 inputs (the first
    slot from the given state). All tails travel in one all-gather. With `docs` the halo keeps only
    tokens of the document the slot starts in, and the conv restarts at every document start.
    `local` runs the conv (`local_conv`'s contract; megahybrid/parallel/kernels.py passes a kernel)."""
    tails, firsts, halo_of = [], [], []
    for conv, x, state in convs:
        k1 = conv.kernel - 1
        if k1 == 0:
            halo_of.append(None)
            continue
        if x.shape[1] < k1:
            raise ValueError(f"CP slot of {x.shape[1]} tokens is shorter than the conv halo ({k1}); "
                             "see megahybrid.parallel.check_cp_length")
        halo_of.append(len(tails))
        tails.append(x[:, x.shape[1] - k1:])
        firsts.append(comm.first_slot(state, like=tails[-1]))
    gathered = exchange(comm, tails + firsts) if tails else []
    out = []
    for (conv, x, _), i in zip(convs, halo_of):
        if i is None:
            out.append(conv(x, None))
            continue
        tail_all, first_all = gathered[i], gathered[len(tails) + i]
        halo = comm.own(torch.cat([first_all[:1], tail_all[:-1]]))  # slot c reads slot c-1's tail
        if docs is not None:
            keep = docs.halo_keep[:, docs.halo_keep.shape[1] - halo.shape[1]:, None]
            halo = torch.where(keep, halo, torch.zeros_like(halo))
        out.append(local(conv, x, halo, docs))
    return out


def local_delta_rule(q, k, v, beta, g=None, initial_state=None, chunk_size: int = 64, scale=None,
                     docs: Optional[SlotDocuments] = None):
    """The reference local pass of `delta_rule_cp`: `chunked_delta_rule` over slot rows (shapes as in
    `delta_rule_cp`) from `initial_state` [rows, H, dk, dv'] (None = zeros); with `docs` every document
    piece after a row's first runs from zeros. -> (o [rows, S, H, dv'], each row's end state, i.e. the
    end state of its last document). A kernel replacing it keeps this contract (parallel/kernels.py)."""
    if docs is None:
        return chunked_delta_rule(q, k, v, beta, g, chunk_size=chunk_size, initial_state=initial_state, scale=scale)

    def piece(q, k, v, beta, *gate_and_state):
        *gate, s = gate_and_state
        return chunked_delta_rule(q, k, v, beta, *(gate or [None]), chunk_size=chunk_size, initial_state=s,
                                  scale=scale)
    return run_slot_documents(piece, [q, k, v, beta] + ([] if g is None else [g]), docs, initial_state)


def delta_rule_cp(comm: CPGroup, q, k, v, beta, g=None, initial_state=None, chunk_size: int = 64, scale=None,
                  docs: Optional[SlotDocuments] = None, local: Callable = local_delta_rule):
    """`chunked_delta_rule` under CP: q, k [rows, S, H, dk], v [rows, S, H, dv], beta, g [rows, S, H]
    are this rank's slots (as rows); `initial_state` [B, H, dk, dv] is the sequence's (used on its first
    slot; None = zeros); `docs` the packed documents (None: one document); `local` the local pass
    (`local_delta_rule`'s contract). Returns (o [rows, S, H, dv] in o_local's dtype, state at the end of
    each slot [rows, H, dk, dv]). The summaries, the composition and the correction run in the dtype of
    the local end state (float32 from the kernels, float64 in the reference tests)."""
    rows, S, H, dk = q.shape
    dv = v.shape[-1]
    # 1. Local pass on [v | 0] from [0 | I]: o' = [o_local | q~], end state [L | M] (module docstring).
    v_aug = torch.cat([v, v.new_zeros(rows, S, H, dk)], dim=-1)
    eye = torch.eye(dk, dtype=v.dtype, device=v.device).expand(rows, H, dk, dk)
    if docs is not None:  # a slot whose token 0 starts a document reads nothing of the incoming state
        eye = eye * (~docs.starts[:, 0]).to(v.dtype)[:, None, None, None]
    s0_aug = torch.cat([v.new_zeros(rows, H, dk, dv), eye], dim=-1)
    # With docs, later documents start from [0 | 0]: q~ = 0 after the first start, M = 0 if there is one.
    o_aug, s_aug = local(q, k, v_aug, beta, g, initial_state=s0_aug, chunk_size=chunk_size, scale=scale, docs=docs)
    o_local, q_tilde = o_aug.split([dv, dk], dim=-1)
    local_end, M = s_aug.split([dv, dk], dim=-1)
    # 2.-3. Gather (L, M) of every slot with the sequence's incoming state; compose.
    first = comm.first_slot(initial_state, like=local_end)
    L_all, M_all, first_all = exchange(comm, [local_end, M, first])
    s_in = comm.own(incoming_states(lambda c, s: M_all[c] @ s, L_all, first_all[0]))
    # 4. Correct: o_t += S_in^T q~_t; the slot's true end state.
    work = s_in.dtype
    o = o_local.to(work) + torch.einsum("bthk,bhkv->bthv", q_tilde.to(work), s_in)
    return o.to(o_local.dtype), M @ s_in + local_end


def delta_rule_heads_cp(comm: CPGroup, q, k, v, beta, g, state, chunk_size: int,
                        docs: Optional[SlotDocuments] = None):
    """`delta_rule_heads` (L2-normalised q/k, working dtype, autocast off) under CP."""
    work = torch.promote_types(v.dtype, torch.float32)
    h0 = None if state is None else state["recurrent"]
    with torch.autocast(v.device.type, enabled=False):
        q, k = l2norm(q.to(work)), l2norm(k.to(work))
        return delta_rule_cp(comm, q, k, v.to(work), beta.to(work), None if g is None else g.to(work),
                             initial_state=h0, chunk_size=chunk_size, docs=docs)


def local_ssd(x, dt, A, B, C, D=None, chunk_size: int = 64, docs: Optional[SlotDocuments] = None):
    """The reference local pass of `ssd_cp`: `chunked_ssd` over slot rows from a zero state, restarting
    at every document start of `docs` -> (y, each row's end state, i.e. its last document's). A kernel
    replacing it keeps this contract (parallel/kernels.py)."""
    if docs is None:
        return chunked_ssd(x, dt, A, B, C, D, None, chunk_size)
    return run_slot_documents(lambda x, dt, B, C, s: chunked_ssd(x, dt, A, B, C, D, s, chunk_size),
                              [x, dt, B, C], docs)


def ssd_cp(comm: CPGroup, x, dt, A, B, C, D=None, initial_state=None, chunk_size: int = 64,
           docs: Optional[SlotDocuments] = None, local: Callable = local_ssd):
    """`chunked_ssd` under CP: x [rows, S, h, p], dt [rows, S, h], B, C [rows, S, g, n] are this
    rank's slots; `initial_state` [B, h, p, n] the sequence's; `docs` the packed documents (None: one);
    `local` the local pass (`local_ssd`'s contract). Returns (y in y_local's dtype, state at each slot's
    end). The decays, summaries and correction run in the dtype of the local end state."""
    y_local, local_end = local(x, dt, A, B, C, D, chunk_size=chunk_size, docs=docs)
    work = local_end.dtype
    cum = (dt.to(work) * A.to(work)).cumsum(dim=1)  # [rows, S, h] log-decay from the slot's start, <= 0
    weight = cum.exp()  # how much of the incoming state each position reads
    if docs is not None:  # nothing after the slot's first document start
        weight = torch.where(docs.reads_incoming[..., None], weight, torch.zeros_like(weight))
    decay = weight[:, -1]  # M_c, one scalar per head
    first = comm.first_slot(initial_state, like=local_end)
    L_all, M_all, first_all = exchange(comm, [local_end, decay, first])
    s_in = comm.own(incoming_states(lambda c, s: M_all[c][..., None, None] * s, L_all, first_all[0]))
    # y_t += weight_t S_in C_t, head h reading group h // (h/g) (as `expand_groups`, without expanding C).
    G = C.shape[2]
    read = torch.einsum("bgjpn,btgn->btgjp", s_in.unflatten(1, (G, -1)), C.to(work)).flatten(2, 3)
    y = y_local.to(work) + weight[..., None] * read
    return y.to(y_local.dtype), decay[..., None, None] * s_in + local_end


def rglru_cp(comm: CPGroup, x, gate_x, gate_a, recurrent_param, c: float, h0=None,
             docs: Optional[SlotDocuments] = None):
    """`parallel_rglru` under CP: x, gate_x, gate_a [rows, S, W] are this rank's slots; `h0` [B, W]
    the sequence's incoming state, None = the sequence starts a document (its first token is not
    scaled by sqrt(1 - a^2); every later slot continues); `docs` the packed documents (None: one),
    each start a reset. Returns (h [rows, S, W], h at each slot's end)."""
    log_a, u = rglru_coefficients(x, gate_x, gate_a, recurrent_param, c, reset=False)
    if docs is None:
        if h0 is None:
            starts = comm.is_first_slot(x.shape[0], x.device)[:, None, None]
            _, u_reset = rglru_coefficients(x, gate_x, gate_a, recurrent_param, c, reset=True)
            u = torch.where(starts, u_reset, u)
        h_local, local_end = scan_linear_recurrence(log_a, u)
    else:
        resets = docs.starts.clone()
        if h0 is None:
            resets[:, 0] |= comm.is_first_slot(x.shape[0], x.device)
        # A reset token is not scaled by sqrt(1 - a^2) (`rglru_coefficients(reset=True)` at position 0).
        u = torch.where(resets[..., None], torch.sigmoid(gate_x) * x, u)
        h_local, local_end = run_slot_documents(scan_linear_recurrence, [log_a, u], docs)
    weight = log_a.cumsum(dim=1).exp()  # how much of the incoming state each position keeps
    if docs is not None:  # nothing after the slot's first document start
        weight = torch.where(docs.reads_incoming[..., None], weight, torch.zeros_like(weight))
    decay = weight[:, -1]
    first = comm.first_slot(h0, like=local_end)
    L_all, M_all, first_all = exchange(comm, [local_end, decay, first])
    h_in = comm.own(incoming_states(lambda c_, h: M_all[c_] * h, L_all, first_all[0]))
    h = h_local + weight * h_in[:, None]
    return h, decay * h_in + local_end
