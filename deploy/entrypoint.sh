#!/bin/sh
# One image, one process per container (the Procfile's processes; the container's restart policy
# replaces scripts/respawn.sh):  web | control | beat | proxy | node | manage ARGS... | any command.
set -eu
cd /app
what=${1:-web}
[ $# -gt 0 ] && shift
case "$what" in
  web)
    # Migrations and static files first: control and beat wait for web to be healthy (compose.yaml).
    python3 manage.py migrate --noinput -v 0
    python3 manage.py collectstatic --noinput -v 0
    exec python3 -m daphne -b "${WEB_HOST:-0.0.0.0}" -p "${WEB_PORT:-8000}" config.asgi:application ;;
  control)
    exec python3 -m celery -A config worker -Q control -n control@%h --concurrency="${CONTROL_CONCURRENCY:-2}" --loglevel=WARNING ;;
  beat)
    exec python3 -m celery -A config beat --loglevel=WARNING --schedule /tmp/celerybeat-schedule ;;
  proxy)
    exec python3 -m proxy ;;
  node)
    if [ -z "${NODE_NAME:-}" ] || [ -z "${NODE_ADDRESS:-}" ]; then
      echo "node: set NODE_NAME (unique per host) and NODE_ADDRESS (this host's address the proxy reaches)." >&2
      exit 2
    fi
    exec python3 -m celery -A config worker -Q "node.$NODE_NAME" -n "node-$NODE_NAME@%h" --concurrency="${NODE_CONCURRENCY:-4}" --loglevel=WARNING ;;
  manage)
    exec python3 manage.py "$@" ;;
  *)
    exec "$what" "$@" ;;
esac
