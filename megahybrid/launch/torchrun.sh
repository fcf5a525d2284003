#!/usr/bin/env bash
# One node of a megahybrid training run: torchrun starts NPROC_PER_NODE trainer processes, each
# running `megahybrid ARGS...` (`python -m megahybrid`) with this script's arguments.
#
#   launch/torchrun.sh train --config SOURCE --out DIR [key=value ...]            # one machine
#   NNODES=2 RDZV_ENDPOINT=node0:29500 launch/torchrun.sh train --config ...     # on each of 2 machines
#
# `megahybrid launch torchrun` runs this script; `launch/slurm.sbatch` runs it once per node.
# Settings, from the environment:
#   PYTHON          the Python that has megahybrid installed (default: python3)
#   NPROC_PER_NODE  trainer processes on this machine (default: its visible GPUs, or 1 on CPU)
#   NNODES          machines in the run (default 1)
#   RDZV_ENDPOINT   HOST:PORT of the first machine; needed when NNODES > 1 (torchrun's c10d
#                   rendezvous store runs there). One machine without it: --standalone.
#   RDZV_ID         the same on every machine of one run (default: megahybrid)
#   DRY_RUN=1       print the torchrun command instead of running it
#
# Preemption: SIGUSR1 to this script reaches every trainer, which finishes its step, checkpoints,
# prints "preempted: ..." and exits 0; running the same command again resumes. torchrun itself has
# no USR1 handler (USR1 would kill it and, with it, the trainers' chance to checkpoint), so it
# starts with USR1 ignored; the trainers inherit that until megahybrid's loop installs its handler,
# so this script repeats the USR1 every 5 s until they have stopped. SIGTERM and SIGINT go to
# torchrun, which passes them to the trainers (SIGTERM: they checkpoint too) and kills them after 30 s.
set -euo pipefail

PYTHON=${PYTHON:-python3}
NNODES=${NNODES:-1}
if [ -z "${NPROC_PER_NODE:-}" ]; then
  NPROC_PER_NODE=$("$PYTHON" -c 'import torch; print(max(1, torch.cuda.device_count()))')
fi

# NVLink multicast (NVLS) off in NCCL, PyTorch and NVSHMEM: on the shared GPU hosts this project
# is tested on, a program using it can take the host's GPUs out of service; turn it on only where
# your cluster supports it. Megatron needs CUDA_DEVICE_MAX_CONNECTIONS=1 so that its tensor- and
# sequence-parallel communication is issued before the compute that waits for it.
export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1
export CUDA_DEVICE_MAX_CONNECTIONS=1
export PYTHONUNBUFFERED=1  # logs appear as they are written (Slurm log files, `tail -f`)

cmd=("$PYTHON" -m torch.distributed.run --nnodes "$NNODES" --nproc-per-node "$NPROC_PER_NODE")
if [ -n "${RDZV_ENDPOINT:-}" ]; then
  cmd+=(--rdzv-backend c10d --rdzv-endpoint "$RDZV_ENDPOINT" --rdzv-id "${RDZV_ID:-megahybrid}")
elif [ "$NNODES" = 1 ]; then
  cmd+=(--standalone)  # a free local port: several single-machine runs can share a host
else
  echo "torchrun.sh: NNODES=$NNODES needs RDZV_ENDPOINT=HOST:PORT of the first machine" >&2
  exit 2
fi
cmd+=(-m megahybrid "$@")

if [ "${DRY_RUN:-0}" = 1 ]; then
  printf '%q ' "${cmd[@]}" | sed 's/ $//'
  echo
  exit 0
fi

agent=""
preempt=0
last_usr1=0
usr1_to_trainers() {  # torchrun's children are the trainers
  preempt=1
  last_usr1=$SECONDS
  [ -z "$agent" ] || pkill -USR1 -P "$agent" 2>/dev/null || true
}
trap usr1_to_trainers USR1
if [ -z "${SLURM_STEP_ID:-}" ]; then  # (under srun, Slurm signals every process of the step itself)
  trap '[ -z "$agent" ] || kill -TERM "$agent" 2>/dev/null || true' TERM
  trap '[ -z "$agent" ] || kill -INT "$agent" 2>/dev/null || true' INT
fi
# torchrun in a session of its own, so that a terminal's Ctrl-C reaches it once, through the trap above
(trap '' USR1; exec setsid "${cmd[@]}") &
agent=$!
while kill -0 "$agent" 2>/dev/null; do
  sleep 1 || true  # (under Slurm the whole step, this sleep included, may get the signal)
  if [ "$preempt" = 1 ] && (( SECONDS - last_usr1 >= 5 )); then
    usr1_to_trainers
  fi
done
wait "$agent"
