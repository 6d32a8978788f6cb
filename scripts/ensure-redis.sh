#!/usr/bin/env bash
# Make sure Redis answers at REDIS_URL; start a local redis-server when it does not (local URL only).
set -euo pipefail
url=${REDIS_URL:-redis://127.0.0.1:6379/0}
hostport=${url#redis://}; hostport=${hostport#*@}; hostport=${hostport%%/*}
host=${hostport%%:*}; port=${hostport##*:}; [ "$port" = "$host" ] && port=6379
ping() { .venv/bin/python - "$host" "$port" <<'PY' 2>/dev/null
import socket, sys
s = socket.create_connection((sys.argv[1], int(sys.argv[2])), timeout=1)
s.sendall(b"PING\r\n"); sys.exit(0 if s.recv(16).startswith(b"+PONG") else 1)
PY
}
ping && exit 0
case "$host" in 127.0.0.1|localhost|::1) ;; *) echo "Redis at $url does not answer; start it or fix REDIS_URL." >&2; exit 1;; esac
command -v redis-server >/dev/null || { echo "Redis is not running and redis-server is not installed: apt-get install redis-server" >&2; exit 1; }
mkdir -p var
echo "starting redis-server on $host:$port (data in var/, log var/redis.log)"
redis-server --daemonize yes --bind "$host" --port "$port" --dir "$(pwd)/var" --save "" --appendonly no \
  --logfile "$(pwd)/var/redis.log" --pidfile "$(pwd)/var/redis.pid"
for _ in $(seq 50); do ping && exit 0; sleep 0.1; done
echo "redis-server did not answer on $host:$port; see var/redis.log" >&2; exit 1
