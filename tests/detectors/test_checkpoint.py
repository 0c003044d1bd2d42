"""Checkpoint round trips and the safe-loading guarantees of `read_checkpoint` / `load_detector`."""

from __future__ import annotations

import pickle
import random
from pathlib import Path

import pytest
import torch

from diode.detectors.base import Detector
from diode.detectors.checkpoint import FORMAT, load_detector, read_checkpoint, save_checkpoint
from diode.detectors.registry import build_detector
from diode.errors import DiodeError

CLASS_NAMES = ["cat", "dog", "bird"]
IMAGE_SIZE = (64, 96)
COMMAND = "diode train --arch yolo-lite-n --epochs 3"
METRICS = {"map": 0.25, "map_50": 0.5, "per_class": {"cat": 0.1, "dog": 0.2, "bird": 0.3}}


def _trained_like(seed: int = 0) -> Detector:
    """A yolo-lite-n whose BN statistics moved away from their initial values (a train-mode pass)."""
    torch.manual_seed(seed)
    detector = build_detector("yolo-lite-n", class_names=CLASS_NAMES, image_size=IMAGE_SIZE)
    with torch.no_grad():
        detector.train()(torch.rand(2, 3, *IMAGE_SIZE))
    return detector.eval()


def _assert_one_line_error(excinfo: pytest.ExceptionInfo, path: Path) -> None:
    message = str(excinfo.value)
    assert path.name in message
    assert len(message.splitlines()) == 1, message


@pytest.fixture
def saved(tmp_path: Path) -> tuple[Detector, Path]:
    detector = _trained_like()
    path = tmp_path / "model.pt"
    save_checkpoint(path, detector, command=COMMAND, metrics=METRICS)
    return detector, path


def test_round_trip_keeps_weights_predictions_and_metadata(saved: tuple[Detector, Path]) -> None:
    original, path = saved
    loaded, payload = load_detector(path)
    assert not loaded.training
    assert loaded.arch == "yolo-lite-n" and loaded.class_names == CLASS_NAMES
    assert loaded.image_size == IMAGE_SIZE
    expected = original.state_dict()
    got = loaded.state_dict()
    assert got.keys() == expected.keys()
    for key in expected:
        assert torch.equal(got[key], expected[key]), key
    images = torch.rand(2, 3, *IMAGE_SIZE, generator=torch.Generator().manual_seed(3))
    for p, q in zip(original.predict(images), loaded.predict(images)):
        for key in ("boxes", "labels", "scores"):
            assert torch.equal(p[key], q[key]), key
    assert payload["format"] == FORMAT
    assert payload["arch"] == "yolo-lite-n"
    assert payload["class_names"] == CLASS_NAMES
    assert tuple(payload["image_size"]) == IMAGE_SIZE
    assert payload["command"] == COMMAND
    assert payload["metrics"] == METRICS
    assert "train_state" not in payload


def test_file_loads_with_weights_only(saved: tuple[Detector, Path]) -> None:
    _, path = saved
    payload = torch.load(path, map_location="cpu", weights_only=True)
    assert payload["format"] == FORMAT and payload["command"] == COMMAND
    assert read_checkpoint(path)["metrics"] == METRICS


def test_state_dict_override_and_train_state(tmp_path: Path) -> None:
    detector, other = _trained_like(0), _trained_like(1)
    path = tmp_path / "last.pt"
    train_state = {"epoch": 3, "best_map": 0.5, "optimizer": {"lr": torch.tensor(1e-3)}}
    save_checkpoint(path, detector, state_dict=other.state_dict(), train_state=train_state)
    loaded, payload = load_detector(path)
    for key, value in other.state_dict().items():
        assert torch.equal(loaded.state_dict()[key], value), key
    assert any(not torch.equal(detector.state_dict()[k], v) for k, v in other.state_dict().items())
    assert payload["train_state"]["epoch"] == 3
    assert torch.equal(payload["train_state"]["optimizer"]["lr"], torch.tensor(1e-3))
    assert payload["metrics"] == {} and payload["command"] == ""


def test_missing_file(tmp_path: Path) -> None:
    path = tmp_path / "absent.pt"
    with pytest.raises(DiodeError) as excinfo:
        load_detector(path)
    _assert_one_line_error(excinfo, path)
    with pytest.raises(DiodeError) as excinfo:
        read_checkpoint(path)
    _assert_one_line_error(excinfo, path)


def test_directory_is_not_a_checkpoint(tmp_path: Path) -> None:
    with pytest.raises(DiodeError) as excinfo:
        load_detector(tmp_path)
    _assert_one_line_error(excinfo, tmp_path)


@pytest.mark.parametrize("content", [
    random.Random(0).randbytes(512),
    b"",
    b"not a checkpoint at all\n",
], ids=["random", "empty", "text"])
def test_garbage_file(tmp_path: Path, content: bytes) -> None:
    path = tmp_path / "garbage.pt"
    path.write_bytes(content)
    with pytest.raises(DiodeError) as excinfo:
        load_detector(path)
    _assert_one_line_error(excinfo, path)


def test_truncated_checkpoint(saved: tuple[Detector, Path]) -> None:
    _, path = saved
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(DiodeError) as excinfo:
        load_detector(path)
    _assert_one_line_error(excinfo, path)


# Corrupt legacy-format (bare pickle) files: torch's weights-only unpickler raises IndexError
# ("pop from empty list") on b"s" and KeyError on b"h\x05", not an UnpicklingError.
@pytest.mark.parametrize("content", [b"s", b"h\x05", random.Random(2).randbytes(256)],
                         ids=["setitem-on-empty-stack", "memo-miss", "random-seed-2"])
def test_corrupt_pickle_opcodes(tmp_path: Path, content: bytes) -> None:
    path = tmp_path / "corrupt.pt"
    path.write_bytes(content)
    with pytest.raises(DiodeError) as excinfo:
        read_checkpoint(path)
    _assert_one_line_error(excinfo, path)


@pytest.mark.parametrize("obj", [torch.zeros(3), {"a": 1}, [1, 2], {"format": "other/1"}],
                         ids=["tensor", "dict", "list", "wrong-format"])
def test_torch_file_that_is_not_a_diode_checkpoint(tmp_path: Path, obj: object) -> None:
    path = tmp_path / "other.pt"
    torch.save(obj, path)
    with pytest.raises(DiodeError) as excinfo:
        load_detector(path)
    _assert_one_line_error(excinfo, path)


@pytest.mark.parametrize("key", ["arch", "class_names", "image_size", "state_dict"])
def test_checkpoint_missing_a_key(saved: tuple[Detector, Path], key: str) -> None:
    _, path = saved
    payload = torch.load(path, weights_only=True)
    del payload[key]
    torch.save(payload, path)
    with pytest.raises(DiodeError, match=key) as excinfo:
        load_detector(path)
    _assert_one_line_error(excinfo, path)


def test_weights_that_do_not_match_the_architecture(saved: tuple[Detector, Path]) -> None:
    _, path = saved
    payload = torch.load(path, weights_only=True)
    payload["class_names"] = ["cat"]  # head shapes no longer match the stored weights
    torch.save(payload, path)
    with pytest.raises(DiodeError, match="yolo-lite-n") as excinfo:
        load_detector(path)
    _assert_one_line_error(excinfo, path)


def test_unknown_arch(saved: tuple[Detector, Path]) -> None:
    _, path = saved
    payload = torch.load(path, weights_only=True)
    payload["arch"] = "resnet-9000"
    torch.save(payload, path)
    with pytest.raises(DiodeError, match="resnet-9000"):
        load_detector(path)


@pytest.mark.parametrize("key, value", [("image_size", [50, 50]), ("class_names", [])])
def test_invalid_metadata(saved: tuple[Detector, Path], key: str, value: object) -> None:
    _, path = saved
    payload = torch.load(path, weights_only=True)
    payload[key] = value
    torch.save(payload, path)
    with pytest.raises(DiodeError):
        load_detector(path)


class _Payload:
    """Unpickling this calls open(marker, "w"): creating the marker proves code execution."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (open, (str(self.marker), "w"))


@pytest.mark.filterwarnings("ignore:Detected pickle protocol")
@pytest.mark.parametrize("container", ["torch-zip", "bare-pickle"])
def test_malicious_pickle_is_not_executed(tmp_path: Path, container: str) -> None:
    marker = tmp_path / "pwned"
    path = tmp_path / "evil.pt"
    evil = {"format": FORMAT, "arch": "yolo-lite-n", "payload": _Payload(marker)}
    if container == "torch-zip":
        torch.save(evil, path)
    else:
        path.write_bytes(pickle.dumps(evil))
    with pytest.raises(DiodeError) as excinfo:
        load_detector(path)
    _assert_one_line_error(excinfo, path)
    assert not marker.exists()
    # Sanity: the payload is live (an unsafe load runs it), so the check above can fail.
    if container == "torch-zip":
        result = torch.load(path, weights_only=False)
    else:
        result = pickle.loads(path.read_bytes())
    result["payload"].close()
    assert marker.exists()
