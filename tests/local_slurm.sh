#!/usr/bin/env bash
# A one-node Slurm on localhost for tests: munged, slurmctld and slurmd from Debian's packages
# (slurm-wlm, munge), run as root with a CPU-only slurm.conf (proctrack/linuxproc, task/none:
# no cgroups needed, so it also runs in containers and gVisor sandboxes).
#
#   tests/local_slurm.sh install     # apt-get install slurm-wlm munge (Debian/Ubuntu, root), if missing
#   tests/local_slurm.sh start DIR   # writes DIR/slurm.conf, starts the daemons, waits for the node;
#                                    # then: export SLURM_CONF=DIR/slurm.conf; sbatch ...
#   tests/local_slurm.sh stop DIR    # stops the daemons it started, by their pid files
#
# Installing: apt-get install -y slurm-wlm munge (about 15 s). Requeued jobs wait ~2 minutes
# (Reason=BeginTime) unless released with `scontrol update JobId=JOB StartTime=now`.
set -euo pipefail
action=${1:?usage: local_slurm.sh install | start DIR | stop DIR}
if [ "$action" = install ]; then
  command -v slurmctld >/dev/null && command -v munged >/dev/null && exit 0
  [ "$(id -u)" = 0 ] || { echo "local_slurm.sh: installing Slurm needs root" >&2; exit 2; }
  command -v apt-get >/dev/null || { echo "local_slurm.sh: no apt-get; install slurm-wlm and munge yourself" >&2; exit 2; }
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -qq && apt-get install -y -qq slurm-wlm munge >/dev/null
  exit
fi
dir=$(mkdir -p "${2:?usage: local_slurm.sh start|stop DIR}" && cd "$2" && pwd)

if [ "$action" = stop ]; then  # the daemons this script started, by their pid files
  pids=()
  for name in slurmd slurmctld munged; do
    pid=$(cat "$dir/$name.pid" 2>/dev/null) && kill "$pid" 2>/dev/null && pids+=("$pid")
    rm -f "$dir/$name.pid"
  done
  for _ in $(seq 100); do  # up to 10 s
    alive=0
    for pid in "${pids[@]}"; do kill -0 "$pid" 2>/dev/null && alive=1; done
    [ $alive = 0 ] && break
    sleep 0.1
  done
  exit 0
fi
[ "$action" = start ] || { echo "local_slurm.sh: unknown action '$action'; use start or stop" >&2; exit 2; }
[ "$(id -u)" = 0 ] || { echo "local_slurm.sh: must run as root (slurmd starts jobs as any user)" >&2; exit 2; }
for cmd in munged slurmctld slurmd sbatch; do
  command -v "$cmd" >/dev/null || { echo "local_slurm.sh: $cmd not found; apt-get install -y slurm-wlm munge" >&2; exit 2; }
done

node=$(hostname -s)
cpus=$(nproc)
mem=$(awk '/MemTotal/ {print int($2 / 1024 / 2)}' /proc/meminfo)  # half of RAM, in MB
mkdir -p "$dir/state" "$dir/spool" "$dir/munge"
# Ports from the directory name's hash, so two fixtures (e.g. parallel CI jobs) do not collide.
port=$(( 20000 + $(cksum <<<"$dir" | cut -d' ' -f1) % 20000 ))
cat >"$dir/slurm.conf" <<EOF
ClusterName=megahybrid-test
SlurmctldHost=$node(127.0.0.1)
SlurmctldPort=$port
SlurmdPort=$((port + 1))
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
AuthInfo=socket=$dir/munge/munge.socket
StateSaveLocation=$dir/state
SlurmdSpoolDir=$dir/spool
SlurmctldPidFile=$dir/slurmctld.pid
SlurmdPidFile=$dir/slurmd.pid
SlurmctldLogFile=$dir/slurmctld.log
SlurmdLogFile=$dir/slurmd.log
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SelectType=select/cons_tres
SelectTypeParameters=CR_CPU
JobRequeue=1
ReturnToService=2
MpiDefault=none
SchedulerType=sched/backfill
AccountingStorageType=accounting_storage/none
JobCompType=jobcomp/none
JobAcctGatherType=jobacct_gather/none
SlurmctldTimeout=30
SlurmdTimeout=30
InactiveLimit=0
MinJobAge=600
KillWait=30
NodeName=$node NodeAddr=127.0.0.1 CPUs=$cpus RealMemory=$mem State=UNKNOWN
PartitionName=debug Nodes=ALL Default=YES MaxTime=INFINITE State=UP
EOF

# munged refuses a key it cannot trust; give it its own copy owned by root.
install -m 0400 /etc/munge/munge.key "$dir/munge/munge.key"
chmod 0700 "$dir/munge"
munged --force --socket="$dir/munge/munge.socket" --key-file="$dir/munge/munge.key" \
  --pid-file="$dir/munged.pid" --log-file="$dir/munged.log" --seed-file="$dir/munge/seed"
export SLURM_CONF=$dir/slurm.conf
slurmctld -f "$SLURM_CONF"
slurmd -f "$SLURM_CONF"
for _ in $(seq 150); do  # up to 30 s for the node to register as idle
  state=$(sinfo -h -n "$node" -o %t 2>/dev/null || true)
  [ "$state" = idle ] && { echo "local_slurm.sh: node $node idle; export SLURM_CONF=$SLURM_CONF"; exit 0; }
  sleep 0.2
done
echo "local_slurm.sh: node $node did not come up (state '${state:-none}'); see $dir/slurmctld.log and $dir/slurmd.log" >&2
exit 1
