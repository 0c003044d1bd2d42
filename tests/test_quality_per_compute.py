"""benchmarks/quality_per_compute.py at toy size: rows, verdict, table files, the cell cache."""

from __future__ import annotations

import importlib.util
import json
import math
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "quality_per_compute.py"


@pytest.fixture
def bench():
    spec = importlib.util.spec_from_file_location("quality_per_compute", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _argv(out: Path) -> list[str]:
    return ["--num-images", "4", "--batch-size", "4", "--epochs", "1", "--kd-batch-size", "2", "--val-images", "4",
            "--seeds", "0", "--paper-iterations", "2", "4", "--fast-iterations", "2", "4",
            "--student", "yolo-lite-n", "--device", "cpu", "--out", str(out)]


def test_rows_verdict_tables_and_cached_rerun(tmp_path, bench, capsys, monkeypatch):
    table = bench.main(_argv(tmp_path))
    assert json.loads(capsys.readouterr().out) == table  # one JSON object on stdout
    assert [(r["recipe"], r["iterations"]) for r in table["rows"]] == [("paper", 2), ("paper", 4), ("fast", 2),
                                                                        ("fast", 4)]
    for r in table["rows"]:
        assert r["image_iterations"] == 4 * r["iterations"] and r["seeds"] == [0] and len(r["per_seed"]) == 1
        for key in ("map_50_mean", "map_mean"):
            assert math.isfinite(r[key]) and 0.0 <= r[key] <= 1.0
        assert r["synthesis_seconds_mean"] > 0
    verdict = table["verdict"]
    assert verdict["reference"]["iterations"] == 4 and verdict["reference"]["recipe"] == "paper"
    if verdict["fast_match"] is None:
        assert verdict["iteration_fraction"] is None and not verdict["meets_target"]
    else:
        assert verdict["fast_match"]["map_50_mean"] >= 0.98 * verdict["reference"]["map_50_mean"]
        assert verdict["iteration_fraction"] == verdict["fast_match"]["iterations"] / 4
    assert json.loads((tmp_path / "table.json").read_text()) == table
    md = (tmp_path / "table.md").read_text()
    assert "benchmarks/quality_per_compute.py" in md and "| fast | 4 | 16 | 1 |" in md and "torch" in md
    # A second run reads every cell from its cache: nothing is synthesised or distilled again.
    cells = {p.name: p.stat().st_mtime_ns for p in (tmp_path / "cells").glob("*.json")}
    assert len(cells) == 4

    def refuse(*args, **kwargs):
        raise AssertionError("a cached cell was recomputed")

    monkeypatch.setattr(bench.Experiment, "synthesize_transfer", refuse)
    monkeypatch.setattr(bench.Experiment, "distil_student", refuse)
    again = bench.main(_argv(tmp_path))
    assert again["rows"] == table["rows"]
    assert {p.name: p.stat().st_mtime_ns for p in (tmp_path / "cells").glob("*.json")} == cells
    # --report-only gathers the cached cells and leaves missing ones out (here: a seed never run).
    (tmp_path / "cells" / "fast@4__seed0.json").unlink()
    report = bench.main(_argv(tmp_path) + ["--report-only", "--seeds", "0", "7"])
    assert [(r["recipe"], r["iterations"]) for r in report["rows"]] == [("paper", 2), ("paper", 4), ("fast", 2)]
    assert report["seeds"] == [0] and report["rows"][0]["per_seed"] == table["rows"][0]["per_seed"]


def test_other_settings_in_the_same_folder_are_refused(tmp_path, bench):
    (tmp_path / "settings.json").write_text(json.dumps({"num_images": 99}))
    with pytest.raises(SystemExit, match="other settings"):
        bench.main(_argv(tmp_path))


def test_a_cell_of_another_recipe_version_is_refused(tmp_path, bench):
    bench.main(_argv(tmp_path))
    path = tmp_path / "cells" / "fast@2__seed0.json"
    cell = json.loads(path.read_text())
    assert cell["recipe_sha256"] == bench.recipe_fingerprint("fast")
    path.write_text(json.dumps(dict(cell, recipe_sha256="0" * 64)))  # as if `fast` had changed since
    with pytest.raises(SystemExit, match="another version of the recipe 'fast'"):
        bench.main(_argv(tmp_path))
    with pytest.raises(SystemExit, match="another version"):
        bench.main(_argv(tmp_path) + ["--report-only"])
