#!/usr/bin/env bash
# A real single-node Slurm cluster on this machine, from Debian's packages, for trying the Slurm launcher
# (`run_all.py --launcher slurm`) on a laptop or in CI without access to a cluster.
#
#   scripts/local_slurm.sh start    install slurm-wlm and munge if missing, start munged, slurmctld and slurmd
#   scripts/local_slurm.sh stop     cancel every job, stop the daemons this script started
#   scripts/local_slurm.sh status   sinfo and the daemons' state; exit 0 if the cluster is up, 1 if not
#
# Needs root (apt-get, /etc/slurm, daemons running as root) on Debian or Ubuntu.
#
# The cluster: one node named $(hostname -s) at 127.0.0.1 with this machine's CPU count (nproc) and memory, one
# partition `cpu` (default, no time limit). Resources are counted per CPU and per MB (select/cons_tres,
# CR_Core_Memory) and a job without --mem gets DefMemPerCPU = memory / CPUs, so jobs asking one CPU each run
# side by side instead of one job taking the whole node's memory. No cgroups (proctrack/linuxproc, task/none),
# so it runs inside containers; no accounting daemon, so `sacct` does not work: read job states with `squeue` or
# `scontrol show job`, which keep a finished job for MinJobAge (120 s). Jobs may be requeued (JobRequeue=1).
#
# Where the configuration lives: everything is written under the state folder, $LOCAL_SLURM_DIR (default
# /var/tmp/fixmatch-bench-slurm): slurm.conf, the controller's state, the spool, logs and pid files (no
# cgroup.conf: no cgroup plugin is used). /etc/slurm/slurm.conf is made a symlink to that slurm.conf: it is the
# path the client commands (sinfo, squeue, sbatch, srun, scontrol, scancel) read by default, so they work from
# any later shell and from Python's subprocess without SLURM_CONF set. An /etc/slurm/slurm.conf that this script
# did not write is never replaced: start stops with an error instead. The controller's state is kept across
# stop/start, so job ids keep counting up and never repeat in a log folder named by job id.
#
# Environment: LOCAL_SLURM_DIR (state folder), LOCAL_SLURM_TIMEOUT (seconds to wait for the node, default 60).
set -euo pipefail

STATE_DIR="${LOCAL_SLURM_DIR:-/var/tmp/fixmatch-bench-slurm}"
TIMEOUT="${LOCAL_SLURM_TIMEOUT:-60}"
ETC_DIR=/etc/slurm
PARTITION=cpu
MARK="# Written by fixmatch-bench scripts/local_slurm.sh"

die() { echo "local_slurm: $*" >&2; exit 1; }
say() { echo "local_slurm: $*"; }

pid_alive() {  # pid_alive DIR/NAME.pid: the pid in that file is a running NAME (not a stale, reused pid)
    local pid comm
    [[ -s "$1" ]] || return 1
    pid=$(cat "$1")
    comm=$(cat "/proc/$pid/comm" 2>/dev/null) || return 1
    [[ "$comm" == "$(basename "$1" .pid)"* ]]
}

controller_up() { scontrol ping 2>/dev/null | grep -q 'is UP'; }

node_state() { sinfo -h -N -n "$NODE" -o '%T' 2>/dev/null | head -n1; }

install_packages() {
    local missing=0
    for cmd in slurmctld slurmd munged sinfo; do
        command -v "$cmd" >/dev/null || missing=1
    done
    ((missing)) || return 0
    command -v apt-get >/dev/null || die "slurmctld/slurmd/munged are missing and there is no apt-get to install them"
    say "installing slurm-wlm and munge with apt-get"
    export DEBIAN_FRONTEND=noninteractive
    local apt=(apt-get install -y -qq --no-install-recommends slurm-wlm munge)
    # The package lists may be missing (fresh containers) or stale: update once and retry.
    "${apt[@]}" >/dev/null 2>&1 || { apt-get update -qq >/dev/null && "${apt[@]}" >/dev/null; } \
        || die "apt-get could not install slurm-wlm and munge"
}

start_munge() {
    if [[ ! -s /etc/munge/munge.key ]]; then
        mkdir -p /etc/munge
        mungekey --create --keyfile=/etc/munge/munge.key 2>/dev/null \
            || dd if=/dev/urandom of=/etc/munge/munge.key bs=1024 count=1 status=none
    fi
    if munge -n 2>/dev/null | unmunge >/dev/null 2>&1; then
        return 0  # a munged is already serving this machine (the system's or ours): use it
    fi
    local user=root
    id munge >/dev/null 2>&1 && user=munge
    mkdir -p /run/munge /var/lib/munge /var/log/munge
    chown "$user:" /etc/munge /etc/munge/munge.key /run/munge /var/lib/munge /var/log/munge
    chmod 700 /etc/munge /var/log/munge
    chmod 400 /etc/munge/munge.key
    chmod 755 /run/munge
    runuser -u "$user" -- munged
    touch "$STATE_DIR/munged.ours"  # so that stop ends only a munged that start began
    for _ in $(seq 50); do
        munge -n 2>/dev/null | unmunge >/dev/null 2>&1 && return 0
        sleep 0.1
    done
    die "munged did not start (see /var/log/munge/munged.log)"
}

write_config() {
    local cpus mem_mb def_mem
    cpus=$(nproc)
    mem_mb=$(awk '/^MemTotal:/ {print int($2 / 1024)}' /proc/meminfo)
    def_mem=$((mem_mb / cpus))
    mkdir -p "$STATE_DIR"/{ctld,spool,log}
    cat >"$STATE_DIR/slurm.conf" <<EOF
$MARK: a single-node cluster on this machine.
ClusterName=local
SlurmctldHost=$NODE(127.0.0.1)
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
MpiDefault=none
MailProg=/bin/true
# No cgroups: processes are tracked through /proc, tasks are not bound, so it runs inside containers.
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SelectType=select/cons_tres
SelectTypeParameters=CR_Core_Memory
# Without a default, a job that does not pass --mem is given the whole node's memory and runs alone.
DefMemPerCPU=$def_mem
SchedulerType=sched/backfill
# Reject at submission a job that asks more than the partition has (more CPUs than the node), instead of
# leaving it pending for ever with Reason=PartitionConfig.
EnforcePartLimits=ALL
AccountingStorageType=accounting_storage/none
JobAcctGatherType=jobacct_gather/none
JobCompType=jobcomp/none
# A node whose slurmd restarts comes back as idle, not down.
ReturnToService=2
JobRequeue=1
# A requeued job waits for the job credential's lifetime (120 s by default) before it may start again.
AuthInfo=cred_expire=10
# Seconds between scheduling passes (60 and 30 by default): a requeued job starts soon after it may.
SchedulerParameters=sched_interval=5,bf_interval=5
# Seconds a finished job stays visible to squeue and scontrol (there is no sacct here).
MinJobAge=120
# Seconds between a job's SIGTERM and SIGKILL when it is cancelled or reaches its time limit.
KillWait=30
# Take the node's CPUs and memory from this file, not from what slurmd detects (containers, cpusets).
SlurmdParameters=config_overrides
StateSaveLocation=$STATE_DIR/ctld
SlurmdSpoolDir=$STATE_DIR/spool
SlurmctldPidFile=$STATE_DIR/slurmctld.pid
SlurmdPidFile=$STATE_DIR/slurmd.pid
SlurmctldLogFile=$STATE_DIR/log/slurmctld.log
SlurmdLogFile=$STATE_DIR/log/slurmd.log
NodeName=$NODE NodeAddr=127.0.0.1 CPUs=$cpus Sockets=1 CoresPerSocket=$cpus ThreadsPerCore=1 RealMemory=$mem_mb State=UNKNOWN
PartitionName=$PARTITION Nodes=$NODE Default=YES MaxTime=INFINITE State=UP
EOF
    mkdir -p "$ETC_DIR"
    local current="$ETC_DIR/slurm.conf"
    if [[ -e "$current" || -L "$current" ]] && [[ "$(readlink "$current")" != "$STATE_DIR/slurm.conf" ]] \
        && ! grep -qs "^$MARK" "$current"; then
        die "$ETC_DIR/slurm.conf exists and was not written by this script; move it away to use the local cluster"
    fi
    ln -sfn "$STATE_DIR/slurm.conf" "$current"
}

cmd_start() {
    [[ $(id -u) -eq 0 ]] || die "must run as root (it installs packages, writes $ETC_DIR and starts daemons)"
    install_packages
    NODE=$(hostname -s)
    if pid_alive "$STATE_DIR/slurmctld.pid" && pid_alive "$STATE_DIR/slurmd.pid" && controller_up; then
        say "already running (node $NODE, partition $PARTITION, state folder $STATE_DIR)"
        return 0
    fi
    mkdir -p "$STATE_DIR"
    write_config
    start_munge
    pid_alive "$STATE_DIR/slurmctld.pid" || slurmctld
    pid_alive "$STATE_DIR/slurmd.pid" || slurmd
    local deadline=$((SECONDS + TIMEOUT)) state=""
    while ((SECONDS < deadline)); do
        state=$(node_state)
        # A node drained by an earlier run (a job that could not be killed, say) would never become idle.
        [[ "$state" == drain* ]] && scontrol update NodeName="$NODE" State=RESUME >/dev/null 2>&1
        if [[ "$state" == idle || "$state" == mixed || "$state" == allocated ]] \
            && pid_alive "$STATE_DIR/slurmd.pid"; then
            say "up: node $NODE ($(nproc) CPUs, partition $PARTITION), state folder $STATE_DIR"
            return 0
        fi
        sleep 0.5
    done
    die "node $NODE not idle after ${TIMEOUT}s (state: ${state:-unknown}); see $STATE_DIR/log/"
}

wait_gone() {  # wait_gone PIDFILE SECONDS: wait for the daemon to exit, then kill it
    local file=$1 i
    for ((i = 0; i < $2 * 10; i++)); do
        pid_alive "$file" || { rm -f "$file"; return 0; }
        sleep 0.1
    done
    kill -KILL "$(cat "$file")" 2>/dev/null || true
    rm -f "$file"
}

cmd_stop() {
    [[ $(id -u) -eq 0 ]] || die "must run as root"
    local running=0
    if pid_alive "$STATE_DIR/slurmctld.pid" || pid_alive "$STATE_DIR/slurmd.pid"; then
        running=1
    fi
    if pid_alive "$STATE_DIR/slurmctld.pid" && controller_up; then
        local jobs
        jobs=$(squeue -h -o %A 2>/dev/null | sort -u | tr '\n' ' ')
        if [[ -n "${jobs// /}" ]]; then
            say "cancelling jobs: $jobs"
            # shellcheck disable=SC2086
            scancel $jobs || true
            # A cancelled job gets SIGTERM, then SIGKILL after KillWait (30 s): wait for the steps to end.
            for _ in $(seq 400); do
                [[ -z "$(squeue -h -t running,completing,configuring -o %A 2>/dev/null)" ]] && break
                sleep 0.1
            done
        fi
        scontrol shutdown >/dev/null 2>&1 || true
    fi
    local daemon
    for daemon in slurmctld slurmd; do  # if the controller did not answer, or shutdown did not reach them
        if pid_alive "$STATE_DIR/$daemon.pid"; then kill -TERM "$(cat "$STATE_DIR/$daemon.pid")" 2>/dev/null || true; fi
    done
    wait_gone "$STATE_DIR/slurmctld.pid" 15
    wait_gone "$STATE_DIR/slurmd.pid" 15
    if [[ -e "$STATE_DIR/munged.ours" ]]; then
        munged --stop >/dev/null 2>&1 || true
        rm -f "$STATE_DIR/munged.ours"
        running=1
    fi
    if ((running)); then say "stopped"; else say "not running"; fi
}

cmd_status() {
    local up=0
    pid_alive "$STATE_DIR/slurmctld.pid" && controller_up && pid_alive "$STATE_DIR/slurmd.pid" && up=1
    if ((up)); then
        sinfo
        say "up: slurmctld pid $(cat "$STATE_DIR/slurmctld.pid"), slurmd pid $(cat "$STATE_DIR/slurmd.pid")"
        return 0
    fi
    local daemon
    for daemon in slurmctld slurmd; do
        if pid_alive "$STATE_DIR/$daemon.pid"; then say "$daemon running"; else say "$daemon not running"; fi
    done
    say "down"
    return 1
}

case "${1:-}" in
    start) cmd_start ;;
    stop) cmd_stop ;;
    status) cmd_status ;;
    *) echo "usage: $0 start|stop|status" >&2; exit 2 ;;
esac
