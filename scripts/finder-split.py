#!/usr/bin/env python3
"""Splits annotated smear fields (a folder with images/ and annotations/, Pascal VOC) into two
halves for choosing the finder's settings on one and reporting on the other: OUT/A holds the
even-numbered fields of the sorted annotation names, OUT/B the odd ones, as symbolic links.

    python3 scripts/finder-split.py ../shared/data/fields /tmp/fields
    appliance eval-finder --fields /tmp/fields/A --microns-per-pixel 0.0722
"""
import os
import sys


def main():
    if len(sys.argv) != 3:
        sys.exit(__doc__)
    fields, out = (os.path.abspath(a) for a in sys.argv[1:])
    names = sorted(n[:-4] for n in os.listdir(os.path.join(fields, "annotations")) if n.endswith(".xml"))
    if not names:
        sys.exit(f"{fields}/annotations holds no .xml files")
    for i, name in enumerate(names):
        part = "A" if i % 2 == 0 else "B"
        for sub, ext in (("images", ".jpg"), ("annotations", ".xml")):
            src = os.path.join(fields, sub, name + ext)
            dst = os.path.join(out, part, sub, name + ext)
            os.makedirs(os.path.dirname(dst), exist_ok=True)
            if os.path.exists(src) and not os.path.lexists(dst):
                os.symlink(src, dst)
    print(f"{len(names)} fields: {out}/A ({(len(names) + 1) // 2}), {out}/B ({len(names) // 2})")


if __name__ == "__main__":
    main()
