#!/usr/bin/env bash
# Self-Extend on a CUDA GPU, in one run that stops by itself within 9 minutes (issue 18):
#
#   1. installs the bundle's wheels (scripts/make_gpu_bundle.sh) into a folder on PYTHONPATH, beside
#      the image's torch, numpy, transformers and pytest
#   2. builds the bundle's patched llama.cpp with CUDA for sm_90 only (-DGGML_CUDA=ON), libraries only
#   3. runs the parity tests with every layer on the GPU (SELFEXTEND_TEST_N_GPU_LAYERS=-1) on the tiny
#      fixtures it generates: prefill, decode and rewind, flash attention on and off, F16 and q8_0 K
#      caches, llama/qwen2/qwen3/gemma2/gemma3/phi2 (the CPU-only fallback builds are left out: CUDA
#      takes those paths by itself)
#   4. measures speed with scripts/bench_speed.py on random weights in SmolLM2's shape: 16k (decode at
#      12k, G=4) and, with the time left, 32k (decode at 28k, G=8), Self-Extend on and off, flash
#      attention on and off
#   5. writes OUTDIR/gpu_check.json and OUTDIR/gpu_check.md from what it has, whatever stopped it
#
# Usage: scripts/gpu_check.sh [--dry-run] [--bundle DIR] [--budget SECONDS] OUTDIR
#   --dry-run  print each step's command instead of running it (tests/test_gpu_check.py)
#   --bundle   what make_gpu_bundle.sh wrote (default build/gpu-bundle)
#   --budget   seconds in all (default 530); each step gets what is left, less the summary's 20
set -uo pipefail

usage() { echo "usage: scripts/gpu_check.sh [--dry-run] [--bundle DIR] [--budget SECONDS] OUTDIR" >&2; exit 2; }

root=$(cd "$(dirname "$0")/.." && pwd)
cd "$root"  # the steps name tests/ and scripts/ from here
bundle=$root/build/gpu-bundle
budget=530
dry=0
out=""
while [[ $# -gt 0 ]]; do
    case "$1" in
        --dry-run) dry=1; shift ;;
        --bundle) [[ $# -ge 2 ]] || usage; bundle=$2; shift 2 ;;
        --budget) [[ $# -ge 2 && "$2" =~ ^[0-9]+$ ]] || usage; budget=$2; shift 2 ;;
        -h|--help) usage ;;
        -*) echo "gpu_check.sh: unknown option $1" >&2; usage ;;
        *) [[ -z "$out" ]] || usage; out=$1; shift ;;
    esac
done
[[ -n "$out" ]] || usage
mkdir -p "$out" || { echo "gpu_check.sh: cannot create $out" >&2; exit 2; }
out=$(cd "$out" && pwd)

start=$(date +%s)
work=${TMPDIR:-/tmp}/selfextend-gpu-check
build=$root/build/cuda
site=$work/site
py=python3
steps=$out/steps.tsv     # step, exit status, seconds
: > "$steps"

left() { echo $(( budget - 20 - ($(date +%s) - start) )); }

# step NAME MAX_SECONDS COMMAND...: runs it (its output in OUTDIR/NAME.log) with at most
# min(MAX_SECONDS, the time left), and records its exit status and seconds
step() {
    local name=$1 max=$2; shift 2
    local limit; limit=$(left)
    (( limit > max )) && limit=$max
    if (( dry )); then
        echo "[$name, at most ${max}s] $*"
        return 0
    fi
    if (( limit <= 10 )); then
        printf '%s\tskipped (no time left)\t0\n' "$name" >> "$steps"
        return 1
    fi
    echo "== $name (at most ${limit}s)"
    local began; began=$(date +%s)
    timeout --kill-after=5 "$limit" "$@" > "$out/$name.log" 2>&1
    local rc=$?
    printf '%s\t%s\t%s\n' "$name" "$rc" "$(( $(date +%s) - began ))" >> "$steps"
    tail -3 "$out/$name.log"
    return $rc
}

export SELFEXTEND_GGUF_LIB_PATH=$build/bin
export PYTHONPATH=$root:$site
export CCACHE_DISABLE=1

step unpack 30 bash -c "cd '$bundle' && sha256sum -c llama.cpp-trimmed.tar.xz.sha256 \
    && rm -rf '$work/llama.cpp' && mkdir -p '$work/llama.cpp' && tar -C '$work/llama.cpp' -xJf llama.cpp-trimmed.tar.xz" \
&& step install 60 bash -c "rm -rf '$site' && '$py' -m pip install --no-index --no-deps -q --target '$site' \
    '$bundle'/wheels/*" \
&& step build 300 bash -c "cmake -S '$root' -B '$build' -G Ninja -DSELFEXTEND_LLAMA_CPP_TREE='$work/llama.cpp' \
    -DSELFEXTEND_BUILD_TOOLS=OFF -DGGML_CUDA=ON -DCMAKE_CUDA_ARCHITECTURES=90 -DGGML_NATIVE=OFF \
    && cmake --build '$build' -j '$(nproc)'" \
&& {
    SELFEXTEND_TEST_N_GPU_LAYERS=-1 step parity 150 "$py" -m pytest -q -p no:cacheprovider \
        --junitxml="$out/parity.xml" tests/test_parity.py tests/test_parity_architectures.py \
        tests/test_parity_kv_types.py tests/test_parity_gemma2.py tests/test_parity_gemma3.py \
        -k "not no_flash_lse and not fallbacks and not transposed"
    step model 60 "$py" scripts/make_tiny_gguf.py "$work/smollm2-shape.gguf" --shape smollm2 --type q8_0
    step bench_16k 150 "$py" scripts/bench_speed.py --model "$work/smollm2-shape.gguf" --n-gpu-layers -1 \
        --threads "$(nproc)" --prefill 16384 --decode-at 12288 --decode 64 --json "$out/bench_16k.json"
    step bench_32k 150 "$py" scripts/bench_speed.py --model "$work/smollm2-shape.gguf" --n-gpu-layers -1 \
        --threads "$(nproc)" --prefill 32768 --decode-at 28672 --decode 64 --group-size 8 \
        --json "$out/bench_32k.json"
}

if (( dry )); then
    echo "[summary] $out/gpu_check.json, $out/gpu_check.md"
    exit 0
fi
"$py" "$root/scripts/gpu_check_summary.py" "$out" "$(( $(date +%s) - start ))"
