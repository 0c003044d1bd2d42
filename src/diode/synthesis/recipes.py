"""Synthesis recipes: YAML files in `diode/configs/` (also `configs/` at the repository root)."""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import yaml

from diode.config import SynthesisConfig
from diode.errors import DiodeError

RECIPES_DIR = Path(__file__).resolve().parent.parent / "configs"


def list_recipes() -> list[str]:
    return sorted(p.stem for p in RECIPES_DIR.glob("*.yaml"))


def load_recipe(name_or_path: str) -> dict[str, Any]:
    """The raw dict of a bundled recipe name or a YAML file path."""
    path = RECIPES_DIR / f"{name_or_path}.yaml"
    if not path.exists():
        path = Path(name_or_path)
        if not path.is_file():
            raise DiodeError(f"--recipe {name_or_path!r}: no such recipe or file (recipes: {', '.join(list_recipes())})")
    try:
        raw = yaml.safe_load(path.read_text())
    except (yaml.YAMLError, UnicodeDecodeError) as exc:
        raise DiodeError(f"{path}: invalid YAML ({str(exc).splitlines()[0][:120]})") from None
    if not isinstance(raw, dict):
        raise DiodeError(f"{path}: a recipe must be a YAML mapping")
    return raw


def build_config(raw: dict[str, Any], *, batch_size: int | None = None, iterations: int | None = None,
                 precision: str | None = None, source: str = "recipe") -> SynthesisConfig:
    """A validated SynthesisConfig from a recipe dict and command-line overrides.

    `iterations` rescales every stage (and the FP schedule) so the stages sum to that total,
    keeping their proportions.
    """
    raw = copy.deepcopy(raw)
    if batch_size is not None:
        raw["batch_size"] = batch_size
    if precision is not None:
        raw["precision"] = precision
    if iterations is not None:
        if iterations < 1:
            raise DiodeError(f"--iterations must be >= 1, got {iterations}")
        stages = raw.get("stages") or [{}]
        total = sum(int(s.get("iterations", 2000)) for s in stages) or 1
        factor = iterations / total
        for s in stages:
            s["iterations"] = max(1, round(int(s.get("iterations", 2000)) * factor))
        raw["stages"] = stages
        fp = raw.get("fp")
        if isinstance(fp, dict):
            for key in ("start", "every", "stop"):
                if fp.get(key) is not None:
                    fp[key] = max(1 if key == "every" else 0, round(fp[key] * factor))
    try:
        return SynthesisConfig(**raw)
    except TypeError as exc:
        raise DiodeError(f"{source}: {exc}".replace("__init__() ", "")) from None
    except ValueError as exc:
        raise DiodeError(f"{source}: {exc}") from None
