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
#
# TEACHING_BASE=1 trains the colour view instead, with the stain-density augmentation
# (`trainer train --colour --stain-density 0.5`), and writes
# runs/teaching-base/ and runs/teaching-base.bundle, signed with the same key: the base a lab
# teaches a clinic's reviews to (`trainer adapt --bundle runs/teaching-base.bundle`). It is not
# an appliance's default (at another site it calls small lymphocytes blasts), but what it learns
# from a site's reviews travels further than the grey default's (BENCHMARKS.md, issue 22 §3).
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
DATA="${1:-../shared/data/wbc}"
KEY="${2:-.cache/keys/default-signing.pem}"
FIELDS="${3:-../shared/data/fields}"
VERSION="${MODEL_VERSION:-6}"

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
RUN=runs/default OUT=appliance/models/default.bundle VIEW=()
if [ "${TEACHING_BASE:-0}" = 1 ]; then
  RUN=runs/teaching-base OUT=runs/teaching-base.bundle VIEW=(--colour --stain-density 0.5)
fi
"$TRAINER" train --data "$DATA" --out "$RUN" "${VIEW[@]}"
"$TRAINER" export --run "$RUN" --key "$KEY" --val "$DATA/val.csv" --train "$DATA/train.csv" \
  "${OTHER[@]}" --model-version "$VERSION" --out "$OUT"
echo "trained and exported in $(( $(date +%s) - start )) s"
"$TRAINER" eval --bundle "$OUT" --trust appliance/keys/default.pub \
  --csv "$DATA/val.csv" --json "$RUN/val.json"
if [ ${#OTHER[@]} -gt 0 ]; then
  "$TRAINER" eval --bundle "$OUT" --trust appliance/keys/default.pub \
    --csv runs/other-site/cells.csv --json "$RUN/other-site.json"
fi
