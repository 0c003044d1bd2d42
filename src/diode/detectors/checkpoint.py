"""Detector checkpoints: a state_dict plus the metadata needed to rebuild and trust it.

A checkpoint is a plain dict of tensors, strings and numbers (so ``torch.load(weights_only=True)``
reads it without unpickling arbitrary objects): ``format``, ``arch``, ``class_names``,
``image_size`` (H, W), ``state_dict``, ``command`` (the command line that produced it),
``metrics`` and optionally ``train_state`` (optimiser, EMA, epoch: only in ``last.pt``).
Bundled checkpoints live in ``diode/weights/<name>.pt`` and resolve by name.

Files that only full unpickling can read (an ultralytics ``.pt`` pickles whole model objects) are
refused: unpickling can run arbitrary code. ``load_detector(..., trust_checkpoint=True)`` (the
CLI's ``--trust-checkpoint``) unpickles them for files the user trusts.
"""

from __future__ import annotations

import pickle
import re
from pathlib import Path
from typing import Any

import torch

from diode.detectors.base import Detector
from diode.detectors.registry import build_detector
from diode.errors import DiodeError
from diode.io import atomic_torch_save

FORMAT = "diode-detector/1"
WEIGHTS_DIR = Path(__file__).resolve().parent.parent / "weights"


def bundled_models() -> dict[str, Path]:
    """Names of the checkpoints shipped inside the package and their paths."""
    return {p.stem: p for p in sorted(WEIGHTS_DIR.glob("*.pt"))}


def save_checkpoint(path: str | Path, detector: Detector, *, command: str = "", metrics: dict | None = None,
                    state_dict: dict | None = None, train_state: dict | None = None) -> None:
    """Write a checkpoint atomically. `state_dict` overrides the detector's own (e.g. EMA weights)."""
    payload: dict[str, Any] = {
        "format": FORMAT,
        "arch": detector.arch,
        "class_names": list(detector.class_names),
        "image_size": list(detector.image_size),
        "state_dict": state_dict if state_dict is not None else detector.state_dict(),
        "command": command,
        "metrics": metrics or {},
    }
    if train_state is not None:
        payload["train_state"] = train_state
    atomic_torch_save(payload, path)


class UnsafeCheckpointError(DiodeError):
    """A file that only full unpickling can read: it references Python objects beyond tensors and
    plain containers, and unpickling would import and call them (which can run any code)."""


# How torch's weights-only unpickler names a global it refuses (not an allowlisted one, or one from
# a blocked module): the file is a well-formed pickle of other objects, not corrupt bytes.
_REFUSED_GLOBAL = re.compile(r"GLOBAL \S+ was not an allowed global|whose module \S+ is blocked")


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0][:160] if text else type(exc).__name__


def read_checkpoint(path: str | Path) -> dict[str, Any]:
    """Load a checkpoint dict safely (weights_only) and validate its keys.

    Raises UnsafeCheckpointError when the file needs full unpickling (e.g. an ultralytics ``.pt``).
    """
    path = Path(path)
    if not path.is_file():
        raise DiodeError(f"{path}: checkpoint file not found")
    try:
        payload = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # noqa: BLE001 - corrupt bytes make the unpickler raise almost anything
        if isinstance(exc, pickle.UnpicklingError) and _REFUSED_GLOBAL.search(str(exc)):
            raise UnsafeCheckpointError(f"refusing to unpickle {path}: it needs full unpickling, "
                                        f"which can run code") from None
        raise DiodeError(f"{path}: not a loadable diode checkpoint ({_first_line(exc)})") from None
    _validate(payload, path)
    return payload


def _validate(payload: object, path: Path) -> None:
    if not isinstance(payload, dict) or payload.get("format") != FORMAT:
        raise DiodeError(f"{path}: not a diode detector checkpoint (missing format {FORMAT!r})")
    for key in ("arch", "class_names", "image_size", "state_dict"):
        if key not in payload:
            raise DiodeError(f"{path}: checkpoint lacks key {key!r}")


def load_detector(spec: str | Path, *, device: torch.device | str = "cpu",
                  trust_checkpoint: bool = False) -> tuple[Detector, dict[str, Any]]:
    """A detector in eval mode from a checkpoint path or a bundled name, plus its checkpoint dict.

    Our own checkpoints are read with ``weights_only=True``. A file that needs full unpickling is
    refused unless `trust_checkpoint` (the CLI's ``--trust-checkpoint``); then it is unpickled and
    may be a diode checkpoint or an ultralytics one (wrapped by the ultralytics adapter; its
    metadata dict then has ``format`` "ultralytics" and no ``state_dict``).
    """
    bundled = bundled_models()
    path = bundled[str(spec)] if str(spec) in bundled else Path(spec)
    if not path.exists() and str(spec) not in bundled:
        names = ", ".join(bundled) or "none"
        raise DiodeError(f"{spec}: no such checkpoint file or bundled model (bundled: {names})")
    try:
        payload = read_checkpoint(path)
    except UnsafeCheckpointError as exc:
        if not trust_checkpoint:
            raise UnsafeCheckpointError(f"{exc}; pass --trust-checkpoint if you trust it") from None
        detector, payload = _load_trusted(path)
        return detector.to(device).eval(), payload
    return _build(payload, path).to(device).eval(), payload


def _build(payload: dict[str, Any], path: Path) -> Detector:
    try:
        detector = build_detector(payload["arch"], class_names=payload["class_names"],
                                  image_size=tuple(payload["image_size"]))
    except (ValueError, TypeError) as exc:
        if isinstance(exc, DiodeError):  # e.g. an architecture this version does not know: name the file
            raise DiodeError(exc if str(path) in str(exc) else f"{path}: {exc}") from None
        raise DiodeError(f"{path}: invalid checkpoint metadata ({str(exc).splitlines()[0][:160]})") from None
    try:
        detector.load_state_dict(payload["state_dict"])
    except RuntimeError as exc:
        raise DiodeError(f"{path}: weights do not match architecture {payload['arch']!r} "
                         f"({str(exc).splitlines()[0][:160]})") from None
    return detector


def _load_trusted(path: Path) -> tuple[Detector, dict[str, Any]]:
    """Fully unpickle a file the user trusts: a diode checkpoint or an ultralytics one."""
    # Configures ultralytics (offline, settings out of the home directory) before the unpickler
    # imports it while rebuilding the model's classes.
    from diode.detectors import ultralytics_adapter

    try:
        obj = torch.load(path, map_location="cpu", weights_only=False)
    except ModuleNotFoundError as exc:
        raise DiodeError(f"{path}: unpickling needs the Python module {exc.name!r}"
                         + (" (pip install diode-kd[ultralytics])" if exc.name and exc.name.startswith("ultralytics")
                            else "")) from None
    except Exception as exc:  # noqa: BLE001 - a trusted pickle can still be corrupt
        raise DiodeError(f"{path}: could not unpickle ({_first_line(exc)})") from None
    if isinstance(obj, dict) and obj.get("format") == FORMAT:
        _validate(obj, path)
        return _build(obj, path), obj
    try:
        detector = ultralytics_adapter.wrap_checkpoint(obj)
    except ValueError as exc:
        raise DiodeError(f"{path}: {_first_line(exc)}") from None
    if detector is None:
        raise DiodeError(f"{path}: neither a diode checkpoint nor an ultralytics detection checkpoint"
                         + ("" if ultralytics_adapter.AVAILABLE else " (ultralytics >= 8.4 is not installed)"))
    payload = {"format": "ultralytics", "arch": detector.arch, "class_names": detector.class_names,
               "image_size": list(detector.image_size), "command": "", "metrics": {}}
    return detector, payload
