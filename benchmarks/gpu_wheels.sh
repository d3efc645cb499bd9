#!/usr/bin/env bash
# Wheels for benchmarks/gpu.sh on a CUDA machine without a package registry, put in .whl/ (git-ignored there
# through .git/info/exclude; carry it to the machine). Run here, where pip reaches a registry:
#
#   bash benchmarks/gpu_wheels.sh [PYTHON_VERSION]     # the GPU machine's python, default 3.12
#
# diffusers and transformers at requirements-lock.txt's versions (gpu.sh wants exactly those), regex (which
# transformers needs at a recent version), and bitsandbytes for the 8-bit AdamW rows with only its CUDA 13
# and CPU libraries kept: the full wheel (43 MB) would not fit beside the repo in a 64 MiB transfer. For
# `gpu.sh --adapters`: peft and lycoris-lora (the adapter benchmark's references) and what they need beyond
# that (accelerate, einops, toml, psutil, PyYAML).
# The rest (huggingface_hub, tokenizers, safetensors, numpy, pillow, tqdm) is taken from the GPU machine's
# python: the versions seen there satisfied diffusers and transformers.
set -euo pipefail
cd "$(dirname "$0")/.."
py=${1:-3.12}
pin() { grep -E "^$1==" requirements-lock.txt; }
platforms=(--platform manylinux_2_28_x86_64 --platform manylinux_2_24_x86_64 --platform manylinux_2_17_x86_64
           --platform manylinux2014_x86_64)
mkdir -p .whl
grep -qx '/.whl/' .git/info/exclude 2>/dev/null || echo '/.whl/' >> .git/info/exclude
fetch() { python3 -m pip download -q --no-deps --only-binary=:all: --python-version "$py" --implementation cp \
    "${platforms[@]}" -d "$1" "${@:2}"; }
fetch .whl "$(pin diffusers)" "$(pin transformers)" "$(pin regex)"
fetch .whl "$(pin peft)" "$(pin lycoris_lora)" "$(pin accelerate)" "$(pin einops)" "$(pin toml)" "$(pin psutil)" \
    "$(pin PyYAML)"
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
fetch "$tmp" bitsandbytes
wheel=$(ls "$tmp"/bitsandbytes-*.whl)
mkdir "$tmp/x"
(cd "$tmp/x" && unzip -q "$wheel" &&
    find bitsandbytes -name 'libbitsandbytes_*.so' ! -name '*cuda13*' ! -name '*cpu*' -delete &&
    record=$(ls -d bitsandbytes-*.dist-info)/RECORD &&
    grep -v -E 'libbitsandbytes_(cuda1[0-2]|rocm|xpu|mps)' "$record" > "$tmp/RECORD" && cp "$tmp/RECORD" "$record" &&
    rm -f "$OLDPWD/.whl/$(basename "$wheel")" && zip -q -r "$OLDPWD/.whl/$(basename "$wheel")" .)
ls -la .whl
du -sh .whl
