#!/usr/bin/env bash
# Warn when the web app listens beyond loopback but SITE_URL is left at its default, or when
# SITE_URL's host is not one ALLOWED_HOSTS names (called by scripts/run.sh). SITE_URL defaults to http://127.0.0.1:$WEB_PORT, and only its origin (WEB_ORIGINS)
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

# SITE_URL set: its host must be one ALLOWED_HOSTS names (whatever WEB_HOST is: behind a reverse
# proxy the web app listens on loopback), or every page opened there is 400 Bad Request.
if [ -n "$site" ]; then
  site_host=${site#*://}
  site_host=${site_host%%/*}
  site_host=${site_host##*@}
  case "$site_host" in
    \[*) site_host="${site_host%%]*}]" ;;  # [v6]: keep the brackets, as ALLOWED_HOSTS writes it
    *) site_host=${site_host%%:*} ;;
  esac
  site_host=${site_host,,}
  site_host=${site_host%.}
  # Unset: config/settings.py's default, the loopback names.
  names=${allowed:-localhost,127.0.0.1,[::1],testserver}
  IFS=, read -r -a patterns <<<"$names"
  for pattern in "${patterns[@]}"; do
    pattern=${pattern// /}
    pattern=${pattern,,}
    [ -n "$pattern" ] || continue
    # Django's rules: "*" is every host, ".example.com" is example.com and its subdomains.
    case "$pattern" in
      "*") exit 0 ;;
      .*) [ "$site_host" = "${pattern#.}" ] && exit 0
          case "$site_host" in *"$pattern") exit 0 ;; esac ;;
      *) [ "$site_host" = "$pattern" ] && exit 0 ;;
    esac
  done
  if [ -n "$allowed" ]; then
    fixed="$allowed,$site_host"
  else
    fixed="$site_host,localhost,127.0.0.1"
  fi
  echo "  WARNING: SITE_URL is $site but ALLOWED_HOSTS (${allowed:-unset: the loopback names}) does not name"
  echo "           $site_host, so every page opened there is refused with 400 Bad Request."
  echo "           Set ALLOWED_HOSTS=$fixed, e.g."
  echo "           WEB_HOST=$1 SITE_URL=$site ALLOWED_HOSTS=$fixed make run"
  exit 0
fi

case "$host" in
  127.* | ::1 | localhost | localhost.) exit 0 ;;
esac
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
