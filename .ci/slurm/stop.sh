#!/usr/bin/env bash
# Stop the cluster that .ci/slurm/start.sh started: SIGTERM to the PIDs in its pid files, in
# reverse start order, then wait for each to exit (SIGKILL after 20 s). Never kills by name.
set -uo pipefail

RUN_DIR=${DINO_SLURM_RUN_DIR:-/run/dino_locat-slurm}

stop_one() { # stop_one NAME
  local file="$RUN_DIR/$1.pid" pid
  [ -e "$file" ] || return 0
  pid=$(cat "$file" 2>/dev/null) || return 0
  if [ -n "$pid" ] && kill -0 "$pid" 2>/dev/null; then
    echo "[slurm-ci] stopping $1 (pid $pid)"
    kill -TERM "$pid"
    for _ in $(seq 40); do
      kill -0 "$pid" 2>/dev/null || break
      sleep 0.5
    done
    if kill -0 "$pid" 2>/dev/null; then
      echo "[slurm-ci] $1 (pid $pid) ignored SIGTERM for 20 s; sending SIGKILL"
      kill -KILL "$pid"
    fi
  fi
  rm -f "$file"
}

for file in "$RUN_DIR"/slurmd-*.pid; do # one slurmd per node (slurmd-n1.pid, slurmd-n2.pid)
  [ -e "$file" ] && stop_one "$(basename "$file" .pid)"
done
for daemon in slurmctld slurmdbd mariadb munged; do
  stop_one "$daemon"
done
