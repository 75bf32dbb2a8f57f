#!/usr/bin/env bash
# The GPU side-by-side benchmarks in one prepared run (at most 10 minutes on a machine with one
# NVIDIA H100/H200, CUDA, PyTorch, transformers and PEFT installed, no network):
#   build with the `cuda` and `wgpu` features;
#   compact model, batch 1 and 64, against PyTorch on the same GPU;
#   mllama at the published 11B shape, random weights, base in 4 bits: prefill, decode tokens/s,
#   class scoring per cell; against transformers in bf16; decode as a fraction of the memory
#   bandwidth limit (4-bit text weights read per token over the measured copy bandwidth);
#   a QLoRA step at the 11B shape (one 560-px image, a 64-token answer) against transformers +
#   PEFT LoRA;
# GPU memory sampled with nvidia-smi throughout. Results under $OUT (default bench/results/gpu).
#
# Without a GPU (no nvidia-smi) it runs the same steps on the CPU at the small shape, to prove
# that the script starts and its pieces fit together: WBC_GPU_FORCE_CPU=1 does the same on any
# machine.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
OUT="${OUT:-bench/results/gpu}"
mkdir -p "$OUT"
py="${WBC_BENCH_PYTHON:-python3}"
log() { echo "[$(date -u +%H:%M:%S)] $*" | tee -a "$OUT/log.txt"; }

if command -v nvidia-smi >/dev/null && [ -z "${WBC_GPU_FORCE_CPU:-}" ]; then
  dev=cuda; scale=11b; dtype=bfloat16; features="appliance/cuda,appliance/wgpu,trainer/cuda"
  nvidia-smi > "$OUT/nvidia-smi.txt"
  nvidia-smi --query-gpu=timestamp,memory.used --format=csv,noheader,nounits -lms 250 > "$OUT/gpu-memory.csv" &
  sampler=$!
  trap 'kill $sampler 2>/dev/null || true' EXIT
else
  dev=cpu; scale=small; dtype=float32; features=""
  log "no GPU: the CPU path at the small shape (proves the script runs; no GPU figures)"
fi
export WBC_BENCH_DEVICE="$dev"
scripts/fetch-weights.sh >/dev/null 2>&1 || log "weights not fetched: the compact peer needs mobilenet_v2-b0353104.pth"
weights="${WBC_WEIGHTS_DIR:-$PWD/.cache/weights/unpacked}/mobilenet_v2-b0353104.pth"

log "build (features: ${features:-none})"
if ! cargo bench --no-run -p appliance -p trainer ${features:+--features "$features"} --bench peers --bench mllama_step \
    > "$OUT/build.txt" 2>&1; then
  # burn's CUDA backend downloads an LLVM bundle at build time (tracel-llvm-bundler): without
  # network and without that bundle installed, measure our side on wgpu (Vulkan) instead.
  log "the cuda build failed (see build.txt; without network it needs the tracel LLVM bundle installed): wgpu instead"
  features="appliance/wgpu,trainer/wgpu"
  export WBC_BENCH_DEVICE=wgpu
  cargo bench --no-run -p appliance -p trainer --features "$features" --bench peers --bench mllama_step \
    >> "$OUT/build.txt" 2>&1
fi
tail -3 "$OUT/build.txt" | tee -a "$OUT/log.txt"
res="$OUT/results.jsonl"
: > "$res"
"$py" -c 'import json, torch, transformers; print(json.dumps({"machine": torch.cuda.get_device_name(0) if torch.cuda.is_available() else "cpu", "torch": torch.__version__, "transformers": transformers.__version__}))' >> "$res" || true
ours() { cargo bench -q -p appliance ${features:+--features "$features"} --bench peers -- "$@" 2>>"$OUT/log.txt" | grep '^{' | sed 's/^{/{"side_of":"ours",/' | tee -a "$res"; }
peer() { timeout 300 "$py" bench/peers.py "$@" 2>>"$OUT/log.txt" | grep '^{"bench"' | sed 's/^{/{"side_of":"peer",/' | tee -a "$res" || log "peer $1 failed (see log)"; }

log "compact"
ours compact
line=$(grep '"side_of":"ours"' "$res" | grep 'compact/batch1' || true)
side=$(echo "$line" | "$py" -c 'import json,sys; print(json.loads(sys.stdin.read())["side"])')
width=$(echo "$line" | "$py" -c 'import json,sys; print(json.loads(sys.stdin.read())["attribute_width"])')
peer compact --weights "$weights" --side "$side" --attribute-width "$width" --device "$dev"

log "mllama $scale: prefill, decode, class scores"
ours mllama-shape "$scale" 32
peer mllama-shape --scale "$scale" --device "$dev" --dtype "$dtype" --tokens 32
[ "$dev" = cuda ] && peer bandwidth --device cuda

log "QLoRA step $scale"
WBC_MLLAMA_SCALE="$scale" WBC_MLLAMA_STEPS=3 cargo bench -q -p trainer ${features:+--features "$features"} --bench mllama_step 2>>"$OUT/log.txt" \
  | tee -a "$OUT/qlora-ours.txt" | grep '^{' | sed 's/^{/{"side_of":"ours",/' | tee -a "$res"
peer qlora-step --scale "$scale" --device "$dev" --dtype "$dtype"

"$py" bench/table.py "$res" | tee "$OUT/table.md"
log "done"
