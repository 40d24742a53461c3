#!/usr/bin/env bash
# Writes what scripts/gpu_check.sh needs on a bare GPU machine (no internet, no package index, at
# most 64 MiB sent) into OUT (default build/gpu-bundle, which git ignores; send it along with the
# device tool's carry):
#
#   OUT/llama.cpp-trimmed.tar.xz          the patched llama.cpp tree, trimmed to what libllama,
#   OUT/llama.cpp-trimmed.tar.xz.sha256   ggml-cpu and ggml-cuda need, and its hash
#   OUT/wheels/                           the Python packages the GPU image lacks: llama-cpp-python
#                                         (its bindings only, built without its library), gguf, diskcache
#
# The tree is extracted and patched by CMakeLists.txt itself (a configure-only run into
# build/gpu-bundle-src: the one place the sdist is hash-checked and patches/ applied), so it
# carries the same .selfextend-patches.stamp that -DSELFEXTEND_LLAMA_CPP_TREE checks.
# Usage: scripts/make_gpu_bundle.sh [OUT]
set -euo pipefail

root=$(cd "$(dirname "$0")/.." && pwd)
out=${1:-$root/build/gpu-bundle}
configure=$root/build/gpu-bundle-src
mkdir -p "$out/wheels"

# a local copy of the sdist, where a pip install already fetched one (else CMake downloads it)
sdist=$(ls "$root"/build/*/_deps/llama_cpp_python-0.3.36.tar.gz 2>/dev/null | head -1 || true)
sdist_arg=()
if [[ -n "$sdist" ]]; then
    sdist_arg=(-DSELFEXTEND_LLAMA_CPP_SDIST="$sdist")
fi

echo "== the patched tree (CMakeLists.txt steps 1-2, configure only)"
cmake -S "$root" -B "$configure" -G Ninja -DSELFEXTEND_BUILD_TOOLS=OFF "${sdist_arg[@]}" > "$configure.log" 2>&1 \
    || { tail -30 "$configure.log"; exit 1; }
src=$configure/llama.cpp-src

echo "== trimming and packing it"
# kept: the CMake files, include/, src/, ggml's headers, its base, CPU and CUDA sources; dropped:
# the other backends, tools, common/, tests, examples, docs, models, the Python package, cpp-httplib
tar -C "$src" -cJf "$out/llama.cpp-trimmed.tar.xz" \
    --exclude=./tools --exclude=./tests --exclude=./examples --exclude=./docs --exclude=./models \
    --exclude=./gguf-py --exclude=./scripts --exclude=./media --exclude=./grammars --exclude=./prompts \
    --exclude=./requirements --exclude=./benches --exclude=./vendor/cpp-httplib --exclude=./pocs --exclude=./ci \
    --exclude=./.devops --exclude=./.github --exclude=./common \
    --exclude='./ggml/src/ggml-vulkan' --exclude='./ggml/src/ggml-metal' --exclude='./ggml/src/ggml-sycl' \
    --exclude='./ggml/src/ggml-opencl' --exclude='./ggml/src/ggml-cann' --exclude='./ggml/src/ggml-musa' \
    --exclude='./ggml/src/ggml-hip' --exclude='./ggml/src/ggml-webgpu' --exclude='./ggml/src/ggml-zdnn' \
    --exclude='./ggml/src/ggml-hexagon' --exclude='./ggml/src/ggml-rpc' --exclude='./ggml/src/ggml-blas' \
    --exclude='./ggml/src/ggml-zendnn' --exclude='./ggml/src/ggml-openvino' --exclude='./ggml/src/ggml-virtgpu' \
    .
(cd "$out" && sha256sum llama.cpp-trimmed.tar.xz > llama.cpp-trimmed.tar.xz.sha256)

echo "== wheels"
rm -f "$out"/wheels/*.whl
if [[ -n "$sdist" ]]; then
    CMAKE_ARGS="-DLLAMA_BUILD=OFF -DLLAVA_BUILD=OFF" pip wheel --no-deps -q -w "$out/wheels" "$sdist"
else
    CMAKE_ARGS="-DLLAMA_BUILD=OFF -DLLAVA_BUILD=OFF" pip wheel --no-deps -q -w "$out/wheels" \
        --no-binary llama-cpp-python llama-cpp-python==0.3.36
fi
pip download --no-deps -q -d "$out/wheels" gguf==0.19.0 diskcache==5.6.3

du -sh "$out" "$out"/* | sed 's/^/   /'
