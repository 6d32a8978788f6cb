#!/usr/bin/env bash
# Warn when the web app and the proxy share one host name (called by scripts/run.sh).
# Browsers scope cookies by host name, not by port, so on one host name every request to a service
# carries the web app's cookies. The proxy removes them and drops a replica's Set-Cookie for them
# (README "Security model"), but a page a replica serves runs its scripts on the proxy's origin,
# where document.cookie reads and writes the cookies of the whole host name: the web app's CSRF
# cookie can be read and cookies planted for the web app. Only a host name of its own closes that.
# Usage: host_check.sh WEB_URL PROXY_URL [SERVING_DOMAIN]
set -euo pipefail
host_of() {
  local rest=${1#*://}
  rest=${rest%%/*}
  rest=${rest##*@}
  if [[ $rest == \[* ]]; then rest=${rest%%]*}]; else rest=${rest%%:*}; fi
  printf '%s' "${rest,,}"
}
web=$(host_of "$1")
proxy=$(host_of "$2")
domain=${3:-}
domain=${domain,,}
domain=${domain#.}
if [ -n "$domain" ]; then
  # Services answer at <slug>.<domain>: a script there may set cookies for <domain> and its subdomains.
  if [ "$web" = "$domain" ] || [[ $web == *".$domain" ]]; then
    echo "  WARNING: the web app ($1) is on SERVING_DOMAIN=$domain, where services answer at <slug>.$domain."
    echo "           A service's pages could set cookies for the web app: serve services from a domain of their own."
  fi
fi
# (The proxy also serves /e/<slug>/ on its own address, with or without SERVING_DOMAIN.)
if [ "$web" = "$proxy" ]; then
  echo "  WARNING: the web app ($1) and the proxy ($2) share the host name $web."
  echo "           Browsers send a host's cookies to every port of it, and a service's pages could read and set them:"
  echo "           give the proxy its own host name in production (SERVING_PROXY_URL=https://models.example.com,"
  echo "           or SERVING_DOMAIN)."
fi
