"""State-passing context parallelism (CP) for the linear-recurrent mixers: DeltaNet (`d`), Gated
DeltaNet (`G`), Mamba2 SSD (`M`) and the RG-LRU (`r`). Issue 7; reference (pure PyTorch) path.

The sequence is split over `parallel.cp` ranks. Each rank runs its tokens from a zero state and
summarises them as an affine map of the state it will receive (delta rule: S_out = M S_in + L with
M a dk x dk matrix per head; SSD / RG-LRU: a decay per head / channel); one all-gather of those
O(d^2) summaries lets every rank compose its true incoming state and correct its outputs
(`state_passing`, which derives the corrections and their cost). The short causal conv takes a halo
of the previous slot's last K-1 inputs. Backward is autograd through the same all-gather, whose
reverse collective returns each rank's gradient contributions to the rank that sent the summary.
Unlike a sequential relay (rank r waits for r-1: R local passes back to back) all ranks work at
once; the chain itself is R tiny matmuls.

    comm = SimulatedCP(4)              # every rank in one process (tests, debugging), or
    comm = DistributedCP(group)        # one rank of a real process group (gloo / NCCL)
    x_local = comm.shard(x)            # [B, T, hidden] -> this rank's tokens
    y_local, state = forward_cp(mixer, x_local, comm)
    y_local, state = forward_cp(mixer, x_local, comm, seq_idx=comm.shard(seq_idx))  # packed documents
    loss = cp_token_loss(token_loss, mask_local, comm)   # finite when a rank holds only padding

The whole LM (`model.py`): `cp_forward_lm(model, comm.shard(input_ids), comm)` runs every layer on
this rank's tokens (attention all-gathers keys and values, `attention.py`; MLP/MoE act per token, MoE
aux-loss statistics are all-reduced); `megahybrid train parallel.cp=N` uses it through
`ContextParallelLM` (train/dist.py).

Layout. Recurrences need every rank's tokens to be contiguous *pieces* of the sequence, each with one
incoming state; Transformer Engine's attention CP instead gives rank r the pieces r and 2R-1-r
(zigzag) so that causal attention work is balanced. Both are supported (`layout=`): a rank's pieces
("slots") run as separate batch rows, and the chain of 2R slots is composed in time order (FLA's
zigzag CP does the same). Costs:
- contiguous: recurrent work is already balanced (linear in tokens), 1 summary per rank; but causal
  attention in the same model on the same layout is not: rank r does (2r+1)/R^2 of it, so the last
  rank carries (2R-1)/R of the mean, 1.75x at R=4, and sets the step time;
- zigzag: attention balanced; the recurrences pay 2 summaries, 2 conv halos and 2 corrections per
  rank, each half as long (same total work), and a chain of 2R links: the summary all-gather doubles
  (delta rule: dk (2 dv + dk) numbers per head per slot, 196 KB in fp32 at dk = dv = 128) and stays
  independent of T;
- re-permuting between the two around every attention layer would move all activations
  (2 all-to-alls of [T/R, hidden] per switch) to save nothing the zigzag chain does not already save.
So a hybrid model should use zigzag throughout when it has causal attention layers under CP, and
contiguous when it is all recurrent (or attention is sliding-window, whose work is already even).
Megatron-Core's alternative for Mamba/GDN (all-to-all from sequence to head shards) moves the
activations twice per layer and caps CP at the head count; its comparison is the benchmark's job.

Packed documents: `forward_cp(mixer, x_local, comm, state, seq_idx=comm.shard(seq_idx))` keeps the
base class's contract (nothing crosses a document boundary; the incoming state belongs to each row's
first document). In the affine view a slot's summary S_out = M S_in + L only changes where a document
starts inside the slot: M = 0 and positions from the first start on read none of S_in, while L is the
end state of the slot's last document (run from zero); positions before the first start, and M of a
slot with no start, are as without packing. A document that spans slots therefore chains through them,
and one starting exactly on a slot boundary (the slot's first token starts it) drops what came before.
The conv halo keeps only the previous slot's tokens of the same document, and the conv restarts at
every start. Cost: one more all-gather per layer of K integers per row and slot (the slot's last K-1
and first document ids, no backward collective); summaries, their exchange and the composition are
unchanged; this reference runs its local pass once per document piece (`state_passing`).
"""

from megahybrid.parallel.group import CPGroup, DistributedCP, SimulatedCP, check_cp_length
from megahybrid.parallel.mixers import CP_FORWARDS, cp_token_loss, forward_cp
from megahybrid.parallel.attention import attention_cp
from megahybrid.parallel.model import ContextParallelLM, check_context_parallel, cp_forward_lm, cp_lm_loss

__all__ = ["CPGroup", "CP_FORWARDS", "ContextParallelLM", "DistributedCP", "SimulatedCP", "attention_cp",
           "check_context_parallel", "check_cp_length", "cp_forward_lm", "cp_lm_loss", "cp_token_loss",
           "forward_cp"]
