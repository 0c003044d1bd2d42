"""Registry of detector architectures: names map to keyword-only builders."""

from __future__ import annotations

from typing import Callable

from diode.detectors.base import Detector
from diode.errors import DiodeError
from diode.types import ImageSize

Builder = Callable[..., Detector]
_BUILDERS: dict[str, tuple[Builder, str]] = {}


def register(name: str, description: str) -> Callable[[Builder], Builder]:
    """Decorator: register `builder(*, class_names, image_size) -> Detector` under `name`."""
    def wrap(builder: Builder) -> Builder:
        if name in _BUILDERS:
            raise ValueError(f"detector {name!r} registered twice")
        _BUILDERS[name] = (builder, description)
        return builder
    return wrap


def list_detectors() -> dict[str, str]:
    """Registered architecture names and their one-line descriptions."""
    _load_builtin()
    return {name: desc for name, (_, desc) in sorted(_BUILDERS.items())}


def build_detector(name: str, *, class_names: list[str], image_size: ImageSize) -> Detector:
    """Build a freshly initialised detector of architecture `name`."""
    _load_builtin()
    if name not in _BUILDERS:
        raise DiodeError(f"unknown detector {name!r}; valid names: {', '.join(sorted(_BUILDERS))}")
    detector = _BUILDERS[name][0](class_names=class_names, image_size=image_size)
    detector.arch = name
    return detector


def _load_builtin() -> None:
    # Importing the modules runs their @register decorators.
    import diode.detectors.torchvision_adapter  # noqa: F401
    import diode.detectors.yolo_lite  # noqa: F401
    import diode.detectors.ultralytics_adapter  # noqa: F401  (registers only when ultralytics is installed)
