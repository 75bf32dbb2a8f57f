#!/usr/bin/env bash
# The lab side and the configuration tools build without a deep-learning stack: fails if
# central, firmware-config, wbc-protocol, wbc-config or wbc-web depends (as a normal
# dependency, any depth) on burn, cubecl, wgpu, tokenizers or the model crate. Also fails on a
# source file over 800 lines outside tests.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
status=0
for p in central firmware-config wbc-protocol wbc-config wbc-web wbc-cells; do
  tree="$(cargo tree -p "$p" -e normal --locked --prefix none --format '{p}' --all-features 2>/dev/null | sort -u)"
  bad="$(grep -E '^(burn|burn-[a-z-]+|cubecl[a-z-]*|wgpu[a-z-]*|tokenizers|wbc-models) ' <<<"$tree" || true)"
  if [ -n "$bad" ]; then
    echo "layout: $p depends on a deep-learning crate:" >&2
    sed 's/^/  /' <<<"$bad" >&2
    status=1
  else
    echo "layout: $p builds without burn, wgpu or tokenizers ($(wc -l <<<"$tree") crates)"
  fi
done
# Source files (tests aside) stay readable.
while read -r n f; do
  [ "$f" = total ] && continue
  case "$f" in */tests/*|*/tests.rs|*/benches/*) continue ;; esac
  if [ "$n" -gt 800 ]; then
    echo "layout: $f has $n lines (over 800): split it along its seams" >&2
    status=1
  fi
done < <(git ls-files --cached --others --exclude-standard '*.rs' | sort -u | while read -r f; do [ -f "$f" ] && echo "$f"; done | xargs wc -l)
exit $status
