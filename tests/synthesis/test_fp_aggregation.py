"""False-positive aggregation: schedule, selection rules, caps and empty inputs."""

from __future__ import annotations

import pytest
import torch

from diode.synthesis.fp_aggregation import FPConfig, aggregate_false_positives

SIZE = (100, 100)  # area 10,000: 1 % is 100 px^2, 85 % is 8,500 px^2


def target(boxes: list[list[float]], labels: list[int]) -> dict[str, torch.Tensor]:
    return {
        "boxes": torch.tensor(boxes, dtype=torch.float32).reshape(-1, 4),
        "labels": torch.tensor(labels, dtype=torch.int64),
    }


def prediction(rows: list[tuple[list[float], int, float]]) -> dict[str, torch.Tensor]:
    return {
        "boxes": torch.tensor([r[0] for r in rows], dtype=torch.float32).reshape(-1, 4),
        "labels": torch.tensor([r[1] for r in rows], dtype=torch.int64),
        "scores": torch.tensor([r[2] for r in rows], dtype=torch.float32),
    }


def test_due_schedule() -> None:
    cfg = FPConfig(enabled=True, start=800, every=100, stop=1000)
    assert [i for i in range(0, 1300, 50) if cfg.due(i)] == [800, 900, 1000]
    open_ended = FPConfig(enabled=True, start=5, every=3)
    assert [i for i in range(20) if open_ended.due(i)] == [5, 8, 11, 14, 17]
    assert not FPConfig(enabled=False, start=0, every=1).due(0)


@pytest.mark.parametrize(
    ("kwargs", "field"),
    [
        ({"every": 0}, "every"),
        ({"score_thresh": 1.5}, "score_thresh"),
        ({"max_iou": -0.1}, "max_iou"),
        ({"min_area": 0.5, "max_area": 0.4}, "min_area"),
        ({"start": 10, "stop": 5}, "stop"),
        ({"max_per_image": 0}, "max_per_image"),
    ],
)
def test_config_validation_names_the_field(kwargs: dict, field: str) -> None:
    with pytest.raises(ValueError, match=field):
        FPConfig(**kwargs)


CASE = [
    ([12.0, 12.0, 50.0, 50.0], 1, 0.9),  # IoU 0.90 with the target: rejected
    ([80.0, 0.0, 88.0, 8.0], 2, 0.9),  # 0.64 % of the image: too small
    ([0.0, 0.0, 100.0, 95.0], 3, 0.9),  # 95 % of the image: too large
    ([60.0, 60.0, 90.0, 90.0], 4, 0.15),  # score below 0.2
    ([55.0, 5.0, 95.0, 45.0], 5, 0.6),  # good
    ([10.0, 60.0, 40.0, 95.0], 6, 0.8),  # good
    ([12.0, 62.0, 42.0, 97.0], 7, 0.5),  # good alone, IoU 0.79 with the 0.8 one: duplicate
]


def test_selection_rules() -> None:
    targets = [target([[10.0, 10.0, 50.0, 50.0]], [0])]
    before = targets[0]["boxes"].clone()
    merged, added = aggregate_false_positives([prediction(CASE)], targets, SIZE, FPConfig())
    assert added == 2
    expected = target(
        [[10.0, 10.0, 50.0, 50.0], [10.0, 60.0, 40.0, 95.0], [55.0, 5.0, 95.0, 45.0]], [0, 6, 5]
    )
    assert torch.equal(merged[0]["boxes"], expected["boxes"])
    assert torch.equal(merged[0]["labels"], expected["labels"])
    assert torch.equal(targets[0]["boxes"], before) and len(targets[0]["labels"]) == 1


def test_cap_per_image_and_batch_count() -> None:
    targets = [target([[10.0, 10.0, 50.0, 50.0]], [0]), target([], [])]
    preds = [prediction(CASE), prediction(CASE)]
    merged, added = aggregate_false_positives(preds, targets, SIZE, FPConfig(max_per_image=2))
    # Image 0 has room for one (the best); image 1 has no targets, so the duplicate of the
    # missing target (score 0.9) is now the best new box, then the 0.8 one.
    assert [m["labels"].tolist() for m in merged] == [[0, 6], [1, 6]]
    assert added == 3
    full = [target([[0.0, 0.0, 5.0, 5.0], [90.0, 90.0, 99.0, 99.0]], [0, 1])]
    merged, added = aggregate_false_positives(
        [prediction(CASE)], full, SIZE, FPConfig(max_per_image=2)
    )
    assert added == 0 and torch.equal(merged[0]["boxes"], full[0]["boxes"])


def test_empty_predictions_and_empty_targets() -> None:
    targets = [target([[1.0, 1.0, 30.0, 30.0]], [2]), target([], [])]
    merged, added = aggregate_false_positives(
        [prediction([]), prediction([])], targets, SIZE, FPConfig()
    )
    assert added == 0
    assert torch.equal(merged[0]["boxes"], targets[0]["boxes"])
    assert merged[1]["boxes"].shape == (0, 4) and merged[1]["labels"].dtype == torch.int64


def test_boxes_are_clipped_before_the_area_rule() -> None:
    # 40 x 40 inside the image, the rest hangs outside: area counted after clipping (16 %).
    preds = [prediction([([-40.0, -40.0, 40.0, 40.0], 1, 0.7)])]
    merged, added = aggregate_false_positives(
        preds, [target([], [])], SIZE, FPConfig(max_area=0.2)
    )
    assert added == 1
    assert torch.equal(merged[0]["boxes"], torch.tensor([[0.0, 0.0, 40.0, 40.0]]))
