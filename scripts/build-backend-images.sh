#!/usr/bin/env bash
# For hosts that can not pull the official postgres and redis images (no internet, only a package
# mirror): build stand-ins from this host's Debian PostgreSQL and Redis binaries, with no registry,
# as scripts/build-image.sh does for python. They take what compose.yaml gives the official images
# (POSTGRES_USER/POSTGRES_PASSWORD/POSTGRES_DB, data in /var/lib/postgresql/data; a `redis-server
# ...` command, data in /data). Then:  POSTGRES_IMAGE=modelserve/postgres:local \
#   REDIS_IMAGE=modelserve/redis:local docker-compose up -d
#
# Usage: scripts/build-backend-images.sh [--force] [POSTGRES_TAG [REDIS_TAG]]
#   Needs postgresql and redis-server installed (apt-get install postgresql redis-server).
set -euo pipefail
FORCE=0
TAGS=()
for arg in "$@"; do
  case "$arg" in
    --force) FORCE=1 ;;
    -h|--help) sed -n '2,11p' "$0"; exit 0 ;;
    *) TAGS+=("$arg") ;;
  esac
done
PG_TAG=${TAGS[0]:-modelserve/postgres:local}
REDIS_TAG=${TAGS[1]:-modelserve/redis:local}
ENGINE=${ENGINE:-docker}
PG_BIN=${PG_BIN:-$(ls -d /usr/lib/postgresql/*/bin 2>/dev/null | sort -V | tail -1)}
REDIS_BIN=${REDIS_BIN:-$(command -v redis-server || true)}
if [ -z "$PG_BIN" ] || [ ! -x "$PG_BIN/postgres" ] || [ -z "$REDIS_BIN" ] || [ ! -x /bin/busybox ]; then
  echo "build-backend-images.sh: needs PostgreSQL, redis-server and a static busybox on this host:" \
       "sudo apt-get install postgresql redis-server busybox-static" >&2
  exit 1
fi
PG_VERSION=$(basename "$(dirname "$PG_BIN")")

# new_root DIR: busybox (for /bin/sh), the usual folders and users.
new_root() {
  mkdir -p "$1"/{bin,usr/bin,usr/lib,usr/lib64,etc,tmp,data}
  chmod 1777 "$1/tmp"
  cp /bin/busybox "$1/bin/busybox"
  for a in $(/bin/busybox --list); do [ -e "$1/bin/$a" ] || ln -s busybox "$1/bin/$a"; done
  ln -s usr/lib "$1/lib"; ln -s usr/lib64 "$1/lib64"
  printf 'root:x:0:0:root:/root:/bin/sh\npostgres:x:999:999:postgres:/var/lib/postgresql:/bin/sh\n' >"$1/etc/passwd"
  printf 'root:x:0:\npostgres:x:999:\n' >"$1/etc/group"
}
# copy_libs DIR FILE...: the shared libraries FILEs need, under /usr (Debian's merged /usr).
copy_libs() {
  local root=$1; shift
  for f in "$@"; do ldd "$f" 2>/dev/null || true; done \
    | awk '/=>/ {print $3} /^\t\/lib/ {print $1}' | grep '^/' | sort -u | while read -r lib; do
      target=$lib
      case "$lib" in /lib/*|/lib64/*) target=/usr$lib ;; esac
      mkdir -p "$root$(dirname "$target")"
      cp -L "$lib" "$root$target"
    done
}
exists() { [ "$FORCE" = 0 ] && "$ENGINE" image inspect "$1" >/dev/null 2>&1; }

if exists "$PG_TAG"; then
  echo "image $PG_TAG already exists (use --force to rebuild)"
else
  ROOT=$(mktemp -d)
  trap 'rm -rf "$ROOT"' EXIT
  new_root "$ROOT"
  mkdir -p "$ROOT/usr/lib/postgresql" "$ROOT/usr/share/postgresql" "$ROOT/var/lib/postgresql/data"
  cp -a "/usr/lib/postgresql/$PG_VERSION" "$ROOT/usr/lib/postgresql/"
  cp -a "/usr/share/postgresql/$PG_VERSION" "$ROOT/usr/share/postgresql/"
  [ -d /usr/share/zoneinfo ] && mkdir -p "$ROOT/usr/share" && cp -a /usr/share/zoneinfo "$ROOT/usr/share/"
  copy_libs "$ROOT" "$PG_BIN"/* "/usr/lib/postgresql/$PG_VERSION"/lib/*.so
  cat >"$ROOT/usr/bin/docker-entrypoint.sh" <<SH
#!/bin/sh
# The official image's interface, in short: initdb on first start, then postgres on every address.
set -eu
PGDATA=\${PGDATA:-/var/lib/postgresql/data}
export PATH=/usr/lib/postgresql/$PG_VERSION/bin:\$PATH
if [ ! -s "\$PGDATA/PG_VERSION" ]; then
  : "\${POSTGRES_PASSWORD:?set POSTGRES_PASSWORD}"
  user=\${POSTGRES_USER:-postgres}; db=\${POSTGRES_DB:-\$user}
  printf '%s\n' "\$POSTGRES_PASSWORD" >/tmp/pw
  initdb -D "\$PGDATA" -U "\$user" --pwfile=/tmp/pw --auth-local=trust --auth-host=scram-sha-256 \
    --locale=C --encoding=UTF8 >/dev/null
  rm -f /tmp/pw
  echo "host all all all scram-sha-256" >>"\$PGDATA/pg_hba.conf"
  [ "\$db" = postgres ] || echo "CREATE DATABASE \"\$db\";" | postgres --single -j -D "\$PGDATA" postgres >/dev/null
fi
exec postgres -D "\$PGDATA" -c listen_addresses='*' -k /tmp "\$@"
SH
  chmod 755 "$ROOT/usr/bin/docker-entrypoint.sh"
  chown -R 999:999 "$ROOT/var/lib/postgresql"
  chmod 700 "$ROOT/var/lib/postgresql/data"
  tar --numeric-owner -C "$ROOT" -cf - . | "$ENGINE" import \
    -c "ENV PATH=/usr/lib/postgresql/$PG_VERSION/bin:/usr/bin:/bin" -c 'ENV PGDATA=/var/lib/postgresql/data' \
    -c 'USER 999' -c 'EXPOSE 5432' -c 'VOLUME /var/lib/postgresql/data' \
    -c 'ENTRYPOINT ["/usr/bin/docker-entrypoint.sh"]' - "$PG_TAG" >/dev/null
  rm -rf "$ROOT"
  echo "built image $PG_TAG (PostgreSQL $PG_VERSION from this host)"
fi

if exists "$REDIS_TAG"; then
  echo "image $REDIS_TAG already exists (use --force to rebuild)"
else
  ROOT=$(mktemp -d)
  trap 'rm -rf "$ROOT"' EXIT
  new_root "$ROOT"
  cp -L "$REDIS_BIN" "$ROOT/usr/bin/redis-server"
  copy_libs "$ROOT" "$REDIS_BIN"
  tar --numeric-owner --owner=0 --group=0 -C "$ROOT" -cf - . | "$ENGINE" import \
    -c 'ENV PATH=/usr/bin:/bin' -c 'WORKDIR /data' -c 'EXPOSE 6379' -c 'VOLUME /data' \
    -c 'CMD ["redis-server", "--protected-mode", "no"]' - "$REDIS_TAG" >/dev/null
  rm -rf "$ROOT"
  echo "built image $REDIS_TAG (Redis from this host)"
fi
