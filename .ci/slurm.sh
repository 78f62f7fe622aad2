#!/usr/bin/env bash
# Single-node SLURM cluster on localhost for tests (Debian/Ubuntu, run as root, no systemd needed).
#
#   .ci/slurm.sh start    install packages if missing, start munged, mariadbd, slurmdbd,
#                         slurmctld, slurmd; return once the node is idle and sacct works
#   .ci/slurm.sh stop     cancel remaining jobs, stop exactly the daemons this script started
#                         (found through the pid files in the state dir); no-op if not running
#   .ci/slurm.sh status   show daemon pids, sinfo and squeue; exit 0 only if everything is up
#   .ci/slurm.sh env      print `export SLURM_CONF=...` (eval "$(.ci/slurm.sh env)")
#   .ci/slurm.sh reset    stop, then delete the state dir (database, job state, logs)
#
# Environment knobs (all optional):
#   REPRMATCH_SLURM_DIR        state dir (config, pid files, logs, db)  [/tmp/reprmatch-slurm]
#   REPRMATCH_SLURM_PARTITION  partition name                            [debug]
#   REPRMATCH_SLURM_CLUSTER    cluster name                              [reprmatch]
#   REPRMATCH_SLURM_CPUS       advertise this many CPUs instead of the real count
#                              (oversubscription for many small jobs; uses config_overrides)
#   REPRMATCH_SLURM_PORT_BASE  slurmctld port; slurmd = +1, slurmdbd = +2  [6817]
#   REPRMATCH_SLURM_TIMEOUT    seconds to wait for readiness in start    [120]
#   REPRMATCH_SLURM_LINK_ETC   1 = symlink /etc/slurm/slurm.conf to the generated config when
#                              that path is free (so plain `sbatch` works w/o SLURM_CONF) [1]
#
# Clients need SLURM_CONF=<state>/etc/slurm.conf unless the /etc/slurm/slurm.conf symlink was
# created (start says which). Jobs inherit it from the submitting environment.
set -euo pipefail

GHOSTS=""
SCRIPT_DIR="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
TEMPLATE_DIR="$SCRIPT_DIR/slurm"

STATE="${REPRMATCH_SLURM_DIR:-/tmp/reprmatch-slurm}"
PARTITION="${REPRMATCH_SLURM_PARTITION:-debug}"
CLUSTER="${REPRMATCH_SLURM_CLUSTER:-reprmatch}"
PORT_BASE="${REPRMATCH_SLURM_PORT_BASE:-6817}"
TIMEOUT="${REPRMATCH_SLURM_TIMEOUT:-120}"
LINK_ETC="${REPRMATCH_SLURM_LINK_ETC:-1}"

CTLD_PORT="$PORT_BASE"
SLURMD_PORT="$((PORT_BASE + 1))"
DBD_PORT="$((PORT_BASE + 2))"

CONF="$STATE/etc/slurm.conf"
DBD_CONF="$STATE/etc/slurmdbd.conf"
MY_CNF="$STATE/etc/my.cnf"
MUNGE_SOCKET="$STATE/munge/munge.socket"
MYSQL_SOCKET="$STATE/mysql/mysqld.sock"
RUN="$STATE/run"
LOG="$STATE/log"
ETC_LINK=/etc/slurm/slurm.conf
# Marker put into every daemon's environment: slurmstepd inherits slurmd's environment, which
# lets `stop` find job step daemons that belong to this cluster (and only those).
MARKER="REPRMATCH_SLURM_OWNER=$STATE"

# Start order; stop goes in reverse. name:executable-basename
DAEMONS=(munged:munged mariadbd:mariadbd slurmdbd:slurmdbd slurmctld:slurmctld slurmd:slurmd)

PACKAGES=(munge mariadb-server slurmdbd slurmctld slurmd slurm-client)
BINARIES=(munged mungekey munge mariadbd mariadb-install-db mariadb-admin slurmdbd slurmctld slurmd
  sinfo sbatch sacct sacctmgr scontrol squeue scancel)

export SLURM_CONF="$CONF"
export PATH="$PATH:/usr/sbin:/sbin"
export MYSQL_UNIX_PORT="$MYSQL_SOCKET"

log() { printf '[slurm.sh] %s\n' "$*" >&2; }
die() {
  printf '[slurm.sh] ERROR: %s\n' "$*" >&2
  exit 1
}

show_log() { # show_log FILE [N]
  if [[ -f "$1" ]]; then
    printf '[slurm.sh] ---- last lines of %s ----\n' "$1" >&2
    tail -n "${2:-25}" "$1" >&2 || true
    printf '[slurm.sh] ----\n' >&2
  fi
}

# ----------------------------------------------------------------------------- pid handling
pidfile_of() { echo "$RUN/$1.pid"; }

has_marker() { { tr '\0' '\n' <"/proc/$1/environ" | grep -xF "$MARKER" >/dev/null; } 2>/dev/null; }

# Prints the pid recorded for daemon $1 if that process is alive and is the expected program.
live_pid() {
  local name="$1" exe="$2" f pid comm
  f="$(pidfile_of "$name")"
  [[ -s "$f" ]] || return 1
  pid="$(tr -dc '0-9' <"$f")"
  [[ -n "$pid" && -d "/proc/$pid" ]] || return 1
  comm="$({ cat "/proc/$pid/comm"; } 2>/dev/null || true)"
  # comm is truncated to 15 chars; guard against pid reuse by another program.
  [[ "$comm" == "${exe:0:15}" ]] || return 1
  # Only processes carrying our marker were started by us (for this state dir).
  has_marker "$pid" || return 1
  echo "$pid"
}

exe_of() {
  local d
  for d in "${DAEMONS[@]}"; do
    [[ "${d%%:*}" == "$1" ]] && { echo "${d#*:}"; return; }
  done
}

is_up() { live_pid "$1" "$(exe_of "$1")" >/dev/null; }

wait_for() { # wait_for SECONDS DESCRIPTION CMD...
  local secs="$1" what="$2" t0
  shift 2
  t0=$SECONDS
  until "$@" >/dev/null 2>&1; do
    if ((SECONDS - t0 >= secs)); then
      log "timed out after ${secs}s waiting for: $what"
      return 1
    fi
    sleep 0.5
  done
}

# Run a daemon command with our marker in its environment, detached from this shell.
spawn() {
  env "$MARKER" setsid "$@" </dev/null >>"$LOG/spawn.log" 2>&1
}

spawn_bg() {
  env "$MARKER" setsid "$@" </dev/null >>"$LOG/spawn.log" 2>&1 &
  disown || true
}

# ----------------------------------------------------------------------------- install
ensure_packages() {
  local missing=() b
  for b in "${BINARIES[@]}"; do
    command -v "$b" >/dev/null 2>&1 || missing+=("$b")
  done
  ((${#missing[@]} == 0)) && return 0
  log "missing binaries: ${missing[*]} -> installing ${PACKAGES[*]}"
  [[ $EUID -eq 0 ]] || die "package installation needs root (apt-get install ${PACKAGES[*]})"
  command -v apt-get >/dev/null || die "apt-get not found; install ${PACKAGES[*]} manually"
  # Keep package postinst scripts from starting system-wide munge/mariadb services.
  local policy=/usr/sbin/policy-rc.d created_policy=0
  if [[ ! -e "$policy" ]]; then
    printf '#!/bin/sh\nexit 101\n' >"$policy" && chmod 755 "$policy" && created_policy=1
  fi
  local rc=0
  {
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -qq &&
      apt-get install -y -qq --no-install-recommends "${PACKAGES[@]}"
  } >"/tmp/reprmatch-slurm-apt.log" 2>&1 || rc=$?
  ((created_policy)) && rm -f "$policy"
  if ((rc != 0)); then
    tail -n 30 /tmp/reprmatch-slurm-apt.log >&2
    die "apt-get install failed (rc=$rc), full log: /tmp/reprmatch-slurm-apt.log"
  fi
  for b in "${BINARIES[@]}"; do
    command -v "$b" >/dev/null 2>&1 || die "binary '$b' still missing after installing packages"
  done
}

# ----------------------------------------------------------------------------- config
render() { # render TEMPLATE OUT
  local tmpl="$TEMPLATE_DIR/$1" out="$2"
  [[ -f "$tmpl" ]] || die "template not found: $tmpl"
  sed -e "s|@STATE@|$STATE|g" \
    -e "s|@CLUSTER@|$CLUSTER|g" \
    -e "s|@NODE@|$NODE|g" \
    -e "s|@PARTITION@|$PARTITION|g" \
    -e "s|@CTLD_PORT@|$CTLD_PORT|g" \
    -e "s|@SLURMD_PORT@|$SLURMD_PORT|g" \
    -e "s|@DBD_PORT@|$DBD_PORT|g" \
    -e "s|@CPUS@|$CPUS|g" \
    -e "s|@NODE_TOPOLOGY@|$NODE_TOPOLOGY|g" \
    -e "s|@MEMORY@|$MEMORY|g" \
    -e "s|@SLURMD_PARAMETERS@|$SLURMD_PARAMETERS|g" \
    "$tmpl" >"$out.tmp"
  mv -f "$out.tmp" "$out"
}

write_configs() {
  mkdir -p "$STATE"/{etc,run,log,ctld,spool/slurmd,munge,mysql}
  chmod 755 "$STATE" "$STATE/munge" # munged insists that its socket dir is world-executable

  NODE="$(hostname -s)"
  [[ -n "$NODE" ]] || die "cannot determine short hostname"
  local hw
  hw="$(slurmd -C 2>/dev/null | head -n1)" || true
  [[ "$hw" == NodeName=* ]] || die "'slurmd -C' failed: $hw"
  local real_cpus boards sockets cores threads
  real_cpus="$(sed -n 's/.* CPUs=\([0-9]*\).*/\1/p' <<<"$hw")"
  boards="$(sed -n 's/.* Boards=\([0-9]*\).*/\1/p' <<<"$hw")"
  sockets="$(sed -n 's/.* SocketsPerBoard=\([0-9]*\).*/\1/p' <<<"$hw")"
  cores="$(sed -n 's/.* CoresPerSocket=\([0-9]*\).*/\1/p' <<<"$hw")"
  threads="$(sed -n 's/.* ThreadsPerCore=\([0-9]*\).*/\1/p' <<<"$hw")"
  MEMORY="$(sed -n 's/.* RealMemory=\([0-9]*\).*/\1/p' <<<"$hw")"
  [[ -n "$real_cpus" && -n "$MEMORY" ]] || die "could not parse 'slurmd -C' output: $hw"
  if [[ -n "${REPRMATCH_SLURM_CPUS:-}" && "${REPRMATCH_SLURM_CPUS}" != "$real_cpus" ]]; then
    CPUS="$REPRMATCH_SLURM_CPUS"
    NODE_TOPOLOGY=""
    SLURMD_PARAMETERS="SlurmdParameters=config_overrides"
  else
    CPUS="$real_cpus"
    NODE_TOPOLOGY="Boards=${boards:-1} SocketsPerBoard=${sockets:-1} CoresPerSocket=${cores:-$CPUS} ThreadsPerCore=${threads:-1}"
    SLURMD_PARAMETERS=""
  fi

  render slurm.conf.in "$CONF"
  render slurmdbd.conf.in "$DBD_CONF"
  chmod 600 "$DBD_CONF"
  render my.cnf.in "$MY_CNF"
  chmod 644 "$CONF" "$MY_CNF"

  if [[ ! -s "$STATE/munge/munge.key" ]]; then
    (umask 077 && mungekey -c -b 1024 -k "$STATE/munge/munge.key") ||
      die "mungekey failed to create $STATE/munge/munge.key"
  fi
  chmod 600 "$STATE/munge/munge.key"

  if [[ "$LINK_ETC" == 1 ]]; then
    if [[ -L "$ETC_LINK" && "$(readlink "$ETC_LINK")" == "$CONF" ]]; then
      :
    elif [[ ! -e "$ETC_LINK" && ! -L "$ETC_LINK" ]]; then
      mkdir -p "$(dirname "$ETC_LINK")" && ln -s "$CONF" "$ETC_LINK" &&
        echo "$ETC_LINK" >"$STATE/etc/created-etc-link"
    fi
  fi
}

# ----------------------------------------------------------------------------- daemons
start_munged() {
  is_up munged && return 0
  rm -f "$MUNGE_SOCKET" "$MUNGE_SOCKET.lock"
  spawn munged --key-file="$STATE/munge/munge.key" --socket="$MUNGE_SOCKET" \
    --pid-file="$(pidfile_of munged)" --seed-file="$STATE/munge/munged.seed" \
    --log-file="$LOG/munged.log" ||
    { show_log "$LOG/munged.log"; die "munged failed to start"; }
  wait_for 15 "munged" bash -c "munge -n -S '$MUNGE_SOCKET' | unmunge -S '$MUNGE_SOCKET'" ||
    { show_log "$LOG/munged.log"; die "munged is not answering on $MUNGE_SOCKET"; }
}

start_mariadbd() {
  is_up mariadbd && return 0
  if [[ ! -d "$STATE/mysql/data/mysql" ]]; then
    rm -rf "$STATE/mysql/data"
    mariadb-install-db --defaults-file="$MY_CNF" --auth-root-authentication-method=socket \
      --skip-test-db >"$LOG/mariadb-install-db.log" 2>&1 ||
      { show_log "$LOG/mariadb-install-db.log"; die "mariadb-install-db failed"; }
  fi
  rm -f "$MYSQL_SOCKET"
  spawn_bg mariadbd --defaults-file="$MY_CNF"
  wait_for 60 "mariadbd" mariadb-admin --defaults-file="$MY_CNF" ping ||
    { show_log "$LOG/mariadbd.log"; die "mariadbd did not come up (socket $MYSQL_SOCKET)"; }
  wait_for 5 "mariadbd pid file" is_up mariadbd ||
    { show_log "$LOG/mariadbd.log"; die "mariadbd answers but $(pidfile_of mariadbd) is not valid"; }
}

start_slurmdbd() {
  is_up slurmdbd && return 0
  # slurmdbd finds slurmdbd.conf next to $SLURM_CONF.
  spawn slurmdbd ||
    { show_log "$LOG/slurmdbd.log"; die "slurmdbd failed to start"; }
  wait_for 60 "slurmdbd" sacctmgr -n show cluster ||
    { show_log "$LOG/slurmdbd.log"; die "slurmdbd is not answering (sacctmgr show cluster fails)"; }
  # Register the cluster (this also creates account "root" with user root; idempotent).
  if [[ -z "$(sacctmgr -n -P show cluster "$CLUSTER" format=cluster 2>/dev/null)" ]]; then
    sacctmgr -i add cluster "$CLUSTER" >/dev/null || die "sacctmgr add cluster $CLUSTER failed"
  fi
}

start_slurmctld() {
  is_up slurmctld && return 0
  spawn slurmctld -f "$CONF" ||
    { show_log "$LOG/slurmctld.log"; die "slurmctld failed to start"; }
  wait_for 60 "slurmctld" scontrol ping ||
    { show_log "$LOG/slurmctld.log"; die "slurmctld does not answer 'scontrol ping'"; }
}

# Jobs the controller believes are running but whose slurmstepd is gone (e.g. killed by a
# forced stop). Only meaningful while our slurmd is down: no new job can start then.
ghost_jobs() {
  local id
  for id in $(squeue -h -t RUNNING,COMPLETING,SUSPENDED -o %A 2>/dev/null); do
    local found=0 p
    for p in $(our_stepds); do
      if { tr '\0' ' ' <"/proc/$p/cmdline" | grep "\[${id}\.batch\]" >/dev/null; } 2>/dev/null; then
        found=1
        break
      fi
    done
    ((found)) || echo "$id"
  done
  return 0
}

start_slurmd() {
  is_up slurmd && return 0
  GHOSTS="$(ghost_jobs | tr '\n' ' ')"
  spawn slurmd -f "$CONF" ||
    { show_log "$LOG/slurmd.log"; die "slurmd failed to start"; }
  wait_for 15 "slurmd pid file" is_up slurmd ||
    { show_log "$LOG/slurmd.log"; die "slurmd exited right after start"; }
}

node_state() { sinfo -h -n "$NODE" -o '%T' 2>/dev/null | head -n1; }

wait_ready() {
  local t0=$SECONDS resumed=0 st
  while :; do
    st="$(node_state || true)"
    case "$st" in
      idle | mixed | allocated | completing) break ;;
      down* | drain* | fail*)
        if ((!resumed && SECONDS - t0 > 3)); then
          log "node $NODE is '$st', resuming it"
          scontrol update NodeName="$NODE" State=RESUME >/dev/null 2>&1 || true
          resumed=1
        fi
        ;;
    esac
    if ((SECONDS - t0 >= TIMEOUT)); then
      log "node $NODE state: '${st:-<none>}'"
      scontrol show node "$NODE" >&2 || true
      show_log "$LOG/slurmd.log"
      show_log "$LOG/slurmctld.log"
      die "node did not become idle within ${TIMEOUT}s"
    fi
    sleep 0.5
  done
  wait_for 30 "sacct" sacct -n -X -S now-1hour ||
    { show_log "$LOG/slurmdbd.log"; die "sacct does not work"; }
}

cmd_start() {
  local t0=$SECONDS
  [[ $EUID -eq 0 ]] || die "must run as root (SlurmUser=root, private munged/mariadbd)"
  ensure_packages
  local d was_up=1
  for d in "${DAEMONS[@]}"; do is_up "${d%%:*}" || was_up=0; done
  ((was_up)) && log "already running (state dir $STATE); checking readiness"
  write_configs
  start_munged
  start_mariadbd
  start_slurmdbd
  start_slurmctld
  start_slurmd
  wait_ready
  if [[ -n "${GHOSTS// /}" ]]; then
    log "cancelling jobs left over from an unclean stop: $GHOSTS"
    # shellcheck disable=SC2086
    scancel $GHOSTS 2>/dev/null || true
  fi
  log "cluster '$CLUSTER' up in $((SECONDS - t0))s: partition '$PARTITION', node $NODE, CPUs=$CPUS, RealMemory=${MEMORY}MB"
  if [[ -L "$ETC_LINK" && "$(readlink "$ETC_LINK")" == "$CONF" ]]; then
    log "clients: $ETC_LINK -> $CONF (SLURM_CONF optional)"
  else
    log "clients need: export SLURM_CONF=$CONF"
  fi
}

# ----------------------------------------------------------------------------- stop
# Pids of slurmstepd processes spawned by our slurmd (they inherit our marker).
our_stepds() {
  local p
  for p in /proc/[0-9]*; do
    [[ "$({ cat "$p/comm"; } 2>/dev/null)" == slurmstepd ]] || continue
    has_marker "${p#/proc/}" && echo "${p#/proc/}"
  done
  return 0
}

descendants() { # all descendants of the given pids
  local todo=("$@") p kids
  while ((${#todo[@]})); do
    p="${todo[0]}"
    todo=("${todo[@]:1}")
    kids="$(ps -o pid= --ppid "$p" 2>/dev/null | tr -s ' \n' ' ' || true)"
    for k in $kids; do
      echo "$k"
      todo+=("$k")
    done
  done
}

stop_pid() { # stop_pid NAME PID
  local name="$1" pid="$2" i
  kill -TERM "$pid" 2>/dev/null || return 0
  for ((i = 0; i < 100; i++)); do
    [[ -d "/proc/$pid" ]] || return 0
    # zombie (should not happen, daemons are reparented) counts as gone
    [[ "$(awk '{print $3}' "/proc/$pid/stat" 2>/dev/null)" == Z ]] && return 0
    sleep 0.2
  done
  log "$name (pid $pid) ignored SIGTERM for 20s, sending SIGKILL"
  kill -KILL "$pid" 2>/dev/null || true
  sleep 0.5
}

cmd_stop() {
  local any=0 d name exe pid
  for d in "${DAEMONS[@]}"; do is_up "${d%%:*}" && any=1; done
  local stepds
  stepds="$(our_stepds)"
  [[ -n "$stepds" ]] && any=1
  if ((!any)); then
    log "not running (state dir $STATE)"
    remove_etc_link
    return 0
  fi

  # Cancel leftover jobs while the controller is still there, so job processes are cleaned up
  # by slurmstepd rather than orphaned.
  if is_up slurmctld && is_up slurmd; then
    local jobs
    jobs="$(squeue -h -o %i 2>/dev/null | tr '\n' ' ')"
    if [[ -n "${jobs// /}" ]]; then
      log "cancelling remaining jobs: $jobs"
      # shellcheck disable=SC2086
      scancel $jobs 2>/dev/null || true
      # shellcheck disable=SC2016  # expanded by the inner bash
      wait_for 30 "cancelled jobs to finish" bash -c '[[ -z "$(squeue -h -o %i)" ]]' || true
    fi
  fi

  for ((i = ${#DAEMONS[@]} - 1; i >= 0; i--)); do
    d="${DAEMONS[$i]}"
    name="${d%%:*}"
    exe="${d#*:}"
    if pid="$(live_pid "$name" "$exe")"; then
      log "stopping $name (pid $pid)"
      stop_pid "$name" "$pid"
    fi
    if [[ "$name" == slurmd ]]; then
      # Step daemons (and their job processes) that survived the cancel.
      stepds="$(our_stepds)"
      if [[ -n "$stepds" ]]; then
        local victims
        # shellcheck disable=SC2086  # word splitting of pid lists is intended
        victims="$(descendants $stepds | tr '\n' ' ')$(tr '\n' ' ' <<<"$stepds")"
        log "killing leftover slurmstepd/job processes: $victims"
        # shellcheck disable=SC2086
        kill -KILL $victims 2>/dev/null || true
      fi
    fi
    rm -f "$(pidfile_of "$name")"
  done
  rm -f "$MUNGE_SOCKET" "$MYSQL_SOCKET"
  remove_etc_link
  log "stopped"
}

remove_etc_link() {
  if [[ -f "$STATE/etc/created-etc-link" && -L "$ETC_LINK" && "$(readlink "$ETC_LINK")" == "$CONF" ]]; then
    rm -f "$ETC_LINK" "$STATE/etc/created-etc-link"
  fi
}

# ----------------------------------------------------------------------------- status
cmd_status() {
  local ok=0 d name pid
  for d in "${DAEMONS[@]}"; do
    name="${d%%:*}"
    if pid="$(live_pid "$name" "${d#*:}")"; then
      printf '%-10s running (pid %s)\n' "$name" "$pid"
    else
      printf '%-10s stopped\n' "$name"
      ok=1
    fi
  done
  echo "state dir: $STATE"
  echo "SLURM_CONF=$CONF"
  if ((ok == 0)); then
    sinfo || ok=1
    squeue || ok=1
  fi
  return $ok
}

usage() {
  sed -n '2,10p' "${BASH_SOURCE[0]}" | sed 's/^# \{0,1\}//' >&2
  exit 2
}

case "${1:-}" in
  start) cmd_start ;;
  stop) cmd_stop ;;
  status) cmd_status ;;
  env) echo "export SLURM_CONF=$CONF" ;;
  reset)
    cmd_stop
    case "$STATE" in
      / | /tmp | /tmp/ | "$HOME" | "") die "refusing to delete state dir '$STATE'" ;;
    esac
    rm -rf "$STATE"
    log "removed $STATE"
    ;;
  *) usage ;;
esac
