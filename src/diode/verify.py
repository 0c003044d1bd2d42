"""Check a synthesised dataset against its manifest: every image present with its checksum."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

from diode.errors import DiodeError


def verify_dataset(folder: str | Path) -> tuple[int, list[str]]:
    """(number of files checked, problems) for a folder written by `diode synthesize`."""
    folder = Path(folder)
    manifest = folder / "manifest.jsonl"
    if not manifest.is_file():
        raise DiodeError(f"{folder}: no manifest.jsonl (not a finished `diode synthesize` output)")
    problems: list[str] = []
    checked = 0
    for number, line in enumerate(manifest.read_text().splitlines(), 1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
            files = record["files"]
        except (ValueError, KeyError, TypeError):
            problems.append(f"{manifest}:{number}: unreadable manifest line")
            continue
        for name, digest in files.items():
            checked += 1
            path = folder / "images" / name
            if not path.is_file():
                problems.append(f"{path}: missing")
            elif hashlib.sha256(path.read_bytes()).hexdigest() != digest:
                problems.append(f"{path}: checksum mismatch (corrupt or modified)")
    ann = folder / "annotations.json"
    if not ann.is_file():
        problems.append(f"{ann}: missing")
    else:
        try:
            listed = {img["file_name"] for img in json.loads(ann.read_text())["images"]}
        except (ValueError, KeyError, TypeError):
            problems.append(f"{ann}: unreadable")
        else:
            if len(listed) != checked:
                problems.append(f"{ann}: lists {len(listed)} images, the manifest {checked}")
    return checked, problems
