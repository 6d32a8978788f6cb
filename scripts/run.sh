#!/usr/bin/env bash
# Start every process of the product under honcho; Ctrl-C stops them all (and the Redis we started).
set -euo pipefail
web_host=${WEB_HOST:-127.0.0.1}; web_port=${WEB_PORT:-8000}
.venv/bin/python manage.py collectstatic --noinput -v 0
cleanup() {
  # Local replicas outlive worker restarts on purpose; Ctrl-C of `make run` stops them too.
  .venv/bin/python manage.py stop_replicas || true
  if [ -f var/redis.pid ]; then kill "$(cat var/redis.pid)" 2>/dev/null || true; rm -f var/redis.pid; fi
}
trap cleanup EXIT
echo
echo "  modelserve is starting:  http://$web_host:$web_port/   (admin: http://$web_host:$web_port/admin/)"
echo "  endpoints are served by the proxy at ${SERVING_PROXY_URL:-http://127.0.0.1:8080}"
echo "  Ctrl-C stops everything."
scripts/site_check.sh "$web_host" "$web_port" "${SITE_URL:-}" "${ALLOWED_HOSTS:-}"
scripts/host_check.sh "${SITE_URL:-http://$web_host:$web_port}" "${SERVING_PROXY_URL:-http://127.0.0.1:8080}" "${SERVING_DOMAIN:-}"
echo
.venv/bin/honcho start -f Procfile
