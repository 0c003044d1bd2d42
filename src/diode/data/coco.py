"""COCO detection annotations: read into a `DetectionDataset`, write from boxes and labels.

COCO boxes are ``[x, y, w, h]`` in pixels; internally they are ``(x1, y1, x2, y2)``. Category ids
may be any distinct integers: sorted by id they become class indices ``0..K-1``. Crowd regions
(``iscrowd: 1``) are skipped, as COCO evaluation ignores them as ground truth. Every problem in the
file is reported as one `DiodeError` line naming the file and, for an annotation, its id.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any, Sequence

import torch
from torchvision.ops import box_convert

from diode.data.dataset import DetectionDataset, Record, brief, dataset_error, entry_arrays, read_text
from diode.io import atomic_write_json

# Largest image side accepted; PIL and torch index pixels with 32-bit integers.
MAX_SIDE = 2**31 - 1
# A box may overhang the image by this many pixels (rounding in annotation tools); `load` clips.
BOX_TOLERANCE_PX = 1.0


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _as_float(value: Any) -> float | None:
    """``value`` as a finite float, or None if it is not a finite JSON number."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return None
    try:
        number = float(value)
    except OverflowError:  # a JSON integer too large for a double
        return None
    return number if math.isfinite(number) else None


def _as_size(value: Any) -> int | None:
    """``value`` as an integer pixel size in 1..MAX_SIDE (``480`` or ``480.0``), else None."""
    if _is_int(value):
        return value if 0 < value <= MAX_SIDE else None
    number = _as_float(value)
    if number is None or not number.is_integer() or not 0 < number <= MAX_SIDE:
        return None
    return int(number)


def _load_json(json_path: Path) -> Any:
    text = read_text(json_path)
    try:
        return json.loads(text)
    except json.JSONDecodeError as exc:
        raise dataset_error(
            json_path, f"invalid JSON at line {exc.lineno} column {exc.colno}: {exc.msg}"
        ) from None
    # Other ValueErrors (an integer literal past Python's digit limit) and RecursionError (absurd
    # nesting) are malformed input too.
    except (ValueError, RecursionError) as exc:
        raise dataset_error(json_path, f"invalid JSON ({type(exc).__name__})") from None


def _read_categories(json_path: Path, categories: list) -> dict[int, str]:
    """Map category id -> name, validating ids are distinct integers."""
    seen: dict[int, str] = {}
    for k, category in enumerate(categories):
        if not isinstance(category, dict):
            raise dataset_error(json_path, f"categories[{k}] is not an object")
        cat_id, name = category.get("id"), category.get("name")
        if not _is_int(cat_id):
            raise dataset_error(json_path, f"categories[{k}] has no integer 'id'")
        if not isinstance(name, str):
            raise dataset_error(json_path, f"category id {cat_id} has no string 'name'")
        if cat_id in seen:
            raise dataset_error(json_path, f"duplicate category id {cat_id}")
        seen[cat_id] = name
    return seen


def _read_images(json_path: Path, images: list) -> dict[int, tuple[str, int, int]]:
    """Map image id -> (file_name, height, width), in file order."""
    out: dict[int, tuple[str, int, int]] = {}
    for k, image in enumerate(images):
        if not isinstance(image, dict):
            raise dataset_error(json_path, f"images[{k}] is not an object")
        image_id = image.get("id")
        if not _is_int(image_id):
            raise dataset_error(json_path, f"images[{k}] has no integer 'id'")
        if image_id in out:
            raise dataset_error(json_path, f"duplicate image id {image_id}")
        file_name = image.get("file_name")
        if not isinstance(file_name, str) or not file_name:
            raise dataset_error(json_path, f"image id {image_id} has no 'file_name'")
        height, width = _as_size(image.get("height")), _as_size(image.get("width"))
        if height is None or width is None:
            raise dataset_error(
                json_path,
                f"image id {image_id} needs integer 'height' and 'width' in 1..{MAX_SIDE}",
            )
        out[image_id] = (file_name, height, width)
    return out


def read_coco(json_path: str | Path, images_dir: str | Path | None = None) -> DetectionDataset:
    """Read a COCO detection file; images live in ``images_dir``.

    ``images_dir`` defaults to an ``images/`` folder next to the json if there is one, else the
    json's own folder. Images without annotations get empty targets; the records keep the order
    of the file's ``images`` list.
    """
    json_path = Path(json_path)
    data = _load_json(json_path)
    if not isinstance(data, dict):
        raise dataset_error(json_path, "top level must be a JSON object")
    for key in ("images", "annotations", "categories"):
        if key not in data:
            raise dataset_error(json_path, f"missing key '{key}'")
        if not isinstance(data[key], list):
            raise dataset_error(json_path, f"'{key}' must be a list")

    names_by_id = _read_categories(json_path, data["categories"])
    sorted_ids = sorted(names_by_id)
    class_of = {cat_id: index for index, cat_id in enumerate(sorted_ids)}
    images = _read_images(json_path, data["images"])

    xywh: dict[int, list[list[float]]] = {image_id: [] for image_id in images}
    labels: dict[int, list[int]] = {image_id: [] for image_id in images}
    for k, ann in enumerate(data["annotations"]):
        if not isinstance(ann, dict):
            raise dataset_error(json_path, f"annotations[{k}] is not an object")
        # Name annotations by id where they have a usable one, else by position.
        ann_id = ann.get("id")
        where = f"annotation id {ann_id}" if _is_int(ann_id) else f"annotations[{k}]"
        image_id, cat_id = ann.get("image_id"), ann.get("category_id")
        if not _is_int(image_id) or image_id not in images:
            raise dataset_error(json_path, f"{where} refers to unknown image id {brief(image_id)}")
        if not _is_int(cat_id) or cat_id not in class_of:
            raise dataset_error(json_path, f"{where} has unknown category id {brief(cat_id)}")
        if ann.get("iscrowd", 0) == 1:
            continue
        bbox = ann.get("bbox")
        numbers = [_as_float(v) for v in bbox] if isinstance(bbox, list) else []
        if len(numbers) != 4 or None in numbers:
            raise dataset_error(json_path, f"{where}: bbox must be 4 finite numbers [x, y, w, h]")
        x, y, w, h = numbers
        if w <= 0 or h <= 0:
            raise dataset_error(json_path, f"{where}: bbox width and height must be positive")
        _, height, width = images[image_id]
        tol = BOX_TOLERANCE_PX
        if x < -tol or y < -tol or x + w > width + tol or y + h > height + tol:
            raise dataset_error(
                json_path,
                f"{where}: bbox {[x, y, w, h]} lies outside image id {image_id} "
                f"({width}x{height})",
            )
        xywh[image_id].append([x, y, w, h])
        labels[image_id].append(class_of[cat_id])

    records = []
    for image_id, (file_name, height, width) in images.items():
        boxes = torch.tensor(xywh[image_id], dtype=torch.float64).reshape(-1, 4)
        records.append(
            Record(
                file_name=file_name,
                height=height,
                width=width,
                # Convert in float64, then store float32: x + w is exact before rounding once.
                boxes=box_convert(boxes, "xywh", "xyxy").to(torch.float32),
                labels=torch.tensor(labels[image_id], dtype=torch.int64),
                image_id=image_id,
            )
        )
    if images_dir is None:
        sibling = json_path.parent / "images"
        images_dir = sibling if sibling.is_dir() else json_path.parent
    return DetectionDataset(
        images_dir=Path(images_dir),
        class_names=[names_by_id[cat_id] for cat_id in sorted_ids],
        records=records,
        source=str(json_path),
    )


def write_coco(json_path: str | Path, class_names: Sequence[str], entries: Sequence[dict]) -> None:
    """Write a COCO detection file, atomically.

    entries: one dict per image with ``file_name``, ``height``, ``width``, ``boxes`` (float
    ``[N, 4]`` xyxy pixels, tensor or array) and ``labels`` (int ``[N]`` indices into
    ``class_names``); any ``scores`` are ignored. Image ids are ``1..len(entries)`` in order,
    category ids are ``index + 1`` and annotation ids count from 1.
    """
    json_path = Path(json_path)
    images, annotations = [], []
    for image_id, entry in enumerate(entries, start=1):
        boxes, labels = entry_arrays(json_path, entry, len(class_names))
        images.append(
            {
                "id": image_id,
                "file_name": str(entry["file_name"]),
                "height": int(entry["height"]),
                "width": int(entry["width"]),
            }
        )
        for (x1, y1, x2, y2), label in zip(boxes.tolist(), labels.tolist()):
            # Four decimals keep round trips well under 1e-3 px without float32 noise digits.
            w, h = round(x2 - x1, 4), round(y2 - y1, 4)
            annotations.append(
                {
                    "id": len(annotations) + 1,
                    "image_id": image_id,
                    "category_id": label + 1,
                    "bbox": [round(x1, 4), round(y1, 4), w, h],
                    "area": round(w * h, 4),
                    "iscrowd": 0,
                }
            )
    categories = [{"id": k + 1, "name": name} for k, name in enumerate(class_names)]
    atomic_write_json(
        json_path,
        {
            "info": {"description": "written by diode"},
            "images": images,
            "annotations": annotations,
            "categories": categories,
        },
    )
