"""The synthesis runner: dataset independent of work split and interruptions; CLI round trip."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from diode.cli import main
from diode.config import SynthesisConfig
from diode.detectors.checkpoint import save_checkpoint
from diode.detectors.registry import build_detector
from diode.errors import DiodeError
from diode.synthesis.runner import RunSpec, SynthesisRun

NAMES = ["a", "b", "c"]


def _teacher():
    torch.manual_seed(0)
    return build_detector("yolo-lite-n", class_names=NAMES, image_size=(64, 64)).eval()


def _config(**kw) -> SynthesisConfig:
    return SynthesisConfig(batch_size=2, stages=[{"iterations": 3, "lr": 0.1}], log_every=1,
                           fp={"enabled": True, "start": 1, "every": 1, "score_thresh": 0.0}, **kw)


def _spec(num_images: int = 5) -> RunSpec:
    return RunSpec(num_images, (64, 64), seed=7, teacher="tiny", config=_config())


def _snapshot(out: Path) -> dict[str, bytes]:
    files = sorted(p for p in (out / "images").glob("*.png"))
    snap = {p.name: p.read_bytes() for p in files}
    ann = json.loads((out / "annotations.json").read_text())
    snap["annotations"] = json.dumps(ann["annotations"], sort_keys=True).encode()
    return snap


def _no_temp_files(out: Path) -> bool:
    return not [p for p in out.rglob("*") if p.name.endswith(".tmp")]


@pytest.fixture(scope="module")
def reference(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("ref")
    run = SynthesisRun(_teacher(), _spec(), out)
    run.check_or_write_settings()
    run.run(progress=False)
    run.merge()
    return out


def test_layout_and_manifest(reference):
    for name in ("annotations.json", "data.yaml", "manifest.jsonl", "summary.json", "config.yaml"):
        assert (reference / name).exists(), name
    assert len(list((reference / "images").glob("*.png"))) == 5
    assert len(list((reference / "labels").glob("*.txt"))) == 5
    lines = (reference / "manifest.jsonl").read_text().splitlines()
    assert len(lines) == 3  # ceil(5 / 2) batches
    first = json.loads(lines[0])
    assert set(first["losses"]) >= {"task", "bn", "bn_first", "tv_l1", "tv_l2", "total"}
    assert "teacher_agreement" in first and len(first["files"]) == 2
    assert (reference / "grids" / "000000_targets.png").exists()
    assert (reference / "grids" / "000000_teacher.png").exists()
    assert _no_temp_files(reference)


def test_split_across_ranks_gives_same_dataset(reference, tmp_path):
    spec = _spec()
    for rank in (1, 0):  # order must not matter
        SynthesisRun(_teacher(), spec, tmp_path, rank=rank, world_size=2).run(progress=False)
    SynthesisRun(_teacher(), spec, tmp_path).merge()
    assert _snapshot(tmp_path) == _snapshot(reference)


def test_interrupted_run_resumes_to_same_dataset(reference, tmp_path, monkeypatch):
    run = SynthesisRun(_teacher(), _spec(), tmp_path)
    original = SynthesisRun.write_batch

    def crash_on_second(self, b, result, seconds):
        if b == 1:
            # Crash mid-batch: some of its images are written, its record is not.
            from diode.io import save_png

            save_png(self.out_dir / "images" / "000001_000.png", result.images[0].cpu())
            raise KeyboardInterrupt
        return original(self, b, result, seconds)

    monkeypatch.setattr(SynthesisRun, "write_batch", crash_on_second)
    with pytest.raises(KeyboardInterrupt):
        run.run(progress=False)
    monkeypatch.setattr(SynthesisRun, "write_batch", original)
    with pytest.raises(DiodeError, match="missing"):
        run.merge()
    rerun = SynthesisRun(_teacher(), _spec(), tmp_path)
    rerun.run(progress=False)
    rerun.merge()
    assert _snapshot(tmp_path) == _snapshot(reference)
    assert _no_temp_files(tmp_path)


def test_other_settings_refused(reference):
    spec = _spec()
    spec.seed = 8
    with pytest.raises(DiodeError, match=r"different seed \(7 there, 8 here\)"):
        SynthesisRun(_teacher(), spec, reference).check_or_write_settings()


def test_run_from_an_earlier_version_resumes_unless_something_differs(reference, tmp_path):
    """A config.yaml written before an option existed (the key absent) matches a run with that
    option at its default; the option at another value, or a key this version does not know, is
    refused."""
    import shutil

    import yaml

    def copy_with(edit) -> Path:
        out = tmp_path / f"copy{len(list(tmp_path.iterdir()))}"
        shutil.copytree(reference, out)
        settings = yaml.safe_load((out / "config.yaml").read_text())
        edit(settings["synthesis"])
        (out / "config.yaml").write_text(yaml.safe_dump(settings))
        return out

    older = copy_with(lambda s: s["targets"].pop("max_aspect"))  # an option added in a later version
    before = _snapshot(older)
    run = SynthesisRun(_teacher(), _spec(), older)
    run.check_or_write_settings()
    run.run(progress=False)
    run.merge()
    assert _snapshot(older) == before
    assert "max_aspect" in yaml.safe_load((older / "config.yaml").read_text())["synthesis"]["targets"]
    edits = {r"different synthesis \(targets.max_aspect: 3.0 there, null here\)":
             lambda s: s["targets"].update(max_aspect=3.0),
             r"different synthesis \(new_option only there\)": lambda s: s.update(new_option=1)}
    for message, edit in edits.items():
        with pytest.raises(DiodeError, match=message):
            SynthesisRun(_teacher(), _spec(), copy_with(edit)).check_or_write_settings()


def test_cli_synthesize_then_train_and_evaluate(tmp_path, capsys):
    teacher = _teacher()
    save_checkpoint(tmp_path / "t.pt", teacher, command="test")
    recipe = tmp_path / "r.yaml"
    recipe.write_text("batch_size: 2\nstages:\n  - {iterations: 2, lr: 0.1}\n")
    out = tmp_path / "syn"
    argv = ["synthesize", "--teacher", str(tmp_path / "t.pt"), "--out", str(out), "--num-images", "3",
            "--recipe", str(recipe), "--quiet", "--device", "cpu"]
    assert main(argv) == 0
    assert "teacher agreement" in capsys.readouterr().out
    before = _snapshot(out)
    assert main(argv) == 0  # rerun of a finished run: nothing changes
    assert _snapshot(out) == before
    assert main(["evaluate", "--model", str(tmp_path / "t.pt"), "--data", str(out)]) == 0
    assert main(["train", "--data", str(out), "--val", str(out), "--arch", "yolo-lite-n", "--out",
                 str(tmp_path / "run"), "--epochs", "1", "--batch-size", "2", "--image-size", "64", "64"]) == 0


@pytest.mark.parametrize("argv_tail, needle", [
    (["--recipe", "no-such-recipe"], "no-such-recipe"),
    (["--num-images", "0"], "--num-images"),
    (["--iterations", "0"], "--iterations"),
    (["--image-size", "50", "64"], "multiples of 32"),
])
def test_cli_synthesize_bad_flags(tmp_path, capsys, argv_tail, needle):
    save_checkpoint(tmp_path / "t.pt", _teacher(), command="test")
    argv = ["synthesize", "--teacher", str(tmp_path / "t.pt"), "--out", str(tmp_path / "o"), "--num-images", "2",
            "--device", "cpu", *argv_tail]
    assert main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and needle in err[0]


def test_recipe_with_unknown_key_is_named(tmp_path, capsys):
    save_checkpoint(tmp_path / "t.pt", _teacher(), command="test")
    recipe = tmp_path / "bad.yaml"
    recipe.write_text("batch_size: 2\nstagez: []\n")
    assert main(["synthesize", "--teacher", str(tmp_path / "t.pt"), "--out", str(tmp_path / "o"),
                 "--num-images", "2", "--recipe", str(recipe)]) == 2
    assert "stagez" in capsys.readouterr().err


def test_non_finite_batch_retried_then_skipped(tmp_path, monkeypatch):
    from diode.synthesis.synthesizer import Synthesizer

    original = Synthesizer.synthesize
    calls = []

    def poisoned(self, targets, image_size, gen, init=None, callback=None, lr_scale=1.0):
        result = original(self, targets, image_size, gen, init=init, callback=callback, lr_scale=lr_scale)
        calls.append(lr_scale)
        if len(calls) <= 3:  # the first batch never recovers
            result.images = result.images * float("nan")
        return result

    monkeypatch.setattr(Synthesizer, "synthesize", poisoned)
    run = SynthesisRun(_teacher(), _spec(4), tmp_path)
    run.run(progress=False)
    summary = run.merge()
    assert calls[:3] == [1.0, 0.5, 0.25]  # two retries at halved learning rates
    assert summary["skipped_batches"] == [0] and summary["num_images"] == 2
    assert not list((tmp_path / "images").glob("000000_*.png"))  # no NaN image written
    manifest = [json.loads(line) for line in (tmp_path / "manifest.jsonl").read_text().splitlines()]
    assert "skipped" in manifest[0] and "skipped" not in manifest[1]


def test_growing_a_run_whose_last_batch_was_partial_is_refused(tmp_path):
    run = SynthesisRun(_teacher(), _spec(3), tmp_path)  # batches of 2: the second holds 1 image
    run.check_or_write_settings()
    run.run(progress=False)
    run.merge()
    with pytest.raises(DiodeError, match="last batch is partial"):
        SynthesisRun(_teacher(), _spec(4), tmp_path).check_or_write_settings()
    SynthesisRun(_teacher(), _spec(3), tmp_path).check_or_write_settings()  # the same run resumes


@pytest.mark.parametrize("start", ["contiguous", "channels_last"])
def test_pipeline_synthesis_runs_the_teacher_in_channels_last_on_the_cpu(tmp_path, monkeypatch, start: str) -> None:
    """`pipeline.synthesize_dataset` (demo, experiment) runs a CPU teacher in channels_last, the
    CPU default, and gives it back in the memory format it came in."""
    from diode import pipeline

    teacher = _teacher()
    cl = torch.channels_last
    if start == "channels_last":
        teacher = teacher.to(memory_format=cl)
    seen = []
    original = SynthesisRun.run

    def run(self, *args, **kwargs):
        seen.append(next(p for p in self.teacher.parameters() if p.dim() == 4).is_contiguous(memory_format=cl))
        return original(self, *args, **kwargs)

    monkeypatch.setattr(SynthesisRun, "run", run)
    pipeline.synthesize_dataset(teacher, "tiny", _config(), tmp_path / "syn", 2, seed=0, progress=False)
    assert seen == [True]
    conv = next(p for p in teacher.parameters() if p.dim() == 4)
    assert conv.is_contiguous(memory_format=cl) == (start == "channels_last")
    assert conv.is_contiguous() == (start == "contiguous")
