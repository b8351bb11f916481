#!/bin/bash
# A one-node slurm cluster on this machine, for tests/slurm/test_slurm.py.
#
#   bash tests/slurm/cluster.sh install       # apt-get slurm-wlm and munge unless already there (root)
#   bash tests/slurm/cluster.sh up DIR        # write DIR/slurm.conf, start munged, slurmctld, slurmd
#   bash tests/slurm/cluster.sh down DIR      # cancel its jobs, stop the daemons started by `up DIR`
#
# Everything (config, key, sockets, state, logs) lives in DIR; nothing in /etc is changed. Client
# commands find the cluster through SLURM_CONF=DIR/slurm.conf. Made for containers: no cgroups
# (proctrack/linuxproc, task/none), SlurmUser=root, one node named after this host with `nproc`
# CPUs, one partition. Ports: SLURM_TEST_CTLD_PORT (16817) and SLURM_TEST_SLURMD_PORT (16818).
set -euo pipefail

die() { echo "cluster.sh: $*" >&2; exit 1; }

install() {
    [ "$(id -u)" = 0 ] || die "installing slurm needs root"
    if command -v slurmctld >/dev/null && command -v slurmd >/dev/null && command -v sbatch >/dev/null \
        && command -v munged >/dev/null; then
        return 0
    fi
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -q >/dev/null || die "apt-get update failed"
    apt-get install -y -q --no-install-recommends slurm-wlm munge >/dev/null || die "apt-get install slurm-wlm munge failed"
}

write_conf() {
    local dir=$1 node=$2
    cat > "$dir/slurm.conf" <<CONF
ClusterName=moetest
SlurmctldHost=$node(127.0.0.1)
SlurmctldPort=${SLURM_TEST_CTLD_PORT:-16817}
SlurmdPort=${SLURM_TEST_SLURMD_PORT:-16818}
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
CredType=cred/munge
AuthInfo=socket=$dir/munge/munge.socket
StateSaveLocation=$dir/state
SlurmdSpoolDir=$dir/spool
SlurmctldPidFile=$dir/slurmctld.pid
SlurmdPidFile=$dir/slurmd.pid
SlurmctldLogFile=$dir/slurmctld.log
SlurmdLogFile=$dir/slurmd.log
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
JobCompType=jobcomp/none
SchedulerType=sched/builtin
SelectType=select/cons_tres
SelectTypeParameters=CR_CPU
MpiDefault=none
ReturnToService=2
KillWait=10
MinJobAge=600
NodeName=$node NodeAddr=127.0.0.1 CPUs=$(nproc) State=UNKNOWN
PartitionName=debug Nodes=$node Default=YES MaxTime=INFINITE State=UP
CONF
}

wait_for() {  # wait_for SECONDS WHAT COMMAND...: poll COMMAND every half second
    local deadline=$((SECONDS + $1)) what=$2
    shift 2
    until "$@" >/dev/null 2>&1; do
        [ "$SECONDS" -lt "$deadline" ] || die "timed out waiting for $what"
        sleep 0.5
    done
}

node_idle() { [ "$(sinfo -h -N -o %t 2>/dev/null)" = idle ]; }

up() {
    local dir=$1 node
    node=$(hostname -s)
    mkdir -p "$dir/munge" "$dir/state" "$dir/spool"
    chmod 700 "$dir/munge"
    [ -f "$dir/munge/munge.key" ] || { head -c 1024 /dev/urandom > "$dir/munge/munge.key"; chmod 400 "$dir/munge/munge.key"; }
    write_conf "$dir" "$node"
    export SLURM_CONF=$dir/slurm.conf
    munged --force --key-file="$dir/munge/munge.key" --socket="$dir/munge/munge.socket" \
        --pid-file="$dir/munged.pid" --log-file="$dir/munged.log" --seed-file="$dir/munge/seed" \
        || die "munged did not start (see $dir/munged.log)"
    slurmctld -c -f "$SLURM_CONF" || die "slurmctld did not start (see $dir/slurmctld.log)"
    wait_for 30 slurmctld scontrol ping
    slurmd -f "$SLURM_CONF" || die "slurmd did not start (see $dir/slurmd.log)"
    wait_for 60 "node $node to become idle" node_idle
    echo "slurm cluster up: SLURM_CONF=$SLURM_CONF"
}

stop_pidfile() {  # stop_pidfile FILE: SIGTERM the daemon named in FILE, SIGKILL it after 10 s
    local file=$1 pid
    [ -f "$file" ] || return 0
    pid=$(cat "$file")
    if kill -TERM "$pid" 2>/dev/null; then
        for _ in $(seq 20); do kill -0 "$pid" 2>/dev/null || break; sleep 0.5; done
        kill -KILL "$pid" 2>/dev/null || true
    fi
    rm -f "$file"
}

no_jobs() { [ -z "$(squeue -h -o %i)" ]; }

down() {
    local dir=$1 jobs
    export SLURM_CONF=$dir/slurm.conf
    if [ -f "$dir/slurmctld.pid" ] && scontrol ping >/dev/null 2>&1; then
        jobs=$(squeue -h -o %i)
        if [ -n "$jobs" ]; then
            # shellcheck disable=SC2086
            scancel $jobs || true
            ( wait_for 60 "jobs to end" no_jobs ) || echo "cluster.sh: jobs still running: $jobs" >&2
        fi
    fi
    stop_pidfile "$dir/slurmd.pid"
    stop_pidfile "$dir/slurmctld.pid"
    stop_pidfile "$dir/munged.pid"
}

case "${1:-}" in
    install) install ;;
    up) [ -n "${2:-}" ] || die "usage: cluster.sh up DIR"; up "$(realpath -m "$2")" ;;
    down) [ -n "${2:-}" ] || die "usage: cluster.sh down DIR"; down "$(realpath -m "$2")" ;;
    *) die "usage: cluster.sh install | up DIR | down DIR" ;;
esac
