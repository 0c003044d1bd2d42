"""Tests of the COCO evaluator: parity with pycocotools run by hand, and the edge cases."""

from __future__ import annotations

import contextlib
import io
import json
import math
from pathlib import Path

import pytest
import torch
from pycocotools.coco import COCO
from pycocotools.cocoeval import COCOeval

from diode.errors import DiodeError
from diode.evaluation import evaluate_detections, evaluate_detector, format_table

CLASS_NAMES = ["cat", "dog", "bird"]
IMAGE_SIZE = (64, 80)  # (H, W)


def _target(boxes: list[list[float]], labels: list[int]) -> dict[str, torch.Tensor]:
    return {
        "boxes": torch.tensor(boxes, dtype=torch.float32).reshape(-1, 4),
        "labels": torch.tensor(labels, dtype=torch.int64),
    }


def _prediction(
    boxes: list[list[float]], labels: list[int], scores: list[float]
) -> dict[str, torch.Tensor]:
    prediction = _target(boxes, labels)
    prediction["scores"] = torch.tensor(scores, dtype=torch.float64)
    return prediction


def _fixture() -> tuple[list[dict], list[dict]]:
    """Four images, three classes: exact hits, shifted boxes, misses and false positives.

    Coordinates are multiples of 0.5 so float32 tensors hold them exactly.
    """
    targets = [
        _target([[2, 2, 30, 30], [40, 10, 70, 50]], [0, 1]),
        _target([[5, 5, 25, 45], [30, 30, 60, 60], [60, 2, 78, 20]], [1, 2, 0]),
        _target([[10, 10, 50, 50]], [2]),
        _target([[0, 0, 8, 8], [20, 20, 36.5, 36], [50, 30, 79, 63]], [0, 0, 1]),
    ]
    predictions = [
        _prediction(
            [[2, 2, 30, 30], [42, 12, 72, 52], [0, 40, 20, 60]], [0, 1, 2], [0.9, 0.8, 0.3]
        ),
        _prediction(
            [[6, 7, 26, 44], [30, 30, 60, 60], [55, 5, 75, 25]], [1, 2, 0], [0.7, 0.95, 0.4]
        ),
        _prediction([[12, 14, 52, 48], [10, 10, 50, 50]], [2, 1], [0.6, 0.5]),
        _prediction(
            [[1, 1, 9, 9], [22, 20, 38, 37], [10, 50, 30, 60]], [0, 0, 1], [0.85, 0.65, 0.2]
        ),
    ]
    return predictions, targets


def _reference_stats(predictions: list[dict], targets: list[dict], tmp_path: Path) -> list[float]:
    """COCO stats computed the documented way: JSON files on disk, COCO + loadRes + COCOeval."""
    images, annotations, results = [], [], []
    for index, (prediction, target) in enumerate(zip(predictions, targets)):
        images.append({"id": index + 1, "height": IMAGE_SIZE[0], "width": IMAGE_SIZE[1]})
        for (x1, y1, x2, y2), label in zip(target["boxes"].tolist(), target["labels"].tolist()):
            annotations.append(
                {
                    "id": len(annotations) + 1,
                    "image_id": index + 1,
                    "category_id": label + 1,
                    "bbox": [x1, y1, x2 - x1, y2 - y1],
                    "area": (x2 - x1) * (y2 - y1),
                    "iscrowd": 0,
                }
            )
        rows = zip(
            prediction["boxes"].tolist(),
            prediction["labels"].tolist(),
            prediction["scores"].tolist(),
        )
        for (x1, y1, x2, y2), label, score in rows:
            results.append(
                {
                    "image_id": index + 1,
                    "category_id": label + 1,
                    "bbox": [x1, y1, x2 - x1, y2 - y1],
                    "score": score,
                }
            )
    categories = [{"id": k + 1, "name": name} for k, name in enumerate(CLASS_NAMES)]
    gt_file, dt_file = tmp_path / "gt.json", tmp_path / "dt.json"
    gt_file.write_text(
        json.dumps({"images": images, "annotations": annotations, "categories": categories})
    )
    dt_file.write_text(json.dumps(results))
    with contextlib.redirect_stdout(io.StringIO()):
        coco_gt = COCO(str(gt_file))
        coco_dt = coco_gt.loadRes(str(dt_file))
        evaluator = COCOeval(coco_gt, coco_dt, "bbox")
        evaluator.evaluate()
        evaluator.accumulate()
        evaluator.summarize()
    return [float(v) for v in evaluator.stats]


def _perfect(targets: list[dict]) -> list[dict]:
    return [{**t, "scores": torch.ones(len(t["labels"]))} for t in targets]


def test_perfect_predictions_score_one() -> None:
    _, targets = _fixture()
    metrics = evaluate_detections(_perfect(targets), targets, CLASS_NAMES, IMAGE_SIZE)
    assert metrics["map"] == pytest.approx(1.0)
    assert metrics["map_50"] == pytest.approx(1.0)
    assert metrics["mar_100"] == pytest.approx(1.0)
    assert all(v == pytest.approx(1.0) for v in metrics["per_class"].values())


def test_no_predictions_score_zero() -> None:
    _, targets = _fixture()
    empty = [{**_target([], []), "scores": torch.zeros(0)} for _ in targets]
    metrics = evaluate_detections(empty, targets, CLASS_NAMES, IMAGE_SIZE)
    for key in ("map", "map_50", "map_75", "mar_100"):
        assert metrics[key] == 0.0
    assert metrics["per_class"] == {name: 0.0 for name in CLASS_NAMES}
    assert metrics["num_predictions"] == 0


def test_matches_pycocotools_run_directly(tmp_path: Path) -> None:
    predictions, targets = _fixture()
    expected = _reference_stats(predictions, targets, tmp_path)
    sizes = [IMAGE_SIZE] * len(targets)
    metrics = evaluate_detections(predictions, targets, CLASS_NAMES, sizes)
    assert abs(metrics["map"] - expected[0]) < 1e-9
    assert abs(metrics["map_50"] - expected[1]) < 1e-9
    assert abs(metrics["map_75"] - expected[2]) < 1e-9
    assert abs(metrics["mar_100"] - expected[8]) < 1e-9
    # A non-trivial fixture: neither perfect nor empty.
    assert 0.0 < metrics["map"] < 1.0
    # COCO's mAP is the mean of the per-class APs over the classes with ground truth.
    assert metrics["map"] == pytest.approx(sum(metrics["per_class"].values()) / len(CLASS_NAMES))
    assert metrics["num_images"] == 4
    assert metrics["num_targets"] == 9
    assert metrics["num_predictions"] == 11


def test_class_absent_from_ground_truth_is_undefined() -> None:
    _, targets = _fixture()
    names = CLASS_NAMES + ["fish"]
    metrics = evaluate_detections(_perfect(targets), targets, names, IMAGE_SIZE)
    assert metrics["per_class"]["fish"] == -1.0
    assert metrics["per_class_50"]["fish"] == -1.0
    assert metrics["map"] == pytest.approx(1.0)  # the undefined class does not drag the mean


def test_class_never_predicted_scores_zero() -> None:
    _, targets = _fixture()
    # Predict every object except the birds (label 2).
    predictions = [
        {key: value[t["labels"] != 2] for key, value in p.items()}
        for p, t in zip(_perfect(targets), targets)
    ]
    metrics = evaluate_detections(predictions, targets, CLASS_NAMES, IMAGE_SIZE)
    assert metrics["per_class"]["bird"] == 0.0
    assert metrics["per_class_50"]["bird"] == 0.0
    assert metrics["per_class"]["cat"] == pytest.approx(1.0)
    assert metrics["map"] == pytest.approx(2.0 / 3.0)


def test_no_ground_truth_is_undefined() -> None:
    predictions, _ = _fixture()
    targets = [_target([], []) for _ in predictions]
    metrics = evaluate_detections(predictions, targets, CLASS_NAMES, IMAGE_SIZE)
    for key in ("map", "map_50", "map_75", "map_small", "map_medium", "map_large", "mar_100"):
        assert metrics[key] == -1.0
    assert set(metrics["per_class"].values()) == {-1.0}


def test_metrics_are_json_serialisable() -> None:
    predictions, targets = _fixture()
    metrics = evaluate_detections(predictions, targets, CLASS_NAMES, IMAGE_SIZE)
    assert json.loads(json.dumps(metrics)) == metrics
    assert not any(isinstance(v, float) and math.isnan(v) for v in metrics.values())


def test_bad_input_raises() -> None:
    predictions, targets = _fixture()
    with pytest.raises(DiodeError):
        evaluate_detections(predictions[:2], targets, CLASS_NAMES, IMAGE_SIZE)
    with pytest.raises(DiodeError, match=r"label 2 outside \[0, 2\)"):
        evaluate_detections(predictions, targets, CLASS_NAMES[:2], IMAGE_SIZE)
    with pytest.raises(DiodeError, match="image_sizes"):
        evaluate_detections(predictions, targets, CLASS_NAMES, [IMAGE_SIZE] * 3)


def test_format_table_lists_classes() -> None:
    predictions, targets = _fixture()
    names = CLASS_NAMES + ["fish"]
    table = format_table(evaluate_detections(predictions, targets, names, IMAGE_SIZE))
    for name in names:
        assert name in table
    assert "mAP@.50" in table
    assert "n/a" in table  # the absent class


class _FakeDetector(torch.nn.Module):
    """Returns the known targets in order, checking it is fed float images in [0, 1]."""

    def __init__(self, targets: list[dict]) -> None:
        super().__init__()
        self.dummy = torch.nn.Parameter(torch.zeros(1))
        self._answers = _perfect(targets)
        self.batch_sizes: list[int] = []

    def predict(self, images: torch.Tensor) -> list[dict]:
        assert images.is_floating_point() and images.device == self.dummy.device
        assert 0.0 <= float(images.min()) and float(images.max()) <= 1.0
        assert not torch.is_grad_enabled()
        self.batch_sizes.append(images.shape[0])
        answers, self._answers = self._answers[: images.shape[0]], self._answers[images.shape[0] :]
        return answers


@pytest.mark.parametrize("dtype", [torch.uint8, torch.float32])
def test_evaluate_detector_with_fake_detector(dtype: torch.dtype) -> None:
    _, targets = _fixture()
    images = torch.randint(0, 256, (len(targets), 3, *IMAGE_SIZE), dtype=torch.uint8)
    if dtype.is_floating_point:
        images = images.to(dtype) / 255.0
    detector = _FakeDetector(targets)
    metrics = evaluate_detector(detector, images, targets, CLASS_NAMES, batch_size=3)
    assert detector.batch_sizes == [3, 1]
    assert metrics["map"] == pytest.approx(1.0)
    assert metrics["map_50"] == pytest.approx(1.0)
