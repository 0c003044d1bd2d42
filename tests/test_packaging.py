"""The wheel carries what a pip-installed diode needs at run time: recipes and bundled weights."""

from __future__ import annotations

import subprocess
import sys
import zipfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def test_wheel_contents(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q",
                           "-w", str(tmp_path), str(ROOT)], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    wheel = next(tmp_path.glob("diode_kd-*.whl"))
    names = set(zipfile.ZipFile(wheel).namelist())
    assert "diode/configs/paper.yaml" in names and "diode/configs/fast.yaml" in names
    assert "diode/cli.py" in names and "diode/__main__.py" in names
    bundled = sorted(p.name for p in (ROOT / "src" / "diode" / "weights").glob("*.pt"))
    assert bundled, "no bundled checkpoint in src/diode/weights"
    for name in bundled:
        assert f"diode/weights/{name}" in names
    entry_points = next(n for n in names if n.endswith("entry_points.txt"))
    assert "diode = diode.cli:main" in zipfile.ZipFile(wheel).read(entry_points).decode()


def test_bundled_weights_small():
    for path in (ROOT / "src" / "diode" / "weights").glob("*.pt"):
        assert path.stat().st_size <= 20 * 2**20, path
