"""Detector checkpoints: a state_dict plus the metadata needed to rebuild and trust it.

A checkpoint is a plain dict of tensors, strings and numbers (so ``torch.load(weights_only=True)``
reads it without unpickling arbitrary objects): ``format``, ``arch``, ``class_names``,
``image_size`` (H, W), ``state_dict``, ``command`` (the command line that produced it),
``metrics`` and optionally ``train_state`` (optimiser, EMA, epoch: only in ``last.pt``).
Bundled checkpoints live in ``diode/weights/<name>.pt`` and resolve by name.
"""

from __future__ import annotations

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


def read_checkpoint(path: str | Path) -> dict[str, Any]:
    """Load a checkpoint dict safely (weights_only) and validate its keys."""
    path = Path(path)
    if not path.is_file():
        raise DiodeError(f"{path}: checkpoint file not found")
    try:
        payload = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # noqa: BLE001 - corrupt bytes make the unpickler raise almost anything
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise DiodeError(f"{path}: not a loadable diode checkpoint ({first[:160]})") from None
    if not isinstance(payload, dict) or payload.get("format") != FORMAT:
        raise DiodeError(f"{path}: not a diode detector checkpoint (missing format {FORMAT!r})")
    for key in ("arch", "class_names", "image_size", "state_dict"):
        if key not in payload:
            raise DiodeError(f"{path}: checkpoint lacks key {key!r}")
    return payload


def load_detector(spec: str | Path, *, device: torch.device | str = "cpu") -> tuple[Detector, dict[str, Any]]:
    """A detector in eval mode from a checkpoint path or a bundled name, plus its checkpoint dict."""
    bundled = bundled_models()
    path = bundled[str(spec)] if str(spec) in bundled else Path(spec)
    if not path.exists() and str(spec) not in bundled:
        names = ", ".join(bundled) or "none"
        raise DiodeError(f"{spec}: no such checkpoint file or bundled model (bundled: {names})")
    payload = read_checkpoint(path)
    try:
        detector = build_detector(payload["arch"], class_names=payload["class_names"],
                                  image_size=tuple(payload["image_size"]))
    except (ValueError, TypeError) as exc:
        if isinstance(exc, DiodeError):
            raise
        raise DiodeError(f"{path}: invalid checkpoint metadata ({str(exc).splitlines()[0][:160]})") from None
    try:
        detector.load_state_dict(payload["state_dict"])
    except RuntimeError as exc:
        raise DiodeError(f"{path}: weights do not match architecture {payload['arch']!r} "
                         f"({str(exc).splitlines()[0][:160]})") from None
    return detector.to(device).eval(), payload
