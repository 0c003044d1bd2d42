"""Image decoding, letterboxing, `DetectionDataset.load` and `open_dataset` dispatch."""

from __future__ import annotations

import io
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from PIL import Image

from diode.data import (
    DetectionDataset,
    Record,
    letterbox,
    letterbox_boxes,
    open_dataset,
    write_coco,
    write_data_yaml,
    write_yolo_labels,
)
from diode.errors import DiodeError


def assert_one_line_error(excinfo: pytest.ExceptionInfo, name: str) -> None:
    assert_one_line(str(excinfo.value), name)


def assert_one_line(message: str, name: str) -> None:
    assert name in message
    assert len(message.splitlines()) == 1, message


def save_image(path: Path, mode: str, size_hw: tuple[int, int], fmt: str = "PNG") -> Image.Image:
    """A solid image of mode ``mode`` whose RGB rendering is (100, 100, 100)-ish grey or red."""
    h, w = size_hw
    if mode == "RGB":
        img = Image.new("RGB", (w, h), (200, 30, 60))
    elif mode == "RGBA":
        img = Image.new("RGBA", (w, h), (200, 30, 60, 128))
    elif mode == "L":
        img = Image.new("L", (w, h), 100)
    elif mode == "LA":
        img = Image.new("LA", (w, h), (100, 255))
    elif mode == "P":
        img = Image.new("RGB", (w, h), (200, 30, 60)).quantize(colors=4)
    elif mode == "I;16":
        img = Image.fromarray(np.full((h, w), 100 * 257, dtype=np.uint16))
    else:
        raise AssertionError(mode)
    path.parent.mkdir(parents=True, exist_ok=True)
    img.save(path, format=fmt)
    return img


def one_image_dataset(tmp_path: Path, file_name: str, height: int, width: int,
                      boxes: list[list[float]] | None = None) -> DetectionDataset:
    boxes_t = torch.tensor(boxes or [], dtype=torch.float32).reshape(-1, 4)
    labels = torch.zeros(len(boxes_t), dtype=torch.int64)
    record = Record(file_name, height, width, boxes_t, labels, image_id=1)
    return DetectionDataset(tmp_path, ["thing"], [record], source=str(tmp_path))


EXPECTED_RGB = {"RGB": (200, 30, 60), "RGBA": (200, 30, 60), "P": (200, 30, 60),
                "L": (100, 100, 100), "LA": (100, 100, 100), "I;16": (100, 100, 100)}


@pytest.mark.parametrize("mode", ["RGB", "RGBA", "L", "LA", "P", "I;16"])
def test_png_modes_load_as_uint8_rgb(tmp_path: Path, mode: str) -> None:
    save_image(tmp_path / "x.png", mode, (5, 7))
    image = one_image_dataset(tmp_path, "x.png", 5, 7).read_image(0)
    assert image.dtype == torch.uint8 and image.shape == (3, 5, 7)
    assert image[:, 2, 3].tolist() == list(EXPECTED_RGB[mode])


def test_palette_png_with_transparency(tmp_path: Path) -> None:
    img = Image.new("RGB", (4, 3), (10, 20, 30)).quantize(colors=2)
    img.save(tmp_path / "x.png", transparency=0)
    image = one_image_dataset(tmp_path, "x.png", 3, 4).read_image(0)
    assert image.shape == (3, 3, 4) and image.dtype == torch.uint8


@pytest.mark.parametrize("mode", ["RGB", "L"])
def test_jpeg_loads_as_uint8_rgb(tmp_path: Path, mode: str) -> None:
    save_image(tmp_path / "x.jpg", mode, (16, 24), fmt="JPEG")
    image = one_image_dataset(tmp_path, "x.jpg", 16, 24).read_image(0)
    assert image.dtype == torch.uint8 and image.shape == (3, 16, 24)
    expected = torch.tensor(EXPECTED_RGB[mode], dtype=torch.float32)
    assert (image[:, 8, 12].float() - expected).abs().max() <= 4  # JPEG is lossy


def test_missing_image_raises(tmp_path: Path) -> None:
    with pytest.raises(DiodeError) as excinfo:
        one_image_dataset(tmp_path, "nope.png", 4, 4).read_image(0)
    assert_one_line_error(excinfo, "nope.png")


@pytest.mark.parametrize("fmt,suffix", [("PNG", "png"), ("JPEG", "jpg")])
def test_truncated_image_raises(tmp_path: Path, fmt: str, suffix: str) -> None:
    rng = np.random.default_rng(0)
    noise = rng.integers(0, 255, (64, 64, 3), dtype=np.uint8)
    Image.fromarray(noise).save(tmp_path / f"x.{suffix}", format=fmt)
    data = (tmp_path / f"x.{suffix}").read_bytes()
    (tmp_path / f"x.{suffix}").write_bytes(data[: len(data) // 2])
    with pytest.raises(DiodeError) as excinfo:
        one_image_dataset(tmp_path, f"x.{suffix}", 64, 64).read_image(0)
    assert_one_line_error(excinfo, f"x.{suffix}")


def test_garbage_image_raises(tmp_path: Path) -> None:
    (tmp_path / "x.png").write_bytes(b"definitely not a png\n\x00\x01")
    with pytest.raises(DiodeError) as excinfo:
        one_image_dataset(tmp_path, "x.png", 4, 4).read_image(0)
    assert_one_line_error(excinfo, "x.png")


def test_letterbox_wide_image() -> None:
    image = torch.full((3, 50, 100), 7, dtype=torch.uint8)  # H=50, W=100
    out, scale, (pad_x, pad_y) = letterbox(image, (64, 64))
    assert out.shape == (3, 64, 64) and out.dtype == torch.uint8
    assert scale == pytest.approx(0.64) and (pad_x, pad_y) == (0.0, 16.0)
    assert (out[:, :16] == 114).all() and (out[:, 48:] == 114).all()
    assert (out[:, 16:48] == 7).all()


def test_letterbox_tall_image_into_non_square_size() -> None:
    image = torch.full((3, 90, 30), 200, dtype=torch.uint8)
    out, scale, (pad_x, pad_y) = letterbox(image, (45, 60), fill=0)
    assert out.shape == (3, 45, 60)
    assert scale == pytest.approx(0.5) and (pad_x, pad_y) == (22.0, 0.0)
    assert (out[:, :, 22:37] == 200).all()
    assert (out[:, :, :22] == 0).all() and (out[:, :, 37:] == 0).all()


def test_letterbox_same_size_is_identity() -> None:
    image = torch.randint(0, 256, (3, 20, 30), dtype=torch.uint8)
    out, scale, pad = letterbox(image, (20, 30))
    assert torch.equal(out, image) and scale == 1.0 and pad == (0.0, 0.0)


def test_letterbox_boxes_formula() -> None:
    boxes = torch.tensor([[10.0, 5.0, 30.0, 25.0]])
    mapped = letterbox_boxes(boxes, 0.64, (0.0, 16.0))
    assert torch.allclose(mapped, torch.tensor([[6.4, 16 + 3.2, 19.2, 16 + 16.0]]))


def draw_scene(path: Path, size_hw: tuple[int, int], box: tuple[int, int, int, int]) -> None:
    """Grey image with a pure red rectangle covering pixels [x1, x2) x [y1, y2)."""
    h, w = size_hw
    array = np.full((h, w, 3), 90, dtype=np.uint8)
    x1, y1, x2, y2 = box
    array[y1:y2, x1:x2] = (255, 0, 0)
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(array).save(path)


def test_load_mixed_sizes_maps_boxes_onto_content(tmp_path: Path) -> None:
    scenes = [("a.png", (40, 80), (20, 10, 60, 30)), ("sub/b.png", (120, 60), (6, 60, 30, 108))]
    entries = []
    for name, size, box in scenes:
        draw_scene(tmp_path / "images" / name, size, box)
        entries.append({"file_name": name, "height": size[0], "width": size[1],
                        "boxes": torch.tensor([box], dtype=torch.float32), "labels": [0]})
    write_coco(tmp_path / "annotations.json", ["red"], entries)
    dataset = open_dataset(tmp_path)
    image_size = (64, 96)
    images, targets = dataset.load_all(image_size)
    assert images.shape == (2, 3, 64, 96) and images.dtype == torch.uint8

    # a.png 40x80 -> scale min(64/40, 96/80) = 1.2, content 48x96, pad_y 8.
    assert torch.allclose(targets[0]["boxes"], torch.tensor([[24.0, 20.0, 72.0, 44.0]]), atol=1e-4)
    # b.png 120x60 -> scale 64/120, content 64x32, pad_x 32.
    s = 64 / 120
    expected_b = torch.tensor([[32 + 6 * s, 60 * s, 32 + 30 * s, 108 * s]])
    assert torch.allclose(targets[1]["boxes"], expected_b, atol=1e-4)
    for image, target in zip(images, targets):
        x1, y1, x2, y2 = target["boxes"][0].tolist()
        inside = image[:, round(y1) + 1 : round(y2) - 1, round(x1) + 1 : round(x2) - 1]
        assert inside[0].min() >= 240 and inside[1].max() <= 15  # red under the mapped box
        assert target["labels"].tolist() == [0] and target["labels"].dtype == torch.int64


def test_load_scales_boxes_when_real_size_differs(tmp_path: Path) -> None:
    draw_scene(tmp_path / "x.png", (50, 50), (10, 10, 20, 30))
    # Annotated at 100x100 (declared), stored at 50x50: boxes halve.
    dataset = one_image_dataset(tmp_path, "x.png", 100, 100, [[20.0, 20.0, 40.0, 60.0]])
    _, target = dataset.load(0, (50, 50))
    assert torch.allclose(target["boxes"], torch.tensor([[10.0, 10.0, 20.0, 30.0]]))


def test_load_clips_overhanging_boxes_and_handles_empty(tmp_path: Path) -> None:
    draw_scene(tmp_path / "x.png", (20, 20), (0, 0, 1, 1))
    dataset = one_image_dataset(tmp_path, "x.png", 20, 20, [[-0.5, 2.0, 20.8, 10.0]])
    _, target = dataset.load(0, (20, 20))
    assert torch.allclose(target["boxes"], torch.tensor([[0.0, 2.0, 20.0, 10.0]]))
    empty = one_image_dataset(tmp_path, "x.png", 20, 20)
    image, target = empty.load(0, (10, 10))
    assert image.shape == (3, 10, 10)
    assert target["boxes"].shape == (0, 4) and target["labels"].shape == (0,)


TINY_ENTRY = {"file_name": "a.png", "height": 10, "width": 12, "boxes": [[1, 1, 5, 5]],
              "labels": [0]}


def write_tiny_coco(folder: Path) -> None:
    draw_scene(folder / "images" / "a.png", (10, 12), (1, 1, 5, 5))
    write_coco(folder / "annotations.json", ["red"], [TINY_ENTRY])


def write_tiny_yolo(folder: Path) -> None:
    draw_scene(folder / "train" / "images" / "a.png", (10, 12), (1, 1, 5, 5))
    write_yolo_labels(folder / "train" / "labels", [TINY_ENTRY])
    write_data_yaml(folder / "data.yaml", ".", {"train": "train/images"}, ["red"])


def test_open_dataset_dispatch(tmp_path: Path) -> None:
    write_tiny_coco(tmp_path / "coco")
    write_tiny_yolo(tmp_path / "yolo")
    for spec in [tmp_path / "coco", tmp_path / "coco" / "annotations.json",
                 str(tmp_path / "yolo"), tmp_path / "yolo" / "data.yaml"]:
        dataset = open_dataset(spec)
        assert dataset.source == str(spec)
        assert dataset.class_names == ["red"] and len(dataset) == 1
        expected = torch.tensor([[1.0, 1.0, 5.0, 5.0]])
        assert torch.allclose(dataset.records[0].boxes, expected, atol=1e-4)
        assert dataset.read_image(0).shape == (3, 10, 12)


def test_open_dataset_json_without_images_folder_uses_json_folder(tmp_path: Path) -> None:
    draw_scene(tmp_path / "a.png", (10, 12), (1, 1, 5, 5))
    write_coco(tmp_path / "labels.json", ["red"], [TINY_ENTRY])
    dataset = open_dataset(tmp_path / "labels.json")
    assert dataset.images_dir == tmp_path
    assert dataset.read_image(0).shape == (3, 10, 12)


@pytest.mark.parametrize("make", ["missing", "empty_dir", "txt_file"])
def test_open_dataset_rejects_non_datasets(tmp_path: Path, make: str) -> None:
    spec = tmp_path / "thing"
    if make == "empty_dir":
        spec.mkdir()
    elif make == "txt_file":
        spec = tmp_path / "thing.txt"
        spec.write_text("hello")
    with pytest.raises(DiodeError) as excinfo:
        open_dataset(spec)
    assert_one_line_error(excinfo, spec.name)


def test_open_dataset_passes_split(tmp_path: Path) -> None:
    write_tiny_yolo(tmp_path)
    with pytest.raises(DiodeError) as excinfo:
        open_dataset(tmp_path, split="val")
    assert_one_line_error(excinfo, "data.yaml")
    assert "val" in str(excinfo.value)


def test_coco_json_is_plain(tmp_path: Path) -> None:
    write_tiny_coco(tmp_path)
    data = json.loads((tmp_path / "annotations.json").read_text())
    assert data["annotations"][0]["bbox"] == [1.0, 1.0, 4.0, 4.0]


def png_bytes() -> bytes:
    buf = io.BytesIO()
    noise = np.random.default_rng(1).integers(0, 255, (16, 16, 3), dtype=np.uint8)
    Image.fromarray(noise).save(buf, format="PNG")
    return buf.getvalue()


PNG = png_bytes()


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    cut=st.integers(0, len(PNG)),
    flips=st.lists(st.tuples(st.integers(0, len(PNG) - 1), st.integers(1, 255)), max_size=4),
)
def test_fuzz_damaged_png(
    tmp_path_factory: pytest.TempPathFactory, cut: int, flips: list[tuple[int, int]]
) -> None:
    """A truncated or bit-flipped PNG decodes or raises DiodeError, nothing else."""
    data = bytearray(PNG)
    for index, xor in flips:
        data[index] ^= xor
    folder = tmp_path_factory.mktemp("png")
    (folder / "x.png").write_bytes(bytes(data[:cut]))
    try:
        image = one_image_dataset(folder, "x.png", 16, 16).read_image(0)
    except DiodeError as exc:
        assert_one_line(str(exc), "x.png")
        return
    assert image.dtype == torch.uint8 and image.shape[0] == 3
