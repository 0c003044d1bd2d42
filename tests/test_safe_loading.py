"""Model files that need full unpickling are refused by every command that loads a model, unless
``--trust-checkpoint`` is given: one line on stderr naming the flag, exit code 2, nothing executed."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from diode.cli import main
from diode.detectors.checkpoint import FORMAT, load_detector
from diode.errors import DiodeError


class _Payload:
    """Unpickling this calls open(marker, "w"): creating the marker proves code execution."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (open, (str(self.marker), "w"))


@pytest.fixture
def evil(tmp_path: Path) -> tuple[Path, Path]:
    marker = tmp_path / "pwned"
    path = tmp_path / "evil.pt"
    torch.save({"format": FORMAT, "arch": "yolo-lite-n", "payload": _Payload(marker)}, path)
    return path, marker


def _one_error_line(capsys) -> str:
    err = capsys.readouterr().err.strip()
    assert "Traceback" not in err
    assert len(err.splitlines()) == 1, err
    assert err.startswith("diode: error: ")
    return err


def test_evaluate_refuses_a_malicious_pickle(evil: tuple[Path, Path], capsys) -> None:
    path, marker = evil
    assert main(["evaluate", "--model", str(path), "--data", "X"]) == 2
    err = _one_error_line(capsys)
    assert "--trust-checkpoint" in err and str(path) in err and "refusing to unpickle" in err
    assert not marker.exists()


@pytest.mark.parametrize("command", [
    ["predict", "--model", "{evil}", "--data", "X", "--out", "{tmp}/grid.png"],
    ["synthesize", "--teacher", "{evil}", "--out", "{tmp}/syn", "--num-images", "1"],
    ["synthesize", "--teacher", "shapes-teacher", "--verifier", "{evil}", "--out", "{tmp}/syn",
     "--num-images", "1", "--device", "cpu"],
    ["distill", "--teacher", "{evil}", "--student", "yolo-lite-n", "--data", "noise", "--out", "{tmp}/kd"],
    ["distill", "--teacher", "shapes-teacher", "--student", "{evil}", "--data", "noise", "--out", "{tmp}/kd",
     "--device", "cpu"],
], ids=["predict", "synthesize-teacher", "synthesize-verifier", "distill-teacher", "distill-student"])
def test_every_model_flag_refuses(evil: tuple[Path, Path], tmp_path: Path, capsys, command: list[str]) -> None:
    path, marker = evil
    argv = [a.format(evil=path, tmp=tmp_path) for a in command]
    assert main(argv) == 2
    assert "--trust-checkpoint" in _one_error_line(capsys)
    assert not marker.exists()


def test_trust_really_unpickles(evil: tuple[Path, Path], capsys) -> None:
    # Sanity: the payload is live, so the checks above could fail; trusted, it runs, and the file,
    # which holds no model, is then rejected with one line.
    path, marker = evil
    assert main(["evaluate", "--model", str(path), "--data", "X", "--trust-checkpoint"]) == 2
    assert marker.exists()
    assert "lacks key 'class_names'" in _one_error_line(capsys)


def test_trusted_file_that_is_no_detector(tmp_path: Path) -> None:
    path = tmp_path / "other.pt"
    torch.save({"weights": _Opaque()}, path)
    with pytest.raises(DiodeError, match="--trust-checkpoint"):
        load_detector(path)
    with pytest.raises(DiodeError, match="neither a diode checkpoint nor an ultralytics") as excinfo:
        load_detector(path, trust_checkpoint=True)
    assert len(str(excinfo.value).splitlines()) == 1


class _Opaque:
    """A harmless class that weights-only loading does not allow."""
