#!/usr/bin/env bash
# Side-by-side benchmarks, ours against the peers a maintainer would otherwise use, in one run
# on one machine, so that machine noise cancels in the ratios:
#   compact model (one cell, a batch of 64) against PyTorch eager (torchvision MobileNetV2, the
#   same ImageNet backbone weights, the same heads' shapes) and ONNX Runtime (the same PyTorch
#   model exported to ONNX);
#   mllama (random weights, WBC_BENCH_SCALE=small|medium|large, default large) prefill and
#   decode against transformers, both on the same safetensors checkpoint.
# Installs the pinned peer versions into .cache/bench-venv (PyPI only) unless WBC_BENCH_PYTHON
# names a Python that has them. Writes bench/results/<date>-<time>-cpu.jsonl and prints the table.
#
#   bench/run.sh            # everything
#   bench/run.sh compact    # the compact model only
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."

what="${1:-all}"
scale="${WBC_BENCH_SCALE:-large}"
tokens="${WBC_BENCH_TOKENS:-16}"
py="${WBC_BENCH_PYTHON:-}"
if [ -z "$py" ]; then
  [ -x .cache/bench-venv/bin/python ] || python3 -m venv .cache/bench-venv
  py=.cache/bench-venv/bin/python
  # Also brings a venv made before a peer was added up to date.
  "$py" -c 'import torch, torchvision, transformers, safetensors, peft, accelerate, onnxruntime, onnx' 2>/dev/null \
    || .cache/bench-venv/bin/pip install -q torch==2.15.0 torchvision==0.29.2 transformers==5.24.0 safetensors peft==0.21.2 accelerate==1.15.0 onnxruntime==1.32.0 onnx==1.23.2
fi
scripts/fetch-weights.sh >/dev/null
weights="${WBC_WEIGHTS_DIR:-$PWD/.cache/weights/unpacked}/mobilenet_v2-b0353104.pth"

cargo bench -p appliance --bench peers --no-run 2>/dev/null
ours() { cargo bench -q -p appliance --bench peers -- "$@" 2>/dev/null | grep '^{' | sed 's/^{/{"side_of":"ours",/'; }
peer() { "$py" bench/peers.py "$@" 2>/dev/null | grep '^{"bench"' | sed 's/^{/{"side_of":"peer",/'; }

mkdir -p bench/results
out="bench/results/$(date -u +%Y-%m-%d-%H%M)-cpu.jsonl"  # never over an earlier run
: > "$out"
{
  "$py" -c 'import json, platform, torch, transformers, torchvision; print(json.dumps({"machine": platform.processor() or platform.machine(), "cores": __import__("os").cpu_count(), "torch": torch.__version__, "torchvision": torchvision.__version__, "transformers": transformers.__version__, "onnxruntime": __import__("importlib.util").util.find_spec("onnxruntime") and __import__("importlib.metadata").metadata.version("onnxruntime")}))'
} >> "$out"
if [ "$what" = all ] || [ "$what" = compact ]; then
  ours compact | tee -a "$out"
  side=$(grep '"side_of":"ours"' "$out" | grep compact | head -1 | "$py" -c 'import json,sys; print(json.loads(sys.stdin.readline())["side"])')
  width=$(grep '"side_of":"ours"' "$out" | grep compact | head -1 | "$py" -c 'import json,sys; print(json.loads(sys.stdin.readline())["attribute_width"])')
  # ONNX Runtime comes last in the peer's run: if its export or check fails, PyTorch's figures
  # are already written and the rest of the run goes on.
  peer compact --weights "$weights" --side "$side" --attribute-width "$width" --onnx | tee -a "$out" \
    || echo "the peer's compact run failed part way (ONNX Runtime?): run bench/peers.py compact --onnx to see why" >&2
fi
if [ "$what" = all ] || [ "$what" = mllama ]; then
  dir=".cache/bench-mllama-$scale"
  [ -f "$dir/model.safetensors" ] || "$py" bench/peers.py make-mllama --scale "$scale" --out "$dir" >/dev/null
  ours mllama "$PWD/$dir" "$tokens" | tee -a "$out"
  peer mllama --dir "$dir" --tokens "$tokens" | tee -a "$out"
fi
"$py" bench/table.py "$out"
