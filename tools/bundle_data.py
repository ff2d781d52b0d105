#!/usr/bin/env python3
"""Builds data/ from the shared real-data folder (default ../shared/data), reproducibly.

- shoulder-implant/: all 597 images, as they are.
- chest-pneumonia224/: about 2,000 of the 5,216 images, stratified by label and grouped by
  patient (a patient's images are all in or all out), chosen by a hash of the patient id.
- smoke/: the full-resolution JPEGs and the two DICOM files, for loader tests.

Usage: python3 tools/bundle_data.py [SOURCE] [DEST]
"""
import csv, hashlib, shutil, sys
from collections import defaultdict
from pathlib import Path

src = Path(sys.argv[1] if len(sys.argv) > 1 else "../shared/data")
dst = Path(sys.argv[2] if len(sys.argv) > 2 else "data")
TARGET = 2000

shutil.copytree(src / "shoulder-implant", dst / "shoulder-implant", dirs_exist_ok=True)
shutil.copytree(src / "smoke", dst / "smoke", dirs_exist_ok=True)

rows = list(csv.DictReader(open(src / "chest-pneumonia224/labels.csv")))
by_label = defaultdict(lambda: defaultdict(list))
for r in rows:
    by_label[r["label"]][r["patient"]].append(r)
chosen = []
for label, patients in sorted(by_label.items()):
    want = round(TARGET * sum(len(v) for v in patients.values()) / len(rows))
    order = sorted(patients, key=lambda p: hashlib.blake2b(p.encode(), digest_size=8).hexdigest())
    taken = []
    for p in order:
        if len(taken) >= want:
            break
        taken += patients[p]
    chosen += taken
chosen.sort(key=lambda r: r["path"])
out = dst / "chest-pneumonia224"
out.mkdir(parents=True, exist_ok=True)
with open(out / "labels.csv", "w", newline="") as f:
    w = csv.DictWriter(f, fieldnames=list(rows[0].keys()))
    w.writeheader()
    for r in chosen:
        (out / r["path"]).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(src / "chest-pneumonia224" / r["path"], out / r["path"])
        w.writerow(r)
print(f"chest: {len(chosen)} images from {len({r['patient'] for r in chosen})} patients")
