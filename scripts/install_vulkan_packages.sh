#!/usr/bin/env bash
# The Debian packages of the Vulkan check (tests/test_vulkan.py): Mesa's software Vulkan device
# (lavapipe) from bookworm-backports (Mesa 25: bookworm's Mesa 22.3 lavapipe crashes in ggml-vulkan,
# docs/backends.md), and glslc, the Vulkan headers and SPIR-V headers from bookworm. Adds the
# bookworm-backports suite to apt's existing Debian entry (the Suites: line that names bookworm) in
# place; names no package host. Idempotent. Run as root: bash scripts/install_vulkan_packages.sh
set -euo pipefail
sources=/etc/apt/sources.list.d/debian.sources
if [ -f "$sources" ] && ! grep -q '^Suites:.*bookworm-backports' "$sources"; then
  sed -i -E '0,/^Suites:(.*)\bbookworm\b(.*)$/s//Suites:\1bookworm\2 bookworm-backports/' "$sources"
fi
if [ -f /etc/apt/sources.list ] && grep -qE '^deb .* bookworm main' /etc/apt/sources.list \
   && ! grep -q 'bookworm-backports' /etc/apt/sources.list; then
  sed -i -E '0,/^deb (.*) bookworm main(.*)$/s//&\ndeb \1 bookworm-backports main\2/' /etc/apt/sources.list
fi
want_mesa=25
have=$(dpkg-query -W -f='${Version}' mesa-vulkan-drivers 2>/dev/null || true)
missing=()
for p in libvulkan-dev glslc spirv-headers; do dpkg -s "$p" >/dev/null 2>&1 || missing+=("$p"); done
if [[ "$have" != ${want_mesa}.* ]] || ((${#missing[@]})); then
  apt-get update -qq
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq -t bookworm-backports mesa-vulkan-drivers
  if ((${#missing[@]})); then
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${missing[@]}"
  fi
fi
echo "mesa-vulkan-drivers $(dpkg-query -W -f='${Version}' mesa-vulkan-drivers)"
