"""The main job on the embedded default: what `make demo` runs.

bundled teacher -> DIODE synthesis (the `fast-multibox` recipe: `fast` with 1-4 boxes per image,
which teaches students more) -> distillation of a student of the
teacher's architecture from scratch on the synthetic images only (soft targets: the `auto`
method) -> COCO mAP of teacher and student on freshly rendered real validation images -> HTML
report. Sized to finish in about 10 minutes on a 2-core CPU; `quick` is a smoke-sized run of the
same pipeline. One synthetic image costs as much compute as ~190 distillation image-steps, so
the budget goes to many short KD epochs over a few hundred images.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from diode.config import TrainConfig
from diode.data import open_dataset
from diode.data.shapes import generate_shapes
from diode.detectors.checkpoint import bundled_models, load_detector
from diode.distill.sources import load_transfer_set
from diode.errors import DiodeError
from diode.evaluation import evaluate_detector
from diode.io import atomic_write_json
from diode.pipeline import synthesize_dataset, train_student
from diode.report.grids import save_grid
from diode.report.html import write_report
from diode.synthesis.recipes import build_config, load_recipe

DEMO_RECIPE = "fast-multibox"
DEMO_SEED = 1234  # real val images, synthesis and distillation (`diode demo --seed` for another run)


@dataclass
class DemoSize:
    synth_images: int  # synthetic transfer images
    iterations: int  # synthesis iterations per image
    epochs: int  # distillation epochs
    val_images: int  # real validation images


FULL = DemoSize(synth_images=256, iterations=250, epochs=150, val_images=300)
QUICK = DemoSize(synth_images=32, iterations=60, epochs=10, val_images=100)


@dataclass
class DemoResult:
    teacher_map_50: float
    student_map_50: float
    teacher_agreement: float
    report: Path
    seconds: float


def _read_json(path: Path) -> dict:
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError) as err:
        raise DiodeError(f"{path}: not a readable JSON file ({err}); choose another --out") from None
    if not isinstance(data, dict):
        raise DiodeError(f"{path}: not a JSON object; choose another --out")
    return data


def _claim_folder(out_dir: Path, seed: int, quick: bool) -> None:
    """Refuse a folder holding a demo of another seed or size before anything in it is rewritten
    (its real val images would be rendered again over those its results were scored on); else
    record this run's in `demo.json`. A folder from before `demo.json` was written holds the fixed
    seed (`--seed` did not exist)."""
    spec_path = out_dir / "demo.json"
    if spec_path.exists():
        held = _read_json(spec_path)
    elif (out_dir / "summary.json").exists():
        summary = _read_json(out_dir / "summary.json")
        held = {"seed": summary.get("seed", DEMO_SEED), "quick": summary.get("quick")}
    elif (out_dir / "real").exists():
        held = {"seed": DEMO_SEED}
    else:
        held = {}
    if held.get("seed", seed) != seed:
        raise DiodeError(f"{out_dir}: holds a demo run with --seed {held['seed']} (--seed {seed} here); "
                         "rerun its own command or choose another --out")
    if held.get("quick") is not None and held["quick"] != quick:
        raise DiodeError(f"{out_dir}: holds a {'--quick' if held['quick'] else 'full'} demo run (this one is "
                         f"{'--quick' if quick else 'full'}); rerun its own command or choose another --out")
    out_dir.mkdir(parents=True, exist_ok=True)
    atomic_write_json(spec_path, {"seed": seed, "quick": quick})


def run_demo(out_dir: Path, *, quick: bool = False, teacher_name: str = "shapes-teacher",
             student_arch: str = "yolo-lite-s-p2", seed: int = DEMO_SEED, device: torch.device | str = "cpu",
             progress: bool = True, log=print) -> DemoResult:
    """Run the whole pipeline into `out_dir` (resumable: finished synthesis batches are kept)."""
    size = QUICK if quick else FULL
    start = time.time()
    _claim_folder(out_dir, seed, quick)
    teacher, _ = load_detector(teacher_name, device=device)

    log(f"[1/4] rendering {size.val_images} real validation images (never used for training)")
    data_dir = generate_shapes(out_dir / "real", train=0, val=size.val_images, image_size=teacher.image_size,
                               seed=seed, progress=progress)
    val = open_dataset(data_dir / "val")
    val_images, val_targets = val.load_all(teacher.image_size)

    command = f"diode demo{' --quick' if quick else ''}{f' --seed {seed}' if seed != DEMO_SEED else ''}"
    log(f"[2/4] synthesizing {size.synth_images} images from {teacher_name} ({size.iterations} iterations each)")
    cfg = build_config(load_recipe(DEMO_RECIPE), iterations=size.iterations, source=f"recipe {DEMO_RECIPE}")
    # The bundled verifier (an independently trained yolo-lite-n) measures whether the images carry
    # object evidence other detectors see too, not only patterns the teacher responds to.
    verifier = load_detector("shapes-verifier", device=device)[0] if "shapes-verifier" in bundled_models() else None
    synth_summary = synthesize_dataset(teacher, teacher_name, cfg, out_dir / "synthetic", size.synth_images, seed,
                                       command=command, progress=progress, verifier=verifier)

    log(f"[3/4] distilling a {student_arch} student from scratch on the synthetic images ({size.epochs} epochs)")
    images = load_transfer_set(str(out_dir / "synthetic"), teacher.image_size, num_images=None, seed=seed,
                               progress=False)
    train_cfg = TrainConfig(epochs=size.epochs, batch_size=32, seed=seed, eval_every=max(1, size.epochs // 5),
                            checkpoint_every=max(1, size.epochs // 10))
    student_metrics = train_student(teacher, student_arch, images, None, val_images, val_targets, train_cfg,
                                    out_dir / "student", progress=progress, command=command)
    student, _ = load_detector(out_dir / "student" / "best.pt", device=device)

    log("[4/4] evaluating the teacher on the real validation images")
    teacher_metrics = evaluate_detector(teacher, val_images, val_targets, teacher.class_names)
    with torch.inference_mode():
        shown = student.predict(val_images[:16].to(device).float() / 255, score_thresh=0.3)
    save_grid(out_dir / "student_predictions.png", val_images[:16], shown, teacher.class_names)
    summary = {
        "teacher": teacher_name, "student": student_arch, "quick": quick, "seed": seed,
        "teacher_map_50": teacher_metrics["map_50"], "teacher_map": teacher_metrics["map"],
        "student_map_50": student_metrics["map_50"], "student_map": student_metrics["map"],
        "student_fraction_of_teacher_map_50": (student_metrics["map_50"] / teacher_metrics["map_50"]
                                               if teacher_metrics["map_50"] > 0 else None),
        "synthetic_images": synth_summary["num_images"], "synthesis_iterations": size.iterations,
        "teacher_agreement": synth_summary["teacher_agreement"],
        "verifier_agreement": synth_summary["verifier_agreement"], "distill_epochs": size.epochs,
        "real_val_images": size.val_images, "seconds": round(time.time() - start, 1),
    }
    atomic_write_json(out_dir / "summary.json", summary)
    report = write_report(out_dir)
    return DemoResult(teacher_metrics["map_50"], student_metrics["map_50"], synth_summary["teacher_agreement"],
                      report, time.time() - start)
