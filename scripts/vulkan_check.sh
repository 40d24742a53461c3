#!/usr/bin/env bash
# The Vulkan check alone: Self-Extend on ggml-vulkan with Mesa's software device (lavapipe, Mesa 25),
# every layer offloaded (tests/test_vulkan.py: the op audit, the device's own error, the parity files
# with the bar fitted to it, G = 1 against the unpatched Vulkan build). Installs the Debian packages
# it needs (scripts/install_vulkan_packages.sh), builds build/vulkan and build/vulkan-unpatched, runs
# the tests. Run from the checkout, with the .venv of the README's test command:
#     bash scripts/vulkan_check.sh [pytest args, e.g. -k audit]
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
bash scripts/install_vulkan_packages.sh
export CCACHE_BASEDIR="$PWD"
exec python -m pytest -q -s -p no:cacheprovider tests/test_vulkan.py "$@"
