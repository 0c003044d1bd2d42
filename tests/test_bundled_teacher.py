"""The bundled teacher meets its bar on freshly rendered real data (issue: mAP@.5 >= 0.85)."""

from __future__ import annotations

import json

import torch

from diode.cli import main
from diode.detectors.checkpoint import bundled_models, read_checkpoint


def test_bundled_teacher_metadata():
    payload = read_checkpoint(bundled_models()["shapes-teacher"])  # weights_only load
    assert payload["arch"] == "yolo-lite-s-p2" and len(payload["class_names"]) == 8
    assert payload["command"].startswith("diode train ")
    assert payload["image_size"] == [128, 128]
    assert "train_state" not in payload


def test_bundled_teacher_map_on_fresh_val(tmp_path):
    # A val split the teacher never saw (seed 11; it was trained on seed 0's train split).
    assert main(["data", "shapes", "--out", str(tmp_path / "d"), "--train", "0", "--val", "500",
                 "--seed", "11", "--quiet"]) == 0
    out = tmp_path / "m.json"
    torch.set_num_threads(2)
    try:
        assert main(["evaluate", "--model", "shapes-teacher", "--data", str(tmp_path / "d" / "val"),
                     "--json", str(out)]) == 0
    finally:
        torch.set_num_threads(1)
    metrics = json.loads(out.read_text())
    assert metrics["map_50"] >= 0.85, metrics["map_50"]
