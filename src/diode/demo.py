"""The main job on the embedded default: what `make demo` runs.

Today the pipeline is: render a fresh validation split of the embedded shapes dataset, evaluate
the bundled teacher on it, and draw its predictions. Synthesis, distillation and the HTML report
join this flow as they land (DIODE sections 1-3).
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path

import torch

from diode.data import open_dataset
from diode.data.shapes import generate_shapes
from diode.detectors.checkpoint import load_detector
from diode.evaluation import evaluate_detector, format_table
from diode.io import atomic_write_json
from diode.report.grids import save_grid


@dataclass
class DemoResult:
    teacher_map_50: float
    teacher_map: float
    out_dir: Path
    seconds: float


def run_demo(out_dir: Path, *, quick: bool = False, teacher: str = "shapes-teacher", seed: int = 1234,
             device: torch.device | str = "cpu", progress: bool = True) -> DemoResult:
    """Generate real val data, evaluate `teacher` on it, draw predictions; write into `out_dir`."""
    start = time.time()
    out_dir.mkdir(parents=True, exist_ok=True)
    model, _ = load_detector(teacher, device=device)
    data_dir = generate_shapes(out_dir / "data", train=0, val=100 if quick else 500,
                               image_size=model.image_size, seed=seed, progress=progress)
    val = open_dataset(data_dir / "val")
    images, targets = val.load_all(model.image_size, progress=progress)
    metrics = evaluate_detector(model, images, targets, model.class_names, progress=progress)
    print(format_table(metrics))
    atomic_write_json(out_dir / "teacher_metrics.json", metrics)
    with torch.inference_mode():
        predictions = model.predict(images[:16].to(device).float() / 255, score_thresh=0.3)
    save_grid(out_dir / "teacher_predictions.png", images[:16], predictions, model.class_names)
    save_grid(out_dir / "ground_truth.png", images[:16], targets[:16], model.class_names)
    return DemoResult(metrics["map_50"], metrics["map"], out_dir, time.time() - start)
