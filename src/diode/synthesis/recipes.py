"""Synthesis recipes: YAML files in `diode/configs/` (also `configs/` at the repository root)."""

from __future__ import annotations

import copy
from dataclasses import replace
from pathlib import Path
from typing import Any

import yaml

from diode.config import SynthesisConfig, check_fields
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
    except yaml.MarkedYAMLError as exc:
        at = f" at line {exc.problem_mark.line + 1} column {exc.problem_mark.column + 1}" if exc.problem_mark else ""
        raise DiodeError(f"{path}: invalid YAML{at}: {exc.problem or exc.context}") from None
    except (yaml.YAMLError, UnicodeDecodeError) as exc:
        raise DiodeError(f"{path}: invalid YAML ({str(exc).splitlines()[0][:120]})") from None
    if not isinstance(raw, dict):
        raise DiodeError(f"{path}: a recipe must be a YAML mapping")
    return raw


def build_config(raw: dict[str, Any], *, batch_size: int | None = None, iterations: int | None = None,
                 precision: str | None = None, source: str = "recipe") -> SynthesisConfig:
    """A validated SynthesisConfig from a recipe dict and command-line overrides.

    `iterations` rescales every stage (and the FP schedule keys the recipe sets) so the stages sum
    to that total, keeping their proportions. Any problem raises `DiodeError` naming the key.
    """
    if not isinstance(raw, dict):
        raise DiodeError(f"{source}: a recipe must be a mapping, got {type(raw).__name__}")
    raw = copy.deepcopy(raw)
    if batch_size is not None:
        raw["batch_size"] = batch_size
    if precision is not None:
        raw["precision"] = precision
    if iterations is not None and iterations < 1:
        raise DiodeError(f"--iterations must be >= 1, got {iterations}")
    try:
        check_fields(SynthesisConfig, raw)
        cfg = SynthesisConfig(**raw)
        if iterations is not None:
            cfg = _rescaled(cfg, iterations, raw.get("fp"))
    except ValueError as exc:
        raise DiodeError(f"{source}: {exc}") from None
    return cfg


def _rescaled(cfg: SynthesisConfig, iterations: int, raw_fp: object) -> SynthesisConfig:
    """`cfg` with stage iterations summing to `iterations` (and the FP keys `raw_fp` sets scaled alike)."""
    factor = iterations / (sum(s.iterations for s in cfg.stages) or 1)
    stages = [replace(s, iterations=max(1, round(s.iterations * factor))) for s in cfg.stages]
    given = raw_fp if isinstance(raw_fp, dict) else {}
    fp = replace(cfg.fp, **{key: max(1 if key == "every" else 0, round(getattr(cfg.fp, key) * factor))
                            for key in ("start", "every", "stop") if given.get(key) is not None})
    return replace(cfg, stages=stages, fp=fp)
