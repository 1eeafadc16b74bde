#!/usr/bin/env bash
# A real Slurm cluster on this one machine, from Debian's packages, for tests and demos.
#
#   scripts/local-slurm.sh up [--nodes N] [--cpus C] [--no-accounting]   start; idempotent, reconfigures on change
#   scripts/local-slurm.sh status                                         daemons and sinfo; exit 0 when up
#   scripts/local-slurm.sh down                                           cancel jobs, stop what `up` started
#
# Runs as root without systemd (containers, CI). N slurmd daemons (`slurmd -N nodeK`) share this host, each on
# its own port, so multi-node jobs (`sbatch -N2`, srun across nodes, a rendezvous on the first node) are real.
# Daemons are stopped through their pid files, never by name. Accounting (slurmdbd on MariaDB, so that `sacct`
# answers as on production clusters) is on by default; `--no-accounting` skips it, and seis then falls back to
# squeue and the jobcomp/filetxt log. Measured on a 2-core Debian 12 machine: from bare (apt included) 7 s
# without accounting, 11 s with; from installed packages 0.3 s without, 2 s with; `up` when up: 0.3 s.
set -euo pipefail

STATE=${SEIS_SLURM_DIR:-/var/lib/seis-slurm}
CONF=/etc/slurm/slurm.conf
DBD_CONF=/etc/slurm/slurmdbd.conf
MARK="# written by seis scripts/local-slurm.sh"
HOSTS_MARK="# seis-local-slurm"
CLUSTER=seislocal
FIRST_PORT=17001

log() { echo "local-slurm: $*" >&2; }
die() {
	log "error: $*"
	exit 1
}

usage() {
	sed -n '2,13p' "$0" | sed 's/^# \{0,1\}//'
	exit 2
}

# -- processes by pid file ------------------------------------------------------------------------

# The pid in FILE if that process is alive and is COMM (a pid file can outlive its daemon and the pid be reused).
pid_of() {
	local file=$1 comm=$2 pid
	[[ -r $file ]] || return 1
	pid=$(tr -dc '0-9' <"$file")
	[[ -n $pid && -r /proc/$pid/comm ]] || return 1
	[[ $(cat "/proc/$pid/comm") == "$comm"* ]] || return 1
	echo "$pid"
}

stop_pidfile() {
	local file=$1 comm=$2 pid i
	if pid=$(pid_of "$file" "$comm"); then
		kill -TERM "$pid" 2>/dev/null || true
		for ((i = 0; i < 100; i++)); do
			[[ -d /proc/$pid ]] || break
			sleep 0.1
		done
		if [[ -d /proc/$pid ]]; then
			log "$comm ($pid) ignored SIGTERM for 10 s; killing it"
			kill -KILL "$pid" 2>/dev/null || true
		fi
	fi
	rm -f "$file"
}

# -- install -------------------------------------------------------------------------------------

install_packages() {
	local want=("$@") missing=() p
	for p in "${want[@]}"; do
		dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
	done
	((${#missing[@]})) || return 0
	command -v apt-get >/dev/null || die "missing packages ${missing[*]} and no apt-get to install them"
	log "installing ${missing[*]}"
	local t0=$SECONDS
	export DEBIAN_FRONTEND=noninteractive
	# Explicit returns: callers test this function in `if`, where `set -e` does not apply.
	apt-get update -qq || return 1
	apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null || return 1
	log "installed in $((SECONDS - t0)) s"
}

# -- munge ---------------------------------------------------------------------------------------

start_munge() {
	if munge -n 2>/dev/null | unmunge >/dev/null 2>&1; then
		return 0 # ours from an earlier `up`, or the machine's own
	fi
	install -d -o munge -g munge -m 0755 /run/munge
	install -d -o munge -g munge -m 0700 /var/lib/munge /var/log/munge /etc/munge
	if [[ ! -s /etc/munge/munge.key ]]; then
		if command -v mungekey >/dev/null; then mungekey --create --keyfile /etc/munge/munge.key; else
			dd if=/dev/urandom of=/etc/munge/munge.key bs=1 count=1024 status=none
		fi
	fi
	chown munge:munge /etc/munge/munge.key
	chmod 0400 /etc/munge/munge.key
	su -s /bin/sh munge -c /usr/sbin/munged
	touch "$STATE/munged.ours" # `down` stops munged only if we started it
	local i
	for ((i = 0; i < 50; i++)); do
		munge -n 2>/dev/null | unmunge >/dev/null 2>&1 && return 0
		sleep 0.1
	done
	die "munged does not answer (see /var/log/munge/munged.log)"
}

# -- accounting (optional): MariaDB + slurmdbd ----------------------------------------------------

start_accounting() {
	install_packages mariadb-server slurmdbd
	install -d -o mysql -g mysql -m 0755 /run/mysqld
	if ! pid_of /run/mysqld/mysqld.pid mariadbd >/dev/null; then
		[[ -d /var/lib/mysql/mysql ]] || mariadb-install-db --user=mysql --datadir=/var/lib/mysql >/dev/null
		# mariadbd does not daemonize itself; setsid + nohup detach it from this shell and its pipes.
		setsid nohup /usr/sbin/mariadbd --user=mysql --pid-file=/run/mysqld/mysqld.pid \
			--socket=/run/mysqld/mysqld.sock --bind-address=127.0.0.1 \
			>"$STATE/log/mariadb.log" 2>&1 </dev/null &
		touch "$STATE/mariadb.ours"
		local i
		for ((i = 0; i < 100; i++)); do
			mariadb -e 'select 1' >/dev/null 2>&1 && break
			sleep 0.2
		done
		mariadb -e 'select 1' >/dev/null 2>&1 || die "MariaDB did not start (see $STATE/log/mariadb.log)"
	fi
	mariadb -e "CREATE DATABASE IF NOT EXISTS slurm_acct_db;
		CREATE USER IF NOT EXISTS 'slurm'@'localhost' IDENTIFIED BY 'seis-local';
		GRANT ALL ON slurm_acct_db.* TO 'slurm'@'localhost';"
	cat >"$DBD_CONF.new" <<EOF
$MARK
AuthType=auth/munge
DbdHost=localhost
DbdAddr=127.0.0.1
SlurmUser=root
PidFile=$STATE/slurmdbd.pid
LogFile=$STATE/log/slurmdbd.log
StorageType=accounting_storage/mysql
StorageHost=localhost
StorageUser=slurm
StoragePass=seis-local
StorageLoc=slurm_acct_db
EOF
	chmod 0600 "$DBD_CONF.new"
	mv "$DBD_CONF.new" "$DBD_CONF"
	if ! pid_of "$STATE/slurmdbd.pid" slurmdbd >/dev/null; then
		slurmdbd
		local i
		for ((i = 0; i < 100; i++)); do
			sacctmgr -n list cluster >/dev/null 2>&1 && break
			sleep 0.2
		done
	fi
	sacctmgr -n list cluster format=cluster | grep -qw "$CLUSTER" || sacctmgr -i add cluster "$CLUSTER" >/dev/null
}

# -- slurm.conf ----------------------------------------------------------------------------------

write_conf() {
	local nodes=$1 cpus=$2 accounting=$3 host last_port acct
	host=$(hostname -s)
	last_port=$((FIRST_PORT + nodes - 1))
	if [[ $accounting == 1 ]]; then
		acct="AccountingStorageType=accounting_storage/slurmdbd
AccountingStorageHost=localhost
JobAcctGatherType=jobacct_gather/linux"
	else
		acct="AccountingStorageType=accounting_storage/none
JobAcctGatherType=jobacct_gather/none"
	fi
	if [[ -f $CONF ]] && ! grep -qF "$MARK" "$CONF" && [[ ! -f $CONF.seis-backup ]]; then
		cp -p "$CONF" "$CONF.seis-backup"
		log "kept the existing $CONF as $CONF.seis-backup"
	fi
	mkdir -p "$(dirname "$CONF")"
	cat >"$CONF.new" <<EOF
$MARK
# nodes=$nodes cpus=$cpus accounting=$accounting
ClusterName=$CLUSTER
SlurmctldHost=$host(127.0.0.1)
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
StateSaveLocation=$STATE/state
SlurmctldPidFile=$STATE/slurmctld.pid
SlurmctldLogFile=$STATE/log/slurmctld.log
SlurmdSpoolDir=$STATE/spool/%n
SlurmdPidFile=$STATE/slurmd-%n.pid
SlurmdLogFile=$STATE/log/slurmd-%n.log
# No cgroups in a container: track processes through /proc, bind nothing.
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
# More CPUs are declared than the machine has, so that several small test jobs (and a 2-task-per-node job) fit;
# config_overrides makes slurmd report the declared hardware instead of draining itself.
SlurmdParameters=config_overrides
ReturnToService=2
MpiDefault=none
$acct
JobCompType=jobcomp/filetxt
JobCompLoc=$STATE/log/jobcomp.txt
# Short waits keep the tests' TIMEOUT and cancel cases fast. Finished jobs leave slurmctld's memory (squeue,
# scontrol) 30-90 s after they end instead of 5-6 minutes, so the sacct and jobcomp fallbacks are exercised.
KillWait=5
OverTimeLimit=0
MinJobAge=30
SlurmdTimeout=60
InactiveLimit=0
SchedulerParameters=sched_interval=5
NodeName=node[1-$nodes] NodeHostname=$host NodeAddr=127.0.0.1 Port=$FIRST_PORT-$last_port CPUs=$cpus RealMemory=4000 State=UNKNOWN
PartitionName=debug Nodes=node[1-$nodes] Default=YES MaxTime=INFINITE State=UP OverSubscribe=YES
EOF
	if cmp -s "$CONF.new" "$CONF"; then
		rm -f "$CONF.new"
		return 1 # unchanged
	fi
	mv "$CONF.new" "$CONF"
	return 0
}

# The node names resolve to this host, so a rendezvous on the job's first node (MASTER_ADDR=node1) works.
write_hosts() {
	local nodes=$1 names="" k
	for ((k = 1; k <= nodes; k++)); do names+=" node$k"; done
	local body
	body=$(grep -vF "$HOSTS_MARK" /etc/hosts || true)
	# /etc/hosts is often a bind mount: rewrite it in place, never replace the file.
	printf '%s\n127.0.0.1%s %s\n' "$body" "$names" "$HOSTS_MARK" >/etc/hosts
}

remove_hosts() {
	grep -qF "$HOSTS_MARK" /etc/hosts 2>/dev/null || return 0
	local body
	body=$(grep -vF "$HOSTS_MARK" /etc/hosts || true)
	printf '%s\n' "$body" >/etc/hosts
}

conf_value() { sed -n "s/^# nodes=\([0-9]*\) cpus=\([0-9]*\) accounting=\([01]\)$/\\$1/p" "$CONF" 2>/dev/null || true; }

slurmd_pidfiles() { compgen -G "$STATE/slurmd-*.pid" || true; }

stop_slurm() {
	local f
	stop_pidfile "$STATE/slurmctld.pid" slurmctld
	for f in $(slurmd_pidfiles); do stop_pidfile "$f" slurmd; done
}

wait_idle() {
	local nodes=$1 deadline=$((SECONDS + 90)) ready states
	while ((SECONDS < deadline)); do
		states=$(sinfo -h -N -o '%N %T' 2>/dev/null || true)
		ready=$(grep -cE ' (idle|mixed|allocated|completing)$' <<<"$states" || true)
		((ready == nodes)) && return 0
		if grep -qE ' (down|drained|draining)' <<<"$states"; then
			scontrol update nodename="node[1-$nodes]" state=resume >/dev/null 2>&1 || true
		fi
		sleep 0.5
	done
	log "nodes did not become idle in 90 s:"
	sinfo -N >&2 || true
	die "see $STATE/log/slurmctld.log and $STATE/log/slurmd-node*.log"
}

cmd_up() {
	local nodes="" cpus="" accounting=""
	while (($#)); do
		case $1 in
		--nodes | -N) nodes=${2:?--nodes needs a number} && shift 2 ;;
		--cpus) cpus=${2:?--cpus needs a number} && shift 2 ;;
		--accounting) accounting=1 && shift ;;
		--no-accounting) accounting=0 && shift ;;
		*) usage ;;
		esac
	done
	# Defaults: what is configured now, else 2 nodes x 4 CPUs with accounting.
	nodes=${nodes:-$(conf_value 1)}
	cpus=${cpus:-$(conf_value 2)}
	accounting=${accounting:-$(conf_value 3)}
	nodes=${nodes:-2} cpus=${cpus:-4} accounting=${accounting:-1}
	[[ $nodes =~ ^[1-9][0-9]?$ ]] || die "--nodes $nodes: allowed 1..99"
	[[ $cpus =~ ^[1-9][0-9]*$ ]] || die "--cpus $cpus: a positive integer"
	((EUID == 0)) || die "run as root (it writes $CONF and /etc/hosts and starts daemons)"

	local t0=$SECONDS
	# One apt run for everything (an apt-get update costs seconds); accounting is dropped, not fatal, if its
	# packages cannot be had.
	if [[ $accounting == 1 ]] && ! install_packages slurm-wlm munge mariadb-server slurmdbd; then
		log "warning: could not install mariadb-server/slurmdbd; continuing without accounting"
		accounting=0
	fi
	install_packages slurm-wlm munge || die "could not install slurm-wlm munge"
	mkdir -p "$STATE"/{state,log,spool}
	start_munge

	local k running=1 changed=0
	write_conf "$nodes" "$cpus" "$accounting" && changed=1
	write_hosts "$nodes"
	# Accounting is worth having (real `sacct`, as on production clusters) but not worth failing for: in its
	# own process, so that `set -e` holds inside it, and on failure the cluster comes up without it.
	if [[ $accounting == 1 ]] && ! bash "$0" _accounting; then
		log "warning: slurmdbd did not start (see $STATE/log/); continuing without accounting (sacct off)"
		accounting=0
		write_conf "$nodes" "$cpus" "$accounting" || true
		changed=1
	fi
	pid_of "$STATE/slurmctld.pid" slurmctld >/dev/null || running=0
	for ((k = 1; k <= nodes; k++)); do
		pid_of "$STATE/slurmd-node$k.pid" slurmd >/dev/null || running=0
	done
	if ((changed || !running)); then
		stop_slurm
		for ((k = 1; k <= nodes; k++)); do mkdir -p "$STATE/spool/node$k"; done
		# slurmctld keeps its state (next job id) across restarts: a new job never reuses an old run's id.
		slurmctld
		for ((k = 1; k <= nodes; k++)); do slurmd -N "node$k"; done
	fi
	wait_idle "$nodes"
	log "up: $nodes node(s) x $cpus CPUs, accounting $([[ $accounting == 1 ]] && echo slurmdbd || echo off) in $((SECONDS - t0)) s"
	sinfo -N >&2
}

cmd_down() {
	((EUID == 0)) || die "run as root"
	if pid_of "$STATE/slurmctld.pid" slurmctld >/dev/null; then
		local ids
		ids=$(squeue -h -o %i 2>/dev/null || true)
		if [[ -n $ids ]]; then
			# shellcheck disable=SC2086
			scancel $ids 2>/dev/null || true
			local i
			for ((i = 0; i < 60; i++)); do
				[[ -z $(squeue -h -t running,completing -o %i 2>/dev/null) ]] && break
				sleep 0.5
			done
		fi
	fi
	stop_slurm
	stop_pidfile "$STATE/slurmdbd.pid" slurmdbd
	if [[ -f $STATE/mariadb.ours ]]; then
		stop_pidfile /run/mysqld/mysqld.pid mariadbd
		rm -f "$STATE/mariadb.ours"
	fi
	if [[ -f $STATE/munged.ours ]]; then
		stop_pidfile /run/munge/munged.pid munged
		rm -f "$STATE/munged.ours"
	fi
	remove_hosts
	log "down"
}

cmd_status() {
	local up=1 f name
	if pid=$(pid_of "$STATE/slurmctld.pid" slurmctld); then echo "slurmctld  pid $pid"; else
		echo "slurmctld  not running"
		up=0
	fi
	for f in $(slurmd_pidfiles); do
		name=${f##*/slurmd-}
		name=${name%.pid}
		if pid=$(pid_of "$f" slurmd); then echo "slurmd     $name pid $pid"; else echo "slurmd     $name not running"; fi
	done
	if pid=$(pid_of "$STATE/slurmdbd.pid" slurmdbd); then echo "slurmdbd   pid $pid"; fi
	if munge -n 2>/dev/null | unmunge >/dev/null 2>&1; then echo "munge      ok"; else
		echo "munge      not answering"
		up=0
	fi
	if ((up)) && sinfo -N 2>/dev/null; then return 0; fi
	return 1
}

main() {
	local cmd=${1:-}
	(($#)) && shift
	case $cmd in
	up) cmd_up "$@" ;;
	down) cmd_down "$@" ;;
	status) cmd_status "$@" ;;
	_accounting) start_accounting ;;
	*) usage ;;
	esac
}

main "$@"
