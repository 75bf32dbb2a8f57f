#!/usr/bin/env bash
# Builds, on the development machine, everything bench/gpu.sh runs on the GPU machine (which has
# no Rust toolchain and no network):
#   bench/bin/peers.xz, bench/bin/mllama_step.xz: the two bench executables, release, with the
#     GPU features (default `appliance/wgpu,trainer/wgpu`; WBC_GPU_FEATURES to change, e.g. with
#     `cuda` where burn's CUDA backend builds offline), stripped and xz-compressed (with wgpu
#     they are 67 and 59 MB stripped, 14 and 9 MB compressed: only compressed do they travel);
#   .gl/*.deb: the Vulkan loader's Debian packages (amd64), for a machine whose image lacks it;
#   the MobileNetV2 weights the PyTorch peer loads (scripts/fetch-weights.sh).
# All three are ignored by git: name them in the device call's `carry`
# (bench/bin, .gl, .cache/weights/unpacked/mobilenet_v2-b0353104.pth); together with the
# working tree they stay well under the 64 MiB that travels (sizes printed at the end).
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
features="${WBC_GPU_FEATURES-appliance/wgpu,trainer/wgpu}"
mkdir -p bench/bin
msgs=$(mktemp)
trap 'rm -f "$msgs"' EXIT
cargo bench --no-run --locked -p appliance -p trainer ${features:+--features "$features"} \
  --bench peers --bench mllama_step --message-format=json-render-diagnostics > "$msgs"
python3 - "$msgs" <<'PY'
import json, shutil, subprocess, sys
found = {}
for line in open(sys.argv[1]):
    try:
        m = json.loads(line)
    except ValueError:
        continue
    if m.get("reason") == "compiler-artifact" and m.get("executable") and m["target"]["name"] in ("peers", "mllama_step"):
        found[m["target"]["name"]] = m["executable"]
missing = {"peers", "mllama_step"} - set(found)
if missing:
    sys.exit(f"cargo built no executable for {sorted(missing)}")
for name, exe in found.items():
    shutil.copy(exe, f"bench/bin/{name}")
    subprocess.run(["strip", f"bench/bin/{name}"], check=True)
    subprocess.run(["xz", "-T0", "-9", "-f", f"bench/bin/{name}"], check=True)
PY
echo "${features:-none}" > bench/bin/features
if [ -z "${WBC_GPU_NO_LOADER:-}" ] && command -v apt-get >/dev/null; then
  # As the device notes say: the loader and GL dispatch libraries, amd64, unpacked there with
  # dpkg -x when the machine's image has no libvulkan.
  mkdir -p .gl /tmp/amd64/partial
  o=(-oAPT::Architecture=amd64 -oAPT::Architectures=amd64 -oDir::State::Lists=/tmp/amd64)
  apt-get "${o[@]}" update -qq >/dev/null
  (cd .gl && apt-get "${o[@]}" download -qq libvulkan1 libegl1 libglvnd0 libopengl0 libgl1 libglx0 libgles2 >/dev/null)
fi
scripts/fetch-weights.sh >/dev/null
du -sh bench/bin/* .gl .cache/weights/unpacked/mobilenet_v2-b0353104.pth 2>/dev/null || true
echo "carry: bench/bin .gl .cache/weights/unpacked/mobilenet_v2-b0353104.pth; then run bench/gpu.sh"
