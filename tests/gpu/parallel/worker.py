"""One rank of a multi-GPU layout test (launched by tests/gpu/test_parallel_layouts.py through torchrun).

Loads the reference weights from a Megatron dist checkpoint written at TP=1 (Megatron reshards it to
this layout), runs this data-parallel rank's micro-batches through `MegatronTrainer.forward_backward`
(Megatron's schedules, DDP and finalize_model_grads), then saves the finalised gradients as a dist
checkpoint, which the test reads back at TP=1 under reference names; the mean loss goes to a JSON file.

    torchrun --nproc-per-node N tests/gpu/parallel/worker.py CKPT DATA GRADS RESULT override ...
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import torch


def main(ckpt: str, data: str, grads: str, result: str, *overrides: str) -> None:
    from megatron.core import dist_checkpointing, parallel_state

    import megahybrid
    from megahybrid.megatron.model import ensure_model_parallel
    from megahybrid.megatron.step import MegatronTrainer
    from megahybrid.megatron.transformer_config import Precision

    torch.backends.cuda.matmul.allow_tf32 = False  # the float64 reference is compared at fp32 tolerances
    torch.backends.cudnn.allow_tf32 = False
    config = megahybrid.load_config(f"{ckpt}/megahybrid.yaml", list(overrides))
    ensure_model_parallel(config.parallel, config.train.seed)
    trainer = MegatronTrainer(config, Precision(torch.float32), optimizer=False)
    trainer.load(ckpt)
    batches = torch.load(data)  # [(tokens, labels), ...]: the global batch's micro-batches
    per_rank = len(batches) // trainer.dp_size
    mine = [(x.cuda(), y.cuda()) for x, y in batches[trainer.dp_rank * per_rank:(trainer.dp_rank + 1) * per_rank]]
    loss = trainer.forward_backward(mine)
    if loss is not None:
        torch.distributed.all_reduce(loss, group=parallel_state.get_data_parallel_group())
        loss = loss / trainer.dp_size
    with torch.no_grad():  # the finalised gradients in the weights' places: their checkpoint reads back anywhere
        for chunk in trainer.chunks:
            for param in chunk.parameters():
                if getattr(param, "main_grad", None) is not None:
                    param.copy_(param.main_grad)
    Path(grads).mkdir(parents=True, exist_ok=True)
    dist_checkpointing.save(trainer.sharded_state_dict(), grads)
    if loss is not None and parallel_state.get_data_parallel_rank() == 0 and \
            parallel_state.get_tensor_model_parallel_rank() == 0:
        world = torch.distributed.get_world_size()
        with open(result, "w") as f:
            json.dump({"loss": float(loss), "world": world,
                       "tp": parallel_state.get_tensor_model_parallel_world_size(),
                       "pp": parallel_state.get_pipeline_model_parallel_world_size(),
                       "ep": parallel_state.get_expert_model_parallel_world_size(),
                       "dp": trainer.dp_size}, f)
    torch.distributed.barrier()
    torch.distributed.destroy_process_group()


if __name__ == "__main__":
    main(*sys.argv[1:])
