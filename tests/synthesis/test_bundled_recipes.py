"""Every bundled recipe loads and validates; `fast-mobilenet`'s BN selection names real layers."""

from __future__ import annotations

import re

import pytest

from diode.detectors.registry import build_detector
from diode.synthesis.bn_stats import select_bn_layers
from diode.synthesis.recipes import build_config, list_recipes, load_recipe


@pytest.mark.parametrize("name", list_recipes())
def test_bundled_recipe_builds(name: str) -> None:
    cfg = build_config(load_recipe(name))
    assert cfg.stages and all(stage.iterations > 0 for stage in cfg.stages)


def test_fast_mobilenet_matches_the_early_backbone_blocks_in_normalised_form() -> None:
    assert {"paper", "fast", "fast-mobilenet"} <= set(list_recipes())
    cfg = build_config(load_recipe("fast-mobilenet"))
    assert cfg.bn.normalize
    detector = build_detector("tv-fcos-mobilenetv2", class_names=["a", "b"], image_size=(64, 64))
    chosen = [n for n, _ in select_bn_layers(detector.bn_layers(), cfg.bn.layers)]
    assert len(chosen) == 18  # features.0 (1 BN) + features.1 (2) + features.2-6 (3 each)
    assert all(re.match(r"model\.backbone\.features\.[0-6]\.", n) for n in chosen)
    # The built-in teacher has no such layers: a clear error, not a silent no-op.
    with pytest.raises(Exception, match="selects no BN layer"):
        select_bn_layers(build_detector("yolo-lite-n", class_names=["a"], image_size=(64, 64)).bn_layers(),
                         cfg.bn.layers)
