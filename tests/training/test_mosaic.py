"""Mosaic augmentation: off changes nothing, quadrants are resized sources, boxes follow the
content and are dropped when cut away, determinism, devices, config and CLI range checks."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from diode.cli import _training_run, build_parser, main
from diode.config import AugmentConfig
from diode.training.augment import augment_batch, mosaic

H, W = 64, 96


def _target(boxes: list[list[float]], labels: list[int]) -> dict[str, torch.Tensor]:
    return {"boxes": torch.tensor(boxes, dtype=torch.float32).reshape(-1, 4),
            "labels": torch.tensor(labels, dtype=torch.int64)}


def _gen(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _mosaic_only(**kwargs) -> AugmentConfig:
    """Mosaic on every image, every other augmentation off."""
    return AugmentConfig(**{"flip_p": 0.0, "scale": (1.0, 1.0), "translate": 0.0, "hue": 0.0,
                            "saturation": 0.0, "value": 0.0, "mosaic_p": 1.0, **kwargs})


def _expected_quadrant(source: torch.Tensor, cx: int, cy: int, q: int) -> torch.Tensor:
    """The quadrant q (0 top-left, 1 top-right, 2 bottom-left, 3 bottom-right) around (cx, cy):
    `source` [3, H, W] resized uniformly to the smallest whole-pixel size covering the quadrant,
    cropped to the quadrant on the side touching the centre."""
    h, w = source.shape[1:]
    right, bottom = q % 2 == 1, q >= 2
    qw = w - cx if right else cx
    qh = h - cy if bottom else cy
    if qw / w >= qh / h:
        sw, sh = qw, math.ceil(qw * h / w)
    else:
        sw, sh = math.ceil(qh * w / h), qh
    resized = F.interpolate(source[None], size=(sh, sw), mode="bilinear", align_corners=False)[0]
    rows = slice(0, qh) if bottom else slice(sh - qh, sh)
    cols = slice(0, qw) if right else slice(sw - qw, sw)
    return resized[:, rows, cols]


def _quadrant(image: torch.Tensor, cx: int, cy: int, q: int) -> torch.Tensor:
    rows = slice(cy, None) if q >= 2 else slice(0, cy)
    cols = slice(cx, None) if q % 2 == 1 else slice(0, cx)
    return image[:, rows, cols]


def test_mosaic_off_matches_the_output_recorded_before_mosaic_existed() -> None:
    # Values recorded from augment_batch as it was before the mosaic option (commit d92125c):
    # with mosaic_p = 0 nothing is drawn for it, so images, boxes and the generator state match.
    images = torch.rand(3, 3, 16, 24, generator=_gen(0))
    targets = [_target([[2, 3, 12, 14], [10, 1, 23, 9]], [1, 4]), _target([[0, 0, 24, 16]], [2]),
               _target([], [])]
    gen = _gen(3)
    out, new = augment_batch(images, targets, AugmentConfig(mosaic_p=0.0), gen)
    assert torch.allclose(out.sum(dim=(1, 2, 3)), torch.tensor([681.49188, 725.48206, 607.73938]), atol=1e-3)
    assert torch.allclose(out[0, :, 5, 7], torch.tensor([0.69602346, 0.68275613, 0.59660882]), atol=1e-5)
    assert torch.allclose(out[2, :, 11, 20], torch.tensor([0.09085245, 0.45413683, 0.60782063]), atol=1e-5)
    assert torch.allclose(new[0]["boxes"], torch.tensor([[13.304955, 4.727147, 21.410339, 13.643067],
                                                         [4.389036, 3.106071, 14.926033, 9.590376]]), atol=1e-4)
    assert torch.allclose(new[1]["boxes"], torch.tensor([[0.383071, 1.194374, 24.0, 16.0]]), atol=1e-4)
    assert new[2]["boxes"].shape == (0, 4)
    assert [t["labels"].tolist() for t in new] == [[1, 4], [2], []]
    assert torch.allclose(torch.rand(2, generator=gen), torch.tensor([0.21475774, 0.94930500]))


@pytest.mark.parametrize("cx, cy", [(24, 16), (72, 48), (40, 40), (29, 21)])
def test_quadrants_are_the_resized_sources(cx: int, cy: int) -> None:
    images = torch.rand(5, 3, H, W, generator=_gen(1))
    targets = [_target([], []) for _ in range(5)]
    sources = torch.tensor([[3, 0, 4, 1], [2, 2, 0, 3]])
    out, new = mosaic(images, targets, sources, torch.tensor([[cx, cy], [cx, cy]]), 0.4)
    assert out.shape == (2, 3, H, W)
    for m in range(2):
        for q in range(4):
            expected = _expected_quadrant(images[sources[m, q]], cx, cy, q)
            assert torch.allclose(_quadrant(out[m], cx, cy, q), expected, atol=1e-5), (m, q)
        assert new[m]["boxes"].shape == (0, 4) and new[m]["labels"].dtype == torch.int64


def test_augment_batch_mosaic_tiles_four_batch_images() -> None:
    # Channel 0 names the source image (constant, so it survives resizing exactly); channels 1-2
    # are texture, compared against an independent resize of the source found there.
    b = 6
    images = torch.rand(b, 3, H, W, generator=_gen(2))
    images[:, 0] = (torch.arange(b, dtype=torch.float32)[:, None, None] + 1) / 10
    targets = [_target([], []) for _ in range(b)]
    out, _ = augment_batch(images, targets, _mosaic_only(), _gen(4))
    ids = (out[:, 0] * 10).round().long() - 1  # [B, H, W] source index of every pixel
    for i in range(b):
        cx = int((ids[i, 0] != ids[i, 0, 0]).nonzero()[0])  # first column of the top-right quadrant
        cy = int((ids[i, :, 0] != ids[i, 0, 0]).nonzero()[0])
        assert W // 4 <= cx <= 3 * W // 4 and H // 4 <= cy <= 3 * H // 4
        picked = [int(_quadrant(ids[i][None], cx, cy, q)[0, 0, 0]) for q in range(4)]
        assert len(set(picked)) == 4 and i in picked  # itself and three other batch images
        for q, j in enumerate(picked):
            assert torch.allclose(_quadrant(out[i], cx, cy, q), _expected_quadrant(images[j], cx, cy, q),
                                  atol=1e-4), (i, q)


def test_boxes_cover_their_coloured_rectangles() -> None:
    # Image j: black with one rectangle of its own colour, labelled j. After the mosaic every
    # kept box must match the extent of that colour in its output image.
    rects = [[10, 8, 40, 30], [50, 20, 90, 60], [4, 30, 30, 62], [30, 4, 70, 40], [60, 10, 92, 34],
             [20, 20, 80, 50], [0, 0, 24, 24], [70, 40, 96, 64]]
    colours = torch.tensor([[1, 0, 0], [0, 1, 0], [0, 0, 1], [1, 1, 0], [1, 0, 1], [0, 1, 1],
                            [1, 1, 1], [1, .5, 0]])
    images = torch.zeros(len(rects), 3, H, W)
    for j, (x1, y1, x2, y2) in enumerate(rects):
        images[j, :, y1:y2, x1:x2] = colours[j][:, None, None]
    targets = [_target([r], [j]) for j, r in enumerate(rects)]
    out, new = augment_batch(images, targets, _mosaic_only(), _gen(6))
    compared = 0
    for i in range(len(rects)):
        assert len(set(new[i]["labels"].tolist())) == len(new[i]["labels"])
        for box, label in zip(new[i]["boxes"], new[i]["labels"]):
            mask = ((out[i] - colours[label][:, None, None]).abs() < 0.25).all(0)
            ys, xs = mask.nonzero(as_tuple=True)
            extent = torch.tensor([xs.min(), ys.min(), xs.max() + 1, ys.max() + 1], dtype=torch.float32)
            assert torch.allclose(box, extent, atol=1.5), (i, int(label), box, extent)
            compared += 1
    assert compared >= 12


def test_boxes_cut_away_are_dropped_and_partial_ones_clipped() -> None:
    # Centre (16, 48) of a 64 x 64 image: the top-left quadrant is 16 wide, 48 high, so source 0
    # is resized to 48 x 48 (x' = 0.75 x - 32, y' = 0.75 y) and only its right third shows.
    images = torch.rand(4, 3, 64, 64, generator=_gen(7))
    boxes = [[0, 8, 20, 40],     # x' in [-32, -17]: cut away entirely
             [30, 8, 48, 40],    # x' in [-9.5, 4]: 4 / 13.5 visible, under min_visible = 0.4
             [36, 8, 52, 40],    # x' in [-5, 7]: 7 / 12 visible, kept and clipped at x' = 0
             [48, 0, 64, 64]]    # x' in [4, 16], y' in [0, 48]: kept whole
    targets = [_target(boxes, [0, 1, 2, 3])] + [_target([], [])] * 3
    _, new = mosaic(images, targets, torch.tensor([[0, 1, 2, 3]]), torch.tensor([[16, 48]]), 0.4)
    assert torch.equal(new[0]["labels"], torch.tensor([2, 3]))
    expected = torch.tensor([[0, 6, 7, 30], [4, 0, 16, 48]], dtype=torch.float32)
    assert torch.allclose(new[0]["boxes"], expected, atol=1e-4)


def test_only_chosen_images_change_and_inputs_untouched() -> None:
    images = torch.rand(16, 3, H, W, generator=_gen(8))
    original = images.clone()
    targets = [_target([[10, 10, 50, 50]], [1]) for _ in range(16)]
    off = _mosaic_only(mosaic_p=0.0)
    out, new = augment_batch(images, targets, _mosaic_only(mosaic_p=0.5), _gen(9))
    plain, _ = augment_batch(images, targets, off, _gen(9))
    same = [bool(torch.allclose(out[i], plain[i], atol=1e-5)) for i in range(16)]
    assert 0 < sum(same) < 16
    assert torch.equal(images, original)
    assert all(torch.equal(t["boxes"], torch.tensor([[10.0, 10, 50, 50]])) for t in targets)
    assert all(len(new[i]["boxes"]) == 1 for i in range(16) if same[i])


@pytest.mark.parametrize("batch_size", [1, 2])
def test_small_batches_reuse_images(batch_size: int) -> None:
    images = torch.rand(batch_size, 3, H, W, generator=_gen(13))
    targets = [_target([[20, 10, 60, 50]], [0]) for _ in range(batch_size)]
    out, new = augment_batch(images, targets, _mosaic_only(), _gen(14))
    assert out.shape == images.shape and len(new) == batch_size
    assert out.min() >= 0 and out.max() <= 1


# "meta" runs the device code path without a GPU: the pixels move, the mosaic's targets do not.
@pytest.mark.parametrize("device", ["cpu", "meta", pytest.param("cuda", marks=pytest.mark.skipif(
    not torch.cuda.is_available(), reason="needs CUDA"))])
def test_mosaic_runs_on_the_batch_device(device: str) -> None:
    images = torch.rand(4, 3, H, W, generator=_gen(15))
    targets = [_target([[10, 10, 50, 50]], [1]), _target([], []), _target([[60, 5, 90, 30]], [2]),
               _target([], [])]
    sources, centres = torch.tensor([[0, 1, 2, 3], [2, 3, 0, 1]]), torch.tensor([[48, 32], [30, 40]])
    out, new = mosaic(images.to(device), targets, sources, centres, 0.4)
    assert out.device.type == device and out.shape == (2, 3, H, W)
    for t in new:
        assert t["boxes"].device.type == "cpu" and t["labels"].device.type == "cpu"
    if device != "meta":
        reference, _ = mosaic(images, targets, sources, centres, 0.4)
        assert torch.allclose(out.cpu(), reference, atol=1e-5)


@pytest.mark.parametrize("value", [-0.1, 1.5])
def test_config_rejects_bad_mosaic_p(value: float) -> None:
    with pytest.raises(ValueError, match="mosaic_p"):
        AugmentConfig(mosaic_p=value)


def test_cli_flag_reaches_the_config(tmp_path) -> None:
    args = build_parser().parse_args(["distill", "--teacher", "t", "--student", "s", "--data", "d",
                                      "--out", str(tmp_path / "r"), "--mosaic", "0.5"])
    _, cfg = _training_run(args)
    assert cfg.augment.mosaic_p == 0.5
    assert cfg.augment.flip_p == AugmentConfig().flip_p  # the other augmentation keeps its defaults


@pytest.mark.parametrize("command", [
    ["train", "--data", "d", "--val", "v", "--arch", "yolo-lite-n"],
    ["distill", "--teacher", "shapes-teacher", "--student", "yolo-lite-n", "--data", "noise:gaussian"],
])
def test_cli_rejects_bad_mosaic(command: list[str], tmp_path, capsys) -> None:
    assert main([*command, "--out", str(tmp_path / "r"), "--mosaic", "1.5"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "Traceback" not in err
    assert err.startswith("diode: error: ") and "--mosaic" in err
