#!/usr/bin/env bash
# A one-node SLURM cluster on this machine, for the scheduler tests (tests/test_slurm.py) and for
# trying `snakemake --profile profiles/slurm` by hand. Debian/Ubuntu only; needs root.
#
#   scripts/slurm_cluster.sh install   # apt-get slurmctld slurmd slurm-client munge (idempotent)
#   scripts/slurm_cluster.sh start     # install if needed, write slurm.conf, start munged,
#                                      # slurmctld and slurmd, wait until the node is idle
#   scripts/slurm_cluster.sh status    # the daemons this script started, and sinfo
#   scripts/slurm_cluster.sh stop      # stop exactly those daemons, by the PIDs it recorded
#   scripts/slurm_cluster.sh env       # the line to source to use the cluster: export SLURM_CONF=...
#
# Everything lives in $A3TUNE_SLURM_DIR (default /tmp/a3tune-slurm): slurm.conf, state, spool, logs,
# the munge socket and the PID files. The node is `hostname -s` with all CPUs (nproc) and the memory
# of /proc/meminfo, no GPUs; partitions `cpu` (default) and `gpu` both hold it, so the partitions of
# profiles/slurm exist. Clients find the cluster through SLURM_CONF=$A3TUNE_SLURM_DIR/slurm.conf
# (printed by `start` and `env`) and through /etc/slurm/slurm.conf, which `start` links to it: inside
# a job snakemake-executor-plugin-slurm deletes every SLURM_* variable before its `srun`, so the
# default path must work. `start` refuses (exit 3) to replace an /etc/slurm/slurm.conf it did not
# link; `stop` removes its link.
#
# Exit codes: 0 ok; 1 usage; 2 a daemon failed to start or the node never became idle (the message
# names the daemon and its log); 3 this machine cannot run the cluster (not root, no apt-get, the
# packages cannot be installed) -- one line on stderr says why, and tests skip with it.
set -euo pipefail

dir=${A3TUNE_SLURM_DIR:-/tmp/a3tune-slurm}
timeout=${A3TUNE_SLURM_TIMEOUT:-60}
port=${A3TUNE_SLURM_PORT:-6817}
packages=(slurmctld slurmd slurm-client munge)
binaries=(slurmctld slurmd sinfo sbatch squeue scontrol srun munged)
conf="$dir/slurm.conf"

say() { echo "slurm_cluster: $*" >&2; }
cannot() { say "cannot run here: $*"; exit 3; }
fail() { say "$*"; exit 2; }

missing_binaries() {
    local b out=()
    for b in "${binaries[@]}"; do
        PATH="$PATH:/usr/sbin:/sbin" command -v "$b" > /dev/null 2>&1 || out+=("$b")
    done
    echo "${out[*]:-}"
}

cmd_install() {
    local missing
    missing=$(missing_binaries)
    if [ -z "$missing" ]; then
        say "packages already installed"
        return 0
    fi
    [ "$(id -u)" = 0 ] || cannot "not root (missing: $missing; install ${packages[*]} as root)"
    command -v apt-get > /dev/null 2>&1 || cannot "no apt-get (missing: $missing; install ${packages[*]} by hand)"
    say "installing ${packages[*]} (missing: $missing)"
    export DEBIAN_FRONTEND=noninteractive
    local apt=(apt-get -y -q -o Dpkg::Options::=--force-confdef -o Dpkg::Options::=--force-confold)
    if ! "${apt[@]}" install --no-install-recommends "${packages[@]}" > "/tmp/a3tune-slurm-apt.log" 2>&1; then
        apt-get update -q > /tmp/a3tune-slurm-apt-update.log 2>&1 || true
        "${apt[@]}" install --no-install-recommends "${packages[@]}" > "/tmp/a3tune-slurm-apt.log" 2>&1 \
            || cannot "apt-get install ${packages[*]} failed (see /tmp/a3tune-slurm-apt.log: $(tail -n1 /tmp/a3tune-slurm-apt.log))"
    fi
    missing=$(missing_binaries)
    [ -z "$missing" ] || cannot "installed ${packages[*]} but still missing: $missing"
    say "installed"
}

alive() { [ -f "$1" ] && kill -0 "$(cat "$1")" 2> /dev/null; }

write_conf() {
    local host cpus mem
    host=$(hostname -s)
    cpus=$(nproc)
    # RealMemory in MB, a little under MemTotal so slurmd does not drain the node as "low memory".
    mem=$(awk '/^MemTotal:/ {printf "%d", $2 / 1024 * 0.95}' /proc/meminfo)
    mkdir -p "$dir/state" "$dir/spool" "$dir/log" "$dir/run"
    cat > "$conf" << EOF
# Written by scripts/slurm_cluster.sh: a one-node test cluster, no accounting, no GPUs.
ClusterName=a3tune
SlurmctldHost=$host
SlurmctldPort=$port
SlurmdPort=$((port + 1))
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
AuthInfo=socket=$dir/munge/munge.socket
CredType=cred/munge
MpiDefault=none
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SchedulerType=sched/backfill
SelectType=select/cons_tres
SelectTypeParameters=CR_Core_Memory
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
ReturnToService=2
# Long enough that snakemake-executor-plugin-slurm keeps its squeue status check (it falls back
# to sacct when MinJobAge < 3 x its first poll interval).
MinJobAge=300
SchedulerParameters=sched_interval=1
MessageTimeout=10
KillWait=5
InactiveLimit=0
StateSaveLocation=$dir/state
SlurmdSpoolDir=$dir/spool
SlurmctldPidFile=$dir/run/slurmctld.pid
SlurmdPidFile=$dir/run/slurmd.pid
SlurmctldLogFile=$dir/log/slurmctld.log
SlurmdLogFile=$dir/log/slurmd.log
NodeName=$host CPUs=$cpus RealMemory=$mem State=UNKNOWN
PartitionName=cpu Nodes=$host Default=YES MaxTime=INFINITE State=UP
PartitionName=gpu Nodes=$host Default=NO MaxTime=INFINITE State=UP
EOF
    link_system_conf
    # The profile asks for more memory than a small machine has (e.g. tune: 256 GB); a test
    # overrides mem_mb, but say what the node offers.
    echo "$mem" > "$dir/real_memory_mb"
}

system_conf=/etc/slurm/slurm.conf

link_system_conf() {
    if [ -e "$system_conf" ] || [ -L "$system_conf" ]; then
        if [ "$(readlink "$system_conf" || true)" != "$conf" ]; then
            cannot "$system_conf exists and is not this script's link to $conf (a real SLURM installation?)"
        fi
        return 0
    fi
    mkdir -p "$(dirname "$system_conf")"
    ln -s "$conf" "$system_conf"
}

start_munge() {
    local key=/etc/munge/munge.key
    if [ ! -s "$key" ]; then
        mkdir -p /etc/munge
        if command -v mungekey > /dev/null 2>&1; then mungekey --create --keyfile="$key" --force; else
            dd if=/dev/urandom of="$key" bs=1 count=1024 status=none
        fi
        chown munge:munge "$key"
        chmod 0400 "$key"
    fi
    mkdir -p "$dir/munge"
    chown munge:munge "$dir/munge"
    chmod 0755 "$dir/munge"
    alive "$dir/run/munged.pid" && return 0
    # setpriv execs munged in place, so $! is munged's own PID.
    setpriv --reuid=munge --regid=munge --init-groups \
        munged -F --force --socket="$dir/munge/munge.socket" --key-file="$key" \
        --pid-file="$dir/munge/munged.pid" --seed-file="$dir/munge/munged.seed" \
        --log-file="$dir/munge/munged.log" > "$dir/log/munged.out" 2>&1 &
    echo $! > "$dir/run/munged.pid"
    local i
    for i in $(seq 1 50); do
        [ -S "$dir/munge/munge.socket" ] && return 0
        alive "$dir/run/munged.pid" || break
        sleep 0.1
    done
    fail "munged did not start (see $dir/munge/munged.log, $dir/log/munged.out: $(tail -n1 "$dir/log/munged.out" 2> /dev/null))"
}

start_daemon() {  # name
    local name=$1
    alive "$dir/run/$name.own.pid" && return 0
    "$name" -D -f "$conf" > "$dir/log/$name.out" 2>&1 &
    echo $! > "$dir/run/$name.own.pid"
    sleep 0.2
    alive "$dir/run/$name.own.pid" \
        || fail "$name exited at start (see $dir/log/$name.log, $dir/log/$name.out: $(tail -n1 "$dir/log/$name.out" 2> /dev/null))"
}

cmd_start() {
    if [ "$(id -u)" != 0 ]; then
        cannot "not root (slurmd and munged need root; run as root or use an existing cluster)"
    fi
    cmd_install
    export PATH="$PATH:/usr/sbin:/sbin"
    export SLURM_CONF="$conf"
    mkdir -p "$dir/run" "$dir/log"
    if alive "$dir/run/slurmctld.own.pid" && alive "$dir/run/slurmd.own.pid"; then
        say "already running (SLURM_CONF=$conf)"
    else
        write_conf
        start_munge
        start_daemon slurmctld
        start_daemon slurmd
    fi
    local deadline=$((SECONDS + timeout)) state=""
    while [ $SECONDS -lt $deadline ]; do
        state=$(sinfo -h -o %T 2> /dev/null | sort -u | tr '\n' ' ' || true)
        case "$state" in
            *idle* | *mixed* | *allocated*) break ;;
            *drain* | *down*) scontrol update nodename="$(hostname -s)" state=resume > /dev/null 2>&1 || true ;;
        esac
        for d in slurmctld slurmd; do
            alive "$dir/run/$d.own.pid" || fail "$d died during start (see $dir/log/$d.log)"
        done
        sleep 0.5
    done
    case "$state" in
        *idle* | *mixed* | *allocated*) ;;
        *) fail "node not idle after ${timeout}s (sinfo state: '${state:-none}'; see $dir/log/slurmctld.log, $dir/log/slurmd.log)" ;;
    esac
    say "up: node $(hostname -s), $(nproc) CPUs, $(cat "$dir/real_memory_mb") MB, partitions cpu (default) and gpu"
    echo "export SLURM_CONF=$conf"
}

cmd_stop() {
    local d pid stopped=()
    for d in slurmd slurmctld munged; do
        local f="$dir/run/$d.own.pid"
        [ "$d" = munged ] && f="$dir/run/munged.pid"
        [ -f "$f" ] || continue
        pid=$(cat "$f")
        if kill -0 "$pid" 2> /dev/null; then
            kill -TERM "$pid" 2> /dev/null || true
            local i
            for i in $(seq 1 50); do kill -0 "$pid" 2> /dev/null || break; sleep 0.1; done
            kill -0 "$pid" 2> /dev/null && kill -KILL "$pid" 2> /dev/null || true
            stopped+=("$d:$pid")
        fi
        rm -f "$f"
    done
    if [ "$(readlink "$system_conf" 2> /dev/null || true)" = "$conf" ]; then rm -f "$system_conf"; fi
    say "stopped ${stopped[*]:-nothing (none of its daemons was running)}"
}

cmd_status() {
    local d f rc=0
    for d in munged slurmctld slurmd; do
        f="$dir/run/$d.own.pid"
        [ "$d" = munged ] && f="$dir/run/munged.pid"
        if alive "$f"; then echo "$d: running (pid $(cat "$f"))"; else echo "$d: not running"; rc=1; fi
    done
    if [ $rc = 0 ]; then SLURM_CONF="$conf" sinfo; fi
    return $rc
}

case "${1:-}" in
    install) cmd_install ;;
    start) cmd_start ;;
    stop) cmd_stop ;;
    status) cmd_status ;;
    env) echo "export SLURM_CONF=$conf" ;;
    *) echo "usage: $0 {install|start|stop|status|env}" >&2; exit 1 ;;
esac
