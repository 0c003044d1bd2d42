"""`diode demo --quick`: the whole pipeline end to end with the bundled teacher (smoke size)."""

from __future__ import annotations

import json

from diode.cli import main


def test_demo_quick(tmp_path, capsys):
    out = tmp_path / "demo"
    assert main(["demo", "--quick", "--out", str(out), "--device", "cpu", "--seed", "7"]) == 0
    printed = capsys.readouterr().out
    assert "teacher mAP@.5" in printed and "student mAP@.5" in printed and "report.html" in printed
    summary = json.loads((out / "summary.json").read_text())
    assert summary["teacher_map_50"] > 0.7  # the bundled teacher on fresh real images
    assert 0.0 <= summary["student_map_50"] <= 1.0
    assert summary["synthetic_images"] == 32 and summary["verifier_agreement"] is not None
    assert summary["seed"] == 7
    assert (out / "report.html").exists() and (out / "synthetic" / "manifest.jsonl").exists()
    # Another seed or size into the same folder: one clear error before anything there is rewritten.
    real = sorted((out / "real" / "val" / "images").iterdir())[0]
    before = real.read_bytes()
    for flags, message in ((["--quick", "--seed", "8"], "--seed 7 (--seed 8 here)"),
                           (["--seed", "7"], "holds a --quick demo run (this one is full)")):
        assert main(["demo", "--out", str(out), "--device", "cpu", *flags]) == 2
        assert message in capsys.readouterr().err
    assert real.read_bytes() == before


def test_demo_folder_with_an_unreadable_spec_is_refused(tmp_path, capsys):
    out = tmp_path / "demo"
    out.mkdir()
    (out / "demo.json").write_text("not json")
    assert main(["demo", "--quick", "--out", str(out), "--device", "cpu"]) == 2
    assert "demo.json: not a readable JSON file" in capsys.readouterr().err
    assert sorted(p.name for p in out.iterdir()) == ["demo.json"]
