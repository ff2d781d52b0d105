#!/usr/bin/env python3
"""Builds data/ from the shared real-data folder (default ../shared/data), reproducibly.

- shoulder-implant/: all 597 images, as they are.
- chest-pneumonia224/: all 5,216 images (the official train split, 224 px), as they are.
- smoke/: the full-resolution JPEGs and the two DICOM files, for loader tests.

Usage: python3 tools/bundle_data.py [SOURCE] [DEST]
"""
import csv, shutil, sys
from pathlib import Path

src = Path(sys.argv[1] if len(sys.argv) > 1 else "../shared/data")
dst = Path(sys.argv[2] if len(sys.argv) > 2 else "data")

shutil.copytree(src / "shoulder-implant", dst / "shoulder-implant", dirs_exist_ok=True)
shutil.copytree(src / "smoke", dst / "smoke", dirs_exist_ok=True)

# All 5,216 chest images, as they are: the chest MAE is the study's pretraining corpus, and the
# reference numbers (a 57-epoch MAE on every image) need all of it.
shutil.copytree(src / "chest-pneumonia224", dst / "chest-pneumonia224", dirs_exist_ok=True)
rows = list(csv.DictReader(open(dst / "chest-pneumonia224/labels.csv")))
print(f"chest: {len(rows)} images from {len({r['patient'] for r in rows})} patients")
