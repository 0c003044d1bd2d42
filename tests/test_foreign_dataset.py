"""A COCO dataset from elsewhere (other size, class count, content) trains and evaluates unchanged."""

from __future__ import annotations

import json

import numpy as np
import torch
from PIL import Image, ImageDraw

from diode.cli import main
from diode.data.coco import write_coco


def _foreign_coco(root, n: int, seed: int) -> None:
    """Two classes ('dog' id 17, 'car' id 3: non-contiguous), 96x160 grayscale and RGBA images."""
    rng = np.random.default_rng(seed)
    entries = []
    (root / "images").mkdir(parents=True)
    for i in range(n):
        h, w = (96, 160) if i % 3 else (120, 200)  # mixed sizes: letterboxed by the reader
        img = Image.new("RGB", (w, h), tuple(int(c) for c in rng.integers(0, 255, 3)))
        draw = ImageDraw.Draw(img)
        boxes, labels = [], []
        for _ in range(int(rng.integers(0, 3))):  # some images have no objects
            x, y = rng.uniform(0, w - 40), rng.uniform(0, h - 40)
            bw, bh = rng.uniform(12, 40), rng.uniform(12, 40)
            label = int(rng.integers(2))
            (draw.ellipse if label else draw.rectangle)([x, y, x + bw, y + bh], fill=(255, 255, 255))
            boxes.append([x, y, x + bw, y + bh])
            labels.append(label)
        name = f"img{i}.png"
        (img.convert("L") if i % 2 else img.convert("RGBA")).save(root / "images" / name)
        entries.append({"file_name": name, "height": h, "width": w,
                        "boxes": torch.tensor(boxes, dtype=torch.float32).reshape(-1, 4),
                        "labels": torch.tensor(labels, dtype=torch.int64)})
    write_coco(root / "annotations.json", ["car", "dog"], entries)
    ann = json.loads((root / "annotations.json").read_text())
    remap = {1: 3, 2: 17}
    for c in ann["categories"]:
        c["id"] = remap[c["id"]]
    for a in ann["annotations"]:
        a["category_id"] = remap[a["category_id"]]
    (root / "annotations.json").write_text(json.dumps(ann))


def test_foreign_coco_trains_and_evaluates(tmp_path):
    _foreign_coco(tmp_path / "train", 16, 0)
    _foreign_coco(tmp_path / "val", 6, 1)
    run = tmp_path / "run"
    assert main(["train", "--data", str(tmp_path / "train"), "--val", str(tmp_path / "val"),
                 "--arch", "yolo-lite-n", "--out", str(run), "--epochs", "1", "--batch-size", "8",
                 "--device", "cpu"]) == 0
    ckpt = torch.load(run / "best.pt", weights_only=True)
    assert ckpt["class_names"] == ["car", "dog"]
    assert ckpt["image_size"] == [96, 160]  # the most common size, rounded up to multiples of 32
    out = tmp_path / "metrics.json"
    assert main(["evaluate", "--model", str(run / "best.pt"), "--data", str(tmp_path / "val"),
                 "--json", str(out)]) == 0
    metrics = json.loads(out.read_text())
    assert set(metrics["per_class"]) == {"car", "dog"}
    assert 0.0 <= metrics["map_50"] <= 1.0
