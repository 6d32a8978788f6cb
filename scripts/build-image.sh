#!/usr/bin/env bash
# Build the local example image (default modelserve/python:3.11) with no registry at all:
# static busybox + the host's Debian python3.11 and its stdlib (+ bash, so service definitions
# that say `shell: /bin/bash` work), assembled as a rootfs and loaded with `docker import`.
#
# Usage: scripts/build-image.sh [--force] [TAG]
#   Idempotent: does nothing when TAG already exists, unless --force.
#   ENGINE=podman scripts/build-image.sh   would use another docker-compatible CLI (untested).
set -euo pipefail

FORCE=0
TAG=""
for arg in "$@"; do
  case "$arg" in
    --force) FORCE=1 ;;
    -h|--help) sed -n '2,10p' "$0"; exit 0 ;;
    -*) echo "build-image.sh: unknown option $arg" >&2; exit 2 ;;
    *) TAG=$arg ;;
  esac
done
TAG=${TAG:-${DEFAULT_IMAGE:-modelserve/python:3.11}}
ENGINE=${ENGINE:-docker}
PY=${PYTHON_BIN:-/usr/bin/python3.11}

if ! command -v "$ENGINE" >/dev/null 2>&1; then
  echo "build-image.sh: '$ENGINE' is not installed; run scripts/docker-up.sh first (as root)." >&2
  exit 1
fi
if ! "$ENGINE" info >/dev/null 2>&1; then
  echo "build-image.sh: no Docker engine answers; start one with scripts/docker-up.sh (as root)." >&2
  exit 1
fi
if [ "$FORCE" = 0 ] && "$ENGINE" image inspect "$TAG" >/dev/null 2>&1; then
  echo "image $TAG already exists (use --force to rebuild)"
  exit 0
fi

# The image is made from the host's own files: it needs a static busybox and Debian's python3.11.
if [ ! -x /bin/busybox ] || [ ! -x "$PY" ]; then
  if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -qq >/dev/null || true
    apt-get install -y -qq --no-install-recommends busybox-static python3.11 >/dev/null
  else
    echo "build-image.sh: needs /bin/busybox (busybox-static) and $PY; install them, e.g." \
         "sudo apt-get install busybox-static python3.11" >&2
    exit 1
  fi
fi

ROOT=$(mktemp -d)
trap 'rm -rf "$ROOT"' EXIT
mkdir -p "$ROOT"/{bin,usr/bin,usr/lib,etc,tmp,proc,sys,dev,models,root,home/work,opt}
chmod 1777 "$ROOT/tmp"

# busybox: /bin/sh and the usual applets (no bash applet in Debian's build, see below).
cp /bin/busybox "$ROOT/bin/busybox"
for a in $(/bin/busybox --list); do [ -e "$ROOT/bin/$a" ] || ln -s busybox "$ROOT/bin/$a"; done

# python interpreter + stdlib (without the test suite and caches: ~60 MB instead of ~100 MB).
cp -a "$PY" "$ROOT/usr/bin/python3.11"
ln -s python3.11 "$ROOT/usr/bin/python3"
ln -s python3.11 "$ROOT/usr/bin/python"
tar -C / --exclude='usr/lib/python3.11/test' --exclude='__pycache__' -cf - usr/lib/python3.11 | tar -C "$ROOT" -xf -

# bash: model definitions default to `/bin/bash -c` for string commands (ReplicaSpec.shell).
BASH_BIN=$(command -v bash)
cp -L "$BASH_BIN" "$ROOT/bin/bash"

# Shared libraries of everything above, resolved via ldd and copied with their parent dirs.
for f in "$PY" "$BASH_BIN" /usr/lib/python3.11/lib-dynload/*.so; do ldd "$f" 2>/dev/null || true; done \
  | awk '/=>/ {print $3} /^\t\/lib/ {print $1}' | grep '^/' | sort -u | while read -r lib; do
    cp --parents -L "$lib" "$ROOT/"
  done
# Merged-/usr layout like Debian: /lib and /lib64 resolve into /usr.
if [ -d "$ROOT/lib" ]; then cp -a "$ROOT/lib/." "$ROOT/usr/lib/"; rm -rf "$ROOT/lib"; fi
if [ -d "$ROOT/lib64" ]; then mkdir -p "$ROOT/usr/lib64"; cp -a "$ROOT/lib64/." "$ROOT/usr/lib64/"; rm -rf "$ROOT/lib64"; fi
ln -s usr/lib "$ROOT/lib"
ln -s usr/lib64 "$ROOT/lib64"

printf 'root:x:0:0:root:/root:/bin/sh\nwork:x:1000:1000:work:/home/work:/bin/sh\nnobody:x:65534:65534:nobody:/nonexistent:/bin/false\n' >"$ROOT/etc/passwd"
printf 'root:x:0:\nwork:x:1000:\nnogroup:x:65534:\n' >"$ROOT/etc/group"

# Sanity check before importing: the interpreter must start with only the copied files.
if ! chroot "$ROOT" /usr/bin/python3 -c 'import json, http.server, ssl, sqlite3' 2>/dev/null; then
  if [ "$(id -u)" = 0 ]; then
    echo "build-image.sh: python3 does not start inside the assembled root; missing libraries?" >&2
    exit 1
  fi
fi

tar --numeric-owner --owner=0 --group=0 -C "$ROOT" -cf - . | "$ENGINE" import \
  -c 'ENV PATH=/usr/local/bin:/usr/bin:/bin' -c 'ENV PYTHONDONTWRITEBYTECODE=1' \
  -c 'ENV PYTHONUNBUFFERED=1' -c 'WORKDIR /home/work' \
  -c 'CMD ["python3","-m","http.server","8000"]' - "$TAG" >/dev/null
echo "built image $TAG ($("$ENGINE" image inspect -f '{{.Size}}' "$TAG" | awk '{printf "%.0f MB", $1/1e6}'))"
