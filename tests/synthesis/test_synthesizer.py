"""The DIODE optimisation loop on a tiny random-init teacher (yolo-lite-n, 64 x 64, a few steps).

Checks the result contract, that the teacher is left untouched, seed determinism,
multi-resolution stages, tiling, false-positive aggregation, the single place where loss
terms are weighted, and bf16 autocast on the CPU.
"""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from diode.config import BNConfig, LossWeights, StageConfig, SynthAugmentConfig, SynthesisConfig, TilingConfig
from diode.detectors.registry import build_detector
from diode.synthesis.fp_aggregation import FPConfig
from diode.synthesis.priors import bn_loss
from diode.synthesis.synthesizer import TERMS, Synthesizer

SIZE = (64, 64)
KEYS = {"task", "bn", "bn_first", "tv_l1", "tv_l2", "l2", "total"}


def teacher():
    torch.manual_seed(0)
    return build_detector("yolo-lite-n", class_names=["a", "b", "c"], image_size=SIZE)


def target(boxes: list[list[float]], labels: list[int]) -> dict[str, torch.Tensor]:
    return {"boxes": torch.tensor(boxes, dtype=torch.float32).reshape(-1, 4),
            "labels": torch.tensor(labels, dtype=torch.int64)}


def two_targets():
    return [target([[8, 8, 40, 40]], [0]), target([[20, 16, 60, 56]], [2])]


def config(iterations: int = 5, batch_size: int = 2, **kwargs) -> SynthesisConfig:
    stage = StageConfig(iterations=iterations, lr=0.1, lr_min=0.0, jitter=0.1)
    return SynthesisConfig(batch_size=batch_size, stages=[stage], log_every=1, **kwargs)


def gen(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def test_result_contract() -> None:
    synth = Synthesizer(teacher(), config())
    events = []
    result = synth.synthesize(two_targets(), SIZE, gen(), callback=lambda e, info: events.append((e, info)))
    synth.close()
    assert result.images.shape == (2, 3, 64, 64)
    assert not result.images.requires_grad
    assert result.images.min() >= 0 and result.images.max() <= 1
    assert set(result.losses) == KEYS
    assert all(math.isfinite(v) for v in result.losses.values())
    assert result.iterations == 5 and len(result.history) == 5
    assert [h["iteration"] for h in result.history] == [1, 2, 3, 4, 5]
    assert all(set(h) == KEYS | {"iteration"} for h in result.history)
    assert result.losses == {k: v for k, v in result.history[-1].items() if k != "iteration"}
    assert events == [("iteration", {"iteration": i}) for i in range(1, 6)]
    assert result.fp_added == 0
    for got, want in zip(result.targets, two_targets()):
        assert torch.equal(got["boxes"], want["boxes"]) and torch.equal(got["labels"], want["labels"])


def test_log_every_keeps_last_iteration() -> None:
    cfg = config()
    cfg.log_every = 2
    synth = Synthesizer(teacher(), cfg)
    result = synth.synthesize(two_targets(), SIZE, gen())
    assert [h["iteration"] for h in result.history] == [2, 4, 5]


def test_teacher_left_untouched() -> None:
    model = teacher()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    synth = Synthesizer(model, config())
    synth.synthesize(two_targets(), SIZE, gen())
    after = model.state_dict()
    assert before.keys() == after.keys()
    changed = [k for k in before if not torch.equal(before[k], after[k])]
    assert changed == []  # weights, running_mean / running_var and num_batches_tracked
    assert all(p.grad is None for p in model.parameters())
    synth.close()
    assert all("forward" not in m.__dict__ for _, m in model.bn_layers())  # layers restored


def test_same_seed_same_images_different_seed_different() -> None:
    synth = Synthesizer(teacher(), config(iterations=3))
    a = synth.synthesize(two_targets(), SIZE, gen(1))
    b = synth.synthesize(two_targets(), SIZE, gen(1))  # reusable: hooks attached once
    c = synth.synthesize(two_targets(), SIZE, gen(2))
    assert torch.equal(a.images, b.images)
    assert a.losses == b.losses
    assert not torch.equal(a.images, c.images)


def test_images_move_away_from_init() -> None:
    init = torch.rand((2, 3, 64, 64), generator=gen(4))
    synth = Synthesizer(teacher(), config(iterations=2))
    result = synth.synthesize(two_targets(), SIZE, gen(), init=init.clone())
    assert result.images.shape == init.shape
    assert not torch.equal(result.images, init)


def test_multi_resolution_stages() -> None:
    stages = [StageConfig(iterations=3, scale=0.5, pixel_scale=0.5, lr=0.1, jitter=0.1),
              StageConfig(iterations=2, scale=1.0, pixel_scale=0.5, lr=0.05, jitter=0.1)]
    cfg = SynthesisConfig(batch_size=2, stages=stages, log_every=1)
    seen_sizes = []
    model = teacher()
    synth = Synthesizer(model, cfg)
    # Stage 1 runs the teacher at 32 x 32 (pixels 16 x 16), stage 2 at 64 x 64 (pixels 32 x 32).
    handle = model.register_forward_pre_hook(lambda m, inputs: seen_sizes.append(tuple(inputs[0].shape[-2:])))
    result = synth.synthesize(two_targets(), SIZE, gen())
    handle.remove()
    assert result.images.shape == (2, 3, 64, 64)
    assert result.images.min() >= 0 and result.images.max() <= 1
    assert result.iterations == 5 and len(result.history) == 5
    assert seen_sizes == [(32, 32)] * 3 + [(64, 64)] * 2
    # Targets come back in the output frame.
    for got, want in zip(result.targets, two_targets()):
        assert torch.allclose(got["boxes"], want["boxes"])
    # pixel_scale 0.5: the final image is a bilinear x2 upsampling of a 32 x 32 pixel grid, so it
    # lies in the range of the separable operator out = Uy p Ux^T (U: 64 x 32 linear upsampling).
    assert in_upsampling_range(result.images, 32)
    full = Synthesizer(teacher(), config()).synthesize(two_targets(), SIZE, gen())
    assert not in_upsampling_range(full.images, 32)  # full-resolution pixels are not


def in_upsampling_range(images: torch.Tensor, low: int) -> bool:
    high = images.shape[-1]
    u = F.interpolate(torch.eye(low, dtype=torch.float64)[None], size=high, mode="linear",
                      align_corners=False)[0].T  # [high, low]: column j = upsampled unit vector j
    out = images.double()
    p = torch.linalg.pinv(u) @ out @ torch.linalg.pinv(u).T
    return torch.allclose(u @ p @ u.T, out, atol=1e-5)


def test_tiling_maps_targets_into_quadrants() -> None:
    boxes = [[8, 8, 40, 40], [0, 0, 64, 32], [16, 24, 48, 64], [4, 12, 60, 52]]
    targets = [target([b], [i % 3]) for i, b in enumerate(boxes)]
    refine = StageConfig(iterations=2, lr=0.05, jitter=0.1)
    cfg = config(iterations=2, batch_size=4, tiling=TilingConfig(enabled=True, grid=(2, 2), refine=refine))
    result = Synthesizer(teacher(), cfg).synthesize(targets, SIZE, gen())
    assert result.images.shape == (1, 3, 64, 64)
    assert result.images.min() >= 0 and result.images.max() <= 1
    assert result.iterations == 4 and len(result.history) == 4
    assert len(result.targets) == 1
    # Image j goes to cell (row, col) = divmod(j, 2), scaled by 1/2: x' = x / 2 + 32 col, y' = y / 2 + 32 row.
    expected = torch.tensor([[b[0] / 2 + 32 * col, b[1] / 2 + 32 * row, b[2] / 2 + 32 * col, b[3] / 2 + 32 * row]
                             for j, b in enumerate(boxes) for row, col in [divmod(j, 2)]])
    assert torch.allclose(result.targets[0]["boxes"], expected)
    assert result.targets[0]["labels"].tolist() == [0, 1, 2, 0]


def test_fp_aggregation_adds_confident_detection(monkeypatch: pytest.MonkeyPatch) -> None:
    model = teacher()
    fp_box = torch.tensor([[36.0, 36.0, 60.0, 60.0]])  # IoU 0 with the requested boxes, area 14 %

    def predict(images, score_thresh=None, iou_thresh=None):
        return [{"boxes": fp_box.clone(), "scores": torch.tensor([0.9]), "labels": torch.tensor([1])}
                for _ in range(len(images))]

    monkeypatch.setattr(model, "predict", predict)
    cfg = config(fp=FPConfig(enabled=True, start=0, every=1))
    targets = [target([[4, 4, 28, 28]], [0]), target([[2, 6, 30, 26]], [2])]
    result = Synthesizer(model, cfg).synthesize(targets, SIZE, gen())
    # Added once per image: afterwards the same box overlaps an existing target (IoU 1).
    assert result.fp_added == 2
    for got, want in zip(result.targets, targets):
        assert torch.allclose(got["boxes"], torch.cat([want["boxes"], fp_box]))
        assert got["labels"].tolist() == want["labels"].tolist() + [1]
        assert got["boxes"].device.type == "cpu"


def test_fp_aggregation_disabled_calls_nothing(monkeypatch: pytest.MonkeyPatch) -> None:
    model = teacher()

    def predict(*args, **kwargs):
        raise AssertionError("predict must not run when FP aggregation is disabled")

    monkeypatch.setattr(model, "predict", predict)
    result = Synthesizer(model, config(iterations=2)).synthesize(two_targets(), SIZE, gen())
    assert result.fp_added == 0


@pytest.mark.parametrize("only", TERMS)
def test_total_is_the_single_weighted_term(only: str) -> None:
    weights = LossWeights(**{k: (1.0 if k == only else 0.0) for k in TERMS})
    cfg = SynthesisConfig(batch_size=2, stages=[StageConfig(iterations=2, lr=0.1, jitter=0.1, weights=weights)],
                          log_every=1)
    result = Synthesizer(teacher(), cfg).synthesize(two_targets(), SIZE, gen())
    for entry in result.history:
        assert entry["total"] == pytest.approx(entry[only], rel=1e-6, abs=1e-7)


def test_total_is_weighted_sum_of_terms() -> None:
    weights = LossWeights(task=0.5, bn=0.1, bn_first=2.0, tv_l1=3.0, tv_l2=0.25, l2=0.01)
    cfg = SynthesisConfig(batch_size=2, stages=[StageConfig(iterations=2, lr=0.1, jitter=0.1, weights=weights)],
                          log_every=1)
    result = Synthesizer(teacher(), cfg).synthesize(two_targets(), SIZE, gen())
    for entry in result.history:
        # total = 0.5 task + 0.1 bn + 2 bn_first + 3 tv_l1 + 0.25 tv_l2 + 0.01 l2
        expected = sum(getattr(weights, k) * entry[k] for k in TERMS)
        assert entry["total"] == pytest.approx(expected, rel=1e-5)
        assert entry["bn_first"] <= entry["bn"] + 1e-6  # first layer is one of the summed layers
        assert all(entry[k] > 0 for k in ("task", "bn", "bn_first", "tv_l1", "tv_l2", "l2"))


def test_bf16_runs_on_cpu() -> None:
    cfg = config(iterations=2, precision="bf16")
    model = teacher()
    conv_dtypes = []
    model.stem[0].register_forward_hook(lambda m, inputs, output: conv_dtypes.append(output.dtype))
    result = Synthesizer(model, cfg).synthesize(two_targets(), SIZE, gen())
    assert conv_dtypes and set(conv_dtypes) == {torch.bfloat16}  # the teacher ran under autocast
    assert result.images.dtype == torch.float32 and result.images.shape == (2, 3, 64, 64)
    assert set(result.losses) == KEYS
    assert all(math.isfinite(v) for v in result.losses.values())


def test_non_square_images() -> None:
    targets = [target([[8, 8, 40, 40]], [0]), target([[30, 10, 90, 60]], [1])]
    result = Synthesizer(teacher(), config(iterations=2)).synthesize(targets, (64, 96), gen())
    assert result.images.shape == (2, 3, 64, 96)
    for got, want in zip(result.targets, targets):
        assert torch.allclose(got["boxes"], want["boxes"])


@pytest.mark.filterwarnings("ignore:var_mean")
def test_tiling_grid_larger_than_batch_fails_early_naming_the_grid() -> None:
    tiling = TilingConfig(enabled=True, grid=(2, 2), refine=StageConfig(iterations=1, lr=0.05))
    with pytest.raises(ValueError, match="tiling grid"):
        config(iterations=1, batch_size=2, tiling=tiling)
    cfg = config(iterations=1, batch_size=4, tiling=tiling)
    with pytest.raises(ValueError, match="tiling grid"):  # a batch that does not fill the grid
        Synthesizer(teacher(), cfg).synthesize(two_targets(), SIZE, gen())


def test_pixels_clamped_after_every_step() -> None:
    # Augmentation off and no jitter: the teacher sees the optimised pixels themselves, which are
    # clamped to [0, 1] after every step (lr 0.3 sign steps would leave [0, 1] otherwise).
    off = SynthAugmentConfig(flip_p=0.0, brightness=0.0, contrast=0.0, erase_p=0.0)
    cfg = SynthesisConfig(batch_size=2, stages=[StageConfig(iterations=4, lr=0.3, jitter=0.0)], augment=off,
                          log_every=1)
    model = teacher()
    ranges = []
    model.register_forward_pre_hook(
        lambda m, inputs: ranges.append((float(inputs[0].detach().min()), float(inputs[0].detach().max()))))
    Synthesizer(model, cfg).synthesize(two_targets(), SIZE, gen())
    assert len(ranges) == 4
    assert all(0.0 <= lo and hi <= 1.0 for lo, hi in ranges)


def test_bn_terms_use_selected_layers_and_first_of_them() -> None:
    """`bn` is the feature-distribution loss over the selected layers only and `bn_first` that of
    the first selected layer alone, with cfg.bn's p and weights: checked against `bn_loss` on the
    selected layers' inputs, captured by hooks and reduced by hand."""
    model = teacher().eval()
    selected = [m for n, m in model.bn_layers() if n.startswith("stage2")]
    assert 1 < len(selected) < len(model.bn_layers())
    cfg = config(iterations=1, bn=BNConfig(layers="stage2*", p=1.0, mean_weight=0.5, var_weight=2.0))
    synth = Synthesizer(model, cfg)
    inputs = []
    hooks = [m.register_forward_pre_hook(lambda m, args: inputs.append(args[0].detach())) for m in selected]
    images = torch.rand(2, 3, *SIZE)
    _, terms = synth._losses(images, two_targets(), cfg.stages[0].weights, synth._bn_loss(), log=True)
    for hook in hooks:
        hook.remove()
    synth.close()
    assert len(inputs) == len(selected)
    stats = [(x.mean((0, 2, 3)), x.var((0, 2, 3), unbiased=False)) for x in inputs]
    running = [(m.running_mean, m.running_var) for m in selected]
    assert float(terms["bn"]) == pytest.approx(float(bn_loss(stats, running, 1.0, 0.5, 2.0)), rel=1e-4)
    assert float(terms["bn_first"]) == pytest.approx(float(bn_loss(stats[:1], running[:1], 1.0, 0.5, 2.0)), rel=1e-4)
    assert float(terms["bn_first"]) < float(terms["bn"])


def test_the_teachers_conv_bn_pairs_run_folded_with_the_same_terms() -> None:
    """The synthesizer's recorder folds every BN layer of yolo-lite into its conv (given the
    teacher), and the task and BN terms and the images' gradient are those of the unfolded layers."""
    from diode.synthesis.bn_stats import BNStatsRecorder

    model = teacher().eval()
    cfg = config(iterations=1, bn=BNConfig(normalize=True))
    synth = Synthesizer(model, cfg)
    images = torch.rand(2, 3, *SIZE)
    results = []
    for _ in range(2):
        x = images.clone().requires_grad_(True)
        total, terms = synth._losses(x, two_targets(), cfg.stages[0].weights, synth._bn_loss(), log=True)
        total.backward()
        results.append(({k: float(terms[k].detach()) for k in ("task", "bn", "bn_first")}, x.grad,
                        [f is not None for f in synth.recorder.folded]))
        synth.recorder.remove()
        synth.recorder = BNStatsRecorder(model.bn_layers())  # no network given: nothing folded
    synth.close()
    (folded_terms, folded_grad, folded), (terms, grad, unfolded) = results
    assert len(folded) == len(model.bn_layers()) and all(folded) and not any(unfolded)
    assert folded_terms == pytest.approx(terms, rel=1e-4)
    assert torch.allclose(folded_grad, grad, rtol=1e-3, atol=1e-3 * float(grad.abs().max()))


def test_multi_resolution_with_a_fixed_input_size_teacher() -> None:
    """torchvision detectors take exactly image_size: a half-resolution stage optimises pixels at
    half resolution, upsampled, and the teacher always sees 64 x 64."""
    torch.manual_seed(0)
    tv = build_detector("tv-fcos-mobilenetv2", class_names=["a", "b"], image_size=(64, 64)).eval()
    assert tv.fixed_input_size
    seen = []
    hook = tv.model.register_forward_pre_hook(lambda m, args: seen.append(tuple(args[0][0].shape[-2:])))
    stages = [StageConfig(iterations=2, scale=0.5, lr=0.05, betas=(0.9, 0.999), jitter=0.05),
              StageConfig(iterations=2, scale=1.0, lr=0.05, betas=(0.9, 0.999), jitter=0.05)]
    cfg = SynthesisConfig(batch_size=2, stages=stages, fp=FPConfig(enabled=False))
    synth = Synthesizer(tv, cfg)
    targets = [target([[8, 8, 40, 40]], [0]), target([[20, 10, 60, 50]], [1])]
    result = synth.synthesize(targets, (64, 64), gen())
    synth.close()
    hook.remove()
    assert result.images.shape == (2, 3, 64, 64) and result.iterations == 4
    assert seen and set(seen) == {(64, 64)}
    assert torch.allclose(result.targets[0]["boxes"], torch.tensor([[8.0, 8, 40, 40]]))


def test_an_iteration_makes_no_blocking_host_to_device_copy(blocking_copies) -> None:
    """Augmentation, the teacher's loss, the BN term, the priors and their backward move what
    they need to the device in non-blocking copies only (checked on the CPU, where the copies
    are no-ops but the calls are the same as on a GPU)."""
    from diode.synthesis.augment import augment_synthesis

    cfg = config(augment=SynthAugmentConfig(flip_p=0.5, erase_p=1.0))
    synth = Synthesizer(teacher().eval(), cfg)
    bn = synth._bn_loss()
    images = torch.rand(2, 3, *SIZE, requires_grad=True)
    with blocking_copies() as seen:
        aug, aug_targets = augment_synthesis(images, two_targets(), cfg.augment, 6, gen())
        total, _ = synth._losses(aug, aug_targets, cfg.stages[0].weights, bn, log=False)
        total.backward()
    synth.close()
    assert images.grad is not None and images.grad.abs().sum() > 0
    assert seen.calls == []
