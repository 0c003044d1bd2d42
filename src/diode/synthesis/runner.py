"""Turn the synthesis loop into a dataset on disk: resumable, split across ranks, verifiable.

Batch `b` of a run is seeded from (run seed, b) alone, so the dataset does not depend on how the
work is split or interrupted. Rank r of K synthesises the batches with b % K == r. A batch is
done when its record `batches/<b>.json` exists; it is written (atomically) only after the
batch's images and grids, so a killed run never shows a half-written batch and rerunning the
same command continues where it stopped. Rank 0 then merges the records into the dataset index:
COCO `annotations.json`, YOLO `labels/` + `data.yaml`, `manifest.jsonl` and `summary.json`.
"""

from __future__ import annotations

import hashlib
import json
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np
import torch
from tqdm import tqdm

from diode.config import SynthesisConfig
from diode.data.coco import write_coco
from diode.data.yolo import write_data_yaml, write_yolo_labels
from diode.detectors.base import Detector
from diode.errors import DiodeError
from diode.evaluation import evaluate_detections
from diode.io import atomic_write_json, atomic_write_text, atomic_write_yaml, save_png
from diode.report.grids import save_grid
from diode.synthesis.recipes import build_config
from diode.synthesis.synthesizer import Synthesizer, SynthesisResult
from diode.synthesis.targets import make_sampler, targets_from_dataset
from diode.types import ImageSize, Prediction, Target

AGREEMENT_SCORE = 0.001  # teacher/verifier detections kept for the agreement mAP
GRID_SCORE = 0.3  # detections drawn on the per-batch grids
MAX_RETRIES = 2  # non-finite losses: retry a batch at half the learning rate this many times


class NonFiniteBatch(DiodeError):
    """A batch whose losses stayed non-finite after the retries: reported and skipped."""


@dataclass
class RunSpec:
    """Everything that determines the dataset's content (checked on resume)."""

    num_images: int
    image_size: ImageSize
    seed: int
    teacher: str
    config: SynthesisConfig

    @property
    def tiles(self) -> int:
        grid = self.config.tiling.grid
        return grid[0] * grid[1] if self.config.tiling.enabled else 1

    @property
    def images_per_batch(self) -> int:
        return max(1, self.config.batch_size // self.tiles)

    @property
    def num_batches(self) -> int:
        return -(-self.num_images // self.images_per_batch)

    def batch_images(self, b: int) -> int:
        return min(self.images_per_batch, self.num_images - b * self.images_per_batch)


def batch_seed(seed: int, batch: int) -> int:
    return int(np.random.SeedSequence([seed, batch]).generate_state(1, dtype=np.uint64)[0] % (2 ** 63))


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _to_lists(t: dict) -> dict:
    return {k: v.tolist() for k, v in t.items()}


def _agreement(predictions: list[Prediction], targets: list[Target], class_names: list[str],
               image_size: ImageSize) -> float:
    """COCO mAP@.5 of `predictions` against the targets the images were made for."""
    if not targets or sum(len(t["labels"]) for t in targets) == 0:
        return -1.0
    return evaluate_detections(predictions, targets, class_names, image_size)["map_50"]


def _with_defaults(synthesis: object) -> object:
    """A recorded synthesis config with the options added since it was written set to their
    defaults (new options default to the behaviour that came before them), so a run made by an
    earlier version resumes when nothing it recorded differs; returned as recorded when it does
    not parse (an unknown key from a later version: compared as is, and refused)."""
    if not isinstance(synthesis, dict):
        return synthesis
    try:
        return build_config(synthesis).to_dict()
    except DiodeError:
        return synthesis


def _first_difference(theirs: object, mine: object, path: str = "") -> str:
    """' (KEY: THEIRS there, MINE here)' for the first differing entry of two JSON values."""
    if isinstance(theirs, dict) and isinstance(mine, dict):
        for key in sorted(set(theirs) | set(mine)):
            if key not in theirs or key not in mine:
                side = "there" if key in theirs else "here"
                return f" ({path}{key} only {side})"
            found = _first_difference(theirs[key], mine[key], f"{path}{key}.")
            if found:
                return found
        return ""
    if isinstance(theirs, list) and isinstance(mine, list) and len(theirs) == len(mine):
        return next((found for i, (a, b) in enumerate(zip(theirs, mine))
                     if (found := _first_difference(a, b, f"{path.rstrip('.')}[{i}]."))), "")
    if theirs != mine:
        label = f"{path.rstrip('.')}: " if path else ""
        return f" ({label}{json.dumps(theirs)[:40]} there, {json.dumps(mine)[:40]} here)"
    return ""


class SynthesisRun:
    """Synthesises a run's batches into `out_dir` (this rank's share) and merges the index."""

    def __init__(self, teacher: Detector, spec: RunSpec, out_dir: Path, *, rank: int = 0, world_size: int = 1,
                 verifier: Detector | None = None, command: str = "") -> None:
        self.teacher, self.spec, self.out_dir = teacher, spec, Path(out_dir)
        self.rank, self.world_size, self.verifier, self.command = rank, world_size, verifier, command
        self.device = next(teacher.parameters()).device
        cfg = spec.config
        if cfg.tiling.enabled:
            gr, gc = cfg.tiling.grid
            if cfg.batch_size % (gr * gc):
                raise DiodeError(f"batch_size {cfg.batch_size} must be a multiple of the tiling grid {gr}x{gc}")
            if spec.image_size[0] % gr or spec.image_size[1] % gc:
                raise DiodeError(f"image size {spec.image_size} must divide into the tiling grid {gr}x{gc}")
        if cfg.targets.sampler == "dataset":
            from diode.data import open_dataset

            self.layout_source = open_dataset(cfg.targets.dataset, split="train")
            if self.layout_source.class_names != teacher.class_names:
                raise DiodeError(f"{cfg.targets.dataset}: its classes differ from the teacher's")
        else:
            kwargs = {"min_side": cfg.targets.min_side, "max_side": cfg.targets.max_side,
                      "max_aspect": cfg.targets.max_aspect}
            if cfg.targets.sampler == "multi-box":
                kwargs.update(boxes_per_image=tuple(cfg.targets.boxes_per_image), max_iou=cfg.targets.max_iou)
            self.sampler = make_sampler(cfg.targets.sampler, **kwargs)

    # ----------------------------------------------------------------------------- settings
    def settings(self) -> dict:
        s = self.spec
        return {"num_images": s.num_images, "image_size": list(s.image_size), "seed": s.seed,
                "teacher": s.teacher, "class_names": self.teacher.class_names, "synthesis": s.config.to_dict()}

    def check_or_write_settings(self) -> None:
        """Refuse to continue a run made with other settings; otherwise record them."""
        path = self.out_dir / "config.yaml"
        mine = self.settings()
        if path.exists():
            import yaml

            try:
                theirs = yaml.safe_load(path.read_text())
            except yaml.YAMLError:
                theirs = None
            if not isinstance(theirs, dict):
                raise DiodeError(f"{path}: unreadable; choose another --out")
            theirs = {**theirs, "synthesis": _with_defaults(theirs.get("synthesis"))}
            for key in ("image_size", "seed", "teacher", "class_names", "synthesis"):
                if json.dumps(theirs.get(key), sort_keys=True) != json.dumps(mine[key], sort_keys=True):
                    plain = lambda value: json.loads(json.dumps(value))  # noqa: E731 - tuples as lists
                    where = _first_difference(plain(theirs.get(key)), plain(mine[key]))
                    raise DiodeError(f"{self.out_dir}: holds a run with a different {key}{where}; rerun its own "
                                     f"command or choose another --out")
            # A different --num-images extends or shortens the run batch by batch; a finished last
            # batch that was partial would stay short, so that case is refused.
            old_n, batch = theirs.get("num_images"), self.spec.config.batch_size
            if isinstance(old_n, int) and old_n != mine["num_images"] and old_n % batch \
                    and mine["num_images"] > old_n - old_n % batch:
                raise DiodeError(f"{self.out_dir}: holds {old_n} images whose last batch is partial (batch size "
                                 f"{batch}); rerun with --num-images {old_n} or choose another --out")
        if self.rank == 0:
            atomic_write_yaml(path, {"command": self.command, **mine})

    # ----------------------------------------------------------------------------- batches
    def record_path(self, b: int) -> Path:
        return self.out_dir / "batches" / f"{b:06d}.json"

    def my_batches(self) -> list[int]:
        return [b for b in range(self.spec.num_batches) if b % self.world_size == self.rank]

    def _targets(self, b: int, count: int, gen: torch.Generator) -> list[Target]:
        spec = self.spec
        if spec.config.targets.sampler == "dataset":
            n = len(self.layout_source)
            indices = [(b * spec.config.batch_size + i) % n for i in range(count)]
            return [{k: v.cpu() for k, v in t.items()}
                    for t in targets_from_dataset(self.layout_source, indices, spec.image_size)]
        return self.sampler(count, spec.image_size, self.teacher.num_classes, gen, "cpu")

    def synthesize_batch(self, synth: Synthesizer, b: int, on_iteration: Callable | None = None) -> SynthesisResult:
        """Batch b from its own seed; retried at a lower learning rate if a loss goes non-finite."""
        count = self.spec.batch_images(b) * self.spec.tiles
        for attempt in range(MAX_RETRIES + 1):
            gen = torch.Generator().manual_seed(batch_seed(self.spec.seed, b))
            targets = self._targets(b, count, gen)
            result = synth.synthesize(targets, self.spec.image_size, gen, lr_scale=0.5 ** attempt,
                                      callback=(lambda e, i: on_iteration()) if on_iteration else None)
            finite = bool(torch.isfinite(result.images).all()) and all(
                np.isfinite(v) for v in result.losses.values())
            if finite:
                return result
        raise NonFiniteBatch(f"batch {b}: losses stayed non-finite after {MAX_RETRIES} retries at lower "
                             f"learning rates; skipped (no image of it is written)")

    def write_batch(self, b: int, result: SynthesisResult, seconds: float) -> dict:
        spec, out = self.spec, self.out_dir
        images = result.images
        with torch.inference_mode():
            predictions = [{k: v.cpu() for k, v in p.items()} for p in
                           self.teacher.predict(images, score_thresh=AGREEMENT_SCORE)]
            verifier_predictions = None
            if self.verifier is not None:
                verifier_predictions = [{k: v.cpu() for k, v in p.items()} for p in
                                        self.verifier.predict(images.to(next(self.verifier.parameters()).device),
                                                              score_thresh=AGREEMENT_SCORE)]
        files = []
        cpu_images = images.cpu()
        for i, (img, target) in enumerate(zip(cpu_images, result.targets)):
            name = f"{b:06d}_{i:03d}.png"
            save_png(out / "images" / name, img)
            files.append({"file_name": name, "sha256": _sha256(out / "images" / name), **_to_lists(target)})
        names = self.teacher.class_names
        save_grid(out / "grids" / f"{b:06d}_targets.png", cpu_images, result.targets, names)
        shown = [{k: v[p["scores"] >= GRID_SCORE] for k, v in p.items()} for p in predictions]
        save_grid(out / "grids" / f"{b:06d}_teacher.png", cpu_images, shown, names)
        record = {
            "batch": b, "seed": batch_seed(spec.seed, b), "iterations": result.iterations,
            "losses": result.losses, "fp_added": result.fp_added, "seconds": round(seconds, 3),
            "teacher_agreement": _agreement(predictions, result.targets, names, spec.image_size),
            "verifier_agreement": (_agreement(verifier_predictions, result.targets, names, spec.image_size)
                                   if verifier_predictions is not None else None),
            "files": files,
            "teacher_predictions": [_to_lists({k: v[p["scores"] >= 0.01] for k, v in p.items()}) for p in predictions],
            "verifier_predictions": ([_to_lists({k: v[p["scores"] >= 0.01] for k, v in p.items()})
                                      for p in verifier_predictions] if verifier_predictions is not None else None),
            "history": result.history,
        }
        atomic_write_json(self.record_path(b), record)  # last: marks the batch done
        return record

    def run(self, progress: bool = True) -> None:
        """Synthesise this rank's missing batches."""
        todo = [b for b in self.my_batches() if not self.record_path(b).exists()]
        if not todo:
            return
        synth = Synthesizer(self.teacher, self.spec.config)
        per_batch = self.spec.config.total_iterations
        bar = tqdm(total=len(todo) * per_batch, disable=not progress, unit="it", desc=f"synthesize rank {self.rank}",
                   dynamic_ncols=True)
        done_images = 0
        start = time.time()
        try:
            for b in todo:
                t0 = time.time()
                try:
                    result = self.synthesize_batch(synth, b, on_iteration=lambda: bar.update(1))
                except NonFiniteBatch as exc:
                    tqdm.write(f"diode: warning: {exc}")
                    atomic_write_json(self.record_path(b), {
                        "batch": b, "seed": batch_seed(self.spec.seed, b), "skipped": str(exc), "iterations": 0,
                        "losses": {}, "fp_added": 0, "seconds": round(time.time() - t0, 3),
                        "teacher_agreement": None, "verifier_agreement": None, "files": [],
                        "teacher_predictions": [], "verifier_predictions": None, "history": []})
                    continue
                record = self.write_batch(b, result, time.time() - t0)
                done_images += len(record["files"])
                bar.set_postfix(img_per_s=f"{done_images / (time.time() - start):.2f}",
                                agree=f"{record['teacher_agreement']:.2f}")
        finally:
            bar.close()
            synth.close()

    # ----------------------------------------------------------------------------- merge
    def merge(self) -> dict:
        """Build the dataset index from every batch record (rank 0, after all ranks finished)."""
        spec, out = self.spec, self.out_dir
        missing = [b for b in range(spec.num_batches) if not self.record_path(b).exists()]
        if missing:
            raise DiodeError(f"{out}: batches {missing[:5]} are missing; rerun the same command to finish them")
        records = [json.loads(self.record_path(b).read_text()) for b in range(spec.num_batches)]
        entries, predictions, verifier_predictions, targets = [], [], [], []
        h, w = spec.image_size
        for rec in records:
            for f, p in zip(rec["files"], rec["teacher_predictions"]):
                t = {"boxes": torch.tensor(f["boxes"], dtype=torch.float32).reshape(-1, 4),
                     "labels": torch.tensor(f["labels"], dtype=torch.int64)}
                targets.append(t)
                entries.append({"file_name": f["file_name"], "height": h, "width": w, **t})
                predictions.append({"boxes": torch.tensor(p["boxes"]).reshape(-1, 4),
                                    "labels": torch.tensor(p["labels"], dtype=torch.int64),
                                    "scores": torch.tensor(p["scores"])})
            for p in rec["verifier_predictions"] or []:
                verifier_predictions.append({"boxes": torch.tensor(p["boxes"]).reshape(-1, 4),
                                             "labels": torch.tensor(p["labels"], dtype=torch.int64),
                                             "scores": torch.tensor(p["scores"])})
        names = self.teacher.class_names
        write_yolo_labels(out / "labels", entries)
        write_coco(out / "annotations.json", names, entries)
        write_data_yaml(out / "data.yaml", ".", {"train": "images", "val": "images"}, names)
        manifest_keys = ("batch", "seed", "iterations", "losses", "fp_added", "seconds", "teacher_agreement",
                         "verifier_agreement")
        lines = [json.dumps({**{k: rec[k] for k in manifest_keys}, **({"skipped": rec["skipped"]} if "skipped" in rec else {}),
                             "files": {f["file_name"]: f["sha256"] for f in rec["files"]}}) for rec in records]
        atomic_write_text(out / "manifest.jsonl", "\n".join(lines) + "\n")
        summary = {
            "num_images": len(entries),
            "num_targets": sum(len(t["labels"]) for t in targets),
            "fp_added": sum(r["fp_added"] for r in records),
            "teacher_agreement": _agreement(predictions, targets, names, spec.image_size),
            "verifier_agreement": (_agreement(verifier_predictions, targets, names, spec.image_size)
                                   if len(verifier_predictions) == len(targets) else None),
            "synthesis_seconds": round(sum(r["seconds"] for r in records), 2),
            "iterations_per_image": max((r["iterations"] for r in records), default=0),
            "skipped_batches": [r["batch"] for r in records if "skipped" in r],
        }
        atomic_write_json(out / "summary.json", summary)
        return summary
