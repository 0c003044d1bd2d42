"""The in-memory detection dataset every reader produces, plus image decoding and letterboxing.

A `DetectionDataset` is a folder of images and one `Record` per image whose boxes are absolute
``(x1, y1, x2, y2)`` pixels in the frame of the original image, with 0-based labels into
``class_names`` (the contract in `diode.types`). `load` turns a record into what the rest of the
pipeline eats: a uint8 ``[3, H, W]`` image letterboxed to the working ``image_size`` and its
target mapped into that letterboxed frame.

Images are decoded with PIL as stored: EXIF orientation is *not* applied, matching pycocotools and
`torchvision.io.decode_image`, so boxes annotated on the stored pixels stay aligned.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torchvision.ops import clip_boxes_to_image
from tqdm import tqdm

from diode.errors import DiodeError
from diode.types import ImageSize, Target

# 16-bit and 32-bit integer grey images are read as 16-bit data and scaled to 8 bits; PNG's
# 16-bit grey opens as "I;16" on current Pillow and as "I" on older releases.
_SIXTEEN_BIT_MODES = ("I;16", "I;16L", "I;16B", "I;16N", "I")


def dataset_error(path: str | Path, problem: str) -> DiodeError:
    """A `DiodeError` reading ``"<path>: <problem>"`` squeezed onto one line.

    User-controlled text (file names, class names, label lines) can carry line breaks, and the CLI
    promises a one-line message.
    """
    return DiodeError(" ".join(f"{path}: {problem}".splitlines()))


def brief(value: object) -> str:
    """A repr of a user value short enough for a one-line error message."""
    text = repr(value)
    return text if len(text) <= 40 else text[:37] + "..."


def entry_arrays(
    path: str | Path, entry: dict, num_classes: int | None = None
) -> tuple[np.ndarray, np.ndarray]:
    """Validated ``(boxes float64 [N, 4] xyxy, labels int64 [N])`` of a writer's entry dict.

    ``boxes``/``labels`` may be tensors, arrays or lists; labels must be non-negative and, when
    ``num_classes`` is given, below it. ``path`` is the file being written, named in errors.
    """
    def as_array(values: object, dtype: type) -> np.ndarray:
        if isinstance(values, torch.Tensor):
            values = values.detach().cpu().numpy()
        return np.asarray(values, dtype=dtype)

    boxes = as_array(entry["boxes"], np.float64).reshape(-1, 4)
    labels = as_array(entry["labels"], np.int64).reshape(-1)
    name = entry["file_name"]
    if len(boxes) != len(labels):
        raise dataset_error(path, f"{name}: {len(boxes)} boxes but {len(labels)} labels")
    if len(labels) and labels.min() < 0:
        raise dataset_error(path, f"{name}: negative label")
    if num_classes is not None and len(labels) and labels.max() >= num_classes:
        raise dataset_error(path, f"{name}: label outside 0..{num_classes - 1}")
    return boxes, labels


def read_text(path: Path) -> str:
    """UTF-8 text of a dataset file; missing, unreadable or non-UTF-8 files raise `DiodeError`."""
    try:
        return path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise dataset_error(path, "file not found") from None
    except UnicodeDecodeError as exc:
        raise dataset_error(path, f"not UTF-8 text (byte {exc.start})") from None
    except OSError as exc:
        raise dataset_error(path, f"cannot read ({exc.strerror or exc})") from None


def _describe(exc: BaseException) -> str:
    return f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__


def read_image_size(path: Path) -> ImageSize:
    """``(H, W)`` of an image file from its header only (no pixel decoding)."""
    try:
        with Image.open(path) as img:
            width, height = img.size
    except FileNotFoundError:
        raise dataset_error(path, "image file not found") from None
    # PIL raises a zoo of exception types on malformed headers (OSError, SyntaxError, ValueError,
    # struct.error, DecompressionBombError); any of them means "this is not a readable image".
    except Exception as exc:
        raise dataset_error(path, f"cannot read image header ({_describe(exc)})") from None
    return height, width


def read_rgb(path: Path) -> torch.Tensor:
    """Decode any PIL-readable image to uint8 RGB ``[3, h, w]`` at its stored size.

    Grey (L), palette (P), alpha (LA, RGBA: alpha dropped) and CMYK images are converted by PIL;
    16-bit grey (I;16, I) is scaled from [0, 65535] to [0, 255]. Missing, truncated or corrupt
    files raise `DiodeError` naming the file.
    """
    try:
        with Image.open(path) as img:
            img.load()  # decode now: Image.open only parses the header, truncation shows here
            array = _to_rgb_array(img)
    except FileNotFoundError:
        raise dataset_error(path, "image file not found") from None
    # See read_image_size: any decoder failure means the file is not a usable image.
    except Exception as exc:
        raise dataset_error(path, f"cannot read image ({_describe(exc)})") from None
    return torch.from_numpy(array).permute(2, 0, 1).contiguous()


def _to_rgb_array(img: Image.Image) -> np.ndarray:
    """uint8 ``[h, w, 3]`` array of a loaded PIL image."""
    if img.mode in _SIXTEEN_BIT_MODES:
        grey = np.asarray(img).astype(np.float64)
        grey = np.clip(np.round(grey / 257.0), 0, 255).astype(np.uint8)
        return np.repeat(grey[:, :, None], 3, axis=2)
    if img.mode == "P" and "transparency" in img.info:
        # Going through RGBA avoids PIL's warning about palette transparency; alpha is dropped.
        img = img.convert("RGBA")
    if img.mode != "RGB":
        img = img.convert("RGB")
    return np.array(img, dtype=np.uint8)


def _geometry(real_size: ImageSize, image_size: ImageSize) -> tuple[float, tuple[float, float], ImageSize]:
    """(scale, (pad_x, pad_y), resized (h, w)) of letterboxing ``real_size`` into ``image_size``."""
    h, w = real_size
    out_h, out_w = image_size
    scale = min(out_h / h, out_w / w)
    new_h = min(out_h, max(1, round(h * scale)))
    new_w = min(out_w, max(1, round(w * scale)))
    return scale, (float((out_w - new_w) // 2), float((out_h - new_h) // 2)), (new_h, new_w)


def letterbox_geometry(real_size: ImageSize, image_size: ImageSize) -> tuple[float, tuple[float, float]]:
    """``(scale, (pad_x, pad_y))`` that `letterbox` applies to an image of ``real_size``."""
    scale, pad, _ = _geometry(real_size, image_size)
    return scale, pad


def letterbox(
    image: torch.Tensor, image_size: ImageSize, fill: int = 114
) -> tuple[torch.Tensor, float, tuple[float, float]]:
    """Resize ``image`` keeping its aspect ratio so it fits ``image_size``, then pad to it.

    image: uint8 ``[C, h, w]``. Returns ``(out, scale, (pad_x, pad_y))`` with ``out`` uint8
    ``[C, H, W]``: the content is resized (bilinear, antialiased) by ``scale`` to
    ``round(h * scale) x round(w * scale)`` and placed at integer offset ``(pad_x, pad_y)``, the
    rest filled with ``fill``. The padding is split evenly (left/top get the smaller half) so the
    content stays centred. A point ``p`` of the input maps to ``p * scale + pad``, exactly on the
    limiting axis and within half a pixel on the other (the content size is rounded).
    """
    if image.ndim != 3:
        raise ValueError(f"letterbox expects a [C, h, w] image, got shape {tuple(image.shape)}")
    out_h, out_w = (int(s) for s in image_size)
    if out_h <= 0 or out_w <= 0:
        raise DiodeError(f"image_size must be positive (H, W), got {tuple(image_size)}")
    channels, h, w = image.shape
    scale, (pad_x, pad_y), (new_h, new_w) = _geometry((h, w), (out_h, out_w))
    if (new_h, new_w) == (h, w):
        resized = image
    else:
        resized = F.interpolate(
            image[None].float(), size=(new_h, new_w), mode="bilinear", align_corners=False,
            antialias=True,
        )[0]
        resized = resized.round().clamp(0, 255).to(image.dtype)
    pad_x, pad_y = int(pad_x), int(pad_y)
    out = torch.full((channels, out_h, out_w), fill, dtype=image.dtype, device=image.device)
    out[:, pad_y : pad_y + new_h, pad_x : pad_x + new_w] = resized
    return out, scale, (float(pad_x), float(pad_y))


def letterbox_boxes(boxes: torch.Tensor, scale: float, pad: tuple[float, float]) -> torch.Tensor:
    """Map xyxy ``boxes`` ``[N, 4]`` from the original frame into the letterboxed one."""
    pad_x, pad_y = pad
    offset = boxes.new_tensor([pad_x, pad_y, pad_x, pad_y])
    return boxes * scale + offset


@dataclass
class Record:
    """One annotated image; boxes are in the frame of the declared ``height x width``."""

    file_name: str  # path relative to DetectionDataset.images_dir (may contain subfolders)
    height: int  # declared size of the original image
    width: int
    boxes: torch.Tensor  # float32 [N, 4] absolute xyxy pixels in the original image frame
    labels: torch.Tensor  # int64 [N], 0-based index into class_names
    image_id: int


@dataclass
class DetectionDataset:
    """Images under ``images_dir`` with one `Record` each, as produced by `open_dataset`."""

    images_dir: Path
    class_names: list[str]
    records: list[Record]
    source: str  # the path the user gave, used in error messages

    def __post_init__(self) -> None:
        self.images_dir = Path(self.images_dir)

    def __len__(self) -> int:
        return len(self.records)

    def image_path(self, i: int) -> Path:
        return self.images_dir / self.records[i].file_name

    def read_image(self, i: int) -> torch.Tensor:
        """uint8 RGB ``[3, h, w]`` of image ``i`` at its real (stored) size."""
        return read_rgb(self.image_path(i))

    def load(self, i: int, image_size: ImageSize) -> tuple[torch.Tensor, Target]:
        """Image ``i`` letterboxed to ``image_size``: uint8 ``[3, H, W]`` and its target."""
        image = self.read_image(i)
        target = self.target(i, image_size, real_size=tuple(image.shape[1:]))
        return letterbox(image, image_size)[0], target

    def target(self, i: int, image_size: ImageSize, real_size: ImageSize | None = None) -> Target:
        """Record ``i``'s boxes in the frame of its image letterboxed to ``image_size``.

        ``real_size`` is the stored image's ``(h, w)`` (read from the file header when not given).
        If it is not the declared ``height x width`` (an annotation file out of date with a
        resized image), the boxes are scaled to the real size rather than rejected: the
        annotations are assumed to describe the same content. Boxes are clipped to the image
        (readers accept up to 1 px overhang) and boxes left empty by clipping are dropped.
        """
        record = self.records[i]
        real_h, real_w = real_size or read_image_size(self.image_path(i))
        boxes = record.boxes.to(torch.float32)
        if (real_h, real_w) != (record.height, record.width):
            sx, sy = real_w / record.width, real_h / record.height
            boxes = boxes * boxes.new_tensor([sx, sy, sx, sy])
        boxes = clip_boxes_to_image(boxes, (real_h, real_w))
        keep = (boxes[:, 2] > boxes[:, 0]) & (boxes[:, 3] > boxes[:, 1])
        scale, pad = letterbox_geometry((real_h, real_w), image_size)
        return {"boxes": letterbox_boxes(boxes[keep], scale, pad), "labels": record.labels[keep].to(torch.int64)}

    def load_all(
        self, image_size: ImageSize, progress: bool = False
    ) -> tuple[torch.Tensor, list[Target]]:
        """Every image letterboxed: uint8 ``[N, 3, H, W]`` and the N targets, in record order."""
        height, width = image_size
        images = torch.empty((len(self), 3, height, width), dtype=torch.uint8)
        targets: list[Target] = []
        for i in tqdm(range(len(self)), desc=f"loading {self.source}", disable=not progress):
            images[i], target = self.load(i, image_size)
            targets.append(target)
        return images, targets


def open_dataset(spec: str | Path, split: str = "train") -> DetectionDataset:
    """Open a COCO or YOLO dataset from what the user typed.

    ``spec`` may be a COCO annotations ``.json`` file, an ultralytics ``data.yaml``/``.yml`` file,
    or a folder containing ``annotations.json`` (COCO, checked first) or ``data.yaml``/``data.yml``.
    ``split`` picks the YOLO split (train/val/test); a COCO file is a single split and ignores it.
    """
    # Imported here because the readers build on the classes above.
    from diode.data.coco import read_coco
    from diode.data.yolo import read_yolo

    path = Path(spec)
    if path.is_dir():
        if (path / "annotations.json").is_file():
            dataset = read_coco(path / "annotations.json")
        elif (path / "data.yaml").is_file():
            dataset = read_yolo(path / "data.yaml", split)
        elif (path / "data.yml").is_file():
            dataset = read_yolo(path / "data.yml", split)
        else:
            raise dataset_error(
                spec, "folder holds neither annotations.json (COCO) nor data.yaml (YOLO)"
            )
    elif path.is_file() and path.suffix.lower() == ".json":
        dataset = read_coco(path)
    elif path.is_file() and path.suffix.lower() in (".yaml", ".yml"):
        dataset = read_yolo(path, split)
    elif not path.exists():
        raise dataset_error(spec, "no such file or folder")
    else:
        raise dataset_error(
            spec,
            "not a dataset: expected a COCO .json, a YOLO data.yaml, or a folder holding one",
        )
    dataset.source = str(spec)
    return dataset
