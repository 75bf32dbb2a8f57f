#!/usr/bin/env bash
# Trains the default compact model from scratch on the WBC data and exports the signed default
# bundle: one command. Usage:
#   scripts/train-default.sh [DATA_DIR] [SIGNING_KEY] [FIELDS_DIR]
# DATA_DIR defaults to ../shared/data/wbc (train.csv, val.csv); SIGNING_KEY to
# .cache/keys/default-signing.pem (created, with its public key added at the head of the key
# ring appliance/keys/default.pub, if it does not exist); FIELDS_DIR (other-site smear fields with
# VOC boxes) to ../shared/data/fields, skipped if absent. Writes runs/default/ and
# appliance/models/default.bundle, then evaluates the bundle on val (runs/default/val.json)
# and on the other-site white cells (runs/default/other-site.json).
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
DATA="${1:-../shared/data/wbc}"
KEY="${2:-.cache/keys/default-signing.pem}"
FIELDS="${3:-../shared/data/fields}"
VERSION="${MODEL_VERSION:-5}"

scripts/fetch-weights.sh >/dev/null
cargo build --release -p trainer
TRAINER="${CARGO_TARGET_DIR:-target}/release/trainer"
if [ ! -f "$KEY" ]; then
  # A new signing key goes first in the appliance's key ring; the keys before it stay trusted,
  # so that bundles they signed (a device's stored models) still verify.
  mkdir -p "$(dirname "$KEY")"
  "$TRAINER" keygen --out "$KEY"
  ring=$(mktemp)
  { echo "# added $(date -u +%F)"; cat "$KEY.pub"; echo; cat appliance/keys/default.pub; } >"$ring"
  mv "$ring" appliance/keys/default.pub
fi
start=$(date +%s)
OTHER=()
if [ -d "$FIELDS/annotations" ]; then
  "$TRAINER" crop-fields --fields "$FIELDS" --out runs/other-site --source other-site
  OTHER=(--other-site "other-site=runs/other-site/cells.csv")
fi
"$TRAINER" train --data "$DATA" --out runs/default
"$TRAINER" export --run runs/default --key "$KEY" --val "$DATA/val.csv" --train "$DATA/train.csv" \
  "${OTHER[@]}" --model-version "$VERSION" --out appliance/models/default.bundle
echo "trained and exported in $(( $(date +%s) - start )) s"
"$TRAINER" eval --bundle appliance/models/default.bundle --trust appliance/keys/default.pub \
  --csv "$DATA/val.csv" --json runs/default/val.json
if [ ${#OTHER[@]} -gt 0 ]; then
  "$TRAINER" eval --bundle appliance/models/default.bundle --trust appliance/keys/default.pub \
    --csv runs/other-site/cells.csv --json runs/default/other-site.json
fi
