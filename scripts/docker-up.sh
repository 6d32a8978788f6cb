#!/usr/bin/env bash
# Make sure a Docker engine answers, for the Docker engine's tests and `SERVING_ENGINE=docker`.
# Does nothing when one already answers. Otherwise (as root, on a Debian machine without systemd)
# installs docker.io + busybox-static if missing and starts dockerd in the background:
#   DOCKERD_MODE=full (default): overlay2 + bridge + iptables, so ports publish on 127.0.0.1;
#   falls back to DOCKERD_MODE=sandbox (vfs, no bridge) when full does not come up (then the
#   Docker engine's port publishing does not work; the local engine is the better choice).
# Then builds the example image (scripts/build-image.sh; skipped when it exists).
# Stop it with `kill $(cat /var/run/dockerd-ci.pid)`.
set -euo pipefail
HERE=$(cd "$(dirname "$0")" && pwd)
LOG=${DOCKERD_LOG:-/var/log/dockerd-ci.log}
PIDFILE=${DOCKERD_PIDFILE:-/var/run/dockerd-ci.pid}
MODE=${DOCKERD_MODE:-full}

if command -v docker >/dev/null 2>&1 && docker info >/dev/null 2>&1; then
  echo "a Docker engine already answers"
  exec "$HERE/build-image.sh"
fi
if [ "$(id -u)" != 0 ]; then
  echo "docker-up.sh: no Docker engine answers and starting one needs root." >&2
  exit 1
fi
export DEBIAN_FRONTEND=noninteractive
if ! command -v dockerd >/dev/null 2>&1 || [ ! -x /bin/busybox ]; then
  apt-get update -qq >/dev/null || true
  apt-get install -y -qq --no-install-recommends docker.io busybox-static >/dev/null
fi

start_dockerd() {
  nohup dockerd --host=unix:///var/run/docker.sock "$@" >"$LOG" 2>&1 &
  echo $! >"$PIDFILE"
  local i=0
  while [ $i -lt 120 ]; do # up to 30 s
    docker info >/dev/null 2>&1 && return 0
    kill -0 "$(cat "$PIDFILE")" 2>/dev/null || return 1
    sleep 0.25
    i=$((i + 1))
  done
  return 1
}
stop_dockerd() {
  local p i=0
  p=$(cat "$PIDFILE" 2>/dev/null || true)
  [ -n "$p" ] || return 0
  kill -TERM "$p" 2>/dev/null || true
  while kill -0 "$p" 2>/dev/null && [ $i -lt 150 ]; do sleep 0.2; i=$((i + 1)); done
}

if [ "$MODE" = full ] && ! start_dockerd --storage-driver=overlay2; then
  echo "dockerd (overlay2 + bridge) failed; log tail:" >&2
  tail -5 "$LOG" >&2 || true
  stop_dockerd
  MODE=sandbox
fi
if [ "$MODE" = sandbox ] && ! start_dockerd --storage-driver=vfs --iptables=false --ip6tables=false --bridge=none; then
  echo "dockerd failed in sandbox mode too; log tail:" >&2
  tail -20 "$LOG" >&2 || true
  exit 1
fi
echo "dockerd up (mode=$MODE, pid=$(cat "$PIDFILE"), log $LOG)"
exec "$HERE/build-image.sh"
