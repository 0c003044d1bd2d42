"""Ultralytics YOLO datasets: read a ``data.yaml`` split into a `DetectionDataset`, write labels.

Layout (as ultralytics defines it): ``data.yaml`` names a root ``path`` and per-split image
sources (a folder searched recursively, a ``.txt`` list of image paths, or a list of either).
The labels of ``.../images/.../x.png`` are in ``.../labels/.../x.txt`` (the last ``images``
folder swapped for ``labels``), one ``class cx cy w h`` line per object with coordinates
normalised to [0, 1]; a missing label file means no objects. Images are sized from their headers
to turn the normalised boxes into pixels.
"""

from __future__ import annotations

import math
import os
from pathlib import Path
from typing import Any, Sequence

import torch
import yaml
from torchvision.ops import box_convert

from diode.data.dataset import (
    DetectionDataset,
    Record,
    brief,
    dataset_error,
    entry_arrays,
    read_image_size,
    read_text,
)
from diode.io import atomic_write_text, atomic_write_yaml

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".webp")
SPLITS = ("train", "val", "test")
# Normalised boxes may overhang [0, 1] by this much (1 px on a 100 px image, as COCO allows);
# `DetectionDataset.load` clips them.
COORD_TOLERANCE = 0.01


def _load_yaml(yaml_path: Path) -> dict:
    text = read_text(yaml_path)
    try:
        data = yaml.safe_load(text)
    except yaml.MarkedYAMLError as exc:
        mark = exc.problem_mark or exc.context_mark
        at = f" at line {mark.line + 1} column {mark.column + 1}" if mark else ""
        raise dataset_error(yaml_path, f"invalid YAML{at}: {exc.problem or exc.context}") from None
    except (yaml.YAMLError, RecursionError) as exc:
        raise dataset_error(yaml_path, f"invalid YAML ({type(exc).__name__})") from None
    if not isinstance(data, dict):
        raise dataset_error(yaml_path, "top level must be a mapping")
    return data


def _class_names(yaml_path: Path, data: dict) -> list[str]:
    """``names`` as a list (from a list or an ``{index: name}`` mapping), checked against ``nc``."""
    names, nc = data.get("names"), data.get("nc")
    if nc is not None and (isinstance(nc, bool) or not isinstance(nc, int) or nc < 0):
        raise dataset_error(yaml_path, f"'nc' must be a non-negative integer, got {brief(nc)}")
    if names is None:
        if nc is None:
            raise dataset_error(yaml_path, "needs 'names' (or at least 'nc')")
        return [f"class{i}" for i in range(nc)]
    if isinstance(names, dict):
        int_keys = all(isinstance(k, int) and not isinstance(k, bool) for k in names)
        if not int_keys or set(names) != set(range(len(names))):
            raise dataset_error(yaml_path, f"'names' keys must be the integers 0..{len(names) - 1}")
        names = [names[i] for i in range(len(names))]
    if not isinstance(names, list):
        raise dataset_error(yaml_path, "'names' must be a list or an {index: name} mapping")
    if nc is not None and nc != len(names):
        raise dataset_error(yaml_path, f"'nc' is {nc} but 'names' lists {len(names)} classes")
    return [str(name) for name in names]


def _split_images(yaml_path: Path, root: Path, split: str, value: Any) -> list[Path]:
    """The image files of one split, folders sorted, ``.txt`` lists in their own order."""
    entries = value if isinstance(value, list) else [value]
    files: list[Path] = []
    for entry in entries:
        if not isinstance(entry, str) or not entry:
            raise dataset_error(yaml_path, f"'{split}' entries must be paths, got {brief(entry)}")
        source = root / entry  # an absolute entry replaces root
        if source.is_dir():
            found = [
                f for f in source.rglob("*")
                if f.suffix.lower() in IMAGE_EXTENSIONS and f.is_file()
            ]
            files += sorted(found, key=lambda f: f.relative_to(source).as_posix())
        elif source.is_file() and source.suffix.lower() == ".txt":
            try:
                lines = source.read_text(encoding="utf-8").splitlines()
            except (OSError, UnicodeDecodeError) as exc:
                raise dataset_error(source, f"cannot read image list ({exc})") from None
            # Relative entries (ultralytics writes "./images/...") are relative to the list.
            files += [source.parent / line.strip() for line in lines if line.strip()]
        elif not source.exists():
            raise dataset_error(yaml_path, f"'{split}' path {source} does not exist")
        else:
            raise dataset_error(
                yaml_path, f"'{split}' path {source} is neither a folder nor a .txt image list"
            )
    if not files:
        raise dataset_error(yaml_path, f"'{split}' split has no images")
    return files


def label_path(image_path: Path) -> Path:
    """Where ultralytics looks for an image's labels: last ``images`` folder -> ``labels``, .txt."""
    parts = list(image_path.parts)
    folders = parts[:-1]
    if "images" in folders:
        last = len(folders) - 1 - folders[::-1].index("images")
        parts[last] = "labels"
    return Path(*parts).with_suffix(".txt")


def _read_labels(
    label_file: Path, num_classes: int, height: int, width: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(boxes float32 [N, 4] xyxy pixels, labels int64 [N])`` of one label file."""
    try:
        text = label_file.read_text(encoding="utf-8")
    except FileNotFoundError:
        text = ""  # ultralytics convention: no label file, no objects
    except UnicodeDecodeError as exc:
        raise dataset_error(label_file, f"not UTF-8 text (byte {exc.start})") from None
    except OSError as exc:
        raise dataset_error(label_file, f"cannot read ({exc.strerror or exc})") from None
    rows: list[list[float]] = []
    labels: list[int] = []
    for lineno, line in enumerate(text.splitlines(), start=1):
        fields = line.split()
        if not fields:
            continue
        where = f"line {lineno}"
        if len(fields) != 5:
            raise dataset_error(
                label_file, f"{where}: expected 5 numbers 'class cx cy w h', got {len(fields)}"
            )
        try:
            numbers = [float(field) for field in fields]
        except ValueError:
            raise dataset_error(label_file, f"{where}: not all fields are numbers") from None
        if not all(math.isfinite(n) for n in numbers):
            raise dataset_error(label_file, f"{where}: fields must be finite numbers")
        cls, cx, cy, w, h = numbers
        if not cls.is_integer() or not 0 <= cls < num_classes:
            raise dataset_error(
                label_file,
                f"{where}: class {brief(fields[0])} is not an integer in 0..{num_classes - 1}",
            )
        if w <= 0 or h <= 0:
            raise dataset_error(label_file, f"{where}: box width and height must be positive")
        lo, hi = -COORD_TOLERANCE, 1 + COORD_TOLERANCE
        if cx - w / 2 < lo or cy - h / 2 < lo or cx + w / 2 > hi or cy + h / 2 > hi:
            raise dataset_error(label_file, f"{where}: box lies outside the [0, 1] image")
        rows.append([cx, cy, w, h])
        labels.append(int(cls))
    cxcywh = torch.tensor(rows, dtype=torch.float64).reshape(-1, 4)
    scale = torch.tensor([width, height, width, height], dtype=torch.float64)
    boxes = box_convert(cxcywh, "cxcywh", "xyxy") * scale
    return boxes.to(torch.float32), torch.tensor(labels, dtype=torch.int64)


def read_yolo(yaml_path: str | Path, split: str = "train") -> DetectionDataset:
    """Read one split (train/val/test) of an ultralytics ``data.yaml`` dataset.

    ``path`` in the yaml is the dataset root, relative to the yaml's folder (default: that
    folder). ``images_dir`` of the result is the deepest folder holding all the split's images.
    """
    yaml_path = Path(yaml_path)
    if split not in SPLITS:
        raise dataset_error(yaml_path, f"unknown split {split!r}; choose one of {list(SPLITS)}")
    data = _load_yaml(yaml_path)
    class_names = _class_names(yaml_path, data)
    root_value = data.get("path", ".")
    if root_value is None:
        root_value = "."
    if not isinstance(root_value, str):
        raise dataset_error(yaml_path, f"'path' must be a folder path, got {brief(root_value)}")
    root = yaml_path.parent.absolute() / root_value
    if data.get(split) is None:
        raise dataset_error(yaml_path, f"no '{split}' split")
    files = _split_images(yaml_path, root, split, data[split])
    images_dir = Path(os.path.commonpath([f.parent for f in files]))

    records = []
    for image_id, image_file in enumerate(files, start=1):
        height, width = read_image_size(image_file)
        boxes, labels = _read_labels(label_path(image_file), len(class_names), height, width)
        records.append(
            Record(
                file_name=image_file.relative_to(images_dir).as_posix(),
                height=height,
                width=width,
                boxes=boxes,
                labels=labels,
                image_id=image_id,
            )
        )
    return DetectionDataset(
        images_dir=images_dir, class_names=class_names, records=records, source=str(yaml_path)
    )


def write_yolo_labels(labels_dir: str | Path, entries: Sequence[dict]) -> None:
    """Write one label file per entry, ``labels_dir/<stem of file_name>.txt``, each atomically.

    entries: dicts with ``file_name``, ``height``, ``width``, ``boxes`` (float ``[N, 4]`` xyxy
    pixels) and ``labels`` (int ``[N]``); ``scores`` are ignored. Lines are ``class cx cy w h``
    normalised to 6 decimals; an image without objects gets an empty file. Two entries with the
    same stem would overwrite each other, so that raises `DiodeError`.
    """
    labels_dir = Path(labels_dir)
    stems: set[str] = set()
    for entry in entries:
        stem = Path(entry["file_name"]).stem
        if stem in stems:
            raise dataset_error(labels_dir, f"two images share the label file name {stem}.txt")
        stems.add(stem)
        out = labels_dir / f"{stem}.txt"
        boxes, labels = entry_arrays(out, entry)
        width, height = float(entry["width"]), float(entry["height"])
        cxcywh = box_convert(torch.from_numpy(boxes), "xyxy", "cxcywh")
        cxcywh = cxcywh / torch.tensor([width, height, width, height], dtype=torch.float64)
        lines = [
            f"{label} {cx:.6f} {cy:.6f} {w:.6f} {h:.6f}"
            for label, (cx, cy, w, h) in zip(labels.tolist(), cxcywh.tolist())
        ]
        atomic_write_text(out, "".join(line + "\n" for line in lines))


def write_data_yaml(
    path: str | Path, root: str | Path, splits: dict[str, str], class_names: Sequence[str]
) -> None:
    """Write an ultralytics ``data.yaml`` atomically.

    A relative ``root`` is taken relative to the yaml's folder, as `read_yolo` reads it, and
    written as given (``"."`` keeps the dataset movable); an absolute ``root`` is written as
    ``.`` when it is the yaml's own folder, else as is. ``splits`` maps train/val/test to image
    folders or lists, relative to ``root``.
    """
    path = Path(path)
    unknown = sorted(set(splits) - set(SPLITS))
    if unknown:
        raise dataset_error(path, f"unknown split keys {unknown}; use {list(SPLITS)}")
    root = Path(root)
    if root.is_absolute() and root.resolve() == path.parent.resolve():
        root = Path(".")
    data: dict[str, Any] = {"path": root.as_posix()}
    data.update({key: str(value) for key, value in splits.items()})
    data["nc"] = len(class_names)
    data["names"] = [str(name) for name in class_names]
    atomic_write_yaml(path, data)
