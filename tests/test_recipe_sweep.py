"""The sweep's variants build, do not move when a bundled recipe changes, and the measured
variant the `fast` recipe was taken from is the recipe itself."""

from __future__ import annotations

import importlib.util
from dataclasses import asdict
from pathlib import Path

import pytest
import yaml

from diode.synthesis.recipes import build_config, load_recipe

BENCH = Path(__file__).resolve().parents[1] / "benchmarks"
VARIANTS = yaml.safe_load((BENCH / "sweep_variants.yaml").read_text())


def _sweep():
    spec = importlib.util.spec_from_file_location("recipe_sweep", BENCH / "recipe_sweep.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.parametrize("name", sorted(VARIANTS))
def test_every_variant_builds(name: str) -> None:
    cfg = _sweep().variant_config(VARIANTS[name], batch_size=8)
    assert cfg.batch_size == 8 and sum(s.iterations for s in cfg.stages) > 0


def test_variants_are_pinned_to_the_sweep_base_not_to_fast() -> None:
    sweep = _sweep()
    base = build_config(load_recipe(str(sweep.SWEEP_BASE)))
    old = sweep.variant_config(VARIANTS["task1-bn.01"], batch_size=None)
    assert not old.bn.normalize and old.targets.max_side == 0.8 == base.targets.max_side
    assert asdict(old) == asdict(base)  # `fast` of session 2 is the base itself


def test_fast_is_the_variant_it_was_measured_as() -> None:
    sweep = _sweep()
    fast = sweep.variant_config(VARIANTS["fast"], batch_size=None)
    measured = sweep.variant_config(VARIANTS["norm-bn.03-side.2-.6-area.4"], batch_size=None)
    assert asdict(fast) == asdict(build_config(load_recipe("fast")))
    assert asdict(measured) == asdict(fast)
