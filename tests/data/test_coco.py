"""COCO reader/writer: round trips, category id mapping, validation of malformed files, fuzzing."""

from __future__ import annotations

import copy
import json
from pathlib import Path
from typing import Any, Callable

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from diode.data import read_coco, write_coco
from diode.errors import DiodeError


def valid_coco() -> dict:
    """Two non-square images (one without objects), non-contiguous category ids, a crowd region."""
    return {
        "images": [
            {"id": 10, "file_name": "a.png", "height": 40, "width": 80},
            {"id": 3, "file_name": "sub/b.jpg", "height": 120, "width": 60},
            {"id": 7, "file_name": "empty.png", "height": 30, "width": 30},
        ],
        "annotations": [
            {"id": 1, "image_id": 10, "category_id": 42, "bbox": [1.5, 2.25, 10.0, 20.5],
             "iscrowd": 0},
            {"id": 2, "image_id": 10, "category_id": 3, "bbox": [0, 0, 80, 40]},
            {"id": 3, "image_id": 3, "category_id": 7, "bbox": [59.5, 100.0, 1.0, 20.5],
             "iscrowd": 0},
            {"id": 4, "image_id": 3, "category_id": 3, "bbox": [0, 0, 5, 5], "iscrowd": 1},
        ],
        "categories": [
            {"id": 42, "name": "cat"},
            {"id": 3, "name": "ant"},
            {"id": 7, "name": "bee"},
        ],
    }


def write_json(path: Path, data: Any) -> Path:
    path.write_text(json.dumps(data))
    return path


def test_read_maps_sorted_category_ids_and_converts_boxes(tmp_path: Path) -> None:
    dataset = read_coco(write_json(tmp_path / "ann.json", valid_coco()))
    assert dataset.class_names == ["ant", "bee", "cat"]  # ids 3, 7, 42
    assert [r.image_id for r in dataset.records] == [10, 3, 7]
    a, b, empty = dataset.records
    assert (a.file_name, a.height, a.width) == ("a.png", 40, 80)
    assert a.boxes.dtype == torch.float32 and a.labels.dtype == torch.int64
    assert torch.allclose(a.boxes, torch.tensor([[1.5, 2.25, 11.5, 22.75], [0.0, 0.0, 80.0, 40.0]]))
    assert a.labels.tolist() == [2, 0]
    assert b.file_name == "sub/b.jpg"
    assert torch.allclose(b.boxes, torch.tensor([[59.5, 100.0, 60.5, 120.5]]))  # crowd skipped
    assert b.labels.tolist() == [1]
    assert empty.boxes.shape == (0, 4) and empty.boxes.dtype == torch.float32
    assert empty.labels.shape == (0,) and empty.labels.dtype == torch.int64


def test_images_dir_defaults_and_override(tmp_path: Path) -> None:
    path = write_json(tmp_path / "ann.json", valid_coco())
    assert read_coco(path).images_dir == tmp_path
    (tmp_path / "images").mkdir()
    assert read_coco(path).images_dir == tmp_path / "images"
    assert read_coco(path, images_dir=tmp_path / "elsewhere").images_dir == tmp_path / "elsewhere"


def test_round_trip_coco_internal_coco(tmp_path: Path) -> None:
    original = valid_coco()
    first = read_coco(write_json(tmp_path / "in.json", original))
    entries = [{"file_name": r.file_name, "height": r.height, "width": r.width, "boxes": r.boxes,
                "labels": r.labels, "scores": torch.ones(len(r.labels))} for r in first.records]
    write_coco(tmp_path / "out.json", first.class_names, entries)
    written = json.loads((tmp_path / "out.json").read_text())
    assert [c["name"] for c in written["categories"]] == ["ant", "bee", "cat"]
    assert [c["id"] for c in written["categories"]] == [1, 2, 3]
    assert [i["id"] for i in written["images"]] == [1, 2, 3]

    # Same boxes per (file, class name) as the input, ignoring the crowd region.
    def boxes_by_file(data: dict) -> dict:
        names = {c["id"]: c["name"] for c in data["categories"]}
        files = {i["id"]: i["file_name"] for i in data["images"]}
        out: dict = {}
        for ann in data["annotations"]:
            if ann.get("iscrowd", 0) != 1:
                box = (names[ann["category_id"]], ann["bbox"])
                out.setdefault(files[ann["image_id"]], []).append(box)
        return out

    expected, got = boxes_by_file(original), boxes_by_file(written)
    assert expected.keys() == got.keys()
    for name in expected:
        for (cls_e, box_e), (cls_g, box_g) in zip(expected[name], got[name]):
            assert cls_e == cls_g
            assert max(abs(e - g) for e, g in zip(box_e, box_g)) < 1e-3
    for ann in written["annotations"]:
        assert ann["iscrowd"] == 0
        assert ann["area"] == pytest.approx(ann["bbox"][2] * ann["bbox"][3], abs=1e-3)

    second = read_coco(tmp_path / "out.json")
    for r1, r2 in zip(first.records, second.records):
        assert torch.allclose(r1.boxes, r2.boxes, atol=1e-3) and torch.equal(r1.labels, r2.labels)


def test_round_trip_internal_coco_internal(tmp_path: Path) -> None:
    g = torch.Generator().manual_seed(0)
    entries = []
    for k, (h, w) in enumerate([(37, 91), (120, 45)]):
        xy = torch.rand(5, 2, generator=g) * torch.tensor([w / 2, h / 2])
        wh = torch.rand(5, 2, generator=g) * torch.tensor([w / 2, h / 2]) + 0.1
        labels = torch.randint(0, 2, (5,), generator=g)
        entries.append({"file_name": f"{k}.png", "height": h, "width": w,
                        "boxes": torch.cat([xy, xy + wh], 1), "labels": labels})
    write_coco(tmp_path / "x.json", ["p", "q"], entries)
    dataset = read_coco(tmp_path / "x.json")
    assert dataset.class_names == ["p", "q"]
    for entry, record in zip(entries, dataset.records):
        assert (record.height, record.width) == (entry["height"], entry["width"])
        assert (record.boxes - entry["boxes"]).abs().max() < 1e-3
        assert torch.equal(record.labels, entry["labels"])


def test_write_coco_rejects_mismatched_entry(tmp_path: Path) -> None:
    with pytest.raises(DiodeError) as excinfo:
        write_coco(tmp_path / "x.json", ["a"], [{"file_name": "a.png", "height": 4, "width": 4,
                                                 "boxes": [[0, 0, 1, 1]], "labels": [3]}])
    assert "x.json" in str(excinfo.value)
    assert not (tmp_path / "x.json").exists()


def assert_one_line_error(excinfo: pytest.ExceptionInfo, *needles: str) -> None:
    message = str(excinfo.value)
    assert len(message.splitlines()) == 1, message
    for needle in needles:
        assert needle in message, (needle, message)


def mutate(fn: Callable[[dict], None]) -> dict:
    data = valid_coco()
    fn(data)
    return data


def set_ann(k: int, **fields: Any) -> Callable[[dict], None]:
    return lambda d: d["annotations"][k].update(fields)


def drop(section: str, k: int, key: str) -> Callable[[dict], None]:
    return lambda d: d[section][k].pop(key)


def append(section: str, item: Any) -> Callable[[dict], None]:
    return lambda d: d[section].append(item)


def unnamed_unknown_category(d: dict) -> None:
    d["annotations"][0].pop("id")
    d["annotations"][0]["category_id"] = 1


# case -> (how to break the valid file, substrings the message must contain)
MALFORMED = {
    "missing images": (lambda d: d.pop("images"), ["'images'"]),
    "missing annotations": (lambda d: d.pop("annotations"), ["'annotations'"]),
    "missing categories": (lambda d: d.pop("categories"), ["'categories'"]),
    "images not a list": (lambda d: d.update(images={}), ["'images'"]),
    "unknown category": (set_ann(0, category_id=5), ["annotation id 1", "category id 5"]),
    "unknown image": (set_ann(2, image_id=99), ["annotation id 3", "image id 99"]),
    "bbox three numbers": (set_ann(1, bbox=[1, 2, 3]), ["annotation id 2", "bbox"]),
    "bbox string": (set_ann(1, bbox=[1, 2, "3", 4]), ["annotation id 2", "bbox"]),
    "bbox missing": (drop("annotations", 1, "bbox"), ["annotation id 2", "bbox"]),
    "bbox nan": (set_ann(1, bbox=[1, 2, float("nan"), 4]), ["annotation id 2", "bbox"]),
    "zero width": (set_ann(0, bbox=[1, 1, 0, 5]), ["annotation id 1", "width"]),
    "negative height": (set_ann(0, bbox=[1, 1, 5, -2]), ["annotation id 1", "height"]),
    "box past right edge": (set_ann(0, bbox=[70, 1, 11.5, 5]), ["annotation id 1", "outside"]),
    "box left of image": (set_ann(2, bbox=[-1.5, 1, 5, 5]), ["annotation id 3", "outside"]),
    "duplicate image id": (
        append("images", {"id": 3, "file_name": "c.png", "height": 5, "width": 5}),
        ["duplicate image id 3"],
    ),
    "duplicate category id": (
        append("categories", {"id": 7, "name": "x"}), ["duplicate category id 7"]
    ),
    "image without size": (drop("images", 0, "height"), ["image id 10", "height"]),
    "image zero size": (lambda d: d["images"][0].update(width=0), ["image id 10", "width"]),
    "image without file name": (drop("images", 1, "file_name"), ["image id 3", "file_name"]),
    "category without name": (drop("categories", 0, "name"), ["category id 42", "name"]),
    "annotation not an object": (append("annotations", 5), ["annotations[4]"]),
    "annotation without id": (unnamed_unknown_category, ["annotations[0]", "category id 1"]),
}


@pytest.mark.parametrize("case", sorted(MALFORMED))
def test_malformed_file_raises_one_line_naming_file(tmp_path: Path, case: str) -> None:
    fn, needles = MALFORMED[case]
    path = write_json(tmp_path / "bad_ann.json", mutate(fn))
    with pytest.raises(DiodeError) as excinfo:
        read_coco(path)
    assert_one_line_error(excinfo, "bad_ann.json", *needles)


def test_box_within_one_pixel_tolerance_is_accepted(tmp_path: Path) -> None:
    data = mutate(lambda d: d["annotations"][0].update(bbox=[-0.9, 1, 80.8, 5]))
    dataset = read_coco(write_json(tmp_path / "ann.json", data))
    assert dataset.records[0].boxes[0, 2].item() == pytest.approx(79.9)


def test_top_level_not_object(tmp_path: Path) -> None:
    with pytest.raises(DiodeError) as excinfo:
        read_coco(write_json(tmp_path / "list.json", [1, 2]))
    assert_one_line_error(excinfo, "list.json")


def test_missing_file(tmp_path: Path) -> None:
    with pytest.raises(DiodeError) as excinfo:
        read_coco(tmp_path / "absent.json")
    assert_one_line_error(excinfo, "absent.json", "not found")


def test_invalid_json_reports_line_and_column(tmp_path: Path) -> None:
    (tmp_path / "broken.json").write_text('{\n  "images": [],\n  "annotations": [,]\n}')
    with pytest.raises(DiodeError) as excinfo:
        read_coco(tmp_path / "broken.json")
    assert_one_line_error(excinfo, "broken.json", "line 3", "column 19")


def test_non_utf8_file(tmp_path: Path) -> None:
    (tmp_path / "latin.json").write_bytes(b'{"images": "\xff"}')
    with pytest.raises(DiodeError) as excinfo:
        read_coco(tmp_path / "latin.json")
    assert_one_line_error(excinfo, "latin.json")


def check_only_diode_error(path: Path) -> None:
    try:
        read_coco(path)
    except DiodeError as exc:
        assert path.name in str(exc) and len(str(exc).splitlines()) == 1
    # Any other exception type propagates and fails the test.


FUZZ = settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])


@FUZZ
@given(data=st.binary(max_size=300))
def test_fuzz_random_bytes(tmp_path_factory: pytest.TempPathFactory, data: bytes) -> None:
    path = tmp_path_factory.mktemp("bytes") / "fuzz.json"
    path.write_bytes(data)
    check_only_diode_error(path)


json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=5),
    lambda children: (
        st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=5), children, max_size=4)
    ),
    max_leaves=20,
)


@FUZZ
@given(data=json_values)
def test_fuzz_random_json(tmp_path_factory: pytest.TempPathFactory, data: Any) -> None:
    path = tmp_path_factory.mktemp("json") / "fuzz.json"
    path.write_text(json.dumps(data))
    check_only_diode_error(path)


# Near-valid files: swap one field of the valid file for an arbitrary JSON value, so the fuzzer
# reaches the per-field validation rather than failing at the top level.
FIELD_PATHS = [
    ("images", 0, "id"), ("images", 1, "height"), ("images", 0, "width"),
    ("images", 2, "file_name"), ("annotations", 0, "bbox"), ("annotations", 1, "image_id"),
    ("annotations", 2, "category_id"), ("annotations", 3, "iscrowd"), ("annotations", 0, "id"),
    ("categories", 0, "id"), ("categories", 1, "name"),
    ("images", 0), ("annotations", 1), ("categories", 2),
]
numbers = st.integers(min_value=-(10**30), max_value=10**30) | st.floats() | st.just(10**400)


@FUZZ
@given(
    field=st.sampled_from(FIELD_PATHS),
    value=json_values | numbers | st.lists(numbers, max_size=5),
)
def test_fuzz_near_valid_coco(
    tmp_path_factory: pytest.TempPathFactory, field: tuple, value: Any
) -> None:
    data = copy.deepcopy(valid_coco())
    target = data
    for key in field[:-1]:
        target = target[key]
    target[field[-1]] = value
    path = tmp_path_factory.mktemp("near") / "fuzz.json"
    path.write_text(json.dumps(data))
    check_only_diode_error(path)
