"""Prints the ratio table (ours / peer) of a bench/run.sh results file (JSON lines)."""

import json
import sys

# (benchmark, field, unit, lower is better); the peer's benchmark of the same name, and for the
# compact model also ONNX Runtime's (`compact-ort/...`) where the run measured it.
ROWS = [
    ("compact/batch1", "ms", "ms per cell, batch 1", True),
    ("compact/batch1", "working_mib", "MiB working memory, batch 1", True),
    ("compact/batch64", "ms_per_cell", "ms per cell, batch 64", True),
    ("compact/batch64", "cells_per_s", "cells/s, batch 64", False),
    ("compact/batch64", "working_mib", "MiB working memory, batch 64", True),
    ("compact/batch64", "rest_mib", "MiB resident, model loaded", True),
    ("mllama/prefill", "ms", "ms prefill (one tile + 24 tokens)", True),
    ("mllama/decode", "tokens_per_s", "decode tokens/s", False),
    ("mllama/prefill", "working_mib", "MiB working memory, prefill", True),
    ("mllama/decode", "rest_mib", "MiB resident, model loaded", True),
    ("mllama/class-scores", "ms", "ms for a cell's six class scores", True),
    ("mllama/qlora-step", "samples_per_s", "QLoRA samples/s", False),
]

# Peers whose figures are compared only on time (their process also holds another framework).
TIME_ONLY = {"compact-ort": {"ms", "ms_per_cell", "cells_per_s"}}


def main(path):
    lines = [json.loads(l) for l in open(path) if l.strip()]
    env = next((l for l in lines if "machine" in l), {})
    results = {(l["side_of"], l["bench"]): l for l in lines if "side_of" in l}
    print(f"# {path}: {env}")
    print("| benchmark | peer | measure | ours | peer | ours / peer | better |")
    print("|---|---|---|---|---|---|---|")
    for bench, field, label, lower in ROWS:
        a = results.get(("ours", bench))
        family, shape = bench.split("/")
        peers = [(bench, "PyTorch" if family == "compact" else "transformers")]
        if family == "compact":
            peers.append((f"compact-ort/{shape}", "ONNX Runtime"))
        for peer_bench, peer in peers:
            b = results.get(("peer", peer_bench))
            only = TIME_ONLY.get(peer_bench.split("/")[0])
            if not a or not b or field not in a or field not in b or (only and field not in only):
                continue
            r = a[field] / b[field] if b[field] else float("nan")
            better = "ours" if (r < 1) == lower else "peer"
            print(f"| {bench} | {peer} | {label} | {a[field]:.1f} | {b[field]:.1f} | {r:.2f} | {better} |")
    bw = results.get(("peer", "device/bandwidth"))
    shape = results.get(("ours", "mllama-shape/model"))
    decode = results.get(("ours", "mllama/decode"))
    if bw and shape and decode:
        bound = shape["decode_bytes_per_token"] / (bw["gb_per_s"] * 1e9) * 1e3
        print(f"\nDecode: {decode['ms_per_token']:.2f} ms per token against a bandwidth bound of {bound:.2f} ms "
              f"({shape['decode_bytes_per_token'] / 1e9:.2f} GB of 4-bit weights at {bw['gb_per_s']:.0f} GB/s): "
              f"{decode['ms_per_token'] / bound:.1f}x the bound")


if __name__ == "__main__":
    main(sys.argv[1])
