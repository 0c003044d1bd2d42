"""Box-aware synthesis augmentation: each operation checked alone against its definition.

Roll jitter is circular (torch.roll) with boxes shifted by the same (dx, dy) then clamped;
flip mirrors images and boxes (x1' = W - x2, x2' = W - x1); erasing zeroes one rectangle;
boxes whose clamped area falls below 1 px^2 are dropped with their labels.
"""

from __future__ import annotations

import itertools

import pytest
import torch

from diode.config import SynthAugmentConfig
from diode.synthesis.augment import augment_synthesis

OFF = dict(flip_p=0.0, brightness=0.0, contrast=0.0, erase_p=0.0)


def cfg(**kwargs) -> SynthAugmentConfig:
    return SynthAugmentConfig(**{**OFF, **kwargs})


def target(boxes: list[list[float]], labels: list[int]) -> dict[str, torch.Tensor]:
    return {"boxes": torch.tensor(boxes, dtype=torch.float32).reshape(-1, 4),
            "labels": torch.tensor(labels, dtype=torch.int64)}


def gen(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def images(b: int, h: int, w: int, seed: int = 0) -> torch.Tensor:
    """Random, strictly positive pixels (so erased zeros and roll offsets are unambiguous)."""
    return 0.1 + 0.8 * torch.rand((b, 3, h, w), generator=gen(seed))


def find_shift(out: torch.Tensor, x: torch.Tensor, jitter: int) -> tuple[int, int]:
    """The unique (dx, dy) in [-J, J]^2 with out == torch.roll(x, (dy, dx), dims=(H, W))."""
    matches = [(dx, dy) for dx, dy in itertools.product(range(-jitter, jitter + 1), repeat=2)
               if torch.equal(out, torch.roll(x, shifts=(dy, dx), dims=(-2, -1)))]
    assert len(matches) == 1, matches
    return matches[0]


def clamp_box(box: list[float], h: int, w: int) -> list[float]:
    x1, y1, x2, y2 = box
    return [min(max(x1, 0), w), min(max(y1, 0), h), min(max(x2, 0), w), min(max(y2, 0), h)]


@pytest.mark.parametrize("size", [(64, 64), (64, 96)])
def test_everything_off_is_identity(size: tuple[int, int]) -> None:
    x = images(3, *size)
    targets = [target([[5, 6, 30, 40]], [1]), target([[0, 0, size[1], size[0]], [10, 10, 12, 12]], [0, 2]),
               target([], [])]
    out, new = augment_synthesis(x, targets, cfg(), jitter=0, gen=gen())
    assert torch.equal(out, x)
    for t, n in zip(targets, new):
        assert torch.equal(n["boxes"], t["boxes"]) and torch.equal(n["labels"], t["labels"])


@pytest.mark.parametrize("size", [(64, 64), (64, 96)])
def test_roll_jitter_moves_pixels_and_boxes_together(size: tuple[int, int]) -> None:
    h, w = size
    jitter = 6
    x = images(6, h, w)
    base = [[10.0, 12.0, 40.0, 50.0], [0.0, 2.0, 8.0, 9.0]]  # the second touches the left edge
    targets = [target(base, [1, 2]) for _ in range(6)]
    out, new = augment_synthesis(x, targets, cfg(), jitter=jitter, gen=gen(3))
    shifts = []
    for i in range(6):
        dx, dy = find_shift(out[i], x[i], jitter)
        shifts.append((dx, dy))
        expected, labels = [], []
        for box, label in zip(base, [1, 2]):
            moved = clamp_box([box[0] + dx, box[1] + dy, box[2] + dx, box[3] + dy], h, w)
            if (moved[2] - moved[0]) * (moved[3] - moved[1]) >= 1:
                expected.append(moved)
                labels.append(label)
        assert torch.allclose(new[i]["boxes"], torch.tensor(expected).reshape(-1, 4))
        assert new[i]["labels"].tolist() == labels
    assert len(set(shifts)) > 1  # re-sampled per image


@pytest.mark.parametrize("size", [(64, 64), (64, 96)])
def test_flip_mirrors_images_and_boxes(size: tuple[int, int]) -> None:
    h, w = size
    x = images(2, h, w)
    targets = [target([[5, 6, 30, 40], [50, 0, w, 10]], [0, 1]), target([[0, 0, 1, 1]], [2])]
    out, new = augment_synthesis(x, targets, cfg(flip_p=1.0), jitter=0, gen=gen())
    assert torch.equal(out, x.flip(-1))
    # x1' = W - x2, x2' = W - x1; y unchanged.
    assert torch.equal(new[0]["boxes"], torch.tensor([[w - 30, 6, w - 5, 40], [0, 0, w - 50, 10]]).float())
    assert torch.equal(new[1]["boxes"], torch.tensor([[w - 1, 0, w, 1]]).float())
    assert new[0]["labels"].tolist() == [0, 1] and new[1]["labels"].tolist() == [2]


def test_boxes_rolled_outside_are_dropped() -> None:
    h, w = 64, 64
    b = 32
    x = images(b, h, w)
    # A 3.5 x 1 px box at the right edge (clamped areas in (0, 1) happen: dx = 3 leaves 0.5 px^2)
    # and a large central one; a big jitter pushes the thin one out of the frame.
    thin, big = [60.5, 20.0, 64.0, 21.0], [20.0, 20.0, 44.0, 44.0]
    targets = [target([thin, big], [3, 4]) for _ in range(b)]
    out, new = augment_synthesis(x, targets, cfg(), jitter=30, gen=gen(1))
    dropped = 0
    for i, t in enumerate(new):
        boxes = t["boxes"]
        assert len(boxes) == len(t["labels"])
        area = (boxes[:, 2] - boxes[:, 0]) * (boxes[:, 3] - boxes[:, 1])
        assert (area >= 1).all()
        assert (boxes[:, 0] >= 0).all() and (boxes[:, 1] >= 0).all()
        assert (boxes[:, 2] <= w).all() and (boxes[:, 3] <= h).all()
        assert 4 in t["labels"].tolist()  # the central box survives any shift of at most 30 px
        dx, dy = find_shift(out[i], x[i], 30)
        x1, y1, x2, y2 = clamp_box([thin[0] + dx, thin[1] + dy, thin[2] + dx, thin[3] + dy], h, w)
        thin_kept = 3 in t["labels"].tolist()
        assert thin_kept == ((x2 - x1) * (y2 - y1) >= 1), (dx, dy)
        dropped += not thin_kept
    assert 0 < dropped < b


def test_sub_pixel_boxes_dropped_even_without_motion() -> None:
    # Areas 0.5, 1.0 (kept: the threshold is area >= 1 px^2) and 0 (a line).
    t = target([[10, 10, 10.5, 11], [10, 10, 11, 11], [5, 5, 5, 30]], [0, 1, 2])
    _, new = augment_synthesis(images(1, 32, 32), [t], cfg(), jitter=0, gen=gen())
    assert new[0]["boxes"].tolist() == [[10.0, 10.0, 11.0, 11.0]] and new[0]["labels"].tolist() == [1]


def test_erase_zeroes_one_rectangle_of_the_requested_area() -> None:
    h, w = 64, 64
    x = images(8, h, w)
    targets = [target([[1, 1, 9, 9]], [0]) for _ in range(8)]
    # Aspect 1 and area 1/4: sides are exactly sqrt(0.25 * 64 * 64) = 32 px.
    exact = cfg(erase_p=1.0, erase_area=(0.25, 0.25), erase_aspect=(1.0, 1.0))
    out, new = augment_synthesis(x, targets, exact, jitter=0, gen=gen())
    for i in range(8):
        zero = out[i] == 0
        assert torch.equal(zero[0], zero[1]) and torch.equal(zero[0], zero[2])  # all channels
        rows, cols = zero[0].any(1), zero[0].any(0)
        assert torch.equal(zero[0], rows[:, None] & cols[None, :])  # a rectangle
        assert int(rows.sum()) == 32 and int(cols.sum()) == 32
        assert torch.equal(out[i][~zero], x[i][~zero])  # the rest untouched
    assert torch.equal(new[0]["boxes"], targets[0]["boxes"])  # erasing never moves boxes

    lo, hi = 0.02, 0.2
    ranged = cfg(erase_p=1.0, erase_area=(lo, hi))
    out, _ = augment_synthesis(x, targets, ranged, jitter=0, gen=gen(5))
    for i in range(8):
        zero = out[i, 0] == 0
        rows, cols = zero.any(1), zero.any(0)
        nr, nc = int(rows.sum()), int(cols.sum())
        assert torch.equal(zero, rows[:, None] & cols[None, :])
        # A real side s covers floor(s) or ceil(s) pixel rows, so s is within (n - 1, n + 1).
        assert (nr - 1) * (nc - 1) <= hi * h * w and (nr + 1) * (nc + 1) >= lo * h * w


def test_erase_p_zero_and_one() -> None:
    x = images(4, 64, 64)
    targets = [target([], []) for _ in range(4)]
    out, _ = augment_synthesis(x, targets, cfg(erase_p=0.0), jitter=0, gen=gen())
    assert (out != 0).all()
    out, _ = augment_synthesis(x, targets, cfg(erase_p=1.0), jitter=0, gen=gen())
    assert all((out[i] == 0).any() for i in range(4))


def test_brightness_and_contrast_are_per_image_affine() -> None:
    x = images(4, 32, 32)
    targets = [target([], []) for _ in range(4)]
    out, _ = augment_synthesis(x, targets, cfg(brightness=0.2, contrast=0.1), jitter=0, gen=gen())
    # out = (x + beta_i) * gamma_i: one (beta, gamma) per image, the same for every pixel.
    for i in range(4):
        flat_x, flat_o = x[i].flatten(), out[i].flatten()
        gamma = (flat_o[1] - flat_o[0]) / (flat_x[1] - flat_x[0])
        beta = flat_o[0] / gamma - flat_x[0]
        assert torch.allclose(flat_o, (flat_x + beta) * gamma, atol=1e-5)
        assert not torch.allclose(gamma, torch.tensor(1.0)) and not torch.allclose(beta, torch.tensor(0.0))


def test_zoom_scales_boxes_about_the_centre() -> None:
    # A white square [24, 40)^2 in a 64 x 64 black image, zoom 2 about the centre (32, 32):
    # x' = (x - 32) * 2 + 32 -> box [16, 16, 48, 48], and the white pixels cover rows/cols 16..47.
    x = torch.zeros(1, 3, 64, 64)
    x[..., 24:40, 24:40] = 1
    out, new = augment_synthesis(x, [target([[24, 24, 40, 40]], [0])], cfg(scale=(2.0, 2.0)), jitter=0, gen=gen())
    assert torch.allclose(new[0]["boxes"], torch.tensor([[16.0, 16.0, 48.0, 48.0]]))
    white = (out[0, 0] > 0.5).nonzero()
    assert white.min(0).values.tolist() == [16, 16] and white.max(0).values.tolist() == [47, 47]
    # Zoom 1/2: the box shrinks to [28, 28, 36, 36]; the new border is black.
    out, new = augment_synthesis(torch.ones(1, 3, 64, 64), [target([[24, 24, 40, 40]], [0])],
                                 cfg(scale=(0.5, 0.5)), jitter=0, gen=gen())
    assert torch.allclose(new[0]["boxes"], torch.tensor([[28.0, 28.0, 36.0, 36.0]]))
    assert float(out[0, :, :8].abs().max()) == 0.0 and torch.allclose(out[0, :, 24:40, 24:40], torch.ones(3, 16, 16))


def test_same_seed_same_output_different_seed_different() -> None:
    x = images(4, 64, 96)
    targets = [target([[10, 10, 50, 40]], [1]) for _ in range(4)]
    full = SynthAugmentConfig()  # everything on, paper values
    a, ta = augment_synthesis(x, targets, full, jitter=8, gen=gen(7))
    b, tb = augment_synthesis(x, targets, full, jitter=8, gen=gen(7))
    c, _ = augment_synthesis(x, targets, full, jitter=8, gen=gen(8))
    assert torch.equal(a, b)
    assert all(torch.equal(p["boxes"], q["boxes"]) and torch.equal(p["labels"], q["labels"]) for p, q in zip(ta, tb))
    assert not torch.equal(a, c)


def test_gradient_flows_to_input() -> None:
    x = images(4, 64, 64).requires_grad_(True)
    targets = [target([[10, 10, 50, 40]], [1]) for _ in range(4)]
    out, _ = augment_synthesis(x, targets, cfg(erase_p=1.0, flip_p=0.5), jitter=5, gen=gen(2))
    out.sum().backward()
    # Roll and flip permute pixels; erasing multiplies by 0: every input pixel gets gradient 1
    # unless it lands in the erased rectangle (gradient 0). Count both.
    assert set(x.grad.unique().tolist()) == {0.0, 1.0}
    assert int((x.grad == 0).sum()) == int((out == 0).sum())

    x2 = images(2, 64, 64).requires_grad_(True)
    out, _ = augment_synthesis(x2, [target([], [])] * 2, SynthAugmentConfig(), jitter=5, gen=gen(2))
    out.square().sum().backward()
    assert x2.grad is not None and x2.grad.abs().sum() > 0


# "meta" runs the device code path without a GPU: the images move, the targets must not.
@pytest.mark.parametrize("device", ["cpu", "meta", pytest.param("cuda", marks=pytest.mark.skipif(
    not torch.cuda.is_available(), reason="needs CUDA"))])
def test_targets_stay_on_cpu(device: str) -> None:
    x = images(2, 64, 96).to(device)
    targets = [target([[10, 10, 50, 40]], [1]), target([], [])]
    out, new = augment_synthesis(x, targets, SynthAugmentConfig(), jitter=8, gen=gen())
    assert out.device.type == device and out.shape == x.shape
    assert targets[0]["boxes"].device.type == "cpu"
    for t in new:
        assert t["boxes"].device.type == "cpu" and t["labels"].device.type == "cpu"
        assert t["boxes"].dtype == torch.float32 and t["labels"].dtype == torch.int64
    assert new[1]["boxes"].shape == (0, 4)


def test_roll_and_flip_together_match_torch_roll_then_flip_with_gradient() -> None:
    """The fused pixel permutation equals torch.roll followed by a flip, image by image, and its
    gradient (a scatter through the same permutation) equals autograd through roll and flip."""
    from diode.synthesis.augment import _roll_flip

    x = images(4, 24, 40).requires_grad_(True)
    dx, dy = torch.tensor([3, -7, 0, 39]), torch.tensor([-2, 5, 0, 23])
    flip = torch.tensor([True, False, True, False])
    weights = torch.randn(4, 3, 24, 40, generator=gen(5))
    out = _roll_flip(x, dx, dy, flip)
    (grad,) = torch.autograd.grad((out * weights).sum(), x)
    x2 = x.detach().clone().requires_grad_(True)
    rolled = [torch.roll(x2[b], shifts=(int(dy[b]), int(dx[b])), dims=(-2, -1)) for b in range(4)]
    expected = torch.stack([r.flip(-1) if f else r for r, f in zip(rolled, flip.tolist())])
    (expected_grad,) = torch.autograd.grad((expected * weights).sum(), x2)
    assert torch.equal(out, expected)
    assert torch.allclose(grad, expected_grad)
