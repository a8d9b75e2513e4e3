#!/bin/sh
# kerasdist ssh wrapper: see kerasdist/launch/ssh.py, which reads this file
# and runs it on each ssh host. Checked by shellcheck (make test).
#
# Runs on the host as `sh -c WRAPPER kerasdist-ssh DIR N ALIVE K=V... CMD`.
# - A background job of a non-interactive shell gets /dev/null as stdin
#   and ignores SIGINT/SIGQUIT (POSIX); the worker's stdin should be
#   /dev/null, but `env --default-signal` undoes the ignored signals, and
#   the signal reader gets ssh's stdin through fd 3.
# - `setsid` does not fork here (a background job is not a group leader),
#   so $! is the worker's pid, session and process group id.
# - The reader forwards signal names; `ALIVE` lines (the launcher's
#   keepalive) write the time to a file. The monitor, every second, kills
#   the group when that time is older than ALIVE seconds (0: never), and
#   relays the worker's heartbeat file (a private file on this host) as
#   `BEAT [JSON]` lines, which touch the launcher's own heartbeat file (or
#   write the worker's JSON object, e.g. its goodput facts, to it), and the
#   worker's /proc state letter when it changes (`T`: stopped), for
#   `SshProcess.state()`.
# - After the worker ends, the rest of its group is killed, as the local
#   launcher's final SIGKILL does; so it is when the wrapper is ended
#   (SIGHUP/SIGTERM: trap; SIGKILL: the monitor sees it gone or a
#   zombie). SIGPIPE is ignored and `wait` is quiet: once sshd is gone,
#   a write to the closed channel (dash's "Killed") must not kill the
#   wrapper before it cleans up.
dir=$1; n=$2; limit=$3; shift 3
# Each of the N arguments is NAME=VALUE: export it as is.
# shellcheck disable=SC2163
while [ "$n" -gt 0 ]; do export "$1"; shift; n=$((n - 1)); done
if ! cd -- "$dir" 2>/dev/null; then
  echo "kerasdist-ssh: $(hostname): cannot enter the launcher's working \
directory $dir; every host needs it (a shared file system)" >&2
  echo "kerasdist-ssh-status 78" >&2
  exit 78
fi
if ! tmp=$(mktemp -d "${TMPDIR:-/tmp}/kerasdist-ssh.XXXXXX"); then
  echo "kerasdist-ssh: $(hostname): mktemp -d failed in ${TMPDIR:-/tmp}" >&2
  echo "kerasdist-ssh-status 1" >&2
  exit 1
fi
date +%s >"$tmp/alive"
# The heartbeat file's JSON object (the backup callback's goodput facts,
# or {"finished": true}) goes through as one line; a touch as nothing.
relay_beat() {
  record=$(head -c 65536 -- "$tmp/beat" 2>/dev/null | tr -d '\n')
  case $record in '{'*) ;; *) record= ;; esac
  printf 'kerasdist-ssh-beat %s\n' "$record" >&2
}
if [ -n "${KERASDIST_HEARTBEAT_FILE-}" ]; then
  : >"$tmp/beat"
  export KERASDIST_HEARTBEAT_FILE="$tmp/beat"
fi
setsid env --default-signal -- "$@" </dev/null 2>&1 &
pid=$!
exec 3<&0
(
  while read -r sig; do
    case $sig in
      ALIVE) date +%s >"$tmp/alive" ;;
      *) kill -s "$sig" -- "-$pid" 2>/dev/null ;;
    esac
  done
  kill -s KILL -- "-$pid" 2>/dev/null
) <&3 >/dev/null &
reader=$!
exec 3<&-
main=$$
(
  last=$(stat -c %y "$tmp/beat" 2>/dev/null)
  # sleep's streams point nowhere: a closed ssh channel must not end it.
  # shellcheck disable=SC2217
  while sleep 1 </dev/null >/dev/null 2>&1; do
    state=; { read -r _ _ state _ </proc/"$main"/stat; } 2>/dev/null
    if [ -z "$state" ] || [ "$state" = Z ]; then
      kill -s KILL -- "-$pid" 2>/dev/null
      rm -rf -- "$tmp"
      exit 0
    fi
    now=$(stat -c %y "$tmp/beat" 2>/dev/null)
    if [ "$now" != "$last" ]; then relay_beat; last=$now; fi
    line=; { read -r line </proc/"$pid"/stat; } 2>/dev/null
    line=${line##*) }; ws=${line%% *}
    if [ "$ws" != "$wlast" ]; then echo "kerasdist-ssh-state $ws" >&2; wlast=$ws; fi
    read -r seen <"$tmp/alive" || seen=$(date +%s)
    if [ "$limit" -gt 0 ] && [ $(($(date +%s) - seen)) -gt "$limit" ]; then
      echo "kerasdist-ssh: $(hostname): no word from the launcher for \
$limit s (lost connection?): killing the worker" >&2
      kill -s KILL -- "-$pid" 2>/dev/null
      exit 0
    fi
  done
) </dev/null >/dev/null &
monitor=$!
stop() {
  kill "$reader" "$monitor" 2>/dev/null
  kill -s KILL -- "-$pid" 2>/dev/null
  rm -rf -- "$tmp"
}
trap 'stop; exit 129' HUP
trap 'stop; exit 143' TERM
trap '' PIPE
wait "$pid" 2>/dev/null
status=$?
kill "$monitor" 2>/dev/null
# The monitor looks once a second: a worker that writes its last facts
# (BackupAndRestore's {"finished": true, ...}) and exits at once would
# lose them, so the file's JSON object goes through once more.
[ -s "$tmp/beat" ] && relay_beat
stop
echo "kerasdist-ssh-status $status" >&2
exit "$status"
