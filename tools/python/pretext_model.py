#!/usr/bin/env python3
"""Load a model that pretext fine-tuned into timm or torchvision, and predict.

A `finetune` stage writes `model/model.safetensors` (the reference library's state_dict, keys and
shapes checked by pretext's tests) and `model/model.json`, whose `python` block names the
constructor, its arguments and the preprocessing. This script needs torch, safetensors, Pillow,
numpy, and timm (ViTs) or torchvision (CNNs).

    python3 tools/python/pretext_model.py cache/finetune/<key>/model image1.jpg image2.png
    python3 tools/python/pretext_model.py MODEL_DIR --folder data/new_xrays > predictions.csv
"""
import argparse
import csv
import importlib
import json
import sys
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from safetensors.torch import load_file


def load(model_dir):
    """The model in eval mode, and its model.json."""
    model_dir = Path(model_dir)
    card = json.loads((model_dir / "model.json").read_text())
    py = card.get("python")
    if py is None:
        sys.exit(f"{model_dir}/model.json has no `python` block: rerun the fine-tune with a pretext from 2026-12-07 or later")
    module, _, name = py["constructor"].rpartition(".")
    model = getattr(importlib.import_module(module), name)(**py["kwargs"])
    stem = py.get("grey_stem")
    if stem:
        *parents, last = stem["attribute"].split(".")
        owner = model
        for p in parents:
            owner = getattr(owner, p)
        setattr(owner, last, torch.nn.Conv2d(1, stem["out_channels"], kernel_size=7, stride=2, padding=3, bias=False))
    model.load_state_dict(load_file(str(model_dir / "model.safetensors")), strict=True)
    return model.eval(), card


def preprocess(path, pre):
    """One image as the network saw it in evaluation: grey, stored at `store` px (an antialiased
    triangle filter, as PIL's BILINEAR is when it shrinks), then resized to `size` by plain
    bilinear sampling at pixel centres (F.interpolate without antialiasing), then normalised."""
    img = Image.open(path).convert("L").resize((pre["store"], pre["store"]), Image.BILINEAR)
    x = torch.from_numpy(np.asarray(img, dtype=np.float32) / 255.0)[None, None]
    if pre["size"] != pre["store"]:
        x = torch.nn.functional.interpolate(x, size=(pre["size"], pre["size"]), mode="bilinear", align_corners=False)
    return (x - pre["mean"]) / pre["std"]


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("model_dir")
    ap.add_argument("images", nargs="*")
    ap.add_argument("--folder", help="every .png/.jpg/.jpeg under this folder")
    args = ap.parse_args()
    model, card = load(args.model_dir)
    paths = [Path(p) for p in args.images]
    if args.folder:
        paths += sorted(p for p in Path(args.folder).rglob("*") if p.suffix.lower() in {".png", ".jpg", ".jpeg"})
    classes = card["classes"]
    out = csv.writer(sys.stdout)
    out.writerow(["path", "prediction"] + [f"p_{c}" for c in classes])
    with torch.no_grad():
        for p in paths:
            probs = model(preprocess(p, card["python"]["preprocess"])).softmax(-1)[0]
            out.writerow([str(p), classes[int(probs.argmax())]] + [f"{v:.6f}" for v in probs.tolist()])


if __name__ == "__main__":
    main()
