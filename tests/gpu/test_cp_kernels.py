"""State-passing context parallelism on the GPU kernels (issue 7), on one GPU: a sequence split into R
pieces with the state passed between them in one process (`SimulatedCP(R)`, contiguous and zigzag),
each piece run by flash-linear-attention / mamba_ssm (`megahybrid/parallel/kernels.py`).

Each case compares three runs of the same inputs, outputs, final state and every gradient (q, k, v,
beta, g, h0 for the delta rule; x, dt, A, B, C, D, h0 for SSD; x, the incoming state and every
parameter for a whole mixer):
  cp    - the kernels under CP (`delta_rule_cp` / `ssd_cp` / `forward_cp_kernels`);
  whole - the same kernels once over the whole sequence;
  ref   - the float64 reference (`chunked_delta_rule` / `chunked_ssd` / the module) on the same values.
and prints one line per case, e.g.
  cp-kernels gdn R=4 zigzag fp32 d=64: cp-ref out 1.2e-03 grads 3.0e-03 (dk) | whole-ref out .. | cp-whole out ..
Pass: cp-ref within TOL (absolute), and cp-ref no worse than CP_VS_WHOLE x whole-ref + FLOOR per tensor
(state passing costs no accuracy beyond the kernel's own). Run with `-s` to see the lines; they are
all printed before any assertion, so a failing tolerance still reports its numbers.
"""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F

from tests.helpers import rel_error

pytestmark = pytest.mark.gpu

F32, BF16 = torch.float32, torch.bfloat16
B, T, H = 2, 1024, 4  # at R=4 zigzag: 8 slots of 128 tokens (>= 64, FLA's chunk)
TOL = {  # (outputs and final states, gradients): max-relative error against the float64 reference
    F32: (1e-2, 2e-2),
    BF16: (5e-2, 1e-1),
}
"""Why these: Triton's float32 dots run in TF32 by default (10-bit mantissa, 2^-11 = 4.9e-4 per
rounding), so the "fp32" kernels are ~1e-3 accurate, not 1e-6; bf16 rounds every stored tile and
output (2^-9 = 2e-3). FLA's bf16 gated delta rule vs the fp32 reference measured ~5e-3 on an H100 at
T=300 (design.md, gdn_guard.TOLERANCE 2e-2), and the CP output adds one more bf16 rounding (o_local
and q~ leave the kernel in bf16 before the fp32 correction), hence 5e-2; gradients sum over the whole
sequence (dg and dA through reverse cumsums, with cancellations), hence 2x for them. These are guesses
from the precisions, not yet measured on this path. A state-passing bug (a wrong composition or
correction) gives errors of order 1, far above both."""
CP_VS_WHOLE, FLOOR = 3.0, {F32: 2e-3, BF16: 1e-2}
"""cp-ref <= CP_VS_WHOLE * whole-ref + FLOOR[dtype] for every tensor: the CP path adds a bf16/TF32
rounding of q~ and o_local and an fp32 correction, so it may be somewhat worse than the single kernel
run, not by more; FLOOR keeps a tensor the whole kernel happens to get nearly exact from failing."""
MIXER_TOL = (1e-2, 3e-2)
"""Whole mixers in float32 (kernels in TF32, projections and norms in fp32)."""
T_MIXER = 512  # 8 zigzag slots of 64 at R=4
DEVICE = "cuda"

torch.backends.cuda.matmul.allow_tf32 = False  # the torch side of the fp32 runs (projections, corrections)
torch.backends.cudnn.allow_tf32 = False


# ------------------------------------------------------------------------ shared pieces


def dtype_name(dtype: torch.dtype) -> str:
    return {F32: "fp32", BF16: "bf16"}[dtype]


def packed_seq_idx(T_: int) -> torch.Tensor:
    """Two rows of documents: row 0 has documents crossing slot boundaries (at 128, 256, 384 for 8 slots
    of 128), one starting exactly on a boundary (512) and several in one slot; row 1 two long ones."""
    rows = [(100, 300, 112, 40, 160, T_ - 712), (700, T_ - 700)] if T_ == 1024 else \
        [(50, 150, 56, 20, 80, T_ - 356), (350, T_ - 350)]
    return torch.stack([torch.repeat_interleave(torch.arange(len(r)), torch.tensor(r)) for r in rows]).to(DEVICE)


def whole_docs(seq_idx):
    """The whole sequence's `SlotDocuments` (only `.doc` is read by the local passes)."""
    from megahybrid.parallel.state_passing import SlotDocuments

    starts = torch.cat([torch.zeros_like(seq_idx[:, :1], dtype=torch.bool), seq_idx[:, 1:] != seq_idx[:, :-1]], 1)
    return SlotDocuments(starts=starts, halo_keep=torch.ones_like(starts[:, :1]))


def run_with_grads(fn, inputs: dict, cotangents: dict):
    """Fresh leaves of `inputs` (None entries pass through) -> fn(**leaves) = {name: tensor}; the loss
    sum(out * cotangent) is differentiated. Returns (outputs detached, {d<name>: grad})."""
    leaves = {n: None if t is None else t.detach().clone().requires_grad_() for n, t in inputs.items()}
    outs = fn(**leaves)
    loss = sum((outs[n].float() * cotangents[n]).sum() for n in cotangents)
    named = {n: t for n, t in leaves.items() if t is not None}
    grads = torch.autograd.grad(loss, list(named.values()), allow_unused=True)
    return ({n: t.detach() for n, t in outs.items()},
            {f"d{n}": torch.zeros_like(t) if g is None else g for (n, t), g in zip(named.items(), grads)})


def errors(ref, got) -> dict:
    (out_ref, grad_ref), (out, grad) = ref, got
    return {**{n: rel_error(out_ref[n], out[n]) for n in out_ref}, **{n: rel_error(grad_ref[n], grad[n]) for n in grad_ref}}


def summary(errs: dict, outputs) -> str:
    out = max(errs[n] for n in outputs)
    grads = {n: e for n, e in errs.items() if n not in outputs}
    worst = max(grads, key=grads.get)
    return f"out {out:.1e} grads {grads[worst]:.1e} ({worst})"


def check(label: str, dtype, outputs, cp_ref: dict, whole_ref: dict | None, cp_whole: dict | None, tol=None):
    """Print the case's line, then assert (see the module docstring)."""
    line = f"cp-kernels {label}: cp-ref {summary(cp_ref, outputs)}"
    if whole_ref is not None:
        line += f" | whole-ref {summary(whole_ref, outputs)} | cp-whole {summary(cp_whole, outputs)}"
    print(line)
    tol_out, tol_grad = tol or TOL[dtype]
    bad = [f"{n} {e:.2e} > {tol_out if n in outputs else tol_grad:.0e}" for n, e in cp_ref.items()
           if not e <= (tol_out if n in outputs else tol_grad)]
    if whole_ref is not None:
        bad += [f"{n}: cp-ref {e:.2e} > {CP_VS_WHOLE} x whole-ref {whole_ref[n]:.2e} + {FLOOR[dtype]:.0e}"
                for n, e in cp_ref.items() if not e <= CP_VS_WHOLE * whole_ref[n] + FLOOR[dtype]]
    assert not bad, f"{label}: " + "; ".join(bad)


def cp_rows(comm, t):
    """A whole-sequence tensor [B, T, ...] -> the simulated ranks' slot rows."""
    return None if t is None else comm.to_rows(comm.shard(t))


def final_of(comm, ends):
    """Slot-row end states -> the whole sequence's final state (held by the last slot's rank)."""
    return comm.latest(ends).unflatten(0, (comm.size, -1))[comm.last_slot_rank]


# ------------------------------------------------------------------------ delta rule


DELTA_CASES = [  # (rule, R, layout, dtype, head dim, incoming state, packed documents)
    ("gdn", 2, "contiguous", F32, 64, False, False),
    ("gdn", 4, "contiguous", F32, 64, True, False),
    ("gdn", 2, "zigzag", F32, 64, False, False),
    ("gdn", 4, "zigzag", F32, 64, True, False),
    ("gdn", 4, "zigzag", F32, 128, True, False),
    ("gdn", 4, "zigzag", BF16, 64, True, False),
    ("gdn", 2, "contiguous", BF16, 64, False, False),
    ("deltanet", 4, "contiguous", BF16, 64, True, False),  # chunk_delta_rule
    ("deltanet", 2, "zigzag", F32, 64, False, False),  # float32: the gated kernel with g = 0
    ("gdn", 4, "zigzag", F32, 64, True, True),
    ("deltanet", 2, "contiguous", BF16, 64, False, True),
]


def delta_inputs(rule, dtype, d, with_state, seed=0):
    gen = torch.Generator(device=DEVICE).manual_seed(seed)
    rand = lambda *s: torch.randn(*s, device=DEVICE, generator=gen)  # noqa: E731
    q, k = (F.normalize(rand(B, T, H, d), dim=-1) for _ in range(2))  # callers L2-normalise q/k
    inputs = {"q": q, "k": k, "v": rand(B, T, H, d), "beta": torch.sigmoid(rand(B, T, H))}
    inputs = {n: t.to(dtype) for n, t in inputs.items()}
    # Per-head decay from ~0.95 (memory ~20 tokens) to ~0.9997 (~3000 tokens > T): the slow heads
    # carry the state across every slot boundary, the fast ones test the near-zero M.
    bias = torch.linspace(3.0, 8.0, H, device=DEVICE)
    inputs["g"] = F.logsigmoid(rand(B, T, H) * 0.5 + bias) if rule == "gdn" else None
    inputs["h0"] = rand(B, H, d, d) * 0.5 if with_state else None
    cotangents = {"o": rand(B, T, H, d), "state": rand(B, H, d, d)}
    return inputs, cotangents


@pytest.mark.parametrize("rule,R,layout,dtype,d,with_state,packed", DELTA_CASES,
                         ids=[f"{c[0]}-R{c[1]}-{c[2]}-{dtype_name(c[3])}-d{c[4]}" + ("-h0" if c[5] else "")
                              + ("-docs" if c[6] else "") for c in DELTA_CASES])
def test_delta_rule_cp_kernels(rule, R, layout, dtype, d, with_state, packed):
    from megahybrid.parallel import SimulatedCP
    from megahybrid.parallel.kernels import fla_delta_rule
    from megahybrid.parallel.state_passing import delta_rule_cp, local_delta_rule, slot_documents

    inputs, cot = delta_inputs(rule, dtype, d, with_state)
    seq_idx = packed_seq_idx(T) if packed else None
    docs = None if seq_idx is None else whole_docs(seq_idx)
    comm = SimulatedCP(R, layout)
    cp_docs = None if seq_idx is None else slot_documents(comm, cp_rows(comm, seq_idx), halo=0)

    def reference(q, k, v, beta, g, h0):
        o, s = local_delta_rule(*(None if t is None else t.double() for t in (q, k, v, beta, g)),
                                initial_state=None if h0 is None else h0.double(), chunk_size=64, docs=docs)
        return {"o": o, "state": s}

    def whole(q, k, v, beta, g, h0):
        o, s = fla_delta_rule(q, k, v, beta, g, initial_state=h0, docs=docs)
        return {"o": o, "state": s}

    def cp(q, k, v, beta, g, h0):  # the loss pairs sharded outputs with sharded cotangents, as real ranks do
        o, ends = delta_rule_cp(comm, *(cp_rows(comm, t) for t in (q, k, v, beta, g)), initial_state=h0,
                                docs=cp_docs, local=fla_delta_rule)
        return {"o_sharded": comm.from_rows(o), "state": final_of(comm, ends)}

    ref = run_with_grads(reference, inputs, cot)
    got_whole = run_with_grads(whole, inputs, cot)
    out_cp, grads_cp = run_with_grads(cp, inputs, {"o_sharded": comm.shard(cot["o"]), "state": cot["state"]})
    got_cp = ({"o": comm.unshard(out_cp["o_sharded"]), "state": out_cp["state"]}, grads_cp)

    label = f"{rule} R={R} {layout} {dtype_name(dtype)} d={d}" + (" h0" if with_state else "") + \
        (" docs" if packed else "")
    check(label, dtype, ("o", "state"), errors(ref, got_cp), errors(ref, got_whole), errors(got_whole, got_cp))


# ------------------------------------------------------------------------ Mamba2 SSD


SSD_CASES = [  # (R, layout, dtype, head dim = state size, incoming state, packed documents)
    (2, "contiguous", F32, 64, False, False),
    (4, "contiguous", F32, 64, True, False),
    (2, "zigzag", F32, 64, False, False),
    (4, "zigzag", F32, 64, True, False),
    (4, "zigzag", F32, 128, True, False),
    (4, "zigzag", BF16, 64, True, False),
    (4, "zigzag", F32, 64, False, True),
    (2, "contiguous", BF16, 64, False, True),
]
G = 2  # B/C groups (2 heads each)


def ssd_inputs(dtype, d, with_state, seed=0):
    gen = torch.Generator(device=DEVICE).manual_seed(seed)
    rand = lambda *s: torch.randn(*s, device=DEVICE, generator=gen)  # noqa: E731
    inputs = {"x": rand(B, T, H, d).to(dtype),
              "dt": F.softplus(rand(B, T, H) * 0.5 - 3.0),  # ~0.05, positive as after the mixer's softplus
              # per-token decay exp(dt A) from ~0.999 (A = -0.02) to ~0.9 (A = -2)
              "A": -torch.logspace(-1.7, 0.3, H, device=DEVICE),
              "B": rand(B, T, G, d).to(dtype), "C": rand(B, T, G, d).to(dtype),
              "D": rand(H),
              "h0": rand(B, H, d, d) * 0.5 if with_state else None}
    cotangents = {"y": rand(B, T, H, d), "state": rand(B, H, d, d)}
    return inputs, cotangents


@pytest.mark.parametrize("R,layout,dtype,d,with_state,packed", SSD_CASES,
                         ids=[f"R{c[0]}-{c[1]}-{dtype_name(c[2])}-d{c[3]}" + ("-h0" if c[4] else "")
                              + ("-docs" if c[5] else "") for c in SSD_CASES])
def test_ssd_cp_kernels(R, layout, dtype, d, with_state, packed):
    from megahybrid.mixers.mamba2 import chunked_ssd
    from megahybrid.parallel import SimulatedCP
    from megahybrid.parallel.kernels import mamba_ssd
    from megahybrid.parallel.state_passing import local_ssd, slot_documents, ssd_cp

    assert not (with_state and packed), "the packed reference (local_ssd) starts from zeros"
    inputs, cot = ssd_inputs(dtype, d, with_state)
    seq_idx = packed_seq_idx(T) if packed else None
    docs = None if seq_idx is None else whole_docs(seq_idx)
    comm = SimulatedCP(R, layout)
    cp_docs = None if seq_idx is None else slot_documents(comm, cp_rows(comm, seq_idx), halo=0)

    def reference(x, dt, A, B, C, D, h0):
        x, dt, A, B, C, D = (t.double() for t in (x, dt, A, B, C, D))
        if docs is None:
            y, s = chunked_ssd(x, dt, A, B, C, D, None if h0 is None else h0.double(), 64)
        else:
            y, s = local_ssd(x, dt, A, B, C, D, chunk_size=64, docs=docs)
        return {"y": y, "state": s}

    def whole(x, dt, A, B, C, D, h0):
        y, s = mamba_ssd(x, dt, A, B, C, D, chunk_size=64, docs=docs, initial_state=h0)
        return {"y": y, "state": s}

    def cp(x, dt, A, B, C, D, h0):
        y, ends = ssd_cp(comm, *(cp_rows(comm, t) for t in (x, dt)), A, *(cp_rows(comm, t) for t in (B, C)), D,
                         initial_state=h0, chunk_size=64, docs=cp_docs, local=mamba_ssd)
        return {"y_sharded": comm.from_rows(y), "state": final_of(comm, ends)}

    ref = run_with_grads(reference, inputs, cot)
    got_whole = run_with_grads(whole, inputs, cot)
    out_cp, grads_cp = run_with_grads(cp, inputs, {"y_sharded": comm.shard(cot["y"]), "state": cot["state"]})
    got_cp = ({"y": comm.unshard(out_cp["y_sharded"]), "state": out_cp["state"]}, grads_cp)

    label = f"ssd R={R} {layout} {dtype_name(dtype)} p=n={d}" + (" h0" if with_state else "") + \
        (" docs" if packed else "")
    check(label, dtype, ("y", "state"), errors(ref, got_cp), errors(ref, got_whole), errors(got_whole, got_cp))


# ------------------------------------------------------------------------ whole mixers


def build_mixer(name: str):
    from megahybrid.config import DeltaNetConfig, GatedDeltaNetConfig, Mamba2Config, ModelConfig
    from megahybrid.mixers.deltanet import DeltaNet
    from megahybrid.mixers.gated_deltanet import GatedDeltaNet
    from megahybrid.mixers.mamba2 import Mamba2

    hidden = 256
    torch.manual_seed(0)
    module = {
        "gdn": lambda: GatedDeltaNet(ModelConfig(hidden_size=hidden, gdn=GatedDeltaNetConfig(
            num_qk_heads=2, num_v_heads=4, qk_head_dim=64, v_head_dim=64, conv_kernel=4))),
        "deltanet": lambda: DeltaNet(ModelConfig(hidden_size=hidden, deltanet=DeltaNetConfig(
            num_heads=4, head_dim=64, conv_kernel=4))),
        "mamba2": lambda: Mamba2(ModelConfig(hidden_size=hidden, mamba2=Mamba2Config(
            state_size=64, head_dim=64, num_groups=2, expand=2, conv_kernel=4, chunk_size=64))),
    }[name]()
    with torch.no_grad():  # unit-variance projections; decay parameters keep their init ranges
        for pname, p in module.named_parameters():
            if pname.split(".")[-1] in ("A_log", "dt_bias"):
                continue
            if p.dim() == 2:
                p.copy_(torch.randn_like(p) / p.shape[1] ** 0.5)
            else:
                p.copy_(torch.randn_like(p) * 0.3 + (1.0 if "norm" in pname else 0.0))
    return module.to(DEVICE)


MIXER_CASES = [  # (mixer, R, layout, incoming state, packed documents)
    ("gdn", 2, "contiguous", False, False),
    ("gdn", 4, "zigzag", True, False),
    ("gdn", 2, "zigzag", False, True),
    ("deltanet", 4, "contiguous", False, False),
    ("mamba2", 2, "contiguous", False, False),
    ("mamba2", 4, "zigzag", True, False),
    ("mamba2", 4, "contiguous", False, True),
]


@pytest.mark.parametrize("name,R,layout,with_state,packed", MIXER_CASES,
                         ids=[f"{c[0]}-R{c[1]}-{c[2]}" + ("-state" if c[3] else "") + ("-docs" if c[4] else "")
                              for c in MIXER_CASES])
def test_mixer_cp_kernels(name, R, layout, with_state, packed):
    """forward_cp_kernels (conv halo on FLA's causal_conv1d, cores on the kernels) == the module."""
    from megahybrid.parallel import SimulatedCP
    from megahybrid.parallel.kernels import forward_cp_kernels, forward_kernels

    module = build_mixer(name)
    ref_module = copy.deepcopy(module).double()
    gen = torch.Generator(device=DEVICE).manual_seed(1)
    rand = lambda *s: torch.randn(*s, device=DEVICE, generator=gen)  # noqa: E731
    x = rand(B, T_MIXER, 256)
    with torch.no_grad():
        _, warm = module(rand(B, 9, 256))
    state = warm if with_state else None
    seq_idx = packed_seq_idx(T_MIXER) if packed else None
    cot = {"y": rand(B, T_MIXER, 256), **{f"state[{k}]": rand(*v.shape) for k, v in warm.items()}}
    comm = SimulatedCP(R, layout)

    def run(m, forward, comm=None):
        """(outputs in whole-sequence layout, grads of x, the incoming state and every parameter)."""
        dtype = next(m.parameters()).dtype
        leaves = {"x": x.to(dtype).clone().requires_grad_()}
        if state is not None:
            leaves.update({f"state[{k}]": v.to(dtype).clone().requires_grad_() for k, v in state.items()})
        st = None if state is None else {k: leaves[f"state[{k}]"] for k in state}
        y, final = forward(m, leaves["x"], st)
        dy = cot["y"] if comm is None else comm.shard(cot["y"])
        loss = (y.float() * dy).sum() + sum((final[k].float() * cot[f"state[{k}]"]).sum() for k in final)
        named = {**leaves, **{f"param {n}": p for n, p in m.named_parameters()}}
        grads = torch.autograd.grad(loss, list(named.values()), allow_unused=True)
        outs = {"y": y.detach() if comm is None else comm.unshard(y.detach()),
                **{f"final[{k}]": v.detach() for k, v in final.items()}}
        return outs, {f"d{n}": torch.zeros_like(t) if g is None else g for (n, t), g in zip(named.items(), grads)}

    def cp(m, x_, st):
        y, ends = forward_cp_kernels(m, comm.shard(x_), comm, st, None if seq_idx is None else comm.shard(seq_idx))
        return y, {k: v.unflatten(0, (R, B))[comm.last_slot_rank] for k, v in ends.items()}

    ref = run(ref_module, lambda m, x_, st: m(x_, st, seq_idx))
    got_cp = run(module, cp, comm)
    outputs = list(ref[0])
    label = f"mixer {name} R={R} {layout} fp32" + (" state" if with_state else "") + (" docs" if packed else "")
    if packed:  # forward_kernels has no packed path: compare with the reference only
        check(label, F32, outputs, errors(ref, got_cp), None, None, tol=MIXER_TOL)
        return
    got_whole = run(module, forward_kernels)
    check(label, F32, outputs, errors(ref, got_cp), errors(ref, got_whole), errors(got_whole, got_cp), tol=MIXER_TOL)
