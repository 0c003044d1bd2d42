"""`diode experiment` end to end at toy size: every row, the table, the plots, the row cache."""

from __future__ import annotations

import json

import pytest

from diode import experiment as ex


@pytest.fixture
def tiny_profile(monkeypatch):
    profile = ex.Profile(transfer_images=4, synth_iterations=2, fast_iterations=2, synth_batch=4, kd_epochs=1,
                         kd_batch=2, val_images=4, seeds=[0, 1], iteration_sweep=[1], image_sweep=[2])
    monkeypatch.setitem(ex.PROFILES, "tiny", profile)
    return profile


def test_experiment_writes_every_row_and_resumes_from_its_cache(tmp_path, tiny_profile):
    logged: list[str] = []
    run = ex.Experiment(tmp_path, "tiny", student_arch="yolo-lite-n-p2", progress=False, log=logged.append)
    assert run.kd.methods == {"soft": 1.0}  # same head layout as the teacher: soft targets
    rows = run.run()
    assert [r["row"] for r in rows] == ex.ROWS
    table = json.loads((tmp_path / "table.json").read_text())
    assert table["kd_methods"] == "soft"
    for r in table["rows"]:
        assert r["seeds"] == 2 and r["images"] == 4 and 0.0 <= r["map_50_mean"] <= 1.0
    synth = {r["row"]: r for r in table["rows"] if r["row"] in ex.SYNTH_ROWS}
    assert all(r["teacher_agreement"] is not None and r["synthesis_seconds"] > 0 for r in synth.values())
    assert {d["iterations"] for d in table["sweeps"]["fast_by_iterations"]} == {1, 2}
    assert {d["images"] for d in table["sweeps"]["fast_by_images"]} == {2, 4}
    md = (tmp_path / "table.md").read_text()
    assert "| real-kd |" in md and "| fast |" in md and "soft" in md
    for name in ("map_vs_iterations.png", "map_vs_images.png"):
        assert (tmp_path / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    # A second run reads every row from rows/ and trains nothing.
    logged.clear()
    again = ex.Experiment(tmp_path, "tiny", student_arch="yolo-lite-n-p2", progress=False, log=logged.append)
    assert again.run() == rows
    assert not any("training the student" in line for line in logged)


def test_unknown_profile_is_a_clear_error(tmp_path):
    from diode.errors import DiodeError

    with pytest.raises(DiodeError, match="--profile"):
        ex.Experiment(tmp_path, "huge", progress=False)


def test_other_settings_in_the_same_folder_are_refused(tmp_path, tiny_profile, monkeypatch):
    from dataclasses import replace

    from diode.errors import DiodeError

    ex.Experiment(tmp_path, "tiny", student_arch="yolo-lite-n-p2", progress=False)
    assert json.loads((tmp_path / "experiment.json").read_text())["kd_epochs"] == 1
    ex.Experiment(tmp_path, "tiny", student_arch="yolo-lite-n-p2", progress=False)  # same settings: fine
    monkeypatch.setitem(ex.PROFILES, "tiny", replace(tiny_profile, kd_epochs=2))
    with pytest.raises(DiodeError, match=r"other settings \(kd_epochs 1 -> 2\)"):
        ex.Experiment(tmp_path, "tiny", student_arch="yolo-lite-n-p2", progress=False)
    # Rows cached before settings were recorded cannot be vouched for.
    legacy = tmp_path / "legacy"
    (legacy / "rows").mkdir(parents=True)
    (legacy / "rows" / "noise__n4__seed0.json").write_text("{}")
    with pytest.raises(DiodeError, match="not recorded"):
        ex.Experiment(legacy, "tiny", student_arch="yolo-lite-n-p2", progress=False)
