#!/usr/bin/env bash
# Keep one process of the product running, as systemd's Restart=on-failure would: `make run` starts
# every process under honcho, which stops them ALL when one exits, so a worker that crashed (a
# library bug on a Redis restart, an out-of-memory kill) would take the whole product down instead
# of being replaced. Usage: scripts/respawn.sh NAME COMMAND [ARGS...]
# A clean exit (0) or SIGTERM/SIGINT/SIGHUP (forwarded as SIGTERM to the command) ends it; any
# other exit restarts the command after 1 s, doubling up to 30 s while it keeps dying within a
# minute of its start. A command still running STOP_GRACE seconds after the TERM is killed with
# everything it started: honcho SIGKILLs this wrapper's group at 5 s, which no longer holds it.
set -u
name=$1
shift
child=0
stopping=0
STOP_GRACE=${RESPAWN_STOP_GRACE:-4}
stop() {
  stopping=1
  if [ "$child" -gt 0 ]; then kill -TERM "$child" 2>/dev/null; fi
}
trap stop TERM INT HUP
delay=1
while :; do
  started=$(date +%s)
  # In a session of its own: a stop signals this wrapper's whole process group (honcho, or Ctrl-C in
  # a terminal), and a Celery worker's pool processes died of that mid-shutdown (WorkerLostError
  # tracebacks on every stop). The command hears only the TERM this wrapper forwards, as from a
  # supervisor. (A background subshell is no group leader, so setsid execs in place: $! is the
  # command, and the leader of its own group.)
  if command -v setsid >/dev/null 2>&1; then
    (exec setsid "$@") &
  else
    "$@" &
  fi
  child=$!
  wait "$child"
  code=$?
  # A trapped signal ends `wait` early: let the command finish its shutdown, for STOP_GRACE at most.
  tenths=0
  while kill -0 "$child" 2>/dev/null; do
    if [ "$stopping" = 1 ] && [ "$tenths" -ge $((STOP_GRACE * 10)) ]; then
      echo "respawn: $name did not stop within ${STOP_GRACE}s of SIGTERM; killing it" >&2
      kill -KILL -- "-$child" 2>/dev/null || kill -KILL "$child" 2>/dev/null
    fi
    sleep 0.1 &
    wait $! 2>/dev/null
    tenths=$((tenths + 1))
  done
  if [ "$tenths" -gt 0 ]; then
    wait "$child" 2>/dev/null
    code=$?
  fi
  if [ "$stopping" = 1 ] || [ "$code" = 0 ]; then
    exit "$code"
  fi
  if [ $(($(date +%s) - started)) -ge 60 ]; then delay=1; fi
  echo "respawn: $name exited with code $code; starting it again in ${delay}s" >&2
  sleep "$delay" &
  wait $! 2>/dev/null
  if [ "$stopping" = 1 ]; then exit "$code"; fi
  delay=$((delay * 2 > 30 ? 30 : delay * 2))
done
