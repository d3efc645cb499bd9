#!/usr/bin/env bash
# GPU train-step benchmark (benchmarks/gpu_step.py), runnable on a bare CUDA machine from a copy of the repo.
#
#   bash benchmarks/gpu.sh            # CUDA: SD1.5 512 px and SDXL 1024 px, about 6-8 minutes
#   bash benchmarks/gpu.sh --tiny     # CPU, tiny models: the same code, CUDA-only rows skipped with the reason
#   bash benchmarks/gpu.sh --only torch_compile [--models sd1]   # some settings/models: a second call for the
#                                     # rows a first call's --budget cut
#   bash benchmarks/gpu.sh --profile [--tiny]   # benchmarks/gpu_profile.py: adapted against bare U-Net, top ops
#   bash benchmarks/gpu.sh --adapters [--algos dora,dora_detached] [--tiny]   # benchmarks/adapters.py on the GPU:
#                                     # one adapted layer against lycoris-lora and peft (their wheels come too)
#
# Dependencies, without `make venv` (which needs PyPI and installs a CPU torch): a python whose torch sees the
# GPU is used as it is; what it lacks from requirements-lock.txt (diffusers, transformers, safetensors, ...)
# comes from wheels in .whl/ when that folder exists (machines without a registry), else from pip. lorakit
# itself runs from src/ (PYTHONPATH), nothing is installed into the system. bitsandbytes (8-bit AdamW) is
# optional: when it cannot be installed the run says so and skips those rows.
set -euo pipefail
cd "$(dirname "$0")/.."
tiny=0 adapters=0
for a in "$@"; do [[ $a == --tiny ]] && tiny=1; done
[[ ${1:-} == --adapters ]] && adapters=1
if [[ $adapters == 1 ]]; then  # the adapter benchmark's references, at requirements-lock.txt's versions
    export LORAKIT_BENCH_DISTS="peft lycoris_lora accelerate einops toml psutil PyYAML"
fi

pick_python() {
    if [[ -n ${PYTHON:-} ]]; then echo "$PYTHON"; return; fi
    if [[ $tiny == 1 && -x .venv/bin/python ]]; then echo .venv/bin/python; return; fi
    for p in .venv/bin/python python3; do
        if command -v "$p" >/dev/null && "$p" -c 'import torch, sys; sys.exit(not torch.cuda.is_available())' 2>/dev/null; then
            echo "$p"; return
        fi
    done
    echo python3
}
PY=$(pick_python)
echo "gpu.sh: python $PY ($("$PY" -c 'import torch; print("torch", torch.__version__, "cuda", torch.cuda.is_available())'))" >&2

site=${LORAKIT_BENCH_SITE:-/tmp/lorakit-bench-site}
export PYTHONPATH="$PWD/src:$site${PYTHONPATH:+:$PYTHONPATH}"
missing=$("$PY" - <<'EOF'
# lorakit's runtime imports, at the versions requirements-lock.txt pins for diffusers/transformers (their APIs move)
import importlib.metadata as md
import os
import re
lock = dict(re.match(r"([A-Za-z0-9_.-]+)==(\S+)", l).groups() for l in open("requirements-lock.txt") if "==" in l)
exact = {"diffusers", "transformers", "peft", "lycoris_lora"}
out = []
extra = os.environ.get("LORAKIT_BENCH_DISTS", "").split()
for dist in ("diffusers", "transformers", "safetensors", "tqdm", "pillow", "numpy", *extra):
    try:
        have = md.version(dist)
    except md.PackageNotFoundError:
        have = None
    if have is None or (dist in exact and have != lock[dist]):
        out.append(f"{dist}=={lock[dist]}")
print(" ".join(out))
EOF
)
if [[ -n $missing ]]; then
    echo "gpu.sh: installing into $site: $missing" >&2
    if [[ -d .whl ]]; then  # no registry: wheels carried in (see docs/benchmarks.md)
        "$PY" -m pip install -q --no-index --no-deps --no-compile --target "$site" .whl/*.whl
    else  # none of these depends on torch, so the GPU build of torch stays the one used
        "$PY" -m pip install -q --target "$site" $missing || {
            echo "gpu.sh: cannot install $missing (no package registry? put their wheels in .whl/)" >&2; exit 3; }
    fi
fi
if [[ $adapters == 1 ]]; then  # no bitsandbytes: it times layers, not optimizers
    shift
    args=()
    for a in "$@"; do [[ $a == --tiny ]] || args+=("$a"); done
    device=cuda
    [[ $tiny == 1 ]] && device=cpu
    export PYTHONUNBUFFERED=1
    exec "$PY" benchmarks/adapters.py --device "$device" ${args[@]+"${args[@]}"}
fi
if [[ $tiny == 0 ]] && ! "$PY" -c 'import bitsandbytes' 2>/dev/null; then
    if [[ -d .whl ]] && ls .whl/bitsandbytes-*.whl >/dev/null 2>&1; then
        "$PY" -m pip install -q --no-index --no-deps --target "$site" .whl/bitsandbytes-*.whl || true
    else
        timeout 120 "$PY" -m pip install -q --target "$site" bitsandbytes 2>/dev/null ||
            echo "gpu.sh: bitsandbytes could not be installed: the 8-bit AdamW rows say so and are skipped" >&2
    fi
fi
export PYTHONUNBUFFERED=1
if [[ ${1:-} == --profile ]]; then
    shift
    exec "$PY" benchmarks/gpu_profile.py "$@"  # where a step goes: adapted against bare U-Net, top ops
fi
exec "$PY" benchmarks/gpu_step.py "$@"
