#!/usr/bin/env bash
# Create/refresh .venv at the repo root with the pinned e2e requirements.
# Idempotent: a stamp file holds the hash of the requirements file (and python version);
# when it matches, nothing is done. pip's download cache (~/.cache/pip) is kept.
set -euo pipefail

root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
venv="$root/.venv"
req="$root/tests/e2e/requirements.txt"
stamp="$venv/.sclb-requirements.sha256"
python="${PYTHON:-python3}"

# A fresh Debian may lack python3, or venv's pip bootstrap (ensurepip, in python3-venv).
if ! "$python" -c 'import ensurepip, venv' >/dev/null 2>&1; then
    if [[ -z "${PYTHON:-}" ]] && command -v apt-get >/dev/null; then
        sudo=()
        ((EUID == 0)) || sudo=(sudo)
        echo "venv.sh: installing python3 python3-venv (apt-get)" >&2
        "${sudo[@]}" apt-get update -qq
        DEBIAN_FRONTEND=noninteractive "${sudo[@]}" apt-get install -y -qq python3 python3-venv >/dev/null
    fi
    "$python" -c 'import ensurepip, venv' >/dev/null 2>&1 || {
        echo "venv.sh: $python cannot create a venv (no python3, or no python3-venv)" >&2
        exit 1
    }
fi

want="$({ sha256sum "$req" | cut -d' ' -f1; "$python" -c 'import sys; print(sys.version)'; } | sha256sum | cut -d' ' -f1)"

if [[ -x "$venv/bin/python" && -f "$stamp" && "$(cat "$stamp")" == "$want" ]]; then
    exit 0
fi

if [[ ! -x "$venv/bin/python" ]]; then
    echo "venv.sh: creating $venv" >&2
    "$python" -m venv "$venv"
    # keep the venv out of git without touching the project's .gitignore
    printf '*\n' > "$venv/.gitignore"
fi

echo "venv.sh: installing $req" >&2
"$venv/bin/python" -m pip install --quiet --disable-pip-version-check -r "$req"
printf '%s\n' "$want" > "$stamp"
echo "venv.sh: ready" >&2
