#!/usr/bin/env bash
# Create the virtualenv with a Python >= 3.11 and install the project with its dev tools.
set -euo pipefail
venv=${1:-.venv}
pick_python() {
  for candidate in "${PYTHON:-}" python3.11 python3.12 python3.13 python3; do
    [ -n "$candidate" ] || continue
    command -v "$candidate" >/dev/null 2>&1 || continue
    if "$candidate" -c 'import sys, venv; sys.exit(0 if sys.version_info >= (3, 11) else 1)' 2>/dev/null; then
      echo "$candidate"; return 0
    fi
  done
  return 1
}
if [ ! -x "$venv/bin/python" ]; then
  if ! python=$(pick_python); then
    echo "modelserve needs Python 3.11 or newer with venv. On Debian/Ubuntu: apt-get install python3 python3-venv" >&2
    exit 1
  fi
  echo "creating $venv with $($python --version)"
  "$python" -m venv "$venv"
fi
"$venv/bin/python" -m pip install --quiet --upgrade pip
echo "installing modelserve and its dependencies into $venv (first time: about a minute)"
"$venv/bin/python" -m pip install --quiet -e '.[dev]'
