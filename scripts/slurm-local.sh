#!/usr/bin/env bash
# A real single-node Slurm cluster on loopback, for the tests of workflows/slurm/ and for trying
# the job files on one machine. Debian's slurm-wlm and munge (`scripts/setup.sh --test` installs
# them); needs root, like the daemons themselves.
#
#   scripts/slurm-local.sh start DIR   # configure in DIR, start munged, slurmctld and slurmd
#   export SLURM_CONF=DIR/slurm.conf   # then sbatch, squeue, scontrol ... talk to this cluster
#   scripts/slurm-local.sh stop DIR    # stop the three daemons (by the pids kept in DIR)
#
# Everything the cluster keeps lives in DIR: the configuration, a private munge key and socket,
# the controller's state, slurmd's spool, the daemons' logs and pids. `start` wipes DIR's old
# state first, so no job, job id or node state carries over from an earlier run, and nothing in
# /etc/slurm, /etc/munge or /var/spool is touched. The ports are free ones picked at start, so
# the cluster does not collide with a Slurm already running on the machine.
#
# Variables:
#   SLURM_LOCAL_CPUS   CPUs the node offers (default: nproc). Jobs may oversubscribe them 4x.
#   SLURM_LOCAL_MEM_MB memory the node offers, in MB (default 16000; not enforced).
set -euo pipefail

usage() { echo "usage: $0 start|stop DIR" >&2; exit 2; }
[ $# -eq 2 ] || usage
action=$1
dir=$(realpath -m "$2")
log() { echo "[slurm-local] $*" >&2; }

free_port() { python3 -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])'; }

# Ends the daemon whose pid is in the file, waiting up to 10 s for it to go.
stop_pidfile() {
  local file=$1 pid
  [ -s "$file" ] || return 0
  pid=$(cat "$file")
  if kill -0 "$pid" 2>/dev/null; then
    kill -TERM "$pid" 2>/dev/null || true
    for _ in $(seq 100); do kill -0 "$pid" 2>/dev/null || break; sleep 0.1; done
    kill -KILL "$pid" 2>/dev/null || true
  fi
  rm -f "$file"
}

# The pids of every process this cluster started: its daemons, their job step daemons
# (slurmstepd) and the jobs, which all inherit SLURM_CONF=DIR/slurm.conf from the daemons.
cluster_pids() {
  local environ pid
  for environ in /proc/[0-9]*/environ; do
    pid=${environ#/proc/}; pid=${pid%/environ}
    [ "$pid" = $$ ] && continue
    tr '\0' '\n' 2>/dev/null < "$environ" | grep -qxF "SLURM_CONF=$dir/slurm.conf" && echo "$pid"
  done
  return 0
}

stop() {
  # Cancel what still runs (a failed test may leave jobs), so no job outlives the cluster.
  if [ -s "$dir/run/slurmctld.pid" ] && kill -0 "$(cat "$dir/run/slurmctld.pid")" 2>/dev/null; then
    SLURM_CONF=$dir/slurm.conf scancel --full --signal=KILL --state=RUNNING 2>/dev/null || true
    SLURM_CONF=$dir/slurm.conf scancel --state=PENDING 2>/dev/null || true
  fi
  # slurmd first, so that no job step outlives its node; then the controller; munge last.
  stop_pidfile "$dir/run/slurmd.pid"
  stop_pidfile "$dir/run/slurmctld.pid"
  stop_pidfile "$dir/munge/munged.pid"
  # Job step daemons and jobs that did not end with their job.
  local pids
  pids=$(cluster_pids)
  [ -z "$pids" ] || kill -KILL $pids 2>/dev/null || true
}

start() {
  for tool in munged slurmctld slurmd sinfo; do
    command -v "$tool" >/dev/null || { log "$tool not found: run scripts/setup.sh --test (apt-get install slurm-wlm munge)"; exit 1; }
  done
  [ "$(id -u)" = 0 ] || { log "the Slurm daemons need root"; exit 1; }
  stop # a cluster left running in DIR by an earlier run
  rm -rf "$dir/state" "$dir/spool" "$dir/log" "$dir/run" "$dir/munge"
  mkdir -p "$dir/state" "$dir/spool" "$dir/log" "$dir/run" "$dir/munge"
  # munged refuses group- or world-writable directories above its files.
  chmod 0755 "$dir"
  chmod 0700 "$dir/munge"

  # A private munge: its own key and socket, so the machine's munge (if any) is left alone.
  dd if=/dev/urandom bs=1 count=1024 of="$dir/munge/munge.key" status=none
  chmod 0400 "$dir/munge/munge.key"
  munged --force --key-file="$dir/munge/munge.key" --socket="$dir/munge/munge.socket" \
    --pid-file="$dir/munge/munged.pid" --log-file="$dir/munge/munged.log" --seed-file="$dir/munge/munged.seed"

  local host cpus mem ctld_port slurmd_port
  host=$(hostname -s)
  cpus=${SLURM_LOCAL_CPUS:-$(nproc)}
  mem=${SLURM_LOCAL_MEM_MB:-16000}
  ctld_port=$(free_port)
  slurmd_port=$(free_port)
  cat > "$dir/slurm.conf" <<CONF
# Written by scripts/slurm-local.sh: one node on loopback, everything kept under $dir.
ClusterName=local
SlurmctldHost=$host(127.0.0.1)
SlurmctldPort=$ctld_port
SlurmdPort=$slurmd_port
SlurmUser=root
AuthType=auth/munge
CredType=cred/munge
AuthInfo=socket=$dir/munge/munge.socket
StateSaveLocation=$dir/state
SlurmdSpoolDir=$dir/spool
SlurmctldPidFile=$dir/run/slurmctld.pid
SlurmdPidFile=$dir/run/slurmd.pid
SlurmctldLogFile=$dir/log/slurmctld.log
SlurmdLogFile=$dir/log/slurmd.log
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
ReturnToService=2
MpiDefault=none
JobAcctGatherType=jobacct_gather/none
# Start dependent jobs as soon as what they wait on ends (the default checks every minute).
SchedulerParameters=sched_interval=1
MinJobAge=3600
NodeName=$host NodeAddr=127.0.0.1 CPUs=$cpus RealMemory=$mem State=UNKNOWN
PartitionName=debug Nodes=$host Default=YES MaxTime=INFINITE State=UP OverSubscribe=FORCE:4
CONF
  export SLURM_CONF=$dir/slurm.conf
  slurmctld
  slurmd
  for _ in $(seq 300); do
    if sinfo -h -o '%t' 2>/dev/null | grep -qx 'idle'; then
      log "up: one node ($cpus CPUs) on 127.0.0.1; export SLURM_CONF=$dir/slurm.conf"
      return 0
    fi
    sleep 0.1
  done
  log "the node did not come up within 30 s; logs in $dir/log"
  tail -n 20 "$dir/log/"*.log >&2 || true
  stop
  exit 1
}

case "$action" in
  start) start ;;
  stop) stop; log "stopped" ;;
  *) usage ;;
esac
