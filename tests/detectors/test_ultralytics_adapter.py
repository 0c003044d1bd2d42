"""The optional ultralytics adapter: protocol, loss scaling, checkpoints, trusted .pt files, offline use.

Skipped as a whole without the ``ultralytics`` extra (every registered ``ul-*`` name is also run
through tests/detectors/test_conformance.py when it is installed).
"""

from __future__ import annotations

import copy
import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

pytest.importorskip("ultralytics")

from diode.cli import main  # noqa: E402
from diode.data.shapes import CLASS_NAMES as SHAPES_CLASSES  # noqa: E402
from diode.detectors.checkpoint import load_detector, save_checkpoint  # noqa: E402
from diode.detectors.registry import build_detector, list_detectors  # noqa: E402
from diode.detectors.ultralytics_adapter import ARCHITECTURES, UltralyticsDetector  # noqa: E402
from diode.errors import DiodeError  # noqa: E402

CLASS_NAMES = ["cat", "dog", "bird"]
SIZE = (64, 64)


def _images(batch: int = 2, size: tuple[int, int] = SIZE, seed: int = 0) -> torch.Tensor:
    return torch.rand(batch, 3, *size, generator=torch.Generator().manual_seed(seed))


def _target(boxes: list[list[float]], labels: list[int]) -> dict[str, torch.Tensor]:
    return {"boxes": torch.tensor(boxes, dtype=torch.float32).reshape(-1, 4),
            "labels": torch.tensor(labels, dtype=torch.int64)}


def _targets() -> list[dict[str, torch.Tensor]]:
    return [_target([[4, 6, 30, 40], [28, 20, 60, 58]], [0, 2]), _target([[10, 10, 26, 22]], [1])]


def _build(name: str = "ul-yolov8n", size: tuple[int, int] = SIZE,
           class_names: list[str] = CLASS_NAMES) -> UltralyticsDetector:
    torch.manual_seed(0)
    detector = build_detector(name, class_names=class_names, image_size=size)
    assert isinstance(detector, UltralyticsDetector)
    return detector


def _calibrated(detector: UltralyticsDetector, size: tuple[int, int] = SIZE) -> UltralyticsDetector:
    """Running BN statistics from one batch, so eval-mode outputs vary between locations (with the
    initial statistics the features of a random network fade and every box is the same)."""
    momentum = {bn: bn.momentum for _, bn in detector.bn_layers()}
    for bn in momentum:
        bn.momentum = 1.0
    with torch.no_grad():
        detector.train().model(_images(size=size, seed=9))
    for bn, value in momentum.items():
        bn.momentum = value
    return detector.eval()


def _bn_buffers(detector: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {n: b.clone() for n, b in detector.named_buffers()
            if n.rsplit(".", 1)[-1] in ("running_mean", "running_var", "num_batches_tracked")}


def _assert_contract(predictions: list[dict], batch: int, size: tuple[int, int], num_classes: int) -> None:
    assert len(predictions) == batch
    height, width = size
    for p in predictions:
        n = len(p["boxes"])
        assert p["boxes"].shape == (n, 4) and p["boxes"].dtype.is_floating_point
        assert p["labels"].shape == (n,) and p["labels"].dtype == torch.int64
        assert p["scores"].shape == (n,) and p["scores"].dtype.is_floating_point
        assert n <= 100
        if n:
            assert (p["boxes"][:, 0::2] >= 0).all() and (p["boxes"][:, 0::2] <= width).all()
            assert (p["boxes"][:, 1::2] >= 0).all() and (p["boxes"][:, 1::2] <= height).all()
            assert (p["boxes"][:, 2:] >= p["boxes"][:, :2]).all()
            assert ((p["labels"] >= 0) & (p["labels"] < num_classes)).all()
            assert ((p["scores"] >= 0) & (p["scores"] <= 1)).all()
            assert (p["scores"][:-1] >= p["scores"][1:]).all()


def test_registered_names_match_shipped_yamls() -> None:
    from ultralytics.utils import ROOT

    names = {n for n in list_detectors() if n.startswith("ul-")}
    assert names == set(ARCHITECTURES)
    assert {"ul-yolov8n", "ul-yolo11n", "ul-yolov5nu", "ul-yolov3u"} <= names
    for config, _, _ in ARCHITECTURES.values():
        assert (ROOT / "cfg" / "models" / config).is_file(), config


def test_losses_are_named_finite_and_weighted_like_ultralytics() -> None:
    from ultralytics.utils.loss import v8DetectionLoss

    detector = _build()
    images = _images()
    with detector.loss_mode():
        terms = detector.loss(images, _targets())
        assert set(terms) == {"box", "cls", "dfl"} == set(detector.loss_weights)
        for key, value in terms.items():
            assert value.dim() == 0 and torch.isfinite(value) and float(value.detach()) > 0, key
        # Parity: ultralytics' own criterion with its default gains returns gains * terms * batch size.
        reference = copy.deepcopy(detector.model)
        reference.args = SimpleNamespace(box=7.5, cls=0.5, dfl=1.5)
        batch = {"batch_idx": torch.tensor([0.0, 0.0, 1.0]), "cls": torch.tensor([[0.0], [2.0], [1.0]]),
                 "bboxes": torch.tensor([[17, 23, 26, 34], [44, 39, 32, 38], [18, 16, 16, 12]]) / 64.0}
        expected, _ = v8DetectionLoss(reference)(reference(images), batch)
    assert detector.loss_weights == {"box": 7.5, "cls": 0.5, "dfl": 1.5}
    got = torch.stack([detector.loss_weights[k] * terms[k] for k in ("box", "cls", "dfl")]) * len(images)
    assert torch.allclose(got, expected, rtol=1e-5), (got, expected)
    assert torch.allclose(detector.weighted_loss(terms) * len(images), expected.sum(), rtol=1e-5)


def test_gradients_reach_every_image() -> None:
    detector = _build()
    images = _images().requires_grad_(True)
    with detector.loss_mode():
        detector.weighted_loss(detector.loss(images, _targets())).backward()
    assert images.grad is not None and torch.isfinite(images.grad).all()
    assert (images.grad.flatten(1).abs().sum(1) > 0).all()


def test_loss_mode_keeps_bn_running_statistics() -> None:
    detector = _build()
    before = _bn_buffers(detector)
    assert before and len(detector.bn_layers()) == len(before) // 3
    images = _images().requires_grad_(True)
    with detector.loss_mode():
        assert detector.model.model[-1].training
        assert all(not bn.training for _, bn in detector.bn_layers())
        for _ in range(2):
            detector.weighted_loss(detector.loss(images, _targets())).backward()
    assert all(torch.equal(before[k], v) for k, v in _bn_buffers(detector).items())
    detector.train()  # sanity: plain train mode does move them
    detector.loss(images, _targets())
    assert any(not torch.equal(before[k], v) for k, v in _bn_buffers(detector).items())


def test_predictions_follow_the_contract() -> None:
    detector = _calibrated(_build())
    images = _images(batch=3, seed=1)
    _assert_contract(detector.predict(images), 3, SIZE, 3)
    _assert_contract(detector.predict(images, score_thresh=0.0), 3, SIZE, 3)
    assert all(len(p["boxes"]) == 0 for p in detector.predict(images, score_thresh=1.0))
    detector.max_detections = 4
    assert [len(p["boxes"]) for p in detector.predict(images, score_thresh=0.0)] == [4, 4, 4]


@pytest.mark.parametrize("empty", ["all", "some"])
def test_empty_targets(empty: str) -> None:
    detector = _build()
    none = _target([], [])
    targets = [none, none] if empty == "all" else [_targets()[0], none]
    images = _images().requires_grad_(True)
    with detector.loss_mode():
        terms = detector.loss(images, targets)
        detector.weighted_loss(terms).backward()
    assert set(terms) == {"box", "cls", "dfl"}
    assert all(torch.isfinite(v) for v in terms.values())
    assert torch.isfinite(images.grad).all()
    if empty == "all":  # no positives: only the classification term (all background) is left
        assert float(terms["box"].detach()) == 0 and float(terms["dfl"].detach()) == 0
        assert float(terms["cls"].detach()) > 0


@pytest.mark.parametrize("name", ["ul-yolov8n", "ul-yolo11n"])
def test_non_square_images(name: str) -> None:
    size = (64, 96)
    detector = _build(name, size)
    images = _images(size=size).requires_grad_(True)
    targets = [_target([[60, 8, 94, 40]], [2]), _target([[2, 30, 20, 62]], [0])]
    with detector.loss_mode():
        detector.weighted_loss(detector.loss(images, targets)).backward()
    assert (images.grad.flatten(1).abs().sum(1) > 0).all()
    _assert_contract(detector.eval().predict(images.detach(), score_thresh=0.0), 2, size, 3)
    with pytest.raises(ValueError, match="multiple of 32"):
        build_detector(name, class_names=CLASS_NAMES, image_size=(64, 80))


def test_checkpoint_round_trip(tmp_path: Path) -> None:
    detector = _calibrated(_build())
    path = tmp_path / "ul.pt"
    save_checkpoint(path, detector, command="test")
    loaded, payload = load_detector(path)  # weights_only: our format, rebuilt by name
    assert payload["arch"] == loaded.arch == "ul-yolov8n" and loaded.class_names == CLASS_NAMES
    for key, value in detector.state_dict().items():
        assert torch.equal(loaded.state_dict()[key], value), key
    images = _images(seed=4)
    for p, q in zip(detector.predict(images, score_thresh=0.0), loaded.predict(images, score_thresh=0.0)):
        assert all(torch.equal(p[k], q[k]) for k in ("boxes", "labels", "scores"))


def _ultralytics_pt(path: Path, class_names: list[str], imgsz: int = 64) -> UltralyticsDetector:
    """Write a checkpoint the way ultralytics does: the pickled (half-precision) model object."""
    detector = _calibrated(_build(class_names=class_names, size=(imgsz, imgsz)), (imgsz, imgsz))
    model = copy.deepcopy(detector.model)
    model.names = dict(enumerate(class_names))
    model.args = {"imgsz": imgsz, "box": 5.0, "cls": 1.0, "dfl": 2.0}
    torch.save({"model": model.half(), "ema": None, "train_args": {"imgsz": imgsz}}, path)
    return detector


def test_ultralytics_pt_needs_trust(tmp_path: Path) -> None:
    path = tmp_path / "yolov8n-custom.pt"
    original = _ultralytics_pt(path, CLASS_NAMES)
    with pytest.raises(DiodeError, match="--trust-checkpoint") as excinfo:
        load_detector(path)
    assert path.name in str(excinfo.value) and len(str(excinfo.value).splitlines()) == 1

    loaded, payload = load_detector(path, trust_checkpoint=True)
    assert isinstance(loaded, UltralyticsDetector) and not loaded.training
    assert loaded.class_names == CLASS_NAMES and loaded.image_size == (64, 64)
    assert payload["format"] == "ultralytics" and loaded.arch == "ul-yolov8n"
    assert loaded.loss_weights == {"box": 5.0, "cls": 1.0, "dfl": 2.0}  # the training gains
    assert all(p.dtype == torch.float32 and p.requires_grad for p in loaded.parameters())
    images = _images(seed=5)
    for key, value in original.state_dict().items():  # the same network, stored in half precision
        expected = value.half().float() if value.dtype.is_floating_point else value
        assert torch.equal(loaded.state_dict()[key], expected), key
    _assert_contract(loaded.predict(images), 2, (64, 64), 3)
    with loaded.loss_mode():
        assert all(torch.isfinite(v) for v in loaded.loss(images, _targets()).values())

    # Re-saved in our format it loads safely again (rebuilt by its ultralytics name).
    save_checkpoint(tmp_path / "ours.pt", loaded)
    again, _ = load_detector(tmp_path / "ours.pt")
    assert again.arch == "ul-yolov8n" and again.class_names == CLASS_NAMES


def test_cli_refuses_then_trusts_an_ultralytics_pt(tmp_path: Path, capsys) -> None:
    path = tmp_path / "best.pt"
    _ultralytics_pt(path, SHAPES_CLASSES)
    assert main(["evaluate", "--model", str(path), "--data", str(tmp_path / "X")]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "--trust-checkpoint" in err and str(path) in err

    data = tmp_path / "shapes"
    assert main(["data", "shapes", "--out", str(data), "--train", "1", "--val", "4",
                 "--image-size", "64", "64", "--quiet"]) == 0
    capsys.readouterr()
    code = main(["evaluate", "--model", str(path), "--data", str(data / "val"), "--trust-checkpoint",
                 "--json", str(tmp_path / "m.json"), "--device", "cpu"])
    assert code == 0, capsys.readouterr().err
    assert 0 <= json.loads((tmp_path / "m.json").read_text())["map"] <= 1


def _run_python(code: str, env: dict[str, str]) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", textwrap.dedent(code)], env=env, capture_output=True,
                          text=True, timeout=300)


def _clean_env(tmp_path: Path) -> dict[str, str]:
    """The test process's environment with a fresh HOME and temp dir and no ultralytics settings."""
    env = {k: v for k, v in os.environ.items()
           if not k.startswith(("YOLO_", "XDG_", "ULTRALYTICS_")) and k not in ("MPLCONFIGDIR",)}
    (tmp_path / "home").mkdir()
    (tmp_path / "tmp").mkdir()
    env.update(HOME=str(tmp_path / "home"), TMPDIR=str(tmp_path / "tmp"), OMP_NUM_THREADS="1")
    return env


def test_offline_and_nothing_written_to_home(tmp_path: Path) -> None:
    proc = _run_python(f"""
        import torch
        from diode.detectors.checkpoint import load_detector
        from diode.detectors.registry import build_detector
        detector = build_detector("ul-yolov8n", class_names=["a", "b"], image_size=(64, 64))
        images = torch.rand(2, 3, 64, 64)
        with detector.loss_mode():
            detector.weighted_loss(detector.loss(images, [{{"boxes": torch.tensor([[4.0, 4, 30, 30]]),
                                                           "labels": torch.tensor([1])}}] * 2)).backward()
        detector.eval().predict(images)
        torch.save({{"model": detector.model}}, {str(tmp_path / "ul.pt")!r})
        load_detector({str(tmp_path / "ul.pt")!r}, trust_checkpoint=True)[0].predict(images)
        import ultralytics.utils
        print("ONLINE", ultralytics.utils.ONLINE, "SETTINGS", ultralytics.utils.SETTINGS.file)
    """, _clean_env(tmp_path))
    assert proc.returncode == 0, proc.stderr
    assert "ONLINE False" in proc.stdout  # its DNS probe was skipped
    assert list((tmp_path / "home").rglob("*")) == [], "something was written under HOME"
    settings = next((tmp_path / "tmp").glob("diode-ultralytics-*/Ultralytics/settings.json"))
    assert str(settings) in proc.stdout and json.loads(settings.read_text())["sync"] is False


def test_user_settings_win(tmp_path: Path) -> None:
    env = _clean_env(tmp_path)
    env["YOLO_CONFIG_DIR"] = str(tmp_path / "mine")
    proc = _run_python("""
        import diode.detectors.registry as r
        assert "ul-yolov8n" in r.list_detectors()
        import ultralytics.utils
        print(ultralytics.utils.SETTINGS.file)
    """, env)
    assert proc.returncode == 0, proc.stderr
    assert str(tmp_path / "mine") in proc.stdout
    assert json.loads((tmp_path / "mine" / "Ultralytics" / "settings.json").read_text())["sync"] is True


def test_registry_works_without_ultralytics(tmp_path: Path) -> None:
    proc = _run_python("""
        import sys
        sys.modules["ultralytics"] = None  # makes `import ultralytics` raise ImportError
        from diode.detectors.registry import list_detectors
        names = list_detectors()
        assert "yolo-lite-n" in names and not any(n.startswith("ul-") for n in names), names
        print("ok")
    """, _clean_env(tmp_path))
    assert proc.returncode == 0 and "ok" in proc.stdout, proc.stderr


def test_conv_blocks_run_folded_while_recording_with_the_same_statistics() -> None:
    """The adapter names ultralytics' Conv blocks (act(bn(conv(x)))): while recording, every BN
    layer of yolov8n runs folded into its conv, and the task loss, the statistics and the
    gradient to the images are those of the unfolded network."""
    from diode.synthesis.bn_stats import BNStatsRecorder

    detector = _calibrated(_build())
    detector.requires_grad_(False)
    blocks = detector.sequential_blocks()
    assert blocks and all(set(n) == {"conv", "bn", "act"} for _, n in blocks)
    results = []
    for root in (detector, None):
        recorder = BNStatsRecorder(detector.bn_layers(), root=root, blocks=blocks)
        images = _images().requires_grad_(True)
        with recorder.recording(), detector.loss_mode():
            loss = detector.weighted_loss(detector.loss(images, _targets()))
        means, variances = recorder.recorded_flat()
        (loss + 0.01 * (means.square().sum() + variances.sum())).backward()
        results.append((float(loss.detach()), means.detach(), variances.detach(), images.grad,
                        [f is not None for f in recorder.folded]))
        recorder.remove()
    (loss, means, variances, grad, folded), (loss2, means2, variances2, grad2, unfolded) = results
    assert all(folded) and not any(unfolded)
    assert loss == pytest.approx(loss2, rel=1e-4)
    assert torch.allclose(means, means2, rtol=1e-3, atol=1e-4)
    assert torch.allclose(variances, variances2, rtol=1e-3, atol=1e-4)
    assert torch.allclose(grad, grad2, rtol=1e-3, atol=1e-3 * float(grad2.abs().max()))
