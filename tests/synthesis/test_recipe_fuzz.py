"""Fuzzing the recipe loader: any YAML file and any recipe dict either gives a SynthesisConfig or
raises `DiodeError` with one line naming the problem, never another exception.

Recipes are drawn from the settings dataclasses themselves, so every known key (nested ones, the
stage list, pairs, alternatives) gets values of every type, near-valid and wild, plus unknown keys.
"""

from __future__ import annotations

import dataclasses
import re
import typing
from pathlib import Path
from typing import Any

import pytest
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from diode.config import SynthesisConfig
from diode.errors import DiodeError
from diode.synthesis.fp_aggregation import FPConfig
from diode.synthesis.recipes import build_config, load_recipe

FUZZ = settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])

numbers = (st.integers(min_value=-3, max_value=3000) | st.integers() | st.just(10 ** 30)
           | st.floats(min_value=-2, max_value=2) | st.floats())
wild = st.recursive(
    st.none() | st.booleans() | numbers | st.text(max_size=6),
    lambda children: st.lists(children, max_size=3) | st.dictionaries(st.text(max_size=6), children, max_size=3),
    max_leaves=8,
)
# Strings the validators accept somewhere, so string fields also reach their valid branches.
WORDS = ["fp32", "bf16", "one-box", "multi-box", "dataset", "all", "stage*", ""]


def plausible(hint: Any) -> st.SearchStrategy:
    """Values shaped like `hint`, sometimes replaced by anything at all."""
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if dataclasses.is_dataclass(hint):
        shaped = recipes(hint)
    elif origin is list:
        shaped = st.lists(plausible(args[0]), max_size=3)
    elif origin is tuple:
        shaped = st.tuples(*(plausible(a) for a in args)).map(list)
    elif args:  # a union
        shaped = st.one_of(*(plausible(a) for a in args))
    else:
        shaped = {int: numbers, float: numbers, bool: st.booleans(), str: st.sampled_from(WORDS) | st.text(max_size=6),
                  type(None): st.none()}[hint]
    return st.one_of(shaped, shaped, wild)


def recipes(cls: type) -> st.SearchStrategy:
    """Mappings with any subset of `cls`'s keys, now and then with an unknown one."""
    hints = typing.get_type_hints(cls, localns={"FPConfig": FPConfig})
    known = st.fixed_dictionaries({}, optional={f.name: plausible(hints[f.name]) for f in dataclasses.fields(cls)})
    unknown = st.dictionaries(st.text(max_size=6), wild, max_size=1)
    return st.tuples(known, unknown).map(lambda parts: {**parts[1], **parts[0]})


def check_build(raw: Any, **overrides: Any) -> None:
    try:
        cfg = build_config(raw, **overrides)
    except DiodeError as exc:
        assert str(exc).strip() and len(str(exc).splitlines()) == 1, str(exc)
        return
    # Accepted: the run can record and compare its settings (config.yaml, resume check).
    assert isinstance(cfg, SynthesisConfig) and cfg.total_iterations >= 0
    yaml.safe_dump(cfg.to_dict())


overrides = st.fixed_dictionaries({}, optional={"batch_size": st.integers(-2, 64), "iterations": st.integers(-2, 5000),
                                                "precision": st.sampled_from(["fp32", "bf16"])})


@FUZZ
@given(raw=recipes(SynthesisConfig), extra=overrides)
def test_fuzz_recipe_dict(raw: dict, extra: dict) -> None:
    check_build(raw, **extra)


@pytest.fixture(scope="module")
def recipe_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("recipes")


@FUZZ
@given(raw=recipes(SynthesisConfig), extra=overrides)
def test_fuzz_recipe_file(recipe_dir: Path, raw: dict, extra: dict) -> None:
    path = recipe_dir / "recipe.yaml"
    path.write_text(yaml.safe_dump(raw))
    check_build(load_recipe(str(path)), **extra)


@FUZZ
@given(data=st.binary(max_size=200) | st.text(max_size=200).map(str.encode))
def test_fuzz_recipe_bytes(recipe_dir: Path, data: bytes) -> None:
    path = recipe_dir / "bytes.yaml"
    path.write_bytes(data)
    try:
        raw = load_recipe(str(path))
    except DiodeError as exc:
        assert len(str(exc).splitlines()) == 1 and str(path) in str(exc)
        return
    check_build(raw)


@pytest.mark.parametrize("text, key", [
    ("batch_size: eight\n", "batch_size"),
    ("stages: 5\n", "stages"),
    ("stages:\n  - {iterations: many}\n", "stages[0].iterations"),
    ("stages:\n  - {lrr: 0.1}\n", "stages[0].lrr"),
    ("stages:\n  - {betas: [0.9]}\n", "stages[0].betas"),
    ("stages:\n  - {weights: {bn: .nan}}\n", "stages[0].weights.bn"),
    ("augment: 3\n", "augment"),
    ("augment: {scale: [1, x]}\n", "augment.scale[1]"),
    ("fp: {enabled: true, start: soon}\n", "fp.start"),
    ("fp: {every: 1.5}\n", "fp.every"),
    ("targets: {sampler: [one-box]}\n", "targets.sampler"),
    ("tiling: {grid: [2, 2, 2]}\n", "tiling.grid"),
    ("bn: {layers: true}\n", "bn.layers"),
    ("bn: {p: 0}\n", "bn.p"),
    ("log_every: 100000000000000000000\n", "log_every"),
    ("1: 2\n", "1"),
])
def test_bad_value_names_its_key(tmp_path: Path, text: str, key: str) -> None:
    path = tmp_path / "r.yaml"
    path.write_text(text)
    for iterations in (None, 10):  # rescaling the stages must not hide or trip over the problem
        with pytest.raises(DiodeError, match=f"recipe: .*{re.escape(key)}"):
            build_config(load_recipe(str(path)), iterations=iterations)


def test_null_fp_means_defaults_and_iterations_rescale_the_schedule() -> None:
    assert build_config({"fp": None}).fp == FPConfig()
    cfg = build_config({"stages": [{"iterations": 300}, {"iterations": 100}], "fp": {"start": 200, "every": 40}},
                       iterations=40)
    assert [s.iterations for s in cfg.stages] == [30, 10]
    assert (cfg.fp.start, cfg.fp.every, cfg.fp.stop) == (20, 4, None)
