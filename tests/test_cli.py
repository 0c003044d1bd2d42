"""CLI smoke tests and the bad-input contract (one line on stderr, exit code 2, no traceback)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from diode.cli import main
from diode.data.shapes import CLASS_NAMES


@pytest.fixture(scope="module")
def shapes_dir(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("shapes")
    assert main(["data", "shapes", "--out", str(out), "--train", "24", "--val", "8",
                 "--image-size", "64", "64", "--seed", "3", "--quiet"]) == 0
    return out


@pytest.fixture(scope="module")
def trained_run(shapes_dir, tmp_path_factory) -> Path:
    run = tmp_path_factory.mktemp("run")
    assert main(["train", "--data", str(shapes_dir / "train"), "--val", str(shapes_dir / "val"),
                 "--arch", "yolo-lite-n", "--out", str(run), "--epochs", "1", "--batch-size", "8",
                 "--device", "cpu"]) == 0
    return run


def _error_line(capsys) -> str:
    err = capsys.readouterr().err.strip()
    assert "Traceback" not in err
    lines = err.splitlines()
    assert len(lines) == 1, err
    assert lines[0].startswith("diode: error: ")
    return lines[0]


def test_shapes_layouts(shapes_dir):
    ann = json.loads((shapes_dir / "train" / "annotations.json").read_text())
    assert len(ann["images"]) == 24 and [c["name"] for c in ann["categories"]] == CLASS_NAMES
    assert (shapes_dir / "data.yaml").exists()
    assert len(list((shapes_dir / "train" / "labels").glob("*.txt"))) == 24


def test_train_writes_checkpoints_and_config(trained_run):
    for name in ("best.pt", "last.pt", "history.json", "config.yaml"):
        assert (trained_run / name).exists(), name
    ckpt = torch.load(trained_run / "best.pt", weights_only=True)
    assert ckpt["arch"] == "yolo-lite-n" and ckpt["class_names"] == CLASS_NAMES
    assert ckpt["command"].startswith("diode train ") and "map_50" in ckpt["metrics"]
    assert ckpt["image_size"] == [64, 64]


def test_evaluate_json_and_table(trained_run, shapes_dir, tmp_path, capsys):
    out = tmp_path / "m.json"
    assert main(["evaluate", "--model", str(trained_run / "best.pt"), "--data", str(shapes_dir / "data.yaml"),
                 "--json", str(out), "--device", "cpu"]) == 0
    metrics = json.loads(out.read_text())
    for key in ("map", "map_50", "map_75", "per_class"):
        assert key in metrics
    assert set(metrics["per_class"]) == set(CLASS_NAMES)
    assert "circle" in capsys.readouterr().out


def test_yolo_and_coco_views_evaluate_equal(trained_run, shapes_dir, tmp_path):
    a, b = tmp_path / "a.json", tmp_path / "b.json"
    main(["evaluate", "--model", str(trained_run / "best.pt"), "--data", str(shapes_dir / "val"), "--json", str(a)])
    main(["evaluate", "--model", str(trained_run / "best.pt"), "--data", str(shapes_dir), "--json", str(b)])
    assert json.loads(a.read_text())["map"] == pytest.approx(json.loads(b.read_text())["map"], abs=1e-9)


def test_predict_draws_png(trained_run, shapes_dir, tmp_path):
    out = tmp_path / "grid.png"
    assert main(["predict", "--model", str(trained_run / "best.pt"), "--data", str(shapes_dir / "val"),
                 "--out", str(out), "--num-images", "4", "--score-thresh", "0.0"]) == 0
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_train_refuses_existing_run_without_resume(trained_run, shapes_dir, capsys):
    before = (trained_run / "last.pt").read_bytes()
    code = main(["train", "--data", str(shapes_dir / "train"), "--val", str(shapes_dir / "val"),
                 "--arch", "yolo-lite-n", "--out", str(trained_run), "--epochs", "1"])
    assert code == 2 and "--resume" in _error_line(capsys)
    assert (trained_run / "last.pt").read_bytes() == before


def test_detectors_lists_names(capsys):
    assert main(["detectors"]) == 0
    out = capsys.readouterr().out
    for name in ("yolo-lite-n", "yolo-lite-s", "yolo-lite-m"):
        assert name in out


@pytest.mark.parametrize("argv_tail, needle", [
    (["--arch", "no-such-net"], "no-such-net"),
    (["--arch", "yolo-lite-n", "--image-size", "60", "64"], "multiples of 32"),
    (["--arch", "yolo-lite-n", "--epochs", "0"], "epochs"),
    (["--arch", "yolo-lite-n", "--device", "cuda:7"] if not torch.cuda.is_available() else
     ["--arch", "yolo-lite-n", "--device", "nonsense"], "--device"),
])
def test_train_bad_flags(shapes_dir, tmp_path, capsys, argv_tail, needle):
    code = main(["train", "--data", str(shapes_dir / "train"), "--val", str(shapes_dir / "val"),
                 "--out", str(tmp_path / "r"), *argv_tail])
    assert code == 2
    assert needle in _error_line(capsys)


def test_bad_dataset_inputs(tmp_path, capsys, trained_run):
    missing = tmp_path / "nope"
    assert main(["evaluate", "--model", str(trained_run / "best.pt"), "--data", str(missing)]) == 2
    assert "nope" in _error_line(capsys)
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "annotations.json").write_text("{not json")
    assert main(["evaluate", "--model", str(trained_run / "best.pt"), "--data", str(bad)]) == 2
    assert "annotations.json" in _error_line(capsys)


def test_bad_model_inputs(tmp_path, capsys, shapes_dir):
    assert main(["evaluate", "--model", "no-such-model", "--data", str(shapes_dir / "val")]) == 2
    assert "no-such-model" in _error_line(capsys)
    junk = tmp_path / "junk.pt"
    junk.write_bytes(os.urandom(256))
    assert main(["evaluate", "--model", str(junk), "--data", str(shapes_dir / "val")]) == 2
    assert "junk.pt" in _error_line(capsys)


def test_class_mismatch_is_named(tmp_path, capsys, trained_run):
    from diode.data.coco import write_coco
    from diode.io import save_png

    save_png(tmp_path / "images" / "a.png", torch.zeros(3, 64, 64))
    write_coco(tmp_path / "annotations.json", ["zebra"],
               [{"file_name": "a.png", "height": 64, "width": 64, "boxes": torch.tensor([[1.0, 1, 20, 20]]),
                 "labels": torch.tensor([0])}])
    assert main(["evaluate", "--model", str(trained_run / "best.pt"), "--data", str(tmp_path)]) == 2
    assert "zebra" in _error_line(capsys)


def test_python_dash_m_entry_point():
    proc = subprocess.run([sys.executable, "-m", "diode", "--version"], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0 and proc.stdout.startswith("diode ")


def test_console_script_bad_input_exit_code(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "diode", "evaluate", "--model", "shapes-teacher",
                           "--data", str(tmp_path / "missing")], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2
    assert proc.stderr.count("\n") == 1 and "Traceback" not in proc.stderr
