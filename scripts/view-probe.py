#!/usr/bin/env python3
"""What turns a cell into a blast for the network? (issue 22, item 1)

Writes copies of labelled cell pictures with one property of the picture changed at a time,
for `appliance classify --single-cell --json` to answer, then tabulates what it answered per
class. Home cells (val) are made to look like another site's in one respect (defocus, paler
stain density, lower magnification, another site's colours); the other site's cells are made
to look like home's (magnified to home's scale, darker, sharper). A change that turns home's
lymphocytes into blasts, or the other site's into lymphocytes, is a cue the network reads.

Usage:
  scripts/view-probe.py make VAL_CSV SITE_DIR OUT      # OUT/<probe>/<Class>/*.jpg
  for p in OUT/*/; do appliance classify --single-cell --json "$p"*/ > "${p%/}.jsonl"; done
  scripts/view-probe.py report OUT                     # per probe and class: reported, argmax

VAL_CSV: `path` relative to its folder, `class_name`; only lymphocytes, monocytes and blasts
are used (the classes the confusion is about). SITE_DIR: `<Class>/*.jpg` (e.g. a part of
`scripts/devsite-split.py`'s split), lymphocytes and monocytes used.
"""
import collections
import csv
import glob
import json
import os
import sys

import numpy as np
from PIL import Image, ImageFilter

CLASSES = ("Lymphocyte", "Monocyte", "Blast")


def od(a):
    return -np.log((np.asarray(a, dtype=np.float32) + 1) / 256.0)


def from_od(d):
    return Image.fromarray(np.clip(256.0 * np.exp(-d) - 1, 0, 255).round().astype(np.uint8))


def density(im, gamma, pivot=0.3):
    """The trainer's stain-density curve (`trainer/src/augment.rs`, `density_curve`)."""
    return from_od(pivot * (np.maximum(od(im), 0) / pivot) ** gamma)


def blur(im, sigma):
    return im.filter(ImageFilter.GaussianBlur(sigma))


def zoom(im, side=140):
    """The centre `side` px magnified to the picture's size: a site at lower magnification
    seen at home's."""
    w, h = im.size
    x, y = (w - side) // 2, (h - side) // 2
    return im.crop((x, y, x + side, y + side)).resize((w, h), Image.BICUBIC)


def shrink(im, side=140):
    """The picture at `side` px, mirrored out to its size: home at a lower magnification."""
    w, h = im.size
    small = np.asarray(im.resize((side, side), Image.BICUBIC))
    p = (w - side) // 2
    return Image.fromarray(np.pad(small, ((p, h - side - p), (p, w - side - p), (0, 0)), mode="reflect"))


def colour_stats(paths):
    a = np.concatenate([np.asarray(Image.open(p).convert("RGB"), dtype=np.float32).reshape(-1, 3) for p in paths[:100]])
    return a.mean(0), a.std(0)


def match_colour(im, target):
    a = np.asarray(im, dtype=np.float32).reshape(-1, 3)
    m, s = a.mean(0), a.std(0) + 1e-3
    b = (a - m) / s * target[1] + target[0]
    return Image.fromarray(np.clip(b, 0, 255).astype(np.uint8).reshape(np.asarray(im).shape))


def make(val_csv, site_dir, out):
    here = os.path.dirname(os.path.abspath(val_csv))
    home = [(os.path.join(here, r["path"]), r["class_name"]) for r in csv.DictReader(open(val_csv)) if r["class_name"] in CLASSES]
    site = [(p, c) for c in CLASSES for p in sorted(glob.glob(os.path.join(site_dir, c, "*.jpg")))]
    site_colour = colour_stats([p for p, _ in site])
    home_probes = {
        "home": lambda im: im,
        "home-blur2": lambda im: blur(im, 2),
        "home-blur4": lambda im: blur(im, 4),
        "home-density0.5": lambda im: density(im, 0.5),
        "home-density0.3": lambda im: density(im, 0.3),
        "home-blur2-density0.3": lambda im: density(blur(im, 2), 0.3),
        "home-shrunk": shrink,
        "home-site-colour": lambda im: match_colour(im, site_colour),
    }
    site_probes = {
        "site": lambda im: im,
        "site-zoomed": zoom,
        "site-zoomed-density2": lambda im: density(zoom(im), 2.0),
        "site-zoomed-sharpened": lambda im: zoom(im).filter(ImageFilter.UnsharpMask(3, 150, 2)),
    }
    for probes, cells in ((home_probes, home), (site_probes, site)):
        for name, f in probes.items():
            for path, cls in cells:
                d = os.path.join(out, name, cls)
                os.makedirs(d, exist_ok=True)
                f(Image.open(path).convert("RGB")).save(os.path.join(d, os.path.basename(path)), quality=95)
            print(f"{name}: {len(cells)} pictures")


def report(out):
    print(f"{'probe':26s} {'class':11s} {'cells':>5s}  {'reported Blast':>14s} {'argmax right':>12s} {'argmax Blast':>12s}")
    for jl in sorted(glob.glob(os.path.join(out, "*.jsonl"))):
        probe = os.path.basename(jl)[: -len(".jsonl")]
        per = collections.defaultdict(lambda: [0, 0, 0, 0])
        for line in open(jl):
            j = json.loads(line)
            cls = j["image"].split("/")[-2]
            for cell in j.get("cells", []):
                p = cell["probabilities"]
                top = max(p, key=p.get)
                n = per[cls]
                n[0] += 1
                n[1] += cell["class"] == "Blast"
                n[2] += top == cls
                n[3] += top == "Blast"
        for cls in CLASSES:
            if cls in per:
                n, rb, ar, ab = per[cls]
                print(f"{probe:26s} {cls:11s} {n:5d}  {100 * rb / n:13.1f}% {100 * ar / n:11.1f}% {100 * ab / n:11.1f}%")


if __name__ == "__main__":
    if len(sys.argv) == 5 and sys.argv[1] == "make":
        make(*sys.argv[2:])
    elif len(sys.argv) == 3 and sys.argv[1] == "report":
        report(sys.argv[2])
    else:
        sys.exit(__doc__)
