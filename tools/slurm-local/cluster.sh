#!/usr/bin/env bash
# A two-node Slurm cluster on one Debian machine, to run recipes/slurm/*.sbatch for real without a
# cluster: nodes node1 and node2 are two slurmd daemons, each in its own network namespace (its own
# IP, 10.9.0.11 / .12, and hostname) on a bridge with slurmctld (10.9.0.1); they share the file
# system, as cluster nodes share a disk. Each node advertises 4 placeholder GPUs (character devices
# that are /dev/null), so the scripts' `--gpus-per-node=4` is accepted; nothing uses them.
#
#   sudo tools/slurm-local/cluster.sh up       (installs slurm-wlm and munge with apt on first use)
#   sudo tools/slurm-local/cluster.sh down
#
# Root only; it edits /etc/hosts and writes /etc/slurm. docs/multinode.md shows the runs made with it.
set -euo pipefail
cmd="${1:?usage: cluster.sh up|down}"

down() {
  pkill -x slurmd 2>/dev/null || true
  pkill -x slurmctld 2>/dev/null || true
  for i in 1 2; do ip netns del "n$i" 2>/dev/null || true; done
  ip link del br0 2>/dev/null || true
  sed -i '/# slurm-local$/d' /etc/hosts
}

if [[ "$cmd" == down ]]; then down; exit 0; fi
[[ "$cmd" == up ]] || { echo "cluster.sh: up or down, not '$cmd'" >&2; exit 2; }
command -v slurmctld >/dev/null || apt-get install -y --no-install-recommends slurm-wlm munge
down

# network: a bridge and one namespace per node
ip link add br0 type bridge && ip addr add 10.9.0.1/24 dev br0 && ip link set br0 up
for i in 1 2; do
  ip netns add "n$i"
  ip link add "v$i" type veth peer name "v${i}p"
  ip link set "v${i}p" netns "n$i"
  ip link set "v$i" master br0 && ip link set "v$i" up
  ip netns exec "n$i" ip addr add "10.9.0.1$i/24" dev "v${i}p"
  ip netns exec "n$i" ip link set "v${i}p" up
  ip netns exec "n$i" ip link set lo up
done
printf '10.9.0.11 node1 # slurm-local\n10.9.0.12 node2 # slurm-local\n' >> /etc/hosts

for g in 0 1 2 3; do [[ -e /dev/fakegpu$g ]] || mknod "/dev/fakegpu$g" c 1 3; done
mkdir -p /etc/slurm /var/spool/slurmctld /var/spool/slurmd/node1 /var/spool/slurmd/node2 /var/log/slurm
cat > /etc/slurm/slurm.conf <<CONF
ClusterName=local
SlurmctldHost=$(hostname)(10.9.0.1)
SlurmUser=root
AuthType=auth/munge
GresTypes=gpu
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
MpiDefault=none
ReturnToService=2
SchedulerType=sched/backfill
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
SlurmctldPidFile=/run/slurmctld.pid
SlurmdPidFile=/run/slurmd-%n.pid
SlurmdSpoolDir=/var/spool/slurmd/%n
StateSaveLocation=/var/spool/slurmctld
SlurmctldLogFile=/var/log/slurm/slurmctld.log
SlurmdLogFile=/var/log/slurm/slurmd-%n.log
NodeName=node1 NodeHostname=node1 NodeAddr=10.9.0.11 CPUs=$(nproc) RealMemory=8000 Gres=gpu:4 State=UNKNOWN
NodeName=node2 NodeHostname=node2 NodeAddr=10.9.0.12 CPUs=$(nproc) RealMemory=8000 Gres=gpu:4 State=UNKNOWN
PartitionName=debug Nodes=node[1-2] Default=YES MaxTime=INFINITE State=UP OverSubscribe=FORCE
CONF
echo "NodeName=node[1-2] Name=gpu File=/dev/fakegpu[0-3]" > /etc/slurm/gres.conf

mkdir -p /run/munge /var/log/munge /var/lib/munge
chown -R munge:munge /run/munge /var/log/munge /var/lib/munge /etc/munge
pgrep -x munged >/dev/null || su -s /bin/sh munge -c munged
rm -rf /var/spool/slurmctld/*
slurmctld
sleep 2
# nsenter, not `ip netns exec`: the latter remounts /sys and slurmd then finds no cgroup hierarchy
for i in 1 2; do nsenter --net="/var/run/netns/n$i" unshare --uts sh -c "hostname node$i; slurmd -N node$i"; done
for _ in $(seq 1 30); do
  [[ "$(sinfo -h -o %T | sort -u)" == idle ]] && { sinfo -N -o "%N %T %G"; exit 0; }
  sleep 1
done
echo "cluster.sh: the nodes did not come up; see /var/log/slurm/" >&2
sinfo -N; exit 1
