#!/usr/bin/env bash
# Create (or reuse) .venv at the repo root and install the project with pinned dependencies.
# Re-running is cheap: pip runs only when pyproject.toml or constraints.txt changed.
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$root"
py="${PYTHON:-python3}"
if [ ! -x .venv/bin/python ]; then
    "$py" -m venv .venv
    .venv/bin/python -m pip install -q --upgrade pip
fi
stamp=.venv/.sparsetrain-installed
want="$(cat pyproject.toml constraints.txt | sha256sum | cut -d' ' -f1)"
if [ ! -f "$stamp" ] || [ "$(cat "$stamp")" != "$want" ]; then
    # -c pins torch to the CPU build (without it pip pulls a multi-GB CUDA build).
    .venv/bin/python -m pip install -q -c constraints.txt -e ".[dev]"
    echo "$want" > "$stamp"
fi
