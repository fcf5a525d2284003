"""A whole hybrid LM under context parallelism (issue 7) == the same `ReferenceLM` on the whole sequence in
one process, float64, max relative error <= 1e-10, for the logits, the loss, the MoE aux loss and every
parameter gradient. The reference is the unsplit `ReferenceLM` forward (`attention_core` with its
causal/window mask, the mixers' own chunked forms, the MoE's own aux loss on all tokens); the CP run
shares nothing with it but the weights.
- pattern `MG*-dr-wE` (Mamba2, GDN, attention, MLP, DeltaNet, RG-LRU, MLP, sliding window, MoE with
  z-loss), contiguous and zigzag layouts: simulated ranks (CP 2, 3, 4) and real gloo ranks (4 spawned
  processes: CP over all 4 and over two 2-rank subgroups, all-gather backward collectives included);
- one rank's labels all masked: finite loss and gradients, equal to the unsplit masked mean;
- packed documents (the hybrid LM and an attention + MoE LM), documents crossing and starting on slot
  boundaries;
- one-line refusals: layer types with no CP form (named by symbol), a KV cache, MoE capacity dropping,
  cp > 1 on the megatron backend.
- `megahybrid train parallel.cp=2` through torchrun (gloo): 2 processes (cp 2) and 4 processes (cp 2 x dp 2,
  zigzag) give the loss and aux loss of a one-process cp=1 run of the same config and seed to rel 1e-5, the
  gradient norm to rel 1e-4 (float32: the CP forward adds in another order; see TRAIN_RTOL)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F

import megahybrid
from megahybrid.config import ConfigError
from megahybrid.data.prepare import prepare
from megahybrid.mixers.attention import Attention
from megahybrid.parallel import (DistributedCP, SimulatedCP, attention_cp, check_context_parallel, cp_forward_lm,
                                 cp_lm_loss)
from megahybrid.reference.model import ReferenceLM
from megahybrid.train.run import check_layout_supported, train_from_cli
from tests.helpers import assert_close

F64 = torch.float64
B, T, VOCAB = 2, 48, 40  # T / 8 = 6 tokens per zigzag slot at CP=4, >= the conv halo of 3
RTOL = 1e-10
SIZES = [
    "model.hidden_size=16", f"model.vocab_size={VOCAB}", "model.tie_embeddings=false",
    "model.attention.num_heads=4", "model.attention.num_kv_heads=2", "model.attention.window=7",
    "model.attention.qk_norm=true", "model.attention.output_gate=true",
    "model.mamba2.state_size=6", "model.mamba2.head_dim=4", "model.mamba2.num_groups=2", "model.mamba2.chunk_size=8",
    "model.gdn.num_qk_heads=2", "model.gdn.num_v_heads=4", "model.gdn.qk_head_dim=8", "model.gdn.v_head_dim=6",
    "model.gdn.chunk_size=8", "model.deltanet.num_heads=2", "model.deltanet.head_dim=8", "model.deltanet.chunk_size=8",
    "model.rglru.width=24", "model.rglru.num_heads=4", "model.mlp.ffn_hidden_size=24",
    "model.moe.num_experts=4", "model.moe.top_k=2", "model.moe.ffn_hidden_size=12",
    "model.moe.aux_loss_coeff=0.1", "model.moe.z_loss_coeff=0.01",
]
HYBRID = "MG*-dr-wE"
KEEP_INIT = ("A_log", "dt_bias", "recurrent_param")
"""Decay parameters keep their realistic init ranges; every other weight is N(0, 0.3) (norm gains 1 + that),
so no layer is close to the identity and every path is exercised."""


def build(pattern: str = HYBRID, seed: int = 0) -> ReferenceLM:
    torch.manual_seed(seed)
    model = ReferenceLM(megahybrid.load_config(pattern, SIZES)).double()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.split(".")[-1] not in KEEP_INIT:
                p.copy_(torch.randn_like(p) * 0.3 + (1.0 if "norm" in name else 0.0))
    return model


def batch(seed: int = 1):
    """Token ids, labels, and a random cotangent for the logits."""
    gen = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, VOCAB, (B, T), generator=gen)
    labels = torch.randint(0, VOCAB, (B, T), generator=gen)
    return ids, labels, torch.randn(B, T, VOCAB, generator=gen, dtype=F64)


def param_grads(loss, model) -> dict:
    named = dict(model.named_parameters())
    found = torch.autograd.grad(loss, list(named.values()), allow_unused=True)
    return {n: torch.zeros_like(p) if g is None else g for (n, p), g in zip(named.items(), found)}


def reference(model, ids, labels, dlogits, seq_idx=None):
    """The whole batch in one process: logits, cross entropy (labels -100 ignored), aux loss and the grads
    of  sum(logits * dlogits) + cross entropy + aux."""
    logits = model(ids, seq_idx=seq_idx)
    ce = F.cross_entropy(logits.flatten(0, 1), labels.flatten())
    aux = model.aux_loss()
    grads = param_grads((logits * dlogits).sum() + ce + aux, model)
    return logits.detach(), ce.detach(), aux.detach(), grads


def cp_run(model, comm, ids, labels, dlogits, seq_idx=None):
    """The same on this process's CP shares: local logits, loss/aux shares and gradient contributions."""
    shard = lambda t: None if t is None else comm.shard(t)  # noqa: E731
    logits = cp_forward_lm(model, shard(ids), comm, shard(seq_idx))
    ce = cp_lm_loss(logits, shard(labels), comm)
    aux = model.aux_loss()
    grads = param_grads((logits * shard(dlogits)).sum() + ce + aux, model)
    return logits.detach(), ce.detach(), aux.detach(), grads


# ---------------------------------------------------------------------------- simulated ranks


@pytest.mark.parametrize("cp,layout", [(2, "contiguous"), (4, "contiguous"), (3, "zigzag"), (4, "zigzag")],
                         ids=lambda v: str(v))
def test_simulated_lm_equals_whole(cp, layout):
    model = build()
    ids, labels, dlogits = batch()
    labels[0, :5] = -100
    logits_ref, ce_ref, aux_ref, grads_ref = reference(model, ids, labels, dlogits)
    comm = SimulatedCP(cp, layout)
    logits, ce, aux, grads = cp_run(model, comm, ids, labels, dlogits)
    assert_close("logits", logits_ref, comm.unshard(logits), RTOL)
    assert_close("loss", ce_ref, ce, RTOL)  # the simulated group holds every rank: its share is the whole
    assert_close("aux loss", aux_ref, aux, RTOL)
    for n in grads_ref:
        assert_close(f"d {n}", grads_ref[n], grads[n], RTOL)


def test_masked_rank_gives_finite_loss_and_grads():
    """CP=4: every label of rank 3's slot masked; the loss shares and their gradients are finite and equal
    the unsplit masked mean; a per-rank mean there would be 0/0."""
    model = build()
    ids, labels, _ = batch()
    labels[:, 3 * T // 4:] = -100
    logits = model(ids)
    ce_ref = F.cross_entropy(logits.flatten(0, 1), labels.flatten())
    grads_ref = param_grads(ce_ref, model)
    comm = SimulatedCP(4)
    logits_local = cp_forward_lm(model, comm.shard(ids), comm)
    ce = cp_lm_loss(logits_local, comm.shard(labels), comm)
    grads = param_grads(ce, model)
    assert torch.isfinite(ce)
    assert_close("loss", ce_ref.detach(), ce.detach(), RTOL)
    for n in grads_ref:
        assert_close(f"d {n}", grads_ref[n], grads[n], RTOL)


PACKED = torch.tensor([[0] * 12 + [1] * 17 + [2] * 19, [0] * 5 + [1] * 43])
"""Documents crossing slot boundaries, one starting exactly on one (token 12: CP=4 contiguous and zigzag)."""


@pytest.mark.parametrize("pattern", [HYBRID, "*-wE"])
@pytest.mark.parametrize("layout", ["contiguous", "zigzag"])
def test_packed_documents(pattern, layout):
    """Packed rows: attention sees only its own document and RoPE restarts per document, recurrences restart
    from zero state, as the reference's per-document runs do."""
    model = build(pattern)
    ids, labels, dlogits = batch()
    seq_idx = PACKED
    logits_ref, ce_ref, aux_ref, grads_ref = reference(model, ids, labels, dlogits, seq_idx)
    comm = SimulatedCP(4, layout)
    logits, ce, aux, grads = cp_run(model, comm, ids, labels, dlogits, seq_idx)
    assert_close("logits", logits_ref, comm.unshard(logits), RTOL)
    assert_close("loss", ce_ref, ce, RTOL)
    for n in grads_ref:
        assert_close(f"d {n}", grads_ref[n], grads[n], RTOL)


# ---------------------------------------------------------------------------- real ranks (gloo)


def _check_ranks(group, checks: list) -> None:
    """This process as one rank of `group`: the hybrid LM in both layouts plus a masked last rank, == the
    whole batch computed locally. Loss shares and parameter gradients are summed over the group (as the
    training loop's gradient all-reduce does); comparisons are appended to `checks`, run after all
    collectives."""
    rank, world = dist.get_rank(group), dist.get_world_size(group)
    for layout, case in [("contiguous", ""), ("zigzag", ""), ("contiguous", "masked last rank"),
                         ("zigzag", "packed")]:
        model = build()
        ids, labels, dlogits = batch()
        if case == "masked last rank":
            labels[:, T - T // world:] = -100
        seq_idx = PACKED if case == "packed" else None
        logits_ref, ce_ref, aux_ref, grads_ref = reference(model, ids, labels, dlogits, seq_idx)
        comm = DistributedCP(group, layout)
        logits, ce, aux, grads = cp_run(model, comm, ids, labels, dlogits, seq_idx)
        where = f"[{layout} {case} rank {rank}/{world}]"
        checks.append((f"{where} logits", comm.shard(logits_ref), logits))
        for name, ref, share in [("loss", ce_ref, ce), ("aux loss", aux_ref, aux)]:
            dist.all_reduce(share, group=group)
            checks.append((f"{where} {name}", ref, share))
        for n in grads_ref:
            dist.all_reduce(grads[n], group=group)
            checks.append((f"{where} d {n}", grads_ref[n], grads[n]))


def _gloo_worker(rank: int, init_file: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=4)
    checks = []
    try:
        _check_ranks(None, checks)  # CP over all 4 ranks
        pairs = [dist.new_group([0, 1]), dist.new_group([2, 3])]  # every process takes part in creating each
        _check_ranks(pairs[rank // 2], checks)  # two CP groups of 2 side by side
    finally:
        dist.destroy_process_group()
    for name, ref, out in checks:
        assert_close(name, ref, out, RTOL)  # also fails on NaN/Inf


def test_gloo_ranks_equal_whole():
    """The hybrid LM over 4 and over 2 real processes (gloo) == one process, both layouts."""
    with tempfile.TemporaryDirectory() as tmp:
        mp.spawn(_gloo_worker, args=(os.path.join(tmp, "rendezvous"),), nprocs=4)


# ---------------------------------------------------------------------------- refusals


@pytest.mark.parametrize("pattern,symbol,name", [("M-s", "s", "shared_attention"), ("h-", "h", "hymba"),
                                                 ("m-", "m", "mamba1")])
def test_layer_types_without_cp_form_are_refused(pattern, symbol, name):
    config = megahybrid.load_config(pattern, [*SIZES, "parallel.cp=2", "model.attention.output_gate=false"])
    message = (rf"model.pattern: layer \d+ '{symbol}' \({name}\) has no context-parallel form \(parallel.cp=2 "
               r"supports M G \* - E d w r.*\); set parallel.cp=1")
    with pytest.raises(ConfigError, match=message):
        check_context_parallel(config)
    with pytest.raises(ConfigError, match=message):
        cp_forward_lm(ReferenceLM(config), torch.zeros(1, 8, dtype=torch.long), SimulatedCP(2))


def test_other_refusals():
    with pytest.raises(NotImplementedError, match="KV-cache state cannot be passed under context parallelism"):
        attention = Attention(megahybrid.load_config("*", SIZES).model)
        attention_cp(attention, torch.zeros(1, 8, 16), SimulatedCP(2), state={"k": None, "v": None})
    with pytest.raises(ConfigError, match=r"model.moe.capacity_factor=1.25: .* set it to null"):
        check_context_parallel(megahybrid.load_config("*E", [*SIZES, "parallel.cp=2",
                                                             "model.moe.capacity_factor=1.25"]))
    with pytest.raises(ConfigError, match=r"parallel.cp=2: the megatron backend .* set train.backend=reference"):
        check_layout_supported(megahybrid.load_config("*E", [*SIZES, "parallel.cp=2", "train.backend=megatron"]))
    with pytest.raises(ConfigError, match=r"parallel.tp=2: .*set parallel.tp=1"):
        check_layout_supported(megahybrid.load_config("*E", [*SIZES, "parallel.tp=2"]))


# ---------------------------------------------------------------------------- megahybrid train parallel.cp=2

ROOT = Path(__file__).resolve().parents[2]
TRAIN = ["model.vocab_size=512", "train.seq_len=32", "train.micro_batch_size=1", "train.global_batch_size=4",
         "train.threads=1", "train.log_every=1", "train.warmup_steps=2", "train.eval_every=0", "train.steps=6"]
"""The tiny default preset (`MG*E`: Mamba2, GDN, attention, MoE) on packed documents. micro_batch_size=1 in
every run: the MoE aux loss is a statistic of one micro-batch, so runs compare only at equal micro-batches."""
TRAIN_RTOL = {"loss": 1e-5, "aux_loss": 1e-5, "grad_norm": 1e-4, "lr": 0.0}
"""Measured over the 6 steps: <= 3e-7 everywhere but step 4 of the 2-process run (loss 1.5e-6, grad norm
1.2e-5, back to <= 3e-7 at step 5). The same runs without the MoE (pattern MG*-) stay <= 8e-8 at every
step, so most likely a float32 near-tie in the top-2 routing of one token; the float64 tests above show
the MoE (aux loss included) exact under CP."""


@pytest.fixture(scope="module")
def train_args(tmp_path_factory):
    prefix, tok = prepare([], str(tmp_path_factory.mktemp("data") / "stdlib"), None, 512, corpus_bytes=300_000)
    return [*TRAIN, f"data.paths=[{prefix}]", f"data.tokenizer={tok}"]


@pytest.fixture(scope="module")
def cp1_run(train_args, tmp_path_factory):
    run_dir = tmp_path_factory.mktemp("cp1")
    assert train_from_cli("default:tiny", str(run_dir), train_args) == 0
    return metrics(run_dir)


def metrics(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


@pytest.mark.parametrize("procs,layout", [(2, "contiguous"), (4, "zigzag")], ids=["cp2", "cp2xdp2-zigzag"])
def test_train_cp2_through_torchrun_equals_cp1(procs, layout, train_args, cp1_run, tmp_path):
    done = subprocess.run([sys.executable, "-m", "megahybrid", "launch", "torchrun", "--nproc-per-node", str(procs),
                           "--out", str(tmp_path), "default:tiny", *train_args, "parallel.cp=2",
                           f"parallel.cp_layout={layout}"], cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-3000:]
    assert f"world size {procs} (cp 2 x dp {procs // 2})" in done.stdout
    cp = metrics(tmp_path)
    assert [r["step"] for r in cp] == [r["step"] for r in cp1_run] == list(range(1, 7))
    for one, two in zip(cp1_run, cp):
        for key, rtol in TRAIN_RTOL.items():
            assert abs(two[key] - one[key]) <= rtol * abs(one[key]), (key, one, two)
