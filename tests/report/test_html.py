"""The HTML report renders in headless Chromium: non-blank screenshot, images load, no console errors."""

from __future__ import annotations

import json
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from diode.cli import main
from diode.config import SynthesisConfig
from diode.detectors.registry import build_detector
from diode.errors import DiodeError
from diode.report.html import write_report
from diode.synthesis.runner import RunSpec, SynthesisRun

CHROMIUM_FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                  "--disable-background-networking", "--disable-component-update", "--disable-sync"]
# Prepended to a copy of the page: records console errors and uncaught exceptions in the DOM.
PROBE = ("<script>window.__errors=0;const e=console.error;console.error=function(){window.__errors++;"
         "e.apply(console,arguments)};window.addEventListener('error',()=>window.__errors++);"
         "window.addEventListener('load',()=>{const ok=[...document.images].every(i=>i.complete&&i.naturalWidth>0);"
         "document.body.setAttribute('data-probe',(ok?'images-ok':'images-broken')+' errors='+window.__errors);});"
         "</script>")


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("report")
    torch.manual_seed(0)
    teacher = build_detector("yolo-lite-n", class_names=["a", "b"], image_size=(64, 64)).eval()
    cfg = SynthesisConfig(batch_size=4, stages=[{"iterations": 4, "lr": 0.1}], log_every=1)
    run = SynthesisRun(teacher, RunSpec(4, (64, 64), 0, "tiny", cfg), root / "synth")
    run.run(progress=False)
    run.merge()
    history = [{"epoch": e, "loss": {"box": 1.0 / e, "obj": 0.5 / e}, "lr": 0.001,
                "metrics": {"map": 0.1 * e, "map_50": 0.2 * e, "map_75": 0.05 * e, "map_small": -1.0,
                            "map_medium": 0.1, "map_large": 0.2}} for e in (1, 2, 3)]
    (root / "student").mkdir()
    (root / "student" / "history.json").write_text(json.dumps(history))
    return root


def _chromium() -> str:
    path = shutil.which("chromium") or shutil.which("chromium-browser")
    assert path, "Debian package chromium is required (make test installs it)"
    return path


def test_report_sections(run_dir):
    page = write_report(run_dir).read_text()
    assert "Synthesis: synth" in page and "Training: student" in page
    assert page.count("data:image/png;base64,") >= 4  # curves, two grids, training curves
    assert "http://" not in page and "https://" not in page  # self-contained


def test_report_renders_in_chromium(run_dir, tmp_path):
    page = write_report(run_dir).read_text()
    probed = tmp_path / "probed.html"
    probed.write_text(page.replace("<head>", "<head>" + PROBE, 1))
    base = [_chromium(), *CHROMIUM_FLAGS, f"--user-data-dir={tmp_path / 'profile'}"]
    dom = subprocess.run([*base, "--dump-dom", probed.as_uri()], capture_output=True, text=True, timeout=120)
    assert 'data-probe="images-ok errors=0"' in dom.stdout, dom.stdout[-500:] + dom.stderr[-500:]
    shot = tmp_path / "shot.png"
    subprocess.run([*base, f"--screenshot={shot}", "--window-size=1200,1600", (run_dir / "report.html").as_uri()],
                   capture_output=True, timeout=120, check=True)
    pixels = np.asarray(Image.open(shot).convert("L"), dtype=np.float32)
    assert pixels.std() > 10  # not a blank page
    assert (pixels < 128).mean() > 0.01  # some dark content (text, images)


def test_report_cli_and_errors(run_dir, tmp_path, capsys):
    assert main(["report", str(run_dir)]) == 0
    assert "report.html" in capsys.readouterr().out
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(DiodeError, match="nothing to report"):
        write_report(empty)
    assert main(["report", str(tmp_path / "missing")]) == 2
