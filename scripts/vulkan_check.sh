#!/usr/bin/env bash
# Issue 20's check: Self-Extend on ggml-vulkan with Mesa's software device (lavapipe), every layer
# offloaded (tests/vulkan_check.py: the op audit, the parity tests again, G = 1 against the unpatched
# Vulkan build). Installs the Debian packages it needs, builds build/vulkan (and build/vulkan-unpatched
# for the G = 1 case) and runs the checks. A cold Vulkan build compiles ggml's ~400 shaders: allow
# tens of minutes on 2 cores. Run from the checkout, with the .venv of the README's test command:
#     bash scripts/vulkan_check.sh [pytest args, e.g. -k audit]
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
packages=(mesa-vulkan-drivers libvulkan-dev glslc spirv-headers)
missing=()
for p in "${packages[@]}"; do dpkg -s "$p" >/dev/null 2>&1 || missing+=("$p"); done
if ((${#missing[@]})); then
  apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${missing[@]}"
fi
export CCACHE_BASEDIR="$PWD"
exec python -m pytest -q -p no:cacheprovider tests/vulkan_check.py "$@"
