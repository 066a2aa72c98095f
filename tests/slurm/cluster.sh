#!/usr/bin/env bash
# A real single-node SLURM cluster (munge, mariadb, slurmdbd, slurmctld, slurmd) for tests.
# Usage: tests/slurm/cluster.sh up|down|status|env
# Debian 12 + root only; no systemd: every daemon is started by hand and stopped by its saved PID.
# All state lives in ${SCM_SLURM_STATE:-/tmp/scm-slurm}; /etc/slurm/{slurm,gres,slurmdbd}.conf are
# symlinks into it so that plain `sbatch`/`squeue`/`sacct` (as submitit calls them) find the cluster.
set -euo pipefail

STATE="${SCM_SLURM_STATE:-/tmp/scm-slurm}"
DB_PORT="${SCM_SLURM_DB_PORT:-3316}"        # not 3306, to stay clear of a system mariadb
DB_PASS="scm-slurm-test"                    # test-only, the database listens on 127.0.0.1 only
CLUSTER="scmbench"
ETC_SLURM="/etc/slurm"
BACKUP_SUFFIX=".scm-bench-backup"
CONF_FILES=(slurm.conf gres.conf slurmdbd.conf)
DAEMONS=(munged mariadbd slurmdbd slurmctld slurmd)   # start order; stopped in reverse
PACKAGES=(munge slurmctld slurmd slurm-client slurmdbd mariadb-server)

export SLURM_CONF="$STATE/etc/slurm.conf"   # the daemons read the state copy directly

log() { echo "cluster.sh: $*" >&2; }

# Where each daemon logs, so that a failure can show the right tail.
# munged and mariadbd run as their own users: their files live in folders they own.
logfile_of() {
    case "$1" in
        munged) echo "$STATE/munge/munged.log" ;;
        mariadbd) echo "$STATE/mariadb/mariadbd.log" ;;
        *) echo "$STATE/log/$1.log" ;;
    esac
}

pidfile_of() {
    case "$1" in
        munged) echo "$STATE/munge/munged.pid" ;;
        mariadbd) echo "$STATE/mariadb/mariadbd.pid" ;;
        *) echo "$STATE/run/$1.pid" ;;
    esac
}

# Start a daemon with no inherited pipes or lock fd: a caller capturing our output
# (subprocess.run) or waiting on the flock must not hang on a daemon that keeps them open.
spawn() {
    local name="$1"; shift
    "$@" </dev/null >>"$STATE/log/$name.start.log" 2>&1 9>&-
}

# A daemon failed: say which, show the end of its log, and stop with an error.
fail() {
    local daemon="$1"; shift
    log "FAILED: $daemon: $*"
    local f; f="$(logfile_of "$daemon")"
    for f in "$f" "$STATE/log/$daemon.start.log"; do
        if [[ -s "$f" ]]; then
            log "--- last 30 lines of $f ---"
            tail -n 30 "$f" >&2 || true
        fi
    done
    log "state left in $STATE for inspection; run '$0 down' to clean up"
    exit 1
}

# PID of a daemon we started, if it is alive and really is that program (guards against PID reuse).
pid_of() {
    local name="$1" pidfile pid
    pidfile="$(pidfile_of "$1")"
    [[ -s "$pidfile" ]] || return 1
    pid="$(tr -dc '0-9' <"$pidfile")"
    [[ -n "$pid" && -r "/proc/$pid/comm" ]] || return 1
    [[ "$(cat "/proc/$pid/comm" 2>/dev/null)" == "$name" ]] || return 1
    echo "$pid"
}

# Poll a command until it succeeds or the deadline passes.
wait_for() {
    local seconds="$1"; shift
    local end=$((SECONDS + seconds))
    until "$@" >/dev/null 2>&1; do
        ((SECONDS < end)) || return 1
        sleep 0.3
    done
}

# Exit code 3 = "cannot run here" so that callers skip instead of fail.
require_root_debian() {
    if ((EUID != 0)); then
        log "needs root (starts daemons, writes /etc/slurm); skipping"; exit 3
    fi
    if ! command -v apt-get >/dev/null || ! command -v dpkg >/dev/null; then
        log "needs Debian (apt-get/dpkg not found); skipping"; exit 3
    fi
}

# Install the packages only when one is missing; apt-get update only then.
install_packages() {
    local missing=() p
    for p in "${PACKAGES[@]}"; do
        dpkg -s "$p" 2>/dev/null | grep -q '^Status: install ok installed' || missing+=("$p")
    done
    ((${#missing[@]} == 0)) && return 0
    log "installing ${missing[*]}"
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -qq || { log "apt-get update failed"; exit 1; }
    apt-get install -y -qq --no-install-recommends "${PACKAGES[@]}" >/dev/null \
        || { log "apt-get install failed"; exit 1; }
}

# Node shape from the hardware, minus some memory slack so slurmd never reports less than configured.
write_configs() {
    local host cpus sockets cores threads mem
    host="$(hostname -s)"
    local probe; probe="$(slurmd -C | head -n 1)"
    cpus="$(sed -n 's/.* CPUs=\([0-9]*\).*/\1/p' <<<"$probe")"
    sockets="$(sed -n 's/.* SocketsPerBoard=\([0-9]*\).*/\1/p' <<<"$probe")"
    cores="$(sed -n 's/.* CoresPerSocket=\([0-9]*\).*/\1/p' <<<"$probe")"
    threads="$(sed -n 's/.* ThreadsPerCore=\([0-9]*\).*/\1/p' <<<"$probe")"
    mem="$(sed -n 's/.* RealMemory=\([0-9]*\).*/\1/p' <<<"$probe")"
    mem=$((mem * 9 / 10))

    # slurm.conf: memory per CPU by default (DefMemPerCPU), short credential expiry (cred_expire=10), fake GPUs.
    cat >"$STATE/etc/slurm.conf" <<EOF
# written by scm-bench tests/slurm/cluster.sh; removed by 'cluster.sh down'
ClusterName=$CLUSTER
SlurmctldHost=$host(127.0.0.1)
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
CredType=cred/munge
AuthInfo=cred_expire=10,socket=$STATE/munge/munge.socket.2
StateSaveLocation=$STATE/spool/slurmctld
SlurmdSpoolDir=$STATE/spool/slurmd
SlurmctldPidFile=$STATE/run/slurmctld.pid
SlurmdPidFile=$STATE/run/slurmd.pid
SlurmctldLogFile=$STATE/log/slurmctld.log
SlurmdLogFile=$STATE/log/slurmd.log
SlurmctldDebug=info
SlurmdDebug=info
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
MpiDefault=none
SchedulerType=sched/backfill
SelectType=select/cons_tres
SelectTypeParameters=CR_Core_Memory
DefMemPerCPU=1024
MinJobAge=300
# A requeued or cancelled job step gets SIGKILL 2 s after SIGTERM (default 30 s), so requeue tests are quick.
KillWait=2
ReturnToService=2
SlurmctldParameters=preempt_send_user_signal
JobAcctGatherType=jobacct_gather/linux
AccountingStorageType=accounting_storage/slurmdbd
AccountingStorageHost=127.0.0.1
# for auth/munge this is the munge socket of the slurmdbd connection (AuthInfo's socket= does not cover it)
AccountingStoragePass=$STATE/munge/munge.socket.2
AccountingStorageTRES=gres/gpu
JobCompType=jobcomp/none
MailProg=/bin/true
GresTypes=gpu
NodeName=$host NodeAddr=127.0.0.1 CPUs=$cpus SocketsPerBoard=$sockets CoresPerSocket=$cores ThreadsPerCore=$threads RealMemory=$mem Gres=gpu:2 State=UNKNOWN
PartitionName=debug Nodes=$host Default=YES MaxTime=INFINITE State=UP
EOF

    # Fake GPUs: slurm wants character devices, so clone /dev/null (c 1 3).
    mknod "$STATE/dev/gpu0" c 1 3
    mknod "$STATE/dev/gpu1" c 1 3
    cat >"$STATE/etc/gres.conf" <<EOF
# written by scm-bench tests/slurm/cluster.sh
AutoDetect=off
NodeName=$host Name=gpu File=$STATE/dev/gpu[0-1]
EOF

    # slurmdbd.conf holds the DB password: slurmdbd insists on mode 600, owned by SlurmUser.
    cat >"$STATE/etc/slurmdbd.conf" <<EOF
# written by scm-bench tests/slurm/cluster.sh
AuthType=auth/munge
AuthInfo=socket=$STATE/munge/munge.socket.2
DbdHost=$host
DbdAddr=127.0.0.1
SlurmUser=root
PidFile=$STATE/run/slurmdbd.pid
LogFile=$STATE/log/slurmdbd.log
DebugLevel=info
StorageType=accounting_storage/mysql
StorageHost=127.0.0.1
StoragePort=$DB_PORT
StorageUser=slurm
StoragePass=$DB_PASS
StorageLoc=slurm_acct_db
EOF
    chmod 600 "$STATE/etc/slurmdbd.conf"
}

# Clients (sbatch, squeue, sacct) read /etc/slurm: link our configs there, keeping foreign ones aside.
link_etc() {
    mkdir -p "$ETC_SLURM"
    local f dst
    for f in "${CONF_FILES[@]}"; do
        dst="$ETC_SLURM/$f"
        if [[ -e "$dst" || -L "$dst" ]] && [[ "$(readlink "$dst" || true)" != "$STATE/etc/$f" ]]; then
            if [[ -e "$dst$BACKUP_SUFFIX" || -L "$dst$BACKUP_SUFFIX" ]]; then
                rm -f "$dst"   # a backup exists already: this one is a leftover of ours
            else
                log "backing up $dst to $dst$BACKUP_SUFFIX"
                mv "$dst" "$dst$BACKUP_SUFFIX"
            fi
        fi
        ln -sfn "$STATE/etc/$f" "$dst"
    done
}

# Undo link_etc: drop our symlinks, put back what was there before.
unlink_etc() {
    local f dst
    for f in "${CONF_FILES[@]}"; do
        dst="$ETC_SLURM/$f"
        if [[ -L "$dst" && "$(readlink "$dst")" == "$STATE/etc/$f" ]]; then
            rm -f "$dst"
        fi
        if [[ -e "$dst$BACKUP_SUFFIX" || -L "$dst$BACKUP_SUFFIX" ]] && [[ ! -e "$dst" && ! -L "$dst" ]]; then
            log "restoring $dst"
            mv "$dst$BACKUP_SUFFIX" "$dst"
        fi
    done
}

# munged as user munge, with socket/pid/log/seed in the state folder.
start_munged() {
    local key=/etc/munge/munge.key
    if [[ ! -s "$key" ]]; then
        key="$STATE/munge/munge.key"
        mungekey --create --keyfile="$key" 2>/dev/null || create-munge-key -f 2>/dev/null \
            || fail munged "could not create a munge key"
        [[ -s "$key" ]] || key=/etc/munge/munge.key   # create-munge-key writes the default path
        chown munge:munge "$key"; chmod 400 "$key"
    fi
    spawn munged runuser -u munge -- munged \
        --socket="$STATE/munge/munge.socket.2" --key-file="$key" \
        --pid-file="$(pidfile_of munged)" --log-file="$(logfile_of munged)" \
        --seed-file="$STATE/munge/munged.seed" \
        || fail munged "munged did not start"
    wait_for 10 bash -c "munge -n -S '$STATE/munge/munge.socket.2' | unmunge -S '$STATE/munge/munge.socket.2'" \
        || fail munged "munge credential round trip failed"
    wait_for 5 pid_of munged || fail munged "no pid file"
}

# mariadbd with its own datadir/socket/port on 127.0.0.1, plus the slurm accounting DB and user.
start_mariadbd() {
    local dir="$STATE/mariadb" sock="$STATE/mariadb/mysqld.sock"
    mkdir -p "$dir/data"; chown -R mysql:mysql "$dir"
    mariadb-install-db --no-defaults --user=mysql --datadir="$dir/data" \
        --auth-root-authentication-method=socket --skip-test-db \
        >"$STATE/log/mariadb-install-db.log" 2>&1 \
        || { tail -n 30 "$STATE/log/mariadb-install-db.log" >&2; fail mariadbd "mariadb-install-db failed"; }
    # mariadbd stays in the foreground: setsid --fork detaches it (no waiting subshell of ours
    # keeps the lock fd); it writes its own pid file.
    spawn mariadbd setsid --fork mariadbd --no-defaults --user=mysql --datadir="$dir/data" --socket="$sock" \
        --port="$DB_PORT" --bind-address=127.0.0.1 --skip-name-resolve \
        --pid-file="$(pidfile_of mariadbd)" --log-error="$(logfile_of mariadbd)" \
        --innodb-buffer-pool-size=128M --innodb-lock-wait-timeout=900 \
        || fail mariadbd "mariadbd did not start"
    wait_for 30 mariadb-admin --no-defaults --socket="$sock" -uroot ping \
        || fail mariadbd "mariadbd does not answer on $sock"
    wait_for 5 pid_of mariadbd || fail mariadbd "no pid file"
    mariadb --no-defaults --socket="$sock" -uroot -e "
        CREATE DATABASE IF NOT EXISTS slurm_acct_db;
        CREATE USER IF NOT EXISTS 'slurm'@'127.0.0.1' IDENTIFIED BY '$DB_PASS';
        GRANT ALL ON slurm_acct_db.* TO 'slurm'@'127.0.0.1';" \
        || fail mariadbd "could not create the slurm database/user"
}

# slurmdbd, then register the cluster so slurmctld finds it in accounting.
start_slurmdbd() {
    spawn slurmdbd slurmdbd || fail slurmdbd "slurmdbd did not start"
    wait_for 30 sacctmgr -n list cluster || fail slurmdbd "slurmdbd does not answer"
    wait_for 5 pid_of slurmdbd || fail slurmdbd "no pid file"
    if ! sacctmgr -n -P list cluster format=cluster | grep -qx "$CLUSTER"; then
        sacctmgr -i add cluster "$CLUSTER" >/dev/null || fail slurmdbd "sacctmgr add cluster failed"
    fi
}

# slurmctld, then slurmd; the node must come up idle.
start_slurm() {
    spawn slurmctld slurmctld || fail slurmctld "slurmctld did not start"
    wait_for 30 scontrol ping || fail slurmctld "slurmctld does not answer"
    wait_for 5 pid_of slurmctld || fail slurmctld "no pid file"
    spawn slurmd slurmd || fail slurmd "slurmd did not start"
    wait_for 5 pid_of slurmd || fail slurmd "no pid file"
    wait_for 30 bash -c "sinfo -h -N -o %T | grep -qx idle" || fail slurmd "node did not become idle"
}

# A probe job must be COMPLETED in sacct: job records reach slurmdbd a few seconds late at first.
probe_job() {
    local id
    id="$(sbatch --parsable -J scm-probe -o "$STATE/log/probe-%j.out" --wrap hostname)" \
        || fail slurmctld "sbatch of the probe job failed"
    wait_for 60 bash -c "sacct -n -X -P -j '$id' -o State | grep -qx COMPLETED" \
        || fail slurmdbd "probe job $id not COMPLETED in sacct after 60 s"
}

all_running() {
    local d
    for d in "${DAEMONS[@]}"; do pid_of "$d" >/dev/null || return 1; done
}

cmd_status() {
    local d pid rc=0
    for d in "${DAEMONS[@]}"; do
        if pid="$(pid_of "$d")"; then echo "$d: running (pid $pid)"; else echo "$d: not running"; rc=1; fi
    done
    return $rc
}

cmd_up() {
    # Idempotent: a healthy cluster is left alone; a half-dead one is torn down and rebuilt.
    if all_running && scontrol ping >/dev/null 2>&1; then
        log "already up ($STATE)"; return 0
    fi
    [[ -d "$STATE" ]] && { log "stale or partial state in $STATE: tearing down first"; cmd_down; }
    install_packages
    local t0=$SECONDS
    mkdir -p "$STATE"/{etc,log,run,dev,spool/slurmctld,spool/slurmd}
    # munged refuses group/world-writable dirs; it must own its own.
    mkdir -p "$STATE/munge"; chown munge:munge "$STATE/munge"; chmod 755 "$STATE/munge"
    write_configs
    link_etc
    start_munged
    start_mariadbd
    start_slurmdbd
    start_slurm
    probe_job
    log "up in $((SECONDS - t0)) s (state in $STATE)"
}

# Stop daemons by their saved PIDs: TERM them together (each takes ~2 s), wait, then KILL stragglers.
stop_daemons() {
    local name pid pids=()
    for name in "$@"; do
        pid="$(pid_of "$name")" && kill -TERM "$pid" 2>/dev/null && pids+=("$pid")
    done
    local end=$((SECONDS + 20))
    for pid in "${pids[@]}"; do
        while kill -0 "$pid" 2>/dev/null; do
            if ((SECONDS >= end)); then log "pid $pid ignores TERM: KILL"; kill -KILL "$pid" 2>/dev/null || true; break; fi
            sleep 0.1
        done
    done
}

cmd_down() {
    # Cancel jobs first so no job steps outlive slurmd.
    if pid_of slurmctld >/dev/null; then
        local jobs; jobs="$(squeue -h -o %i 2>/dev/null || true)"
        if [[ -n "$jobs" ]]; then
            # shellcheck disable=SC2086
            scancel $jobs 2>/dev/null || true
            wait_for 40 bash -c '[[ -z "$(squeue -h -o %i)" ]]' || log "jobs still listed after 40 s: stopping anyway"
        fi
    fi
    # Reverse start order, in groups that do not depend on each other.
    stop_daemons slurmd slurmctld
    stop_daemons slurmdbd
    stop_daemons mariadbd munged
    unlink_etc
    # Refuse to rm -rf anything that is not plainly our folder.
    if [[ -d "$STATE" && "$STATE" != "/" && ( -d "$STATE/run" || -d "$STATE/etc" ) ]]; then
        rm -rf "$STATE"
    fi
    log "down"
}

cmd_env() {
    # /etc/slurm/slurm.conf is a symlink to our config, so nothing needs exporting.
    :
}

# One up/down at a time (pytest sessions may race).
with_lock() {
    exec 9>"${STATE%/}.lock"
    flock 9
    "$@"
}

case "${1:-}" in
    up) require_root_debian; with_lock cmd_up ;;
    down) require_root_debian; with_lock cmd_down ;;
    status) cmd_status ;;
    env) cmd_env ;;
    *) echo "usage: $0 up|down|status|env" >&2; exit 2 ;;
esac
