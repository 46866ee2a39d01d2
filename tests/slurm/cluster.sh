#!/usr/bin/env bash
# A real SLURM cluster on this one machine, for testing the Snakemake SLURM profile (tests/test_slurm.py).
#
#   tests/slurm/cluster.sh start    install if missing, configure, start munged + slurmctld + slurmd n1, n2
#   tests/slurm/cluster.sh status   daemons, nodes and queue
#   tests/slurm/cluster.sh stop     stop the daemons this script started (by PID file), remove its config files
#
# Two *virtual* nodes (n1, n2, partition "debug") run on this host, each claiming max(nproc, 4) CPUs and
# max(90% of the memory, 16 GiB), so multi-node code paths (sbatch --nodes=2, srun across nodes,
# torchrun with --nnodes=2) run for real. Needs root (it writes
# /etc/slurm/slurm.conf and runs the daemons) and, on first use, apt-get (Debian/Ubuntu packages
# slurmctld slurmd slurm-client munge; SLURM 22.05 on Debian 12).
#
# Why /etc/slurm/slurm.conf and not a private path: the slurm-jobstep executor plugin strips SLURM_CONF from
# the job environment, so inside jobs only the default path is found.
# A pre-existing /etc/slurm/slurm.conf that this script did not write (a real cluster's) is never touched:
# `start` refuses with exit status 3, unless CPTFLOW_SLURM_FORCE=1, in which case it is moved to
# $CPTFLOW_SLURM_DIR/slurm.conf.orig and put back by `stop`.
# The same holds for /etc/slurm/gres.conf, which declares fake GPUs (see below).
# munged: an already running munged (answers `munge -n | unmunge`) is reused and left running.
#
# Fake GPUs: each node declares CPTFLOW_SLURM_GPUS (default 2) GPUs backed by /dev/null and /dev/zero,
# so `sbatch --gpus-per-node=G` (how training rules ask for GPUs, see profiles/slurm/config.yaml) is
# scheduled and sets CUDA_VISIBLE_DEVICES / SLURM_GPUS_ON_NODE for real. No device is touched
# (TaskPlugin=task/none does not constrain devices). CPTFLOW_SLURM_GPUS=0 turns them off.
#
# Environment: CPTFLOW_SLURM_DIR (default /tmp/cptflow-slurm) holds state, spool, logs and PID files;
# CPTFLOW_SLURM_TIMEOUT (default 60) seconds to wait for both nodes to be idle.
# Exit status: 0 ok; 1 failure (daemon logs are printed); 2 usage; 3 cannot run here (not root, no apt,
# foreign slurm.conf) -- tests skip on 3 only.
set -euo pipefail

DIR="${CPTFLOW_SLURM_DIR:-/tmp/cptflow-slurm}"
TIMEOUT="${CPTFLOW_SLURM_TIMEOUT:-60}"
CONF=/etc/slurm/slurm.conf
GRES_CONF=/etc/slurm/gres.conf
GPUS="${CPTFLOW_SLURM_GPUS:-2}"
FAKE_GPU_FILES=(/dev/null /dev/zero)
MARKER="# written by cptflow tests/slurm/cluster.sh"
NODES=(n1 n2)
PORTS=(17001 17002)
CTLD_PORT=17000
PARTITION=debug

now() { date +%s.%N; }
elapsed() { awk -v a="$1" -v b="$(now)" 'BEGIN { printf "%.1f", b - a }'; }
say() { echo "cluster.sh: $*"; }
cannot() { say "cannot run here: $*" >&2; exit 3; }
die() { say "ERROR: $*" >&2; exit 1; }

pid_alive() {  # pid_alive FILE: the PID in FILE names a running process
    [[ -s "$1" ]] && kill -0 "$(cat "$1")" 2>/dev/null
}

print_logs() {
    local f
    for f in "$DIR"/log/*.log /run/munge/*.log /var/log/munge/munged.log; do
        [[ -f "$f" ]] || continue
        echo "----- $f (last 40 lines) -----" >&2
        tail -n 40 "$f" >&2
    done
}

install_packages() {
    local missing=()
    command -v slurmctld >/dev/null || missing+=(slurmctld)
    command -v slurmd >/dev/null || missing+=(slurmd)
    command -v sbatch >/dev/null || missing+=(slurm-client)
    command -v munged >/dev/null || missing+=(munge)
    [[ ${#missing[@]} -eq 0 ]] && return 0
    command -v apt-get >/dev/null || cannot "SLURM is not installed and apt-get is missing (need: ${missing[*]})"
    local t0; t0=$(now)
    say "installing ${missing[*]} with apt-get"
    export DEBIAN_FRONTEND=noninteractive
    # wait for a dpkg lock held by another apt run rather than failing
    local apt=(apt-get -o DPkg::Lock::Timeout=120 -y -qq)
    if ! "${apt[@]}" install slurmctld slurmd slurm-client munge >"$DIR/apt.log" 2>&1; then
        "${apt[@]}" update >>"$DIR/apt.log" 2>&1 \
            || { tail -n 20 "$DIR/apt.log" >&2; cannot "apt-get update failed (no package mirror reachable?)"; }
        "${apt[@]}" install slurmctld slurmd slurm-client munge >>"$DIR/apt.log" 2>&1 \
            || { tail -n 20 "$DIR/apt.log" >&2; cannot "apt-get install slurmctld slurmd slurm-client munge failed"; }
    fi
    say "install took $(elapsed "$t0") s"
}

munge_ok() { munge -n 2>/dev/null | unmunge >/dev/null 2>&1; }

start_munge() {
    if munge_ok; then
        say "munged already answering; reusing it"
        return 0
    fi
    if [[ ! -s /etc/munge/munge.key ]]; then
        mkdir -p /etc/munge
        mungekey -c -k /etc/munge/munge.key
    fi
    chown -R munge:munge /etc/munge && chmod 700 /etc/munge && chmod 400 /etc/munge/munge.key
    mkdir -p /run/munge /var/log/munge /var/lib/munge
    chown munge:munge /run/munge /var/log/munge /var/lib/munge
    chmod 755 /run/munge
    rm -f /run/munge/munged.pid
    runuser -u munge -- munged --pid-file=/run/munge/munged.pid
    local i
    for i in $(seq 50); do
        munge_ok && break
        sleep 0.2
    done
    munge_ok || { print_logs; die "munged did not answer within 10 s"; }
    cp /run/munge/munged.pid "$DIR/run/munged.pid"  # our record: stop only a munged we started
}

claim() {  # claim FILE: FILE is ours to (over)write; a foreign one is refused or moved aside (FORCE)
    local f=$1
    [[ -e "$f" ]] || return 0
    grep -qF "$MARKER" "$f" && return 0
    if [[ "${CPTFLOW_SLURM_FORCE:-0}" == 1 ]]; then
        [[ -e "$DIR/$(basename "$f").orig" ]] || mv "$f" "$DIR/$(basename "$f").orig"
        say "moved the existing $f to $DIR/$(basename "$f").orig (restored by stop)"
    else
        cannot "$f exists and was not written by this script (a real cluster?); set CPTFLOW_SLURM_FORCE=1 to back it up and replace it until 'stop'"
    fi
}

release() {  # release FILE: remove our FILE, put back a moved-aside original
    local f=$1
    if [[ -f "$f" ]] && grep -qF "$MARKER" "$f"; then
        rm -f "$f"
    fi
    if [[ -e "$DIR/$(basename "$f").orig" ]]; then
        mv "$DIR/$(basename "$f").orig" "$f"
        say "restored the original $f"
    fi
}

write_conf() {
    local host cpus mem gres_node="" gres_types="" i
    host=$(hostname -s)
    # At least 4 CPUs per node (SlurmdParameters=config_overrides lets a node claim more than the machine
    # has; task/none binds nothing): the test's 2-node job takes 2 CPUs per node and the two 1-CPU jobs
    # then still run beside it instead of queueing on a 2-core CI machine.
    cpus=$(nproc); (( cpus >= 4 )) || cpus=4
    # 90% of physical memory (MiB) per node; the two nodes share it (nothing enforces memory here).
    # At least 16 GiB (config_overrides, as for CPUs): the real workflow's rules ask for up to 8 GB
    # (tests/test_slurm_workflow.py submits them unchanged), which a node of a 7 GB CI machine would
    # otherwise refuse at sbatch time; the tiny test jobs use a fraction of it.
    mem=$(awk '/^MemTotal:/ { printf "%d", $2 / 1024 * 0.9 }' /proc/meminfo)
    (( mem >= 16384 )) || mem=16384
    (( GPUS >= 0 && GPUS <= ${#FAKE_GPU_FILES[@]} )) \
        || die "CPTFLOW_SLURM_GPUS must be 0..${#FAKE_GPU_FILES[@]}, got $GPUS"
    claim "$CONF"
    claim "$GRES_CONF"
    mkdir -p /etc/slurm
    if (( GPUS > 0 )); then
        gres_types="GresTypes=gpu"
        gres_node="Gres=gpu:$GPUS"
        {
            echo "$MARKER -- removed by 'cluster.sh stop'"
            echo "# fake GPUs: any existing files do; nothing opens them (task/none)"
            echo "AutoDetect=off"
            for (( i = 0; i < GPUS; i++ )); do
                echo "NodeName=n[1-2] Name=gpu File=${FAKE_GPU_FILES[$i]}"
            done
        } >"$GRES_CONF.tmp"
        mv "$GRES_CONF.tmp" "$GRES_CONF"
    else
        release "$GRES_CONF"
    fi
    cat >"$CONF.tmp" <<EOF
$MARKER -- removed by 'cluster.sh stop'
# Two virtual nodes on one host; no systemd, no cgroups, no accounting database.
ClusterName=cptflow-test
SlurmctldHost=$host(127.0.0.1)
SlurmctldPort=$CTLD_PORT
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
CredType=cred/munge
# linuxproc/none: work without cgroups or systemd (containers, CI runners)
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
MpiDefault=none
SelectType=select/cons_tres
SelectTypeParameters=CR_Core_Memory
# trust CPUs/RealMemory/Gres below even where the machine has less (both virtual nodes share one machine)
SlurmdParameters=config_overrides
$gres_types
# memory of a job that asks for none, so that two small jobs can share a node
DefMemPerCPU=256
# a node that was down comes back by itself once its slurmd registers
ReturnToService=2
# finished jobs stay visible to squeue this long; the Snakemake status check (squeue) relies on it, and the
# plugin falls back to sacct (which needs slurmdbd) when MinJobAge < 3 x its first status-check delay
MinJobAge=300
KillWait=5
SlurmdTimeout=60
InactiveLimit=0
AccountingStorageType=accounting_storage/none
JobAcctGatherType=jobacct_gather/none
JobCompType=jobcomp/none
# no mail on this test cluster (silences "Configured MailProg is invalid")
MailProg=/bin/true
StateSaveLocation=$DIR/state
SlurmdSpoolDir=$DIR/spool/%n
SlurmctldPidFile=$DIR/run/slurmctld.pid
SlurmdPidFile=$DIR/run/slurmd-%n.pid
SlurmctldLogFile=$DIR/log/slurmctld.log
SlurmdLogFile=$DIR/log/slurmd-%n.log
SlurmctldDebug=info
SlurmdDebug=info
NodeName=n[1-2] NodeHostname=$host NodeAddr=127.0.0.1 Port=[${PORTS[0]}-${PORTS[1]}] CPUs=$cpus RealMemory=$mem $gres_node State=UNKNOWN
PartitionName=$PARTITION Nodes=n[1-2] Default=YES MaxTime=INFINITE State=UP
EOF
    mv "$CONF.tmp" "$CONF"
}

both_idle() {
    local out
    out=$(sinfo -h -N -t idle -o '%N' 2>/dev/null | sort -u | tr '\n' ' ')
    [[ "$out" == "n1 n2 " ]]
}

running() {  # all our slurm daemons alive and both nodes idle or in use
    pid_alive "$DIR/run/slurmctld.pid" && pid_alive "$DIR/run/slurmd-n1.pid" \
        && pid_alive "$DIR/run/slurmd-n2.pid" && [[ -f "$CONF" ]] && grep -qF "$MARKER" "$CONF" \
        && [[ $(sinfo -h -N -t idle,mix,alloc -o '%N' 2>/dev/null | sort -u | wc -l) -eq 2 ]]
}

stop_pidfiles() {  # stop_pidfiles FILE...: TERM all at once (each takes ~2 s to exit), wait up to 10 s, then KILL
    local f pid i pids=()
    for f in "$@"; do
        [[ -s "$f" ]] || continue
        pid=$(cat "$f")
        if kill -0 "$pid" 2>/dev/null; then
            kill -TERM "$pid" 2>/dev/null || true
            pids+=("$pid:$(basename "$f" .pid)")
        fi
        rm -f "$f"
    done
    for f in "${pids[@]}"; do
        pid=${f%%:*}
        for i in $(seq 50); do
            kill -0 "$pid" 2>/dev/null || break
            sleep 0.2
        done
        if kill -0 "$pid" 2>/dev/null; then
            say "${f#*:} ($pid) ignored TERM; sending KILL"
            kill -KILL "$pid" 2>/dev/null || true
        fi
        say "stopped ${f#*:} ($pid)"
    done
}

cmd_start() {
    local t0 t1
    t0=$(now)
    [[ $(id -u) -eq 0 ]] || cannot "must run as root (writes $CONF, starts daemons)"
    mkdir -p "$DIR"
    if running; then
        say "already running (nodes: $(sinfo -h -N -o '%N:%t' | sort -u | tr '\n' ' '))"
        return 0
    fi
    install_packages
    # stale pieces of an earlier run (crashed daemon, killed test) are stopped before a clean start
    stop_slurm_daemons
    rm -rf "$DIR/state" "$DIR/spool" "$DIR/log"
    mkdir -p "$DIR/state" "$DIR/spool/n1" "$DIR/spool/n2" "$DIR/log" "$DIR/run"
    write_conf
    t1=$(now)
    start_munge
    say "munge ready in $(elapsed "$t1") s"
    t1=$(now)
    slurmctld || { print_logs; die "slurmctld failed to start"; }
    local n
    for n in "${NODES[@]}"; do
        slurmd -N "$n" || { print_logs; die "slurmd -N $n failed to start"; }
    done
    local deadline=$(( $(date +%s) + TIMEOUT ))
    until both_idle; do
        if (( $(date +%s) >= deadline )); then
            sinfo -N >&2 || true
            print_logs
            die "nodes n1 n2 not idle within $TIMEOUT s"
        fi
        sleep 0.5
    done
    say "slurmctld + slurmd n1, n2 idle in $(elapsed "$t1") s"
    say "started in $(elapsed "$t0") s total (state under $DIR, config $CONF)"
    sinfo -N
}

stop_slurm_daemons() {
    stop_pidfiles "$DIR/run/slurmd-n1.pid" "$DIR/run/slurmd-n2.pid" "$DIR/run/slurmctld.pid"
}

cmd_stop() {
    local t0; t0=$(now)
    [[ $(id -u) -eq 0 ]] || cannot "must run as root"
    stop_slurm_daemons
    stop_pidfiles "$DIR/run/munged.pid"
    release "$CONF"
    release "$GRES_CONF"
    say "stopped in $(elapsed "$t0") s"
}

cmd_status() {
    local f
    for f in "$DIR"/run/*.pid; do
        [[ -e "$f" ]] || continue
        if pid_alive "$f"; then echo "$(basename "$f" .pid): running ($(cat "$f"))"; else echo "$(basename "$f" .pid): dead"; fi
    done
    if running; then
        sinfo -N
        squeue
        return 0
    fi
    echo "cluster not running"
    return 1
}

case "${1:-}" in
    start) cmd_start ;;
    stop) cmd_stop ;;
    status) cmd_status ;;
    *) echo "usage: $0 start|stop|status" >&2; exit 2 ;;
esac
