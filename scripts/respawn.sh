#!/usr/bin/env bash
# Keep one process of the product running, as systemd's Restart=on-failure would: `make run` starts
# every process under honcho, which stops them ALL when one exits, so a worker that crashed (a
# library bug on a Redis restart, an out-of-memory kill) would take the whole product down instead
# of being replaced. Usage: scripts/respawn.sh NAME COMMAND [ARGS...]
# A clean exit (0) or SIGTERM/SIGINT (forwarded to the command) ends it; any other exit restarts the
# command after 1 s, doubling up to 30 s while it keeps dying within a minute of its start.
set -u
name=$1
shift
child=0
stopping=0
stop() {
  stopping=1
  if [ "$child" -gt 0 ]; then kill -TERM "$child" 2>/dev/null; fi
}
trap stop TERM INT
delay=1
while :; do
  started=$(date +%s)
  "$@" &
  child=$!
  wait "$child"
  code=$?
  # A trapped signal ends `wait` early: wait for the command itself to finish its shutdown.
  while kill -0 "$child" 2>/dev/null; do
    wait "$child"
    code=$?
  done
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
