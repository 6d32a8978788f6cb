#!/usr/bin/env bash
# Build the product's image (default modelserve/server:latest) with no registry: the replica base
# image (scripts/build-image.sh: the host's Debian python3.11) + the product's dependencies,
# pip-installed from the package index for that same interpreter, + this checkout's source.
# compose.yaml runs it; `docker run ... modelserve/server node` starts a node on another host.
#
# Usage: scripts/build-server-image.sh [TAG]        (always rebuilds: the source may have changed)
#   BASE_IMAGE=...  the base (default modelserve/python:3.11, built first when missing)
set -euo pipefail
cd "$(dirname "$0")/.."
TAG=${1:-${MODELSERVE_IMAGE:-modelserve/server:latest}}
BASE_IMAGE=${BASE_IMAGE:-modelserve/python:3.11}
ENGINE=${ENGINE:-docker}
PY=${PYTHON_BIN:-/usr/bin/python3.11}

if ! command -v "$ENGINE" >/dev/null 2>&1 || ! "$ENGINE" info >/dev/null 2>&1; then
  echo "build-server-image.sh: no Docker engine answers; start one (scripts/docker-up.sh, as root)." >&2
  exit 1
fi
# The base image's interpreter is the host's $PY: the dependencies are installed with it, so their
# compiled parts (psycopg, uvloop, httptools...) match the image's Python.
DEFAULT_IMAGE=$BASE_IMAGE PYTHON_BIN=$PY scripts/build-image.sh "$BASE_IMAGE"
if ! "$PY" -m pip --version >/dev/null 2>&1; then
  echo "build-server-image.sh: $PY has no pip; install it, e.g. sudo apt-get install python3-pip" >&2
  exit 1
fi

CTX=$(mktemp -d)
trap 'rm -rf "$CTX"' EXIT
mkdir -p "$CTX/app"
# The source the processes run (templates, static files and translations live beside the packages).
for part in config accounts storage serving proxy cli templates static locale examples deploy manage.py pyproject.toml Procfile; do
  [ -e "$part" ] && cp -a "$part" "$CTX/app/"
done
find "$CTX/app" -name __pycache__ -prune -exec rm -rf {} +
cp deploy/Dockerfile "$CTX/Dockerfile"

"$PY" -c 'import tomllib; print("\n".join(tomllib.load(open("pyproject.toml", "rb"))["project"]["dependencies"]))' \
  >"$CTX/requirements.txt"
echo "installing the dependencies for $("$PY" --version) into the image (first time: about a minute)"
PIP_DISABLE_PIP_VERSION_CHECK=1 "$PY" -m pip install --quiet --no-compile --target "$CTX/lib" \
  -r "$CTX/requirements.txt" 2> >(grep -v -e "^WARNING: Location" -e "Running pip as the 'root' user" >&2)

# Shared libraries the compiled dependencies need that the base image lacks (libpthread.so.0 for
# psycopg's bundled libpq...), from the host, into sys/ (copied over / by the Dockerfile).
mkdir -p "$CTX/sys"
find "$CTX/lib" -name '*.so*' -type f -exec ldd {} + 2>/dev/null \
  | awk '/=>/ {print $3} /^\t\/lib/ {print $1}' | grep '^/' | grep -v "^$CTX/" | sort -u | while read -r lib; do
    target=$lib
    case "$lib" in /lib/*|/lib64/*) target=/usr$lib ;; esac
    mkdir -p "$CTX/sys$(dirname "$target")"
    cp -L "$lib" "$CTX/sys$target"
  done

# The legacy builder: it needs no buildx plugin, and the build runs no command (only COPY).
DOCKER_BUILDKIT=0 "$ENGINE" build -q --build-arg "BASE_IMAGE=$BASE_IMAGE" -t "$TAG" "$CTX" >/dev/null \
  2> >(grep -v -e DEPRECATED -e "legacy builder" -e BuildKit -e "environment-variable" -e '^ *$' >&2)
# A smoke test: the image's interpreter imports the compiled dependencies and the proxy.
"$ENGINE" run --rm --entrypoint python3 "$TAG" -c 'import django, celery, daphne, psycopg, uvloop, httptools, docker, proxy.config'
echo "built image $TAG ($("$ENGINE" image inspect -f '{{.Size}}' "$TAG" | awk '{printf "%.0f MB", $1/1e6}'))"
