#!/usr/bin/env bash
# The GPU side-by-side benchmarks in one prepared run, within 8 minutes, on a machine with one
# NVIDIA GPU, PyTorch, transformers and PEFT, and neither a Rust toolchain nor network. Nothing
# is built here: bench/gpu-build.sh builds the executables on the development machine (carry
# bench/bin, .gl and .cache/weights/unpacked/mobilenet_v2-b0353104.pth with the tree).
#   compact model, batch 1 and 64: ours on wgpu (Vulkan on the NVIDIA driver) against PyTorch
#     on CUDA, the same backbone weights;
#   mllama at the published 11B shape, random weights, base in 4 bits: prefill, decode tokens/s,
#     class scoring per cell, against transformers in bf16; the copy bandwidth, for decode as a
#     fraction of the memory-bandwidth bound;
#   a QLoRA step at the 11B shape against transformers + PEFT.
# GPU memory sampled with nvidia-smi throughout. Every step has its own time limit, so that a
# step that hangs costs its limit and not the run. Results in one folder: $OUT (default
# bench/results/gpu): results.jsonl, table.md, log.txt, gpu-memory.csv, nvidia-smi.txt.
#
# Without a GPU (no nvidia-smi), or with WBC_GPU_FORCE_CPU=1, the same steps run on the CPU at
# the small shape: proof that the script and its carried pieces work, no GPU figures.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
OUT="${OUT:-bench/results/gpu}"
mkdir -p "$OUT"
py="${WBC_BENCH_PYTHON:-python3}"
bin="${WBC_GPU_BIN:-bench/bin}"
log() { echo "[$(date -u +%H:%M:%S)] $*" | tee -a "$OUT/log.txt"; }
for b in peers mllama_step; do
  # Carried xz-compressed (see gpu-build.sh); Python's lzma unpacks them where xz is missing.
  if [ ! -x "$bin/$b" ] && [ -f "$bin/$b.xz" ]; then
    "$py" -c 'import lzma, shutil, sys; shutil.copyfileobj(lzma.open(sys.argv[1]), open(sys.argv[2], "wb"))' "$bin/$b.xz" "$bin/$b"
    chmod +x "$bin/$b"
  fi
  [ -x "$bin/$b" ] || { log "$bin/$b is missing: run bench/gpu-build.sh on the development machine and carry $bin"; exit 2; }
done
log "executables built with features: $(cat "$bin/features" 2>/dev/null || echo unknown)"

if command -v nvidia-smi >/dev/null && [ -z "${WBC_GPU_FORCE_CPU:-}" ]; then
  ours_dev=wgpu; peer_dev=cuda; scale=11b; dtype=bfloat16
  # The Vulkan loader, where the image has none (carried as Debian packages, see gpu-build.sh).
  if ! ldconfig -p | grep -q libvulkan && ls .gl/*.deb >/dev/null 2>&1; then
    for f in .gl/*.deb; do dpkg -x "$f" /; done
    ldconfig
  fi
  nvidia_icd=/usr/local/nvidia/share/vulkan/icd.d/nvidia_icd.json
  [ -f "$nvidia_icd" ] && export VK_DRIVER_FILES="$nvidia_icd"
  nvidia-smi > "$OUT/nvidia-smi.txt"
  nvidia-smi --query-gpu=timestamp,memory.used --format=csv,noheader,nounits -lms 250 > "$OUT/gpu-memory.csv" &
  sampler=$!
  trap 'kill $sampler 2>/dev/null || true' EXIT
else
  ours_dev=cpu; peer_dev=cpu; scale=small; dtype=float32
  log "no GPU: the CPU path at the small shape (proves the script runs; no GPU figures)"
fi
weights="${WBC_WEIGHTS_DIR:-$PWD/.cache/weights/unpacked}/mobilenet_v2-b0353104.pth"
[ -f "$weights" ] || log "no $weights: the compact peer cannot run (carry it)"

res="$OUT/results.jsonl"
: > "$res"
"$py" -c 'import json, torch, transformers; print(json.dumps({"machine": torch.cuda.get_device_name(0) if torch.cuda.is_available() else "cpu", "ours_device": "'"$ours_dev"'", "torch": torch.__version__, "transformers": transformers.__version__}))' >> "$res" \
  || log "no PyTorch/transformers here: peers will fail"
# step LIMIT_S WHAT CMD...: runs CMD with a time limit; its JSON lines go to the results.
tag() { sed "s/^{/{\"side_of\":\"$1\",/"; }
ours() {
  local limit=$1; shift
  WBC_BENCH_DEVICE="$ours_dev" timeout "$limit" "$bin/peers" "$@" 2>>"$OUT/log.txt" | grep '^{' | tag ours | tee -a "$res" \
    || log "ours $1 failed or ran past ${limit} s (see log.txt)"
}
peer() {
  local limit=$1; shift
  timeout "$limit" "$py" bench/peers.py "$@" 2>>"$OUT/log.txt" | grep '^{"bench"' | tag peer | tee -a "$res" \
    || log "peer $1 failed or ran past ${limit} s (see log.txt)"
}

log "compact ($ours_dev against PyTorch on $peer_dev)"
ours 60 compact
line=$(grep '"side_of":"ours"' "$res" | grep 'compact/batch1' | head -1 || true)
if [ -n "$line" ]; then
  side=$(echo "$line" | "$py" -c 'import json,sys; print(json.loads(sys.stdin.read())["side"])')
  width=$(echo "$line" | "$py" -c 'import json,sys; print(json.loads(sys.stdin.read())["attribute_width"])')
  peer 90 compact --weights "$weights" --side "$side" --attribute-width "$width" --device "$peer_dev"
fi

log "mllama $scale: prefill, decode, class scores"
ours 100 mllama-shape "$scale" 32
peer 100 mllama-shape --scale "$scale" --device "$peer_dev" --dtype "$dtype" --tokens 32
[ "$peer_dev" = cuda ] && peer 20 bandwidth --device cuda

log "QLoRA step $scale"
WBC_BENCH_DEVICE="$ours_dev" WBC_MLLAMA_SCALE="$scale" WBC_MLLAMA_STEPS=3 timeout 70 "$bin/mllama_step" 2>>"$OUT/log.txt" \
  | tee -a "$OUT/qlora-ours.txt" | grep '^{' | tag ours | tee -a "$res" || log "ours qlora failed or ran past 70 s"
peer 70 qlora-step --scale "$scale" --device "$peer_dev" --dtype "$dtype"

"$py" bench/table.py "$res" | tee "$OUT/table.md" || log "no table (see results.jsonl)"
log "done"
