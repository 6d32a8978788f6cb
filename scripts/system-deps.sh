#!/usr/bin/env bash
# System packages the product uses: redis-server (broker, routing table), bubblewrap (the local
# engine's sandbox) and, for tests only, chromium and a Japanese font (e2e) and docker-registry (image pulls). Installed with apt when we are root; otherwise we say exactly what to install.
set -euo pipefail
missing=()
command -v redis-server >/dev/null 2>&1 || missing+=(redis-server)
command -v bwrap >/dev/null 2>&1 || missing+=(bubblewrap)
command -v ip >/dev/null 2>&1 || missing+=(iproute2)
# The e2e tests' browser (tests/e2e, Playwright with executable_path); they skip, saying so, without it.
# A Japanese font too (3.5 MB), or the Japanese screenshots show boxes where the text should be.
optional=()
[ -x /usr/bin/chromium ] || optional+=(chromium)
# The image-pull tests' registry (tests/integration/test_image_pull.py); skipped, saying so, without it.
[ -x /usr/bin/docker-registry ] || optional+=(docker-registry)
{ command -v fc-list >/dev/null 2>&1 && [ -n "$(fc-list :lang=ja 2>/dev/null)" ]; } || optional+=(fonts-ipafont-gothic)
# compose.yaml's runner, where Docker is installed without its compose plugin (tests/integration/test_compose.py).
if command -v docker >/dev/null 2>&1 && ! docker compose version >/dev/null 2>&1 && ! command -v docker-compose >/dev/null 2>&1; then
  optional+=(docker-compose)
fi
[ ${#missing[@]} -eq 0 ] && [ ${#optional[@]} -eq 0 ] && exit 0
if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
  echo "installing ${missing[*]} ${optional[*]} with apt-get"
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -qq >/dev/null || true
  apt-get install -y -qq --no-install-recommends "${missing[@]}" "${optional[@]}" >/dev/null
else
  if [ ${#optional[@]} -gt 0 ]; then
    echo "some tests need ${optional[*]} (they are skipped without it): sudo apt-get install ${optional[*]}" >&2
  fi
  [ ${#missing[@]} -eq 0 ] && exit 0
  echo "modelserve needs these system packages: ${missing[*]}" >&2
  echo "install them, e.g.: sudo apt-get install ${missing[*]}" >&2
  [[ " ${missing[*]} " == *" redis-server "* ]] && [ -n "${REDIS_URL:-}" ] || exit 1
fi
