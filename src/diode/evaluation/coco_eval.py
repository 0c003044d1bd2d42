"""COCO box mAP of detections against targets, computed by pycocotools.

The ground truth and the detections are handed to `pycocotools` in memory (no JSON files), so
the numbers are exactly those of the reference COCO evaluator with its default parameters
(IoU thresholds .50:.05:.95, maxDets 1/10/100, the small/medium/large area ranges).

Conventions of the returned metrics (all plain Python numbers, so they serialise to JSON):

- ``-1.0`` means *undefined*, as in pycocotools: no ground-truth object exists that the metric
  could be measured on (no objects at all, none in an area range, or a class never annotated).
  It is kept as ``-1.0`` rather than NaN so the dict stays valid JSON.
- A class with ground truth but no detections scores ``0.0``; detections of a class without any
  ground truth are ignored by COCO (that class is undefined, ``-1.0``, not a penalty).
"""

from __future__ import annotations

import contextlib
import io
from typing import Any, Sequence

import numpy as np
import torch
from pycocotools.coco import COCO
from pycocotools.cocoeval import COCOeval
from tqdm import tqdm

from diode.errors import DiodeError
from diode.types import ImageSize, Prediction, Target

# Positions in `COCOeval.stats` (the order `COCOeval.summarize` prints them in).
_SUMMARY_STATS = {
    "map": 0,
    "map_50": 1,
    "map_75": 2,
    "map_small": 3,
    "map_medium": 4,
    "map_large": 5,
    "mar_100": 8,
}


def evaluate_detections(
    predictions: Sequence[Prediction],
    targets: Sequence[Target],
    class_names: Sequence[str],
    image_sizes: Sequence[ImageSize] | ImageSize,
) -> dict[str, Any]:
    """COCO bbox metrics of ``predictions`` against ``targets``, one entry per image.

    predictions[i]: ``boxes`` float [N, 4] absolute xyxy pixels, ``labels`` int64 [N] (0-based
    into ``class_names``), ``scores`` float [N]; targets[i]: ``boxes`` and ``labels`` alike.
    Tensors may live on any device. ``image_sizes`` is one (H, W) per image, or a single (H, W)
    shared by all.

    Returns ``map`` (AP@[.50:.95]), ``map_50``, ``map_75``, ``map_small``, ``map_medium``,
    ``map_large``, ``mar_100`` (AR with 100 detections per image), ``per_class`` and
    ``per_class_50`` ({class name: AP@[.50:.95] / AP@.50}), ``num_images``, ``num_targets`` and
    ``num_predictions``. Every metric is ``-1.0`` where undefined (see the module docstring): with
    no ground-truth object at all, every AP and AR is ``-1.0``. With no detections at all every
    defined metric is ``0.0``.
    """
    if len(predictions) != len(targets):
        raise DiodeError(
            f"evaluate_detections: {len(predictions)} predictions for {len(targets)} targets"
        )
    if not targets:
        raise DiodeError("evaluate_detections: no images to evaluate")
    if not class_names:
        raise DiodeError("evaluate_detections: class_names is empty")
    sizes = _per_image_sizes(image_sizes, len(targets))

    coco_gt = _ground_truth(targets, class_names, sizes)
    results = _results(predictions, len(class_names))
    with contextlib.redirect_stdout(io.StringIO()):  # pycocotools prints progress on stdout
        # loadRes indexes results[0], so it cannot take an empty list.
        coco_dt = coco_gt.loadRes(results) if results else _empty_results(coco_gt)
        evaluator = COCOeval(coco_gt, coco_dt, iouType="bbox")
        evaluator.evaluate()
        evaluator.accumulate()
        evaluator.summarize()

    metrics: dict[str, Any] = {
        name: float(evaluator.stats[index]) for name, index in _SUMMARY_STATS.items()
    }
    # precision: [iou thresholds, recall thresholds, classes, area ranges, max dets]; area "all"
    # is index 0 and maxDets 100 the last, as for stats[0]; IoU 0.50 is the first threshold.
    precision = evaluator.eval["precision"][:, :, :, 0, -1]
    metrics["per_class"] = {
        name: _mean_defined(precision[:, :, k]) for k, name in enumerate(class_names)
    }
    metrics["per_class_50"] = {
        name: _mean_defined(precision[0, :, k]) for k, name in enumerate(class_names)
    }
    metrics["num_images"] = len(targets)
    metrics["num_targets"] = sum(int(t["labels"].numel()) for t in targets)
    metrics["num_predictions"] = sum(int(p["labels"].numel()) for p in predictions)
    return metrics


def evaluate_detector(
    detector: Any,
    images: torch.Tensor,
    targets: Sequence[Target],
    class_names: Sequence[str],
    batch_size: int = 32,
    progress: bool = False,
) -> dict[str, Any]:
    """Run ``detector.predict`` over ``images`` in batches and score it with COCO mAP.

    images: uint8 [N, 3, H, W] (scaled to [0, 1]) or float [N, 3, H, W] already in [0, 1].
    ``detector`` is anything with ``predict(images) -> list[prediction]``; each batch goes to the
    device of its first parameter when it has any. Train/eval mode is left to the detector.
    Returns what `evaluate_detections` returns.
    """
    if images.dim() != 4:
        raise DiodeError(
            f"evaluate_detector: images must be [N, 3, H, W], got {tuple(images.shape)}"
        )
    if images.shape[0] != len(targets):
        raise DiodeError(
            f"evaluate_detector: {images.shape[0]} images for {len(targets)} targets"
        )
    if batch_size < 1:
        raise DiodeError(f"evaluate_detector: batch_size must be >= 1, got {batch_size}")
    if images.dtype != torch.uint8 and not images.is_floating_point():
        raise DiodeError(f"evaluate_detector: images must be uint8 or float, got {images.dtype}")

    device = _device_of(detector)
    predictions: list[Prediction] = []
    starts = range(0, images.shape[0], batch_size)
    with torch.inference_mode():
        for start in tqdm(starts, desc="evaluate", unit="batch", disable=not progress):
            batch = images[start : start + batch_size]
            if device is not None:
                batch = batch.to(device)
            if batch.dtype == torch.uint8:
                batch = batch.float() / 255.0
            # Back to the CPU per batch so a large evaluation set does not pile up on the GPU.
            predictions.extend(
                {key: value.cpu() for key, value in p.items()} for p in detector.predict(batch)
            )
    height, width = images.shape[-2:]
    return evaluate_detections(predictions, targets, class_names, (int(height), int(width)))


def format_table(metrics: dict[str, Any]) -> str:
    """A fixed-width text table of `evaluate_detections` output; undefined (-1) shows as n/a."""
    summary = [
        ("mAP@[.50:.95]", "map"),
        ("mAP@.50", "map_50"),
        ("mAP@.75", "map_75"),
        ("mAP small", "map_small"),
        ("mAP medium", "map_medium"),
        ("mAP large", "map_large"),
    ]
    per_class: dict[str, float] = metrics.get("per_class", {})
    per_class_50: dict[str, float] = metrics.get("per_class_50", {})
    width = max([len(label) for label, _ in summary] + [len(name) for name in per_class] + [5])

    lines = [f"{'metric':<{width}}  {'value':>7}"]
    lines += [f"{label:<{width}}  {_cell(metrics[key])}" for label, key in summary]
    lines.append("")
    lines.append(f"{'class':<{width}}  {'AP':>7}  {'AP50':>7}")
    for name, ap in per_class.items():
        lines.append(f"{name:<{width}}  {_cell(ap)}  {_cell(per_class_50.get(name, -1.0))}")
    return "\n".join(lines)


def _per_image_sizes(image_sizes: Sequence[ImageSize] | ImageSize, count: int) -> list[ImageSize]:
    """One (H, W) per image, expanding a single shared size."""
    if len(image_sizes) == 2 and all(isinstance(v, (int, np.integer)) for v in image_sizes):
        return [(int(image_sizes[0]), int(image_sizes[1]))] * count
    sizes = [(int(h), int(w)) for h, w in image_sizes]  # type: ignore[misc]
    if len(sizes) != count:
        raise DiodeError(f"evaluate_detections: {len(sizes)} image_sizes for {count} images")
    return sizes


def _ground_truth(
    targets: Sequence[Target], class_names: Sequence[str], sizes: Sequence[ImageSize]
) -> COCO:
    """An in-memory COCO ground truth: image id = index + 1, category id = label + 1."""
    annotations = []
    for index, target in enumerate(targets):
        boxes = _boxes_xywh(target["boxes"], f"targets[{index}]")
        labels = _labels(target["labels"], len(boxes), len(class_names), f"targets[{index}]")
        for (x, y, w, h), label in zip(boxes, labels):
            annotations.append(
                {
                    "id": len(annotations) + 1,  # COCO ids start at 1; 0 is treated as missing
                    "image_id": index + 1,
                    "category_id": label + 1,
                    "bbox": [x, y, w, h],
                    "area": w * h,
                    "iscrowd": 0,
                }
            )
    coco = COCO()
    coco.dataset = {
        "images": [
            {"id": index + 1, "height": h, "width": w} for index, (h, w) in enumerate(sizes)
        ],
        "categories": [{"id": k + 1, "name": name} for k, name in enumerate(class_names)],
        "annotations": annotations,
    }
    with contextlib.redirect_stdout(io.StringIO()):
        coco.createIndex()
    return coco


def _results(predictions: Sequence[Prediction], num_classes: int) -> list[dict[str, Any]]:
    """Predictions as a COCO results list (xywh boxes)."""
    results = []
    for index, prediction in enumerate(predictions):
        where = f"predictions[{index}]"
        boxes = _boxes_xywh(prediction["boxes"], where)
        labels = _labels(prediction["labels"], len(boxes), num_classes, where)
        scores = prediction["scores"].detach().to("cpu", torch.float64).reshape(-1).tolist()
        if len(scores) != len(boxes):
            raise DiodeError(f"{where}: {len(scores)} scores for {len(boxes)} boxes")
        for box, label, score in zip(boxes, labels, scores):
            results.append(
                {"image_id": index + 1, "category_id": label + 1, "bbox": box, "score": score}
            )
    return results


def _empty_results(coco_gt: COCO) -> COCO:
    """A detections object with no detections, sharing the ground truth's images and classes."""
    coco = COCO()
    coco.dataset = {
        "images": list(coco_gt.dataset["images"]),
        "categories": list(coco_gt.dataset["categories"]),
        "annotations": [],
    }
    coco.createIndex()
    return coco


def _boxes_xywh(boxes: torch.Tensor, where: str) -> list[list[float]]:
    """[N, 4] xyxy tensor -> list of [x, y, w, h] Python floats."""
    if boxes.dim() != 2 or boxes.shape[-1] != 4:
        if boxes.numel() == 0:
            return []
        raise DiodeError(f"{where}: boxes must be [N, 4], got {tuple(boxes.shape)}")
    rows = boxes.detach().to("cpu", torch.float64).tolist()
    return [[x1, y1, x2 - x1, y2 - y1] for x1, y1, x2, y2 in rows]


def _labels(labels: torch.Tensor, count: int, num_classes: int, where: str) -> list[int]:
    """Labels as Python ints, checked against the box count and the class list."""
    values = [int(v) for v in labels.detach().cpu().reshape(-1).tolist()]
    if len(values) != count:
        raise DiodeError(f"{where}: {len(values)} labels for {count} boxes")
    bad = [v for v in values if not 0 <= v < num_classes]
    if bad:
        raise DiodeError(f"{where}: label {bad[0]} outside [0, {num_classes})")
    return values


def _mean_defined(precision: np.ndarray) -> float:
    """Mean over the entries COCO filled in; -1.0 (undefined) when there are none."""
    defined = precision[precision > -1]
    return float(defined.mean()) if defined.size else -1.0


def _device_of(detector: Any) -> torch.device | None:
    """The device of the detector's first parameter, or None when it has no parameters."""
    parameters = getattr(detector, "parameters", None)
    if parameters is None:
        return None
    first = next(iter(parameters()), None)
    return None if first is None else first.device


def _cell(value: float) -> str:
    return f"{'n/a':>7}" if value == -1.0 else f"{value:7.4f}"
