"""The embedded dataset: procedurally rendered shapes on natural-photo and texture backgrounds.

Nothing can be downloaded, so the project owns its ground truth. Classes are defined by shape,
never by colour (colours and fills are random), so a detector has to learn geometry. Each image
holds 1-8 objects whose largest side spans 6 % to 70 % of the image side (uniformly), with random aspect
and rotation, on a background that mixes crops of the photographs shipped inside scikit-image with
procedural textures and unlabelled clutter (lines, dots, arcs). Objects may occlude each other, at
most `MAX_HIDDEN` of an object's pixels; boxes are the exact extent of each object's visible
pixels.

Every image is a pure function of (seed, split, index): the dataset does not depend on how many
images are generated or in which order.
"""

from __future__ import annotations

import functools
import math
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageDraw
from tqdm import tqdm

from diode.data.coco import write_coco
from diode.data.yolo import write_data_yaml, write_yolo_labels
from diode.errors import DiodeError
from diode.io import save_png
from diode.types import ImageSize

CLASS_NAMES = ["circle", "square", "triangle", "star", "cross", "ring", "hexagon", "arrow"]
SPLIT_IDS = {"train": 0, "val": 1, "test": 2}
MIN_SIZE, MAX_SIZE = 0.06, 0.70  # object's largest side, as a fraction of the image's shorter side
MAX_HIDDEN = 0.35  # an object may lose at most this fraction of its pixels to later objects
PHOTOS = ["astronaut", "coffee", "chelsea", "rocket", "motorcycle_left", "horse", "camera",
          "coins", "grass", "gravel", "brick", "moon", "page", "hubble_deep_field", "retina"]


@functools.lru_cache(maxsize=1)
def _photos() -> tuple[np.ndarray, ...]:
    """The scikit-image sample photographs present on disk, as uint8 HWC RGB arrays."""
    import skimage

    folder = Path(skimage.__file__).parent / "data"
    photos = []
    for name in PHOTOS:
        for ext in (".png", ".jpg"):
            path = folder / f"{name}{ext}"
            if path.exists():
                photos.append(np.asarray(Image.open(path).convert("RGB")))
                break
    return tuple(photos)


def _resize(array: np.ndarray, size: ImageSize) -> np.ndarray:
    h, w = size
    return np.asarray(Image.fromarray(array).resize((w, h), Image.BILINEAR))


def _photo_crop(rng: np.random.Generator, size: ImageSize) -> np.ndarray:
    photos = _photos()
    photo = photos[rng.integers(len(photos))]
    ph, pw = photo.shape[:2]
    h, w = size
    scale = rng.uniform(0.15, 1.0) * min(ph / h, pw / w)
    ch, cw = max(8, int(h * scale)), max(8, int(w * scale))
    y, x = rng.integers(0, ph - ch + 1), rng.integers(0, pw - cw + 1)
    crop = _resize(photo[y:y + ch, x:x + cw], size)
    return crop[:, ::-1] if rng.random() < 0.5 else crop


def _texture(rng: np.random.Generator, size: ImageSize) -> np.ndarray:
    """Procedural texture: flat, gradient, stripes, checker or smooth noise."""
    h, w = size
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
    c1, c2 = rng.uniform(0, 255, 3), rng.uniform(0, 255, 3)
    kind = rng.integers(5)
    if kind == 0:
        t = np.zeros((h, w), np.float32)
    elif kind == 1:
        a = rng.uniform(0, 2 * math.pi)
        t = (xx * math.cos(a) + yy * math.sin(a))
        t = (t - t.min()) / max(float(np.ptp(t)), 1.0)
    elif kind == 2:
        a, period = rng.uniform(0, 2 * math.pi), rng.uniform(4, 40)
        t = 0.5 + 0.5 * np.sin((xx * math.cos(a) + yy * math.sin(a)) * 2 * math.pi / period)
    elif kind == 3:
        cell = rng.integers(4, 32)
        t = ((xx // cell + yy // cell) % 2).astype(np.float32)
    else:
        low = rng.uniform(0, 1, (rng.integers(2, 9), rng.integers(2, 9))).astype(np.float32)
        t = np.asarray(Image.fromarray(low).resize((w, h), Image.BICUBIC)).clip(0, 1)
    out = c1 * (1 - t[..., None]) + c2 * t[..., None]
    return out.clip(0, 255).astype(np.uint8)


def _background(rng: np.random.Generator, size: ImageSize) -> np.ndarray:
    mode = rng.random()
    if mode < 0.4:
        return _photo_crop(rng, size)
    if mode < 0.7:
        return _texture(rng, size)
    alpha = rng.uniform(0.3, 0.7)
    mixed = alpha * _photo_crop(rng, size) + (1 - alpha) * _texture(rng, size)
    return mixed.astype(np.uint8)


def _draw_clutter(rng: np.random.Generator, image: Image.Image) -> None:
    """Unlabelled distractors: thin lines, small dots and arcs."""
    w, h = image.size
    side = min(h, w)
    draw = ImageDraw.Draw(image)
    for _ in range(rng.integers(0, 7)):
        color = tuple(int(c) for c in rng.integers(0, 256, 3))
        kind = rng.integers(3)
        x, y = rng.uniform(0, w), rng.uniform(0, h)
        if kind == 0:
            x2, y2 = rng.uniform(0, w), rng.uniform(0, h)
            draw.line([(x, y), (x2, y2)], fill=color, width=int(rng.integers(1, 3)))
        elif kind == 1:
            r = rng.uniform(0.5, 0.025 * side + 0.5)
            draw.ellipse([x - r, y - r, x + r, y + r], fill=color)
        else:
            r = rng.uniform(0.05, 0.3) * side
            start = rng.uniform(0, 360)
            draw.arc([x - r, y - r, x + r, y + r], start, start + rng.uniform(30, 150),
                     fill=color, width=int(rng.integers(1, 3)))


def _unit_outline(cls: str, rng: np.random.Generator) -> list[np.ndarray]:
    """Polygons of a class around the origin, radius about 1: [outer] or [outer, hole]."""
    def ngon(n: int, radius: float = 1.0, phase: float = 0.0) -> np.ndarray:
        a = phase + np.arange(n) * 2 * math.pi / n
        return radius * np.stack([np.cos(a), np.sin(a)], 1)

    if cls == "circle":
        return [ngon(48)]
    if cls == "ring":
        return [ngon(48), ngon(48, rng.uniform(0.45, 0.7))]
    if cls == "square":
        return [ngon(4, phase=math.pi / 4)]
    if cls == "triangle":
        return [ngon(3, phase=-math.pi / 2)]
    if cls == "hexagon":
        return [ngon(6)]
    if cls == "star":
        outer, inner = ngon(5, 1.0, -math.pi / 2), ngon(5, rng.uniform(0.38, 0.5), -math.pi / 2 + math.pi / 5)
        return [np.stack([outer, inner], 1).reshape(10, 2)]
    if cls == "cross":
        t = rng.uniform(0.28, 0.4)
        return [np.array([(-t, -1), (t, -1), (t, -t), (1, -t), (1, t), (t, t), (t, 1), (-t, 1),
                          (-t, t), (-1, t), (-1, -t), (-t, -t)], np.float64)]
    if cls == "arrow":
        shaft, head = rng.uniform(0.15, 0.25), rng.uniform(0.45, 0.6)
        neck = rng.uniform(0.0, 0.35)
        return [np.array([(-1, -shaft), (neck, -shaft), (neck, -head), (1, 0), (neck, head),
                          (neck, shaft), (-1, shaft)], np.float64)]
    raise AssertionError(cls)


def _object_mask(rng: np.random.Generator, cls: str, size: ImageSize) -> np.ndarray | None:
    """A boolean mask [H, W] of one object of class `cls` at a random pose, or None if off-image."""
    h, w = size
    polys = _unit_outline(cls, rng)
    aspect = math.exp(rng.uniform(-0.35, 0.35))
    angle = rng.uniform(0, 2 * math.pi)
    rot = np.array([[math.cos(angle), -math.sin(angle)], [math.sin(angle), math.cos(angle)]])
    polys = [(p * [math.sqrt(aspect), 1 / math.sqrt(aspect)]) @ rot.T for p in polys]
    extent = polys[0].max(0) - polys[0].min(0)
    side = rng.uniform(MIN_SIZE, MAX_SIZE) * min(h, w)
    polys = [p * side / extent.max() for p in polys]
    lo, hi = polys[0].min(0), polys[0].max(0)
    if hi[0] - lo[0] >= w - 1 or hi[1] - lo[1] >= h - 1:
        return None
    offset = np.array([rng.uniform(-lo[0], w - hi[0]), rng.uniform(-lo[1], h - hi[1])])
    mask = Image.new("L", (w, h), 0)
    draw = ImageDraw.Draw(mask)
    for k, p in enumerate(polys):
        draw.polygon([tuple(v) for v in (p + offset)], fill=0 if k else 255)
    out = np.asarray(mask) > 0
    return out if out.sum() >= 4 else None


def _fill(rng: np.random.Generator, size: ImageSize, avoid: np.ndarray) -> np.ndarray:
    """Object paint [H, W, 3] float: solid, gradient or stripes, contrasting with colour `avoid`."""
    def color() -> np.ndarray:
        for _ in range(20):
            c = rng.uniform(0, 255, 3)
            if np.abs(c - avoid).sum() > 120:
                return c
        return 255.0 - avoid

    h, w = size
    c1 = color()
    kind = rng.random()
    if kind < 0.6:
        return np.broadcast_to(c1, (h, w, 3))
    c2 = color()
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
    a = rng.uniform(0, 2 * math.pi)
    proj = xx * math.cos(a) + yy * math.sin(a)
    if kind < 0.8:
        t = (proj - proj.min()) / max(float(np.ptp(proj)), 1.0)
    else:
        t = (np.sin(proj * 2 * math.pi / rng.uniform(3, 12)) > 0).astype(np.float32)
    return c1 * (1 - t[..., None]) + c2 * t[..., None]


def render_image(rng: np.random.Generator, image_size: ImageSize) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Render one image. Returns (uint8 [H, W, 3], boxes float32 [N, 4] xyxy, labels int64 [N])."""
    h, w = image_size
    canvas = Image.fromarray(_background(rng, image_size))
    _draw_clutter(rng, canvas)
    image = np.asarray(canvas).astype(np.float32)
    owner = np.full((h, w), -1, np.int64)  # index of the object that owns each pixel
    areas: list[int] = []
    labels: list[int] = []
    for _ in range(rng.integers(1, 9)):
        cls = int(rng.integers(len(CLASS_NAMES)))
        for _attempt in range(10):
            mask = _object_mask(rng, CLASS_NAMES[cls], image_size)
            if mask is None:
                continue
            # Partial occlusion is allowed, but no earlier object may lose more than MAX_HIDDEN.
            covered = np.bincount(owner[mask & (owner >= 0)], minlength=len(areas))
            visible = np.bincount(owner[owner >= 0], minlength=len(areas))
            if all((visible[k] - covered[k]) >= (1 - MAX_HIDDEN) * areas[k] for k in range(len(areas))):
                break
        else:
            continue
        paint = _fill(rng, image_size, image[mask].mean(0))
        image[mask] = paint[mask]
        owner[mask] = len(areas)
        areas.append(int(mask.sum()))
        labels.append(cls)
    boxes = np.zeros((len(areas), 4), np.float32)
    for k in range(len(areas)):
        ys, xs = np.nonzero(owner == k)
        boxes[k] = (xs.min(), ys.min(), xs.max() + 1, ys.max() + 1)
    return image.clip(0, 255).astype(np.uint8), boxes, np.asarray(labels, np.int64)


def render_background(rng: np.random.Generator, image_size: ImageSize) -> np.ndarray:
    """A background with clutter and no objects: out-of-distribution natural-ish images."""
    canvas = Image.fromarray(_background(rng, image_size))
    _draw_clutter(rng, canvas)
    return np.asarray(canvas)


def generate_backgrounds(out_dir: str | Path, count: int, image_size: ImageSize = (128, 128), seed: int = 0,
                         progress: bool = True) -> Path:
    """A folder of `count` object-free images (photo crops, textures, clutter), e.g. a KD proxy set."""
    out_dir = Path(out_dir)
    for i in tqdm(range(count), desc="backgrounds", disable=not progress, unit="img"):
        rng = np.random.default_rng(np.random.SeedSequence([seed, 99, i]))
        save_png(out_dir / f"bg_{i:06d}.png", render_background(rng, image_size))
    return out_dir


def _image_rng(seed: int, split: str, index: int) -> np.random.Generator:
    return np.random.default_rng(np.random.SeedSequence([seed, SPLIT_IDS[split], index]))


def generate_split(out_dir: Path, split: str, count: int, image_size: ImageSize, seed: int,
                   progress: bool = True) -> None:
    """Write `out_dir/split/{images/, labels/, annotations.json}` with `count` images."""
    split_dir = out_dir / split
    entries = []
    for i in tqdm(range(count), desc=f"shapes {split}", disable=not progress, unit="img"):
        image, boxes, labels = render_image(_image_rng(seed, split, i), image_size)
        name = f"{split}_{i:06d}.png"
        save_png(split_dir / "images" / name, image)
        entries.append({"file_name": name, "height": image_size[0], "width": image_size[1],
                        "boxes": torch.from_numpy(boxes), "labels": torch.from_numpy(labels)})
    write_yolo_labels(split_dir / "labels", entries)
    write_coco(split_dir / "annotations.json", CLASS_NAMES, entries)


def generate_shapes(out_dir: str | Path, train: int, val: int, image_size: ImageSize = (128, 128),
                    seed: int = 0, progress: bool = True) -> Path:
    """Generate the embedded dataset (COCO per split + an ultralytics `data.yaml` at the root)."""
    if train < 0 or val < 0:
        raise DiodeError(f"--train and --val must be >= 0, got {train} and {val}")
    if min(image_size) < 16:
        raise DiodeError(f"--image-size must be at least 16 x 16, got {image_size[0]} x {image_size[1]}")
    out_dir = Path(out_dir)
    splits = {}
    for split, count in (("train", train), ("val", val)):
        if count:
            generate_split(out_dir, split, count, image_size, seed, progress)
            splits[split] = f"{split}/images"
    write_data_yaml(out_dir / "data.yaml", ".", splits, CLASS_NAMES)
    return out_dir
