#!/usr/bin/env python3
"""Splits the development site (LISC) by cell into two halves for honest site measurements.

LISC holds several shifted crops of each cell under neighbouring file numbers, so a split by file
would put the same cell on both sides. Within each class the files are sorted by their number and
the lower half becomes part A (development: look at it, choose recipes on it), the upper half
part B (report once). Writes OUT/A/<Class>/ and OUT/B/<Class>/ (symlinks to the images) and
OUT/A.csv, OUT/B.csv (`path,class_name`, paths relative to the part's folder) for
../shared/tools/site-report.py.

For teaching a site bundle (`trainer adapt`), part A is split once more by number: OUT/A/reviewed.csv
(`path,label`) holds 20 evenly spaced cells per class of its lower half (A1, the "technician's
reviews"), and OUT/A2/<Class>/ with OUT/A2.csv its upper half, never reviewed, to compare recipes
on before part B is run once.

usage: scripts/devsite-split.py [LISC_DIR] OUT   (LISC_DIR defaults to ../shared/data/devsite/lisc)
"""
import csv
import os
import re
import sys

args = sys.argv[1:]
if not args or len(args) > 2:
    sys.exit(__doc__)
src = os.path.abspath(args[0] if len(args) == 2 else os.path.join(os.path.dirname(__file__), "../../shared/data/devsite/lisc"))
out = args[-1]
if not os.path.isdir(src):
    sys.exit(f"{src}: no such folder (the development site's class folders)")
rows = {"A": [], "B": []}
for cls in sorted(os.listdir(src)):
    d = os.path.join(src, cls)
    if not os.path.isdir(d):
        continue
    files = sorted(os.listdir(d), key=lambda f: (int(re.findall(r"\d+", f)[-1]) if re.findall(r"\d+", f) else -1, f))
    for i, f in enumerate(files):
        part = "A" if i < len(files) // 2 else "B"
        os.makedirs(os.path.join(out, part, cls), exist_ok=True)
        link = os.path.join(out, part, cls, f)
        if not os.path.lexists(link):
            os.symlink(os.path.join(d, f), link)
        rows[part].append((f"{cls}/{f}", cls))
for part, r in rows.items():
    with open(os.path.join(out, f"{part}.csv"), "w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(["path", "class_name"])
        w.writerows(r)
    print(f"part {part}: {len(r)} cells")

# Part A split again: the reviewed cells from its lower half, its upper half to compare recipes.
REVIEWED_PER_CLASS = 20
a_by_class = {}
for path, cls in rows["A"]:
    a_by_class.setdefault(cls, []).append(path)
a2 = []
with open(os.path.join(out, "A", "reviewed.csv"), "w", newline="") as fh:
    w = csv.writer(fh)
    w.writerow(["path", "label"])
    for cls, paths in sorted(a_by_class.items()):
        half = len(paths) // 2
        a1 = paths[:half]
        a2 += [(p, cls) for p in paths[half:]]
        step = len(a1) / REVIEWED_PER_CLASS
        for i in range(min(REVIEWED_PER_CLASS, len(a1))):
            w.writerow([a1[int(i * step)], cls])
with open(os.path.join(out, "A2.csv"), "w", newline="") as fh:
    w = csv.writer(fh)
    w.writerow(["path", "class_name"])
    w.writerows(a2)
for p, cls in a2:
    os.makedirs(os.path.join(out, "A2", cls), exist_ok=True)
    link = os.path.join(out, "A2", p)
    if not os.path.lexists(link):
        os.symlink(os.path.realpath(os.path.join(out, "A", p)), link)
print(f"reviewed: {sum(min(REVIEWED_PER_CLASS, len(v) // 2) for v in a_by_class.values())} cells (A/reviewed.csv); A2: {len(a2)} cells")
