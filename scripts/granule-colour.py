#!/usr/bin/env python3
"""Does granule colour tell eosinophils from neutrophils across stains? (issue 22, item 1)

A hand-made colour measure, no learning: in the central half of a cell picture (128 px), in
optical density, the share of stained pixels that pass red light and absorb green (eosin-red
granules; the nucleus absorbs red too, so it is left out). Its threshold is fitted on the
training cells (PBC: the only source with eosinophils) and applied unchanged to another site;
the AUC shows whether the measure still ranks the classes there at all.

Usage: scripts/granule-colour.py TRAIN_CSV SITE_CSV [SITE_CSV ...]
(CSV columns `path` relative to the CSV, or to the folder of its name beside it, and `class_name`; at most 300 cells per class each).
"""
import csv
import os
import sys

import numpy as np
from PIL import Image

CLASSES = ("Eosinophil", "Neutrophil")


def eosin_share(path):
    im = np.asarray(Image.open(path).convert("RGB").resize((128, 128)), dtype=np.float32)
    od = -np.log((im + 1) / 256.0)
    c = od[32:96, 32:96].reshape(-1, 3)
    background = np.percentile(od.reshape(-1, 3).sum(1), 20)
    stained = c.sum(1) > background + 0.3
    eosin = stained & (c[:, 0] < 0.45 * c[:, 1])
    return eosin.sum() / max(stained.sum(), 1)


def measure(csv_path, per_class=300):
    here = os.path.dirname(os.path.abspath(csv_path))
    # scripts/devsite-split.py writes site/A.csv with paths under site/A/.
    beside = os.path.splitext(os.path.abspath(csv_path))[0]
    out = {c: [] for c in CLASSES}
    for row in csv.DictReader(open(csv_path)):
        c = row["class_name"]
        if c in out and len(out[c]) < per_class:
            path = os.path.join(here, row["path"])
            if not os.path.exists(path):
                path = os.path.join(beside, row["path"])
            out[c].append(eosin_share(path))
    return {c: np.array(v) for c, v in out.items()}


def auc(pos, neg):
    return (pos[:, None] > neg[None, :]).mean() + 0.5 * (pos[:, None] == neg[None, :]).mean()


def main():
    if len(sys.argv) < 3:
        sys.exit(__doc__)
    train = measure(sys.argv[1])
    eo, ne = train["Eosinophil"], train["Neutrophil"]
    cands = np.unique(np.concatenate([eo, ne]))
    bal = [((eo > t).mean() + (ne <= t).mean()) / 2 for t in cands]
    t = cands[int(np.argmax(bal))]
    print(f"threshold fitted on {sys.argv[1]}: {t:.3f}")
    print("| cells | eosinophils, neutrophils | AUC | eosinophils above | neutrophils below | balanced |")
    print("|---|---|---|---|---|---|")
    for name, d in [(sys.argv[1], train)] + [(p, measure(p)) for p in sys.argv[2:]]:
        e, n = d["Eosinophil"], d["Neutrophil"]
        if len(e) == 0 or len(n) == 0:
            print(f"| {name} | {len(e)}, {len(n)} | | | | |")
            continue
        above, below = (e > t).mean(), (n <= t).mean()
        print(f"| {name} | {len(e)}, {len(n)} | {auc(e, n):.3f} | {above:.1%} | {below:.1%} | {(above + below) / 2:.1%} |")


if __name__ == "__main__":
    main()
