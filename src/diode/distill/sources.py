"""Transfer sets for distillation: what images the student and teacher look at.

A SOURCE is a synthesised dataset or any labelled dataset (labels ignored), a plain folder of
images, or generated noise (`noise:gaussian`, `noise:uniform`). Every source becomes one uint8
tensor [N, 3, H, W] letterboxed to the working size, held in memory like the supervised trainer's.
"""

from __future__ import annotations

from pathlib import Path

import torch
from tqdm import tqdm

from diode.data.dataset import dataset_error, letterbox, read_rgb
from diode.errors import DiodeError
from diode.types import ImageSize

IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".bmp", ".webp"}
NOISE_KINDS = ("gaussian", "uniform")


def noise_images(kind: str, count: int, image_size: ImageSize, seed: int) -> torch.Tensor:
    """uint8 [count, 3, H, W]: gaussian = clamp(0.5 + 0.25 N(0, 1)), uniform = U(0, 1), per pixel."""
    if kind not in NOISE_KINDS:
        raise DiodeError(f"noise:{kind}: unknown noise; valid: {', '.join('noise:' + k for k in NOISE_KINDS)}")
    gen = torch.Generator().manual_seed(seed)
    shape = (count, 3, *image_size)
    pixels = (0.5 + 0.25 * torch.randn(shape, generator=gen)).clamp(0, 1) if kind == "gaussian" \
        else torch.rand(shape, generator=gen)
    return (pixels * 255).round().to(torch.uint8)


def folder_images(folder: Path, image_size: ImageSize, limit: int | None, progress: bool) -> torch.Tensor:
    files = sorted(p for p in folder.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES)
    if not files:
        raise dataset_error(folder, "folder holds no images (png, jpg, jpeg, bmp, webp)")
    files = files[:limit] if limit else files
    out = torch.empty((len(files), 3, *image_size), dtype=torch.uint8)
    for i, path in enumerate(tqdm(files, desc=f"loading {folder}", disable=not progress)):
        out[i] = letterbox(read_rgb(path), image_size)[0]
    return out


def load_transfer_set(source: str, image_size: ImageSize, *, num_images: int | None, seed: int,
                      progress: bool = True) -> torch.Tensor:
    """The transfer images of `source` (at most `num_images`; noise needs it)."""
    if num_images is not None and num_images < 1:
        raise DiodeError(f"--num-images must be >= 1, got {num_images}")
    if source.startswith("noise:"):
        if num_images is None:
            raise DiodeError(f"--data {source}: pass --num-images to say how many noise images to draw")
        return noise_images(source.split(":", 1)[1], num_images, image_size, seed)
    path = Path(source)
    if not path.exists():
        raise dataset_error(source, "no such file or folder")
    is_dataset = path.is_file() or any((path / n).is_file() for n in ("annotations.json", "data.yaml", "data.yml"))
    if not is_dataset:
        return folder_images(path, image_size, num_images, progress)
    from diode.data import open_dataset

    dataset = open_dataset(source, split="train")
    count = min(len(dataset), num_images) if num_images else len(dataset)
    out = torch.empty((count, 3, *image_size), dtype=torch.uint8)
    for i in tqdm(range(count), desc=f"loading {source}", disable=not progress):
        out[i] = dataset.load(i, image_size)[0]
    return out
