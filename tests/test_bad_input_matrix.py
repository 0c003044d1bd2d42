"""The bad-input matrix: every case runs the real CLI (`diode.cli.main`) on one bad dataset, image,
checkpoint, recipe, flag, model pairing or output place and must give one line on stderr naming
the problem (after progress bars, if any), no traceback, the documented exit code, and leave every
file that existed before byte-identical, with no temp file behind.

Exit codes (see `diode.cli`): 2 for bad input, which includes an output path that is not
writable or lies on a read-only file system (EACCES, EROFS: the user chose that path, as the
output-folder lock also reports); 1 for runtime failures such as a full disk (ENOSPC), after
which rerunning the same command, once there is space, finishes the job.

Full disks, read-only file systems and (when running as root, where chmod does not stop writes)
non-writable folders are simulated in-process: creating, renaming onto or making a folder at a
matching path raises the OSError the kernel would.
"""

from __future__ import annotations

import errno
import fnmatch
import json
import os
import re
import shutil
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import pytest
import torch

from diode.cli import main
from diode.data.shapes import CLASS_NAMES
from diode.detectors.checkpoint import FORMAT, save_checkpoint
from diode.detectors.registry import build_detector

Make = Callable[[Path, Path], None]  # (case folder, shared workspace) -> None: writes the bad input


@dataclass(frozen=True)
class Case:
    id: str
    argv: str  # tokens formatted with {ws}, {tmp}, {data} (shapes dataset), {teacher} (a checkpoint)
    needle: str  # names the problem: must appear in the error line
    code: int = 2
    make: Make | None = None
    before: str = ""  # a command that must succeed first: its files must survive the failure
    fault: tuple[int, str] | None = None  # (errno, path glob under {tmp}) simulated for this run
    readonly: str = ""  # a folder under {tmp} made non-writable (chmod 555) before the run
    changes: tuple[str, ...] = ()  # files under {tmp} the run may rewrite (atomically) before failing


# ----------------------------------------------------------------------------- bad inputs
def coco(keys: tuple, value: object) -> Make:
    """The shapes val split (COCO) copied to {tmp}/d, the entry of its annotations.json at `keys`
    set to `value` (keys (): the whole document; a callable value gets the old one)."""
    def make(tmp: Path, ws: Path) -> None:
        shutil.copytree(ws / "data" / "val", tmp / "d")
        path = tmp / "d" / "annotations.json"
        doc = json.loads(path.read_text())
        if keys:
            parent = doc
            for key in keys[:-1]:
                parent = parent[key]
            parent[keys[-1]] = value
        else:
            doc = value(doc)
        path.write_text(json.dumps(doc))
    return make


def coco_bytes(edit: Callable[[bytes], bytes]) -> Make:
    """The shapes val split copied to {tmp}/d with the bytes of its annotations.json edited."""
    def make(tmp: Path, ws: Path) -> None:
        shutil.copytree(ws / "data" / "val", tmp / "d")
        path = tmp / "d" / "annotations.json"
        path.write_bytes(edit(path.read_bytes()))
    return make


def first_image(edit: Callable[[bytes], bytes] | None) -> Make:
    """The shapes val split copied to {tmp}/d with its first image's bytes edited (None: deleted)."""
    def make(tmp: Path, ws: Path) -> None:
        shutil.copytree(ws / "data" / "val", tmp / "d")
        path = sorted((tmp / "d" / "images").glob("*.png"))[0]
        if edit is None:
            path.unlink()
        else:
            path.write_bytes(edit(path.read_bytes()))
    return make


def yolo(label: bytes | None = None, data_yaml: str | None = None) -> Make:
    """The shapes dataset (YOLO view) copied to {tmp}/d with the first val label file and/or data.yaml replaced."""
    def make(tmp: Path, ws: Path) -> None:
        shutil.copytree(ws / "data", tmp / "d")
        if label is not None:
            sorted((tmp / "d" / "val" / "labels").glob("*.txt"))[0].write_bytes(label)
        if data_yaml is not None:
            (tmp / "d" / "data.yaml").write_text(data_yaml)
    return make


def file(name: str, content: bytes | str | Callable[[Path], bytes]) -> Make:
    """{tmp}/name with `content` (a function of the workspace for derived bytes)."""
    def make(tmp: Path, ws: Path) -> None:
        data = content(ws) if callable(content) else content
        (tmp / name).write_bytes(data.encode() if isinstance(data, str) else data)
    return make


def checkpoint(edit: Callable[[dict], object]) -> Make:
    """{tmp}/x.pt: the teacher checkpoint's dict passed through `edit`, saved with torch.save."""
    def make(tmp: Path, ws: Path) -> None:
        torch.save(edit(torch.load(ws / "teacher.pt", weights_only=True)), tmp / "x.pt")
    return make


def half(data: bytes) -> bytes:
    return data[:len(data) // 2]


class _Opaque:
    """A harmless class that weights-only loading refuses: its file needs full unpickling."""


def folder(name: str) -> Make:
    def make(tmp: Path, ws: Path) -> None:
        (tmp / name).mkdir()
    return make


TRAIN = "train --data {data}/train --val {data}/val --arch yolo-lite-n --out {tmp}/run --epochs 1 --device cpu"
EVAL = "evaluate --model {teacher} --data {tmp}/d --device cpu"  # on the bad dataset copy
EVAL_VAL = "evaluate --model {teacher} --data {data}/val --device cpu"
EVAL_MODEL = EVAL_VAL.replace("{teacher}", "{tmp}/x.pt")
SYN = "synthesize --teacher {teacher} --out {tmp}/syn --num-images 1 --device cpu --quiet"
SYN_MODEL = SYN.replace("{teacher}", "{tmp}/x.pt")
SYN_RECIPE = SYN + " --recipe {tmp}/r.yaml"
KD = "distill --teacher {teacher} --student yolo-lite-n --data {data}/train --out {tmp}/kd --device cpu"
# Real runs (a few seconds), finished by the number of images / epochs appended.
SYN_TINY = "synthesize --teacher {teacher} --out {tmp}/syn --recipe {ws}/tiny.yaml --device cpu --quiet --num-images"
TRAIN_RESUME = ("train --data {data}/train --val {data}/val --arch yolo-lite-n --out {tmp}/run --batch-size 8 "
                "--device cpu --resume --epochs")

CASES = [
    # datasets
    Case("train-data-missing-dir", TRAIN.replace("{data}/train", "{tmp}/nope"), "no such file or folder"),
    Case("coco-truncated-json", EVAL, "invalid JSON", make=coco_bytes(half)),
    Case("coco-bbox-negative-width", EVAL, "bbox width and height must be positive",
         make=coco(("annotations", 0, "bbox", 2), -5)),
    Case("coco-bbox-three-numbers", EVAL, "bbox must be 4 finite numbers",
         make=coco(("annotations", 0, "bbox"), [1, 2, 3])),
    Case("coco-unknown-category", EVAL, "unknown category id 999", make=coco(("annotations", 0, "category_id"), 999)),
    Case("coco-top-level-list", EVAL, "top level must be a JSON object", make=coco((), lambda doc: [doc])),
    Case("coco-no-images-train", TRAIN.replace("{data}/train", "{tmp}/d"), "dataset has no images",
         make=coco((), lambda doc: {**doc, "images": [], "annotations": []})),
    Case("yolo-label-class-out-of-range", EVAL, "not an integer in 0..7", make=yolo(label=b"12 0.5 0.5 0.2 0.2\n")),
    Case("yolo-label-not-numbers", EVAL, "not all fields are numbers", make=yolo(label=b"0 0.5 abc 0.2 0.2\n")),
    Case("yolo-box-outside-image", EVAL, "outside the [0, 1] image", make=yolo(label=b"0 0.95 0.5 0.3 0.2\n")),
    Case("yolo-label-not-utf8", EVAL, "not UTF-8", make=yolo(label=b"\xff\xfe0 0.5\n")),
    Case("data-yaml-missing-names", EVAL, "needs 'names'",
         make=yolo(data_yaml="path: .\ntrain: train/images\nval: val/images\n")),
    Case("data-yaml-missing-val-split", EVAL, "no 'val' split",
         make=yolo(data_yaml="train: train/images\nnames: [a]\n")),
    Case("data-yaml-syntax-error", EVAL, "invalid YAML at line 3",
         make=yolo(data_yaml="train: train/images\nnames: [a, b\nval: val/images\n")),
    Case("data-yaml-unknown-split", EVAL_VAL.replace("{data}/val", "{data}/data.yaml") + " --split nosuch",
         "unknown split"),
    Case("transfer-folder-without-images", KD.replace("{data}/train", "{tmp}/empty"), "holds no images",
         make=folder("empty")),
    # images
    Case("png-truncated", EVAL, "truncated", make=first_image(half)),
    Case("png-not-an-image", EVAL, "cannot read image", make=first_image(lambda b: b"just text, named .png\n")),
    Case("png-missing", EVAL, "image file not found", make=first_image(None)),
    Case("transfer-png-truncated", KD.replace("{data}/train", "{tmp}/d/images"), "truncated", make=first_image(half)),
    # checkpoints
    Case("checkpoint-truncated", SYN_MODEL, "not a loadable diode checkpoint",
         make=file("x.pt", lambda ws: half((ws / "teacher.pt").read_bytes()))),
    Case("checkpoint-arbitrary-bytes-student", KD.replace("yolo-lite-n", "{tmp}/x.pt"), "not a loadable diode checkpoint",
         make=file("x.pt", bytes(range(256)) * 8)),
    Case("checkpoint-empty-file", EVAL_MODEL, "not a loadable diode checkpoint", make=file("x.pt", b"")),
    Case("checkpoint-missing-keys", EVAL_MODEL, "lacks key 'class_names'",
         make=checkpoint(lambda c: {k: c[k] for k in ("format", "arch", "state_dict")})),
    Case("checkpoint-bare-state-dict", SYN_MODEL, "not a diode detector checkpoint",
         make=checkpoint(lambda c: c["state_dict"])),
    Case("checkpoint-weights-of-other-arch", SYN_MODEL, "weights do not match",
         make=checkpoint(lambda c: {**c, "arch": "yolo-lite-s"})),
    Case("checkpoint-unknown-arch", SYN_MODEL, "x.pt: unknown detector 'no-such-arch'",
         make=checkpoint(lambda c: {**c, "arch": "no-such-arch"})),
    Case("checkpoint-needs-unpickling-init", TRAIN + " --init {tmp}/x.pt", "--trust-checkpoint",
         make=lambda tmp, ws: torch.save({"format": FORMAT, "weights": _Opaque()}, tmp / "x.pt")),
    Case("checkpoint-init-other-classes", TRAIN + " --init {ws}/three.pt", "cannot initialise"),
    # recipes
    Case("recipe-yaml-syntax-error", SYN_RECIPE, "invalid YAML at line 3",
         make=file("r.yaml", "batch_size: 2\nstages: [ {iterations: 2\n")),
    Case("recipe-unknown-nested-key", SYN_RECIPE, "unknown key 'stages[0].lrr'",
         make=file("r.yaml", "stages:\n  - {iterations: 2, lrr: 0.1}\n")),
    Case("recipe-negative-iterations", SYN_RECIPE, "iterations must be >= 0",
         make=file("r.yaml", "stages:\n  - {iterations: -3}\n")),
    Case("recipe-wrong-type", SYN + " --recipe {tmp}/r.yaml --iterations 4", "stages[0].iterations must be an integer",
         make=file("r.yaml", "stages:\n  - {iterations: many}\n")),
    Case("recipe-section-not-mapping", SYN_RECIPE, "augment must be a mapping",
         make=file("r.yaml", "augment: 3\n")),
    Case("recipe-not-a-mapping", SYN_RECIPE, "must be a YAML mapping", make=file("r.yaml", "- 1\n")),
    Case("recipe-unknown-precision", SYN_RECIPE, "precision must be fp32 or bf16",
         make=file("r.yaml", "precision: fp16\n")),
    Case("recipe-bn-layers-select-nothing", SYN_RECIPE, "selects no BN layer",
         make=file("r.yaml", "batch_size: 1\nstages:\n  - {iterations: 1}\nbn: {layers: 'no-such-layer*'}\n")),
    # flags
    Case("synthesize-batch-size-0", SYN + " --batch-size 0", "batch_size must be >= 1"),
    Case("train-batch-size-0", TRAIN + " --batch-size 0", "batch_size must be >= 1"),
    Case("train-negative-lr", TRAIN + " --lr -1", "lr must be > 0"),
    Case("train-eval-every-0", TRAIN + " --eval-every 0", "eval_every must be >= 1"),
    Case("train-image-size-0", TRAIN + " --image-size 0 64", "--image-size must be positive"),
    Case("evaluate-batch-size-0", EVAL_VAL + " --batch-size 0", "batch_size must be >= 1"),
    Case("predict-num-images-0", "predict --model {teacher} --data {data}/val --out {tmp}/g.png --num-images 0",
         "--num-images must be >= 1"),
    Case("synthesize-unknown-device", SYN.replace("--device cpu", "--device tpu"), "not a device name"),
    Case("shapes-negative-count", "data shapes --out {tmp}/s --train -1 --val 1", "--train and --val must be >= 0"),
    Case("distill-unknown-method", KD + " --method magic", "unknown ['magic']"),
    Case("distill-pseudo-score-out-of-range", KD + " --pseudo-score-thresh 1.5", "must be in [0, 1]"),
    Case("predict-score-out-of-range", "predict --model {teacher} --data {data}/val --out {tmp}/g.png --score-thresh 2",
         "must be in [0, 1]"),
    Case("distill-method-weight-not-number", KD + " --method output=abc", "is not a number"),
    Case("distill-unknown-student", KD.replace("yolo-lite-n", "no-such-net"),
         "no such checkpoint file or bundled model"),
    Case("distill-unknown-noise", KD.replace("{data}/train", "noise:pink") + " --num-images 2", "unknown noise"),
    Case("distill-noise-without-count", KD.replace("{data}/train", "noise:gaussian"), "pass --num-images"),
    Case("verify-not-a-synthesis-output", "verify {data}/train", "no manifest.jsonl"),
    Case("report-missing-run-folder", "report {tmp}/nope", "no such run folder"),
    # incompatible models
    Case("distill-class-counts-differ", KD.replace("yolo-lite-n", "{ws}/three.pt"), "classes differ (8 vs 3)"),
    Case("synthesize-verifier-classes-differ", SYN + " --verifier {ws}/three.pt", "classes differ"),
    Case("distill-student-image-size-differs", KD.replace("yolo-lite-n", "{tmp}/x.pt"), "differs from the teacher's",
         make=checkpoint(lambda c: {**c, "image_size": [96, 96]})),
    # output places
    Case("output-is-a-file", SYN.replace("{tmp}/syn", "{teacher}"), "cannot create output folder"),
    Case("output-folder-not-writable-predict", "predict --model {teacher} --data {data}/val --out {tmp}/ro/g.png",
         "g.png: Permission denied (EACCES)", readonly="ro"),
    Case("output-folder-not-writable-synthesize", SYN.replace("{tmp}/syn", "{tmp}/ro/syn"),
         "cannot create output folder", readonly="ro"),
    Case("read-only-file-system-evaluate-json", EVAL_VAL + " --json {tmp}/out/m.json",
         "m.json: Read-only file system (EROFS)", before=EVAL_VAL + " --json {tmp}/out/m.json",
         fault=(errno.EROFS, "{tmp}/out/*")),
    Case("disk-full-synthesize-merge", SYN_TINY + " 2", "annotations.json: No space left on device (ENOSPC)", code=1,
         before=SYN_TINY + " 2", fault=(errno.ENOSPC, "{tmp}/syn/annotations.json")),
    Case("disk-full-train-checkpoint", TRAIN_RESUME + " 2", ".pt: No space left on device (ENOSPC)", code=1,
         before=TRAIN_RESUME + " 1", fault=(errno.ENOSPC, "{tmp}/run/*.pt"), changes=("run/config.yaml",)),
]

_PROGRESS = re.compile(r"\[\d+:\d+")  # tqdm's elapsed-time bracket


@pytest.fixture(scope="module")
def ws(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("matrix")
    assert main(["data", "shapes", "--out", str(root / "data"), "--train", "8", "--val", "4",
                 "--image-size", "64", "64", "--seed", "1", "--quiet"]) == 0
    torch.manual_seed(0)
    for name, classes in (("teacher", CLASS_NAMES), ("three", ["a", "b", "c"])):
        detector = build_detector("yolo-lite-n", class_names=classes, image_size=(64, 64)).eval()
        save_checkpoint(root / f"{name}.pt", detector, command="test")
    (root / "tiny.yaml").write_text("batch_size: 1\nstages:\n  - {iterations: 2, lr: 0.1}\n")
    return root


def _argv(template: str, ws: Path, tmp: Path) -> list[str]:
    return [t.format(ws=ws, tmp=tmp, data=ws / "data", teacher=ws / "teacher.pt") for t in template.split()]


def _files(*roots: Path) -> dict[Path, bytes]:
    return {p: p.read_bytes() for root in roots for p in sorted(root.rglob("*")) if p.is_file()}


def _simulate(monkeypatch: pytest.MonkeyPatch, code: int, pattern: str) -> None:
    """Creating a file, making a folder or renaming onto a path matching `pattern` fails with `code`."""
    def failing(real: Callable, index: int, applies: Callable[..., bool] = lambda *a: True) -> Callable:
        def call(*args, **kwargs):
            path = os.fsdecode(args[index])
            if applies(*args) and fnmatch.fnmatchcase(path, pattern):
                raise OSError(code, os.strerror(code), path)
            return real(*args, **kwargs)
        return call

    monkeypatch.setattr(os, "open", failing(os.open, 0, lambda path, flags, *rest: bool(flags & os.O_CREAT)))
    monkeypatch.setattr(os, "mkdir", failing(os.mkdir, 0))
    monkeypatch.setattr(os, "replace", failing(os.replace, 1))


def _error_line(err: str) -> str:
    """The one error line of `err`, which must be the last; any other line is a progress bar."""
    assert "Traceback" not in err, err
    lines = [line for line in err.splitlines() if line.strip()]
    assert lines and lines[-1].startswith("diode: error: "), err
    assert all(_PROGRESS.search(line) for line in lines[:-1]), err
    return lines[-1]


def test_matrix_is_large_and_ids_unique() -> None:
    assert len(CASES) >= 30
    assert len({c.id for c in CASES}) == len(CASES)


@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
def test_bad_input(case: Case, ws: Path, tmp_path: Path, capsys, monkeypatch: pytest.MonkeyPatch) -> None:
    if case.make is not None:
        case.make(tmp_path, ws)
    if case.before:
        assert main(_argv(case.before, ws, tmp_path)) == 0
    fault = (case.fault[0], case.fault[1].format(tmp=tmp_path)) if case.fault else None
    if case.readonly:
        (tmp_path / case.readonly).mkdir()
        (tmp_path / case.readonly).chmod(0o555)
        if os.access(tmp_path / case.readonly, os.W_OK):  # root: chmod does not stop writes
            fault = (errno.EACCES, f"{tmp_path / case.readonly}/*")
    earlier = _files(ws, tmp_path)
    capsys.readouterr()
    try:
        with monkeypatch.context() as patch:
            if fault is not None:
                _simulate(patch, *fault)
            code = main(_argv(case.argv, ws, tmp_path))
        line = _error_line(capsys.readouterr().err)
    finally:
        if case.readonly:
            (tmp_path / case.readonly).chmod(0o755)
    assert code == case.code, line
    assert case.needle in line
    after = _files(ws, tmp_path)
    may_change = {tmp_path / name for name in case.changes}
    damaged = [p for p, data in earlier.items() if after.get(p) != data and p not in may_change]
    assert not damaged, damaged
    assert not [p for p in after if p.name.endswith(".tmp") or p.name == ".diode.lock"]
    if case.fault is not None:  # space freed / disk writable again: the same command finishes the job
        assert main(_argv(case.argv, ws, tmp_path)) == 0


def test_debug_shows_the_traceback(ws: Path, tmp_path: Path, capsys, monkeypatch: pytest.MonkeyPatch) -> None:
    coco(("annotations", 0, "bbox", 2), -5)(tmp_path, ws)
    assert main(["--debug", *_argv(EVAL, ws, tmp_path)]) == 2
    err = capsys.readouterr().err
    assert "Traceback" in err and err.strip().splitlines()[-1].startswith("diode: error: ")
    with monkeypatch.context() as patch:
        _simulate(patch, errno.ENOSPC, f"{tmp_path}/m.json")
        assert main(["--debug", *_argv(EVAL_VAL + " --json {tmp}/m.json", ws, tmp_path)]) == 1
    err = capsys.readouterr().err
    assert "Traceback" in err and "No space left on device (ENOSPC)" in err.strip().splitlines()[-1]


def test_trust_flag_named_for_init_exists(ws: Path, tmp_path: Path, capsys) -> None:
    # The refusal above tells the user to pass --trust-checkpoint: train must accept it.
    torch.save({"format": FORMAT, "weights": _Opaque()}, tmp_path / "x.pt")
    assert main(_argv(TRAIN + " --init {tmp}/x.pt --trust-checkpoint", ws, tmp_path)) == 2
    assert "lacks key 'arch'" in _error_line(capsys.readouterr().err)


def test_separate_process_gives_one_line(ws: Path, tmp_path: Path) -> None:
    first_image(half)(tmp_path, ws)
    proc = subprocess.run([sys.executable, "-m", "diode", *_argv(EVAL, ws, tmp_path)], capture_output=True,
                          text=True, timeout=300, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert proc.returncode == 2
    assert "truncated" in _error_line(proc.stderr)
