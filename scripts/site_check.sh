#!/usr/bin/env bash
# Warn when the web app listens beyond loopback but SITE_URL is left at its default (called by
# scripts/run.sh). SITE_URL defaults to http://127.0.0.1:$WEB_PORT, and only its origin (WEB_ORIGINS)
# may open the websockets: a browser on another machine gets its live updates refused with nothing
# but a server log line. ALLOWED_HOSTS (default: the loopback names) must name that address too, or
# Django answers it 400 Bad Request.
# Usage: site_check.sh WEB_HOST WEB_PORT [SITE_URL] [ALLOWED_HOSTS]
set -euo pipefail
host=${1,,}
port=$2
site=${3:-}
allowed=${4:-}
host=${host#[}
host=${host%]}
case "$host" in
  127.* | ::1 | localhost | localhost.) exit 0 ;;
esac
[ -z "$site" ] || exit 0
case "$host" in
  0.0.0.0 | :: | "")
    # Every address: name the first one this machine has, if it says (Linux hostname -I).
    address=$(hostname -I 2>/dev/null | awk '{print $1}' || true)
    case "$address" in
      "") address="<this machine's address>" ;;
      *:*) address="[$address]" ;;
    esac
    ;;
  *:*) address="[$host]" ;;
  *) address=$host ;;
esac
hosts=""
[ -n "$allowed" ] || hosts=" ALLOWED_HOSTS=$address,localhost,127.0.0.1"
echo "  WARNING: the web app listens on $1 but SITE_URL is unset, so only pages opened at http://127.0.0.1:$port"
echo "           (or localhost) get live updates: at any other address the websockets are refused."
echo "           Set SITE_URL=http://$address:$port (the address browsers use)${hosts:+ and${hosts}}, e.g."
echo "           WEB_HOST=$1 SITE_URL=http://$address:$port${hosts} make run"
