"""YOLO reader/writers: data.yaml layouts, label validation, round trips, fuzzing label lines."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from PIL import Image

from diode.data import read_yolo, write_data_yaml, write_yolo_labels
from diode.data.yolo import label_path
from diode.errors import DiodeError


def make_image(path: Path, size_hw: tuple[int, int]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fmt = "JPEG" if path.suffix.lower() in (".jpg", ".jpeg") else "PNG"
    Image.new("RGB", (size_hw[1], size_hw[0]), (10, 20, 30)).save(path, format=fmt)


def write_labels(path: Path, text: str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    return path


def write_yaml(path: Path, data: dict) -> Path:
    path.write_text(yaml.safe_dump(data))
    return path


def assert_one_line_error(excinfo: pytest.ExceptionInfo, *needles: str) -> None:
    message = str(excinfo.value)
    assert len(message.splitlines()) == 1, message
    for needle in needles:
        assert needle in message, (needle, message)


A_LABELS = "0 0.500000 0.500000 0.250000 0.500000\n2 0.100000 0.900000 0.200000 0.200000\n"


@pytest.fixture
def yolo_root(tmp_path: Path) -> Path:
    """Non-square images of mixed sizes in train (one unlabelled, one in a subfolder) and val."""
    make_image(tmp_path / "images" / "train" / "a.png", (40, 80))
    write_labels(tmp_path / "labels" / "train" / "a.txt", A_LABELS)
    make_image(tmp_path / "images" / "train" / "sub" / "b.JPG", (120, 60))
    write_labels(tmp_path / "labels" / "train" / "sub" / "b.txt", "1 0.5 0.25 1.0 0.5\n\n")
    make_image(tmp_path / "images" / "train" / "c.png", (30, 30))  # no label file: no objects
    (tmp_path / "images" / "train" / "notes.md").write_text("not an image")
    make_image(tmp_path / "images" / "val" / "v.png", (20, 10))
    write_yaml(tmp_path / "data.yaml", {"path": ".", "train": "images/train", "val": "images/val",
                                        "names": {0: "ant", 1: "bee", 2: "cat"}})
    return tmp_path


def test_read_train_split(yolo_root: Path) -> None:
    dataset = read_yolo(yolo_root / "data.yaml")
    assert dataset.class_names == ["ant", "bee", "cat"]
    assert dataset.images_dir == yolo_root / "images" / "train"
    assert [r.file_name for r in dataset.records] == ["a.png", "c.png", "sub/b.JPG"]
    a, c, b = dataset.records
    assert (a.height, a.width, b.height, b.width) == (40, 80, 120, 60)
    expected = torch.tensor([[30.0, 10.0, 50.0, 30.0], [0.0, 32.0, 16.0, 40.0]])
    assert torch.allclose(a.boxes, expected, atol=1e-4)
    assert a.labels.tolist() == [0, 2] and a.labels.dtype == torch.int64
    assert torch.allclose(b.boxes, torch.tensor([[0.0, 0.0, 60.0, 60.0]]), atol=1e-4)
    assert c.boxes.shape == (0, 4) and c.boxes.dtype == torch.float32 and c.labels.shape == (0,)
    assert len({r.image_id for r in dataset.records}) == 3
    image, target = dataset.load(0, (64, 64))  # 40x80 -> scale 0.8, pad_y 16
    assert image.shape == (3, 64, 64)
    assert torch.allclose(target["boxes"][0], torch.tensor([24.0, 24.0, 40.0, 40.0]), atol=1e-4)


def test_read_val_split_and_unknown_split(yolo_root: Path) -> None:
    dataset = read_yolo(yolo_root / "data.yaml", "val")
    assert [r.file_name for r in dataset.records] == ["v.png"]
    with pytest.raises(DiodeError) as excinfo:
        read_yolo(yolo_root / "data.yaml", "test")
    assert_one_line_error(excinfo, "data.yaml", "test")
    with pytest.raises(DiodeError) as excinfo:
        read_yolo(yolo_root / "data.yaml", "training")
    assert_one_line_error(excinfo, "data.yaml", "training")


def test_root_defaults_to_yaml_folder_and_relative_path(tmp_path: Path) -> None:
    make_image(tmp_path / "ds" / "images" / "x.png", (10, 10))
    write_yaml(tmp_path / "ds" / "data.yaml", {"train": "images", "names": ["a"]})
    assert len(read_yolo(tmp_path / "ds" / "data.yaml")) == 1
    write_yaml(tmp_path / "cfg.yaml", {"path": "ds", "train": "images", "names": ["a"]})
    assert len(read_yolo(tmp_path / "cfg.yaml")) == 1


def test_txt_list_and_list_of_folders(yolo_root: Path) -> None:
    (yolo_root / "train.txt").write_text("./images/train/a.png\nimages/val/v.png\n\n")
    write_yaml(yolo_root / "list.yaml", {"train": "train.txt",
                                         "val": ["images/train/sub", "images/val"],
                                         "names": ["ant", "bee", "cat"]})
    train = read_yolo(yolo_root / "list.yaml")
    assert train.images_dir == yolo_root / "images"
    assert [r.file_name for r in train.records] == ["train/a.png", "val/v.png"]
    assert train.records[0].labels.tolist() == [0, 2]
    val = read_yolo(yolo_root / "list.yaml", "val")
    assert [r.file_name for r in val.records] == ["train/sub/b.JPG", "val/v.png"]
    assert val.read_image(0).shape == (3, 120, 60)


def test_label_path_replaces_last_images_folder() -> None:
    assert label_path(Path("/d/images/set/images/x.png")) == Path("/d/images/set/labels/x.txt")
    assert label_path(Path("/d/images/train/x.jpeg")) == Path("/d/labels/train/x.txt")
    assert label_path(Path("/d/pics/x.png")) == Path("/d/pics/x.txt")


def entries_of(dataset) -> list[dict]:
    return [{"file_name": r.file_name, "height": r.height, "width": r.width, "boxes": r.boxes,
             "labels": r.labels, "scores": torch.ones(len(r.labels))} for r in dataset.records]


def parse_label_text(text: str) -> list[list[float]]:
    return [[float(v) for v in line.split()] for line in text.splitlines() if line.strip()]


def test_round_trip_yolo_internal_yolo(tmp_path: Path) -> None:
    lines = ("0 0.123456 0.654321 0.200000 0.300000\n"
             "1 0.999000 0.500000 0.002000 0.999999\n"
             "0 0.000500 0.000500 0.001000 0.001000\n")
    make_image(tmp_path / "images" / "odd.png", (37, 91))
    write_labels(tmp_path / "labels" / "odd.txt", lines)
    write_yaml(tmp_path / "data.yaml", {"train": "images", "names": ["p", "q"]})
    dataset = read_yolo(tmp_path / "data.yaml")
    write_yolo_labels(tmp_path / "out", entries_of(dataset))
    got = parse_label_text((tmp_path / "out" / "odd.txt").read_text())
    expected = parse_label_text(lines)
    assert len(got) == len(expected)
    for row_g, row_e in zip(got, expected):
        assert row_g[0] == row_e[0]
        assert max(abs(g - e) for g, e in zip(row_g[1:], row_e[1:])) <= 1e-5


def test_round_trip_internal_yolo_internal(tmp_path: Path) -> None:
    g = torch.Generator().manual_seed(1)
    sizes = {"a.png": (37, 91), "b.png": (120, 45), "e.png": (8, 8)}
    entries = []
    for name, (h, w) in sizes.items():
        n = 0 if name == "e.png" else 6
        xy = torch.rand(n, 2, generator=g) * torch.tensor([w / 2, h / 2])
        wh = torch.rand(n, 2, generator=g) * torch.tensor([w / 2, h / 2]) + 0.5
        labels = torch.randint(0, 3, (n,), generator=g)
        entries.append({"file_name": name, "height": h, "width": w,
                        "boxes": torch.cat([xy, xy + wh], 1), "labels": labels})
        make_image(tmp_path / "images" / "train" / name, (h, w))
    write_yolo_labels(tmp_path / "labels" / "train", entries)
    assert (tmp_path / "labels" / "train" / "e.txt").read_text() == ""
    write_data_yaml(tmp_path / "data.yaml", tmp_path, {"train": "images/train"}, ["x", "y", "z"])
    dataset = read_yolo(tmp_path / "data.yaml")
    assert dataset.class_names == ["x", "y", "z"]
    for entry, record in zip(entries, dataset.records):
        assert record.file_name == entry["file_name"]
        # 6 decimals of a normalised coordinate is at most 5e-7 * side pixels off.
        assert record.boxes.shape == entry["boxes"].shape
        assert torch.allclose(record.boxes, entry["boxes"], rtol=0, atol=1e-3)
        assert torch.equal(record.labels, entry["labels"])


def test_write_yolo_labels_rejects_clashing_stems(tmp_path: Path) -> None:
    entry = {"height": 4, "width": 4, "boxes": torch.zeros(0, 4), "labels": torch.zeros(0)}
    with pytest.raises(DiodeError):
        write_yolo_labels(tmp_path, [{"file_name": "a/x.png", **entry},
                                     {"file_name": "b/x.jpg", **entry}])


def test_write_data_yaml_contents(tmp_path: Path) -> None:
    splits = {"train": "train/images", "val": "val/images"}
    write_data_yaml(tmp_path / "data.yaml", tmp_path, splits, ["a", "b"])
    data = yaml.safe_load((tmp_path / "data.yaml").read_text())
    assert data == {"path": ".", **splits, "nc": 2, "names": ["a", "b"]}
    write_data_yaml(tmp_path / "sub" / "data.yaml", tmp_path, {"train": "train/images"}, ["a"])
    sub_data = yaml.safe_load((tmp_path / "sub" / "data.yaml").read_text())
    assert sub_data["path"] == str(tmp_path.resolve())
    with pytest.raises(DiodeError):
        write_data_yaml(tmp_path / "bad.yaml", ".", {"training": "x"}, ["a"])


BAD_LINES = {
    "four fields": ("0 0.5 0.5 0.1\n", "line 1"),
    "six fields": ("0 0.5 0.5 0.1 0.1\n0 0.5 0.5 0.1 0.1 0.9\n", "line 2"),
    "not a number": ("\n0 0.5 abc 0.1 0.1\n", "line 2"),
    "class out of range": ("3 0.5 0.5 0.1 0.1\n", "line 1"),
    "negative class": ("-1 0.5 0.5 0.1 0.1\n", "line 1"),
    "fractional class": ("1.5 0.5 0.5 0.1 0.1\n", "line 1"),
    "nan": ("0 nan 0.5 0.1 0.1\n", "line 1"),
    "centre outside": ("0 1.2 0.5 0.1 0.1\n", "line 1"),
    "box past edge": ("0 0.95 0.5 0.2 0.1\n", "line 1"),
    "zero width": ("0 0.5 0.5 0 0.1\n", "line 1"),
    "pixel coordinates": ("0 320 240 50 60\n", "line 1"),
}


@pytest.mark.parametrize("case", sorted(BAD_LINES))
def test_bad_label_line_names_file_and_line(yolo_root: Path, case: str) -> None:
    text, needle = BAD_LINES[case]
    write_labels(yolo_root / "labels" / "train" / "a.txt", text)
    with pytest.raises(DiodeError) as excinfo:
        read_yolo(yolo_root / "data.yaml")
    assert_one_line_error(excinfo, str(yolo_root / "labels" / "train" / "a.txt"), needle)


def test_label_coordinates_within_tolerance_are_accepted(yolo_root: Path) -> None:
    text = "0 0.5 0.5 1.005 1.0\n1.0 0.5 0.5 0.1 0.1\n"
    write_labels(yolo_root / "labels" / "train" / "a.txt", text)
    assert read_yolo(yolo_root / "data.yaml").records[0].labels.tolist() == [0, 1]


def test_non_utf8_label_file(yolo_root: Path) -> None:
    (yolo_root / "labels" / "train" / "a.txt").write_bytes(b"0 0.5 0.5 0.1 0.1\xff\n")
    with pytest.raises(DiodeError) as excinfo:
        read_yolo(yolo_root / "data.yaml")
    assert_one_line_error(excinfo, "a.txt")


def test_corrupt_image_header(yolo_root: Path) -> None:
    (yolo_root / "images" / "train" / "c.png").write_bytes(b"garbage")
    with pytest.raises(DiodeError) as excinfo:
        read_yolo(yolo_root / "data.yaml")
    assert_one_line_error(excinfo, "c.png")


BAD_YAML = {
    "names wrong length": ({"train": "images/train", "names": ["a", "b", "c"], "nc": 2}, "nc"),
    "names dict gap": ({"train": "images/train", "names": {0: "a", 2: "c"}}, "names"),
    "names scalar": ({"train": "images/train", "names": "abc"}, "names"),
    "no names": ({"train": "images/train"}, "names"),
    "missing folder": ({"train": "images/nope", "names": ["a", "b", "c"]}, "images/nope"),
    "empty folder": ({"train": "empty", "names": ["a", "b", "c"]}, "no images"),
    "no train split": ({"val": "images/val", "names": ["a", "b", "c"]}, "train"),
    "split not a path": ({"train": 5, "names": ["a", "b", "c"]}, "train"),
    "path not a string": ({"path": [1], "train": "images/train", "names": ["a"]}, "path"),
}


@pytest.mark.parametrize("case", sorted(BAD_YAML))
def test_bad_data_yaml(yolo_root: Path, case: str) -> None:
    (yolo_root / "empty").mkdir(exist_ok=True)
    data, needle = BAD_YAML[case]
    write_yaml(yolo_root / "bad.yaml", data)
    with pytest.raises(DiodeError) as excinfo:
        read_yolo(yolo_root / "bad.yaml")
    assert_one_line_error(excinfo, "bad.yaml", needle)


def test_nc_without_names_generates_names(yolo_root: Path) -> None:
    write_yaml(yolo_root / "nc.yaml", {"train": "images/train", "nc": 3})
    assert read_yolo(yolo_root / "nc.yaml").class_names == ["class0", "class1", "class2"]


def test_invalid_yaml_syntax_and_missing_file(tmp_path: Path) -> None:
    (tmp_path / "broken.yaml").write_text("train: images\nnames: [a, b\n")
    with pytest.raises(DiodeError) as excinfo:
        read_yolo(tmp_path / "broken.yaml")
    assert_one_line_error(excinfo, "broken.yaml", "line")
    (tmp_path / "scalar.yaml").write_text("just text\n")
    with pytest.raises(DiodeError) as excinfo:
        read_yolo(tmp_path / "scalar.yaml")
    assert_one_line_error(excinfo, "scalar.yaml")
    with pytest.raises(DiodeError) as excinfo:
        read_yolo(tmp_path / "absent.yaml")
    assert_one_line_error(excinfo, "absent.yaml")


number_text = st.one_of(
    st.floats(allow_nan=True, allow_infinity=True).map(repr),
    st.integers(-5, 5).map(str),
    st.sampled_from(["0.5", "1", "0", "1e-3", "1e400", "-0", "nan", "inf", "0x1", "1_0", ".", ""]),
    st.text(max_size=4),
)
label_line = st.lists(number_text, max_size=7).map(" ".join)


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    lines=st.lists(label_line | st.text(max_size=30), max_size=6),
    newline=st.sampled_from(["\n", "\r\n", "\r"]),
)
def test_fuzz_label_lines(
    tmp_path_factory: pytest.TempPathFactory, lines: list[str], newline: str
) -> None:
    root = tmp_path_factory.mktemp("fuzz")
    make_image(root / "images" / "x.png", (12, 20))
    label_file = root / "labels" / "x.txt"
    label_file.parent.mkdir(parents=True)
    label_file.write_bytes(newline.join(lines).encode("utf-8", "surrogatepass"))
    write_yaml(root / "data.yaml", {"train": "images", "names": ["a", "b", "c"]})
    try:
        dataset = read_yolo(root / "data.yaml")
    except DiodeError as exc:
        assert "x.txt" in str(exc) and len(str(exc).splitlines()) == 1
        return
    record = dataset.records[0]
    assert record.boxes.shape == (len(record.labels), 4)
    assert bool(((record.labels >= 0) & (record.labels < 3)).all())
    assert bool(torch.isfinite(record.boxes).all())
