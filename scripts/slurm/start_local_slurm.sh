#!/usr/bin/env bash
# Start a real single-node SLURM on this machine (tests and .ci/run): slurmctld + slurmd as root on
# localhost, one node with CPUs=2 (linuxproc process tracking, no task plugin, cons_tres selection).
# Idempotent: installs slurm-wlm and munge with apt-get if missing, writes the config only when it
# differs, starts only the daemons that are not running, and returns once `sinfo` shows the node
# idle (exit 0). Exit 1 with one line on stderr when SLURM cannot be installed or started.
#   bash scripts/slurm/start_local_slurm.sh            # CPUS=2 by default
set -euo pipefail

CPUS="${CPUS:-2}"
HOST="$(hostname -s)"
CONF_DIR=/etc/slurm
LOG_DIR=/var/log/slurm
PARTITION=debug

die() { echo "start_local_slurm.sh: $*" >&2; exit 1; }

[ "$(id -u)" -eq 0 ] || die "needs root (slurmctld/slurmd run as root here); run it with sudo"

# --- install -------------------------------------------------------------------------------------
if ! command -v slurmctld >/dev/null || ! command -v slurmd >/dev/null || ! command -v munged >/dev/null; then
    command -v apt-get >/dev/null || die "slurm-wlm/munge are missing and there is no apt-get to install them"
    export DEBIAN_FRONTEND=noninteractive
    # the daemons are started below, by hand: keep the packages' service scripts from starting them
    printf '#!/bin/sh\nexit 101\n' > /usr/sbin/policy-rc.d && chmod +x /usr/sbin/policy-rc.d
    trap 'rm -f /usr/sbin/policy-rc.d' EXIT
    (apt-get install -y -q slurm-wlm munge >/tmp/start_local_slurm.apt.log 2>&1 \
        || { apt-get update -q >>/tmp/start_local_slurm.apt.log 2>&1 \
             && apt-get install -y -q slurm-wlm munge >>/tmp/start_local_slurm.apt.log 2>&1; }) \
        || die "apt-get install slurm-wlm munge failed (log: /tmp/start_local_slurm.apt.log)"
    rm -f /usr/sbin/policy-rc.d
fi

# --- munge ---------------------------------------------------------------------------------------
mkdir -p /etc/munge /var/lib/munge /var/log/munge /run/munge
if [ ! -s /etc/munge/munge.key ]; then
    dd if=/dev/urandom of=/etc/munge/munge.key bs=1024 count=1 status=none
fi
chown -R munge:munge /etc/munge /var/lib/munge /var/log/munge /run/munge 2>/dev/null || true
chmod 0700 /etc/munge /var/lib/munge /var/log/munge
chmod 0755 /run/munge
chmod 0400 /etc/munge/munge.key
if ! munge -n </dev/null 2>/dev/null | unmunge >/dev/null 2>&1; then
    rm -f /run/munge/munged.pid /run/munge/munge.socket.2*
    if id munge >/dev/null 2>&1; then
        runuser -u munge -- munged || munged --force || die "munged did not start (see /var/log/munge/munged.log)"
    else
        munged --force || die "munged did not start (see /var/log/munge/munged.log)"
    fi
    for _ in $(seq 50); do munge -n </dev/null 2>/dev/null | unmunge >/dev/null 2>&1 && break; sleep 0.2; done
    munge -n </dev/null | unmunge >/dev/null 2>&1 || die "munge does not authenticate (see /var/log/munge/munged.log)"
fi

# --- config --------------------------------------------------------------------------------------
mkdir -p "$CONF_DIR" "$LOG_DIR" /var/spool/slurmctld /var/spool/slurmd
conf="$(cat <<CONF
# Written by scripts/slurm/start_local_slurm.sh: a single-node SLURM for the tests.
ClusterName=badmerging
SlurmctldHost=$HOST(127.0.0.1)
AuthType=auth/munge
CryptoType=crypto/munge
SlurmUser=root
SlurmdUser=root
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SelectType=select/cons_tres
SelectTypeParameters=CR_CPU
SchedulerType=sched/backfill
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
JobCompType=jobcomp/none
MpiDefault=none
ReturnToService=2
JobRequeue=1
# a requeued or cancelled job is killed 5 s after SIGTERM (default 30): the requeue test restarts sooner
KillWait=5
# keep finished jobs visible to scontrol for 10 min (the tests read their state and restart count)
MinJobAge=600
SchedulerParameters=sched_interval=2
SlurmctldPidFile=/run/slurmctld.pid
SlurmdPidFile=/run/slurmd.pid
StateSaveLocation=/var/spool/slurmctld
SlurmdSpoolDir=/var/spool/slurmd
SlurmctldLogFile=$LOG_DIR/slurmctld.log
SlurmdLogFile=$LOG_DIR/slurmd.log
NodeName=$HOST NodeAddr=127.0.0.1 CPUs=$CPUS State=UNKNOWN
PartitionName=$PARTITION Nodes=$HOST Default=YES MaxTime=INFINITE State=UP
CONF
)"
changed=0
if [ ! -f "$CONF_DIR/slurm.conf" ] || [ "$(cat "$CONF_DIR/slurm.conf")" != "$conf" ]; then
    printf '%s\n' "$conf" > "$CONF_DIR/slurm.conf"
    changed=1
fi

# --- daemons -------------------------------------------------------------------------------------
running() { [ -f "$1" ] && kill -0 "$(cat "$1")" 2>/dev/null; }
if [ "$changed" = 1 ]; then  # a new config: restart whatever runs with the old one
    for pid in /run/slurmd.pid /run/slurmctld.pid; do
        if running "$pid"; then kill "$(cat "$pid")"; sleep 1; fi
    done
fi
running /run/slurmctld.pid || slurmctld || die "slurmctld did not start (see $LOG_DIR/slurmctld.log)"
running /run/slurmd.pid || slurmd || die "slurmd did not start (see $LOG_DIR/slurmd.log)"

for _ in $(seq 120); do
    state="$(sinfo -h -n "$HOST" -o %t 2>/dev/null || true)"
    case "$state" in
        idle|mix|alloc) exit 0 ;;
        down*|drain*|inval*) scontrol update nodename="$HOST" state=resume >/dev/null 2>&1 || true ;;
    esac
    sleep 0.5
done
die "node $HOST is not idle after 60 s (sinfo state: ${state:-none}; see $LOG_DIR/slurmd.log)"
