"""One writer per output folder, stale-lock takeover, and `diode verify`."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys

import pytest

from diode.cli import main
from diode.errors import DiodeError
from diode.lock import LOCK_NAME, OutputLock
from diode.verify import verify_dataset


def test_second_writer_refused(tmp_path):
    with OutputLock(tmp_path / "run"):
        with pytest.raises(DiodeError, match="in use by another diode process"):
            OutputLock(tmp_path / "run").acquire()
    assert not (tmp_path / "run" / LOCK_NAME).exists()  # released


def test_second_writer_refused_across_processes(tmp_path):
    (tmp_path / LOCK_NAME).write_text(json.dumps({"pid": os.getppid(), "host": socket.gethostname()}))
    code = main(["train", "--data", str(tmp_path), "--val", str(tmp_path), "--arch", "yolo-lite-n",
                 "--out", str(tmp_path)])
    assert code == 2


def test_stale_lock_taken_over(tmp_path):
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    (tmp_path / LOCK_NAME).write_text(json.dumps({"pid": int(dead.stdout), "host": socket.gethostname()}))
    with OutputLock(tmp_path) as lock:
        assert json.loads(lock.path.read_text())["pid"] == os.getpid()


def test_garbage_lock_is_stale(tmp_path):
    (tmp_path / LOCK_NAME).write_text("{half")
    with OutputLock(tmp_path):
        pass


def _fake_dataset(folder):
    import hashlib

    (folder / "images").mkdir(parents=True)
    files = {}
    for i in range(3):
        data = bytes([i]) * 100
        (folder / "images" / f"{i}.png").write_bytes(data)
        files[f"{i}.png"] = hashlib.sha256(data).hexdigest()
    (folder / "manifest.jsonl").write_text(json.dumps({"batch": 0, "files": files}) + "\n")
    (folder / "annotations.json").write_text(json.dumps({"images": [{"file_name": n} for n in files]}))


def test_verify_detects_corruption_and_missing(tmp_path, capsys):
    _fake_dataset(tmp_path)
    assert verify_dataset(tmp_path) == (3, [])
    assert main(["verify", str(tmp_path)]) == 0
    (tmp_path / "images" / "1.png").write_bytes(b"corrupted")
    (tmp_path / "images" / "2.png").unlink()
    checked, problems = verify_dataset(tmp_path)
    assert checked == 3 and len(problems) == 2
    assert any("1.png: checksum mismatch" in p for p in problems)
    assert any("2.png: missing" in p for p in problems)
    assert main(["verify", str(tmp_path)]) == 1
    assert main(["verify", str(tmp_path / "nope")]) == 2
