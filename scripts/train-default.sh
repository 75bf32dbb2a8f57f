#!/usr/bin/env bash
# Trains the default compact model from scratch on the WBC data and exports the signed default
# bundle: one command. Usage:
#   scripts/train-default.sh [DATA_DIR] [SIGNING_KEY]
# DATA_DIR defaults to ../shared/data/wbc (train.csv, val.csv); SIGNING_KEY to
# .cache/keys/default-signing.pem (created, with its public key copied to
# appliance/keys/default.pub, if it does not exist). Writes runs/default/ and
# appliance/models/default.bundle, then evaluates the bundle on val (runs/default/val.json).
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
DATA="${1:-../shared/data/wbc}"
KEY="${2:-.cache/keys/default-signing.pem}"
VERSION="${MODEL_VERSION:-1}"

scripts/fetch-weights.sh >/dev/null
cargo build -p trainer
TRAINER="${CARGO_TARGET_DIR:-target}/debug/trainer"
if [ ! -f "$KEY" ]; then
  mkdir -p "$(dirname "$KEY")"
  "$TRAINER" keygen --out "$KEY"
  cp "$KEY.pub" appliance/keys/default.pub
fi
start=$(date +%s)
"$TRAINER" train --data "$DATA" --out runs/default
"$TRAINER" export --run runs/default --key "$KEY" --val "$DATA/val.csv" \
  --model-version "$VERSION" --out appliance/models/default.bundle
echo "trained and exported in $(( $(date +%s) - start )) s"
"$TRAINER" eval --bundle appliance/models/default.bundle --trust appliance/keys/default.pub \
  --csv "$DATA/val.csv" --json runs/default/val.json
