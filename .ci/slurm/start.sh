#!/usr/bin/env bash
# Start a real two-node SLURM cluster on localhost (facts: /work/shared/SLURM.md), so that the
# launcher tests submit real sbatch jobs, multi-node ones included. Needs root and apt; no
# systemd, no cgroups. The nodes n1 and n2 are two slurmd daemons on this host (own ports,
# spool dirs, logs), both with every CPU of the host and two fake GPUs (GRES gpu:2, character
# devices under $RUN_DIR) so that --ngpus is scheduled as on a GPU cluster; the jobs themselves
# see no CUDA device and run on CPU (gloo). The node names resolve to 127.0.0.1 (/etc/hosts).
#
#   .ci/slurm/start.sh      install (first time), write configs, start the daemons, wait for idle
#   .ci/slurm/stop.sh       stop them again (by the PIDs in $RUN_DIR/*.pid)
#
# Partitions: "debug" (default, PriorityTier=1, GraceTime=20) and "high" (PriorityTier=2): a job
# in "high" preempts (requeues) one in "debug", which receives SIGUSR2 first. SlurmdTimeout=10:
# a node whose slurmd stops answering is DOWN within ~10 s (its batch jobs are requeued, see
# JobRequeue) and is back (ReturnToService=2) as soon as its slurmd registers again.
# Idempotent: exits at once when a slurmctld already answers.
set -euo pipefail

RUN_DIR=${DINO_SLURM_RUN_DIR:-/run/dino_locat-slurm}
LOG_DIR=/var/log/slurm
CLUSTER=dinolocat
HOST=$(hostname -s)
NODES=(n1 n2)
GPUS_PER_NODE=2

log() { echo "[slurm-ci] $*"; }

if command -v scontrol >/dev/null && scontrol ping 2>/dev/null | grep -q "is UP"; then
  log "a slurmctld already answers; nothing to do"
  exit 0
fi

wait_for() { # wait_for SECONDS DESCRIPTION COMMAND...
  local limit=$1 what=$2
  shift 2
  for _ in $(seq "$((limit * 2))"); do
    if "$@" >/dev/null 2>&1; then return 0; fi
    sleep 0.5
  done
  log "gave up waiting for $what after ${limit}s; logs in $LOG_DIR:" >&2
  tail -n 20 "$LOG_DIR"/*.log >&2 || true
  exit 1
}

install_packages() {
  # The Debian package called "slurm" is an unrelated network monitor: never install it.
  local pkgs=(munge slurmctld slurmd slurm-client slurmdbd mariadb-server)
  local missing=() pkg
  for pkg in "${pkgs[@]}"; do
    dpkg-query -W -f='${db:Status-Status}' "$pkg" 2>/dev/null | grep -qx installed || missing+=("$pkg")
  done
  if [ "${#missing[@]}" -gt 0 ]; then
    log "installing ${missing[*]}"
    local own_policy=0
    if [ ! -e /usr/sbin/policy-rc.d ]; then # keep the packages from starting daemons unconfigured
      printf '#!/bin/sh\nexit 101\n' >/usr/sbin/policy-rc.d
      chmod +x /usr/sbin/policy-rc.d
      own_policy=1
    fi
    export DEBIAN_FRONTEND=noninteractive
    apt-get install -y -q --no-install-recommends "${missing[@]}" ||
      { apt-get update -q && apt-get install -y -q --no-install-recommends "${missing[@]}"; }
    if [ "$own_policy" = 1 ]; then rm -f /usr/sbin/policy-rc.d; fi
  fi
}

write_configs() {
  local hw cpus sockets cores threads mem
  hw=$(slurmd -C | head -n 1)
  cpus=$(sed -n 's/.* CPUs=\([0-9]*\).*/\1/p' <<<"$hw")
  sockets=$(sed -n 's/.* SocketsPerBoard=\([0-9]*\).*/\1/p' <<<"$hw")
  cores=$(sed -n 's/.* CoresPerSocket=\([0-9]*\).*/\1/p' <<<"$hw")
  threads=$(sed -n 's/.* ThreadsPerCore=\([0-9]*\).*/\1/p' <<<"$hw")
  mem=$(sed -n 's/.* RealMemory=\([0-9]*\).*/\1/p' <<<"$hw")
  mkdir -p /etc/slurm "$RUN_DIR" "$LOG_DIR" /var/spool/slurmctld
  local node gpu
  : >/etc/slurm/gres.conf.new
  echo "AutoDetect=off" >>/etc/slurm/gres.conf.new
  for node in "${NODES[@]}"; do
    mkdir -p "/var/spool/slurmd-$node"
    for gpu in $(seq 0 $((GPUS_PER_NODE - 1))); do
      # a character device of its own name per fake GPU (SLURM rejects regular files)
      [ -c "$RUN_DIR/$node-gpu$gpu" ] || mknod "$RUN_DIR/$node-gpu$gpu" c 1 3
      echo "NodeName=$node Name=gpu File=$RUN_DIR/$node-gpu$gpu" >>/etc/slurm/gres.conf.new
    done
  done
  mv /etc/slurm/gres.conf.new /etc/slurm/gres.conf
  cat >/etc/slurm/slurm.conf <<EOF
# Written by dino_locat .ci/slurm/start.sh: a two-node test cluster on localhost.
ClusterName=$CLUSTER
SlurmctldHost=$HOST(127.0.0.1)
SlurmUser=root
AuthType=auth/munge
AuthInfo=cred_expire=5
StateSaveLocation=/var/spool/slurmctld
SlurmdSpoolDir=/var/spool/slurmd-%n
SlurmctldPidFile=$RUN_DIR/slurmctld.pid
SlurmdPidFile=$RUN_DIR/slurmd-%n.pid
SlurmctldLogFile=$LOG_DIR/slurmctld.log
SlurmdLogFile=$LOG_DIR/slurmd-%n.log
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
JobAcctGatherType=jobacct_gather/none
MpiDefault=none
MailProg=/bin/true
ReturnToService=2
SlurmdTimeout=10
JobRequeue=1
GresTypes=gpu
SchedulerType=sched/backfill
SchedulerParameters=sched_interval=2,bf_interval=1
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
AccountingStorageType=accounting_storage/slurmdbd
AccountingStorageHost=127.0.0.1
PreemptType=preempt/partition_prio
PreemptMode=REQUEUE
SlurmctldParameters=preempt_send_user_signal
KillWait=10
MinJobAge=60
NodeName=n1 NodeHostname=$HOST NodeAddr=127.0.0.1 Port=17001 CPUs=$cpus Boards=1 SocketsPerBoard=$sockets CoresPerSocket=$cores ThreadsPerCore=$threads RealMemory=$mem Gres=gpu:$GPUS_PER_NODE State=UNKNOWN
NodeName=n2 NodeHostname=$HOST NodeAddr=127.0.0.1 Port=17002 CPUs=$cpus Boards=1 SocketsPerBoard=$sockets CoresPerSocket=$cores ThreadsPerCore=$threads RealMemory=$mem Gres=gpu:$GPUS_PER_NODE State=UNKNOWN
PartitionName=debug Nodes=ALL Default=YES PriorityTier=1 GraceTime=20 MaxTime=INFINITE State=UP
PartitionName=high Nodes=ALL PriorityTier=2 PreemptMode=OFF MaxTime=INFINITE State=UP
EOF
  cat >/etc/slurm/slurmdbd.conf <<EOF
# Written by dino_locat .ci/slurm/start.sh: accounting so that sacct sees finished jobs.
AuthType=auth/munge
DbdHost=$HOST
DbdAddr=127.0.0.1
DbdPort=6819
SlurmUser=root
PidFile=$RUN_DIR/slurmdbd.pid
LogFile=$LOG_DIR/slurmdbd.log
StorageType=accounting_storage/mysql
StorageHost=localhost
StorageUser=root
StorageLoc=slurm_acct_db
EOF
  chmod 600 /etc/slurm/slurmdbd.conf
}

start_daemons() {
  log "starting munged"
  mkdir -p /run/munge /var/log/munge
  chown munge:munge /run/munge /var/log/munge
  runuser -u munge -- munged --pid-file=/run/munge/munged.pid
  ln -sf /run/munge/munged.pid "$RUN_DIR/munged.pid"
  wait_for 10 munged munge -n

  log "starting mariadb (socket only)"
  mkdir -p /run/mysqld
  chown mysql:mysql /run/mysqld
  setsid mariadbd --user=mysql --skip-networking --pid-file=/run/mysqld/mariadb.pid \
    >"$LOG_DIR/mariadb.log" 2>&1 </dev/null &
  ln -sf /run/mysqld/mariadb.pid "$RUN_DIR/mariadb.pid"
  wait_for 60 mariadb mariadb-admin --protocol=socket ping

  log "starting slurmdbd"
  slurmdbd
  wait_for 30 slurmdbd bash -c "exec 3<>/dev/tcp/127.0.0.1/6819"

  log "starting slurmctld"
  slurmctld
  wait_for 30 slurmctld bash -c "scontrol ping | grep -q 'is UP'"

  local node
  for node in "${NODES[@]}"; do
    log "starting slurmd for node $node"
    slurmd -N "$node"
  done
  wait_for 60 "nodes ${NODES[*]} to be idle" \
    bash -c "[ \"\$(sinfo -h -N -t idle -o %N | sort -u | wc -l)\" = ${#NODES[@]} ]"
  wait_for 30 "accounting (sacct)" sacct -n -X
}

resolve_node_names() {
  # Real clusters resolve node names through DNS; here both names mean this host.
  local node
  for node in "${NODES[@]}"; do
    getent hosts "$node" >/dev/null || echo "127.0.0.1 $node  # dino_locat test cluster" >>/etc/hosts
  done
}

install_packages
write_configs
resolve_node_names
start_daemons
log "cluster $CLUSTER is up: $(sinfo -h -o '%P %a %D %t' | tr '\n' ';')"
