"""The paper's comparison (METHOD.md section 4) on the embedded domain.

One teacher (the bundled `shapes-teacher`), one student architecture, and for every row the same
number of transfer images and the same distillation budget; the student is scored on freshly
rendered real validation images it never saw. Rows: real images with labels unused (the
in-distribution upper bound), the student trained with real labels (reference), Gaussian noise,
out-of-distribution photo/texture crops without objects, BN-only inversion (no task loss), DIODE
one-box, + false-positive aggregation, + tiling, our `fast` recipe, and `fast-multibox` (the same
with 1-4 boxes per image). Every row is cached in
`rows/`, so an interrupted experiment continues where it stopped.
"""

from __future__ import annotations

import io
import json
import os
import shutil
import statistics
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import torch  # noqa: E402

from diode.config import TrainConfig  # noqa: E402
from diode.data import open_dataset  # noqa: E402
from diode.data.shapes import generate_backgrounds, generate_shapes  # noqa: E402
from diode.detectors.checkpoint import load_detector  # noqa: E402
from diode.detectors.registry import build_detector  # noqa: E402
from diode.distill.losses import DistillConfig, resolve_methods  # noqa: E402
from diode.distill.sources import load_transfer_set, noise_images  # noqa: E402
from diode.errors import DiodeError  # noqa: E402
from diode.io import atomic_write_bytes, atomic_write_json, atomic_write_text  # noqa: E402
from diode.pipeline import synthesize_dataset, train_student  # noqa: E402
from diode.synthesis.recipes import build_config, load_recipe  # noqa: E402


@dataclass
class Profile:
    transfer_images: int  # images per row (every row the same)
    synth_iterations: int  # synthesis iterations per image (paper-style rows)
    fast_iterations: int  # iterations of the `fast` row
    synth_batch: int  # synthesis batch size
    kd_epochs: int  # distillation epochs (same for every row)
    kd_batch: int
    val_images: int  # real validation images
    seeds: list[int] = field(default_factory=lambda: [0])  # KD seeds per row (mean +- std)
    iteration_sweep: list[int] = field(default_factory=list)  # fast-recipe budgets for the plot
    image_sweep: list[int] = field(default_factory=list)  # transfer-set sizes for the plot


PROFILES = {
    # Sized for the 2-core CPU (README: quick <= 20 min, full about two hours): every
    # row gets the same images and the same KD steps (transfer_images / kd_batch * kd_epochs).
    # `full` distils for 120 epochs: at 60 the students are far from converged and the gap between
    # synthetic and real transfer images is mostly a gap in how fast they teach (results/experiment-full).
    "quick": Profile(transfer_images=64, synth_iterations=100, fast_iterations=60, synth_batch=32, kd_epochs=40,
                     kd_batch=32, val_images=200, seeds=[0], iteration_sweep=[20, 40], image_sweep=[16, 32]),
    "full": Profile(transfer_images=192, synth_iterations=300, fast_iterations=150, synth_batch=32, kd_epochs=120,
                    kd_batch=32, val_images=300, seeds=[0, 1, 2], iteration_sweep=[50, 100],
                    image_sweep=[64, 128]),
}

# Row name -> how its synthetic images are made (recipe name + overrides), None for non-synthetic rows.
SYNTH_ROWS = {
    "bn-only": ("paper", {"task": 0.0, "fp": False, "tiling": False}),
    "diode-onebox": ("paper", {"fp": False, "tiling": False}),
    "diode-onebox+fp": ("paper", {"fp": True, "tiling": False}),
    "diode-onebox+fp+tiling": ("paper", {"fp": True, "tiling": True}),
    "fast": ("fast", {}),
    "fast-multibox": ("fast-multibox", {}),
}
ROWS = ["real-kd", "real-labels", "noise", "ood", *SYNTH_ROWS]


def _synth_config(recipe: str, overrides: dict, profile: Profile, iterations: int):
    raw = load_recipe(recipe)
    if "fp" in overrides:
        raw.setdefault("fp", {})["enabled"] = overrides["fp"]
    if overrides.get("tiling"):
        raw["tiling"] = {"enabled": True, "grid": [2, 2],
                         "refine": {"iterations": max(1, iterations // 4), "lr": 0.01, "lr_min": 0.001,
                                    "betas": [0.9, 0.999], "weights": raw["stages"][-1].get("weights", {})}}
    if overrides.get("task") is not None:
        for stage in raw["stages"]:
            stage.setdefault("weights", {})["task"] = overrides["task"]
    return build_config(raw, batch_size=profile.synth_batch, iterations=iterations, source=f"recipe {recipe}")


@dataclass
class RowResult:
    row: str
    seed: int
    map_50: float
    map: float
    images: int
    synthesis_seconds: float
    teacher_agreement: float | None


class Experiment:
    def __init__(self, out_dir: Path, profile_name: str, teacher_name: str = "shapes-teacher",
                 student_arch: str = "yolo-lite-s-p2", device: torch.device | str = "cpu", progress: bool = True,
                 log=print, profile: Profile | None = None, command: str | None = None) -> None:
        """`profile` (with any `profile_name` as its label) replaces the named profile; `command` is
        recorded in every run folder (default: the `diode experiment` line)."""
        if profile is None and profile_name not in PROFILES:
            raise DiodeError(f"--profile {profile_name!r}: valid profiles are {', '.join(PROFILES)}")
        self.out, self.profile_name = Path(out_dir), profile_name
        self.profile = profile or PROFILES[profile_name]
        self.command = command or f"diode experiment --profile {profile_name}"
        self.teacher_name, self.student_arch, self.device = teacher_name, student_arch, device
        self.progress, self.log = progress, log
        self.teacher, _ = load_detector(teacher_name, device=device)
        self.size = self.teacher.image_size
        probe = build_detector(student_arch, class_names=self.teacher.class_names, image_size=self.size).to(device)
        self.kd = DistillConfig(methods=resolve_methods("auto", self.teacher, probe, self.size))
        self._real_cache = None
        self._check_settings()

    def settings(self) -> dict:
        """What a cached row or student depends on (the seeds do not: rows are cached per seed)."""
        p = self.profile
        return {"teacher": self.teacher_name, "student": self.student_arch, "kd_methods": self.kd.methods,
                "transfer_images": p.transfer_images, "synth_iterations": p.synth_iterations,
                "fast_iterations": p.fast_iterations, "synth_batch": p.synth_batch, "kd_epochs": p.kd_epochs,
                "kd_batch": p.kd_batch, "val_images": p.val_images}

    def _check_settings(self) -> None:
        """Rows, students and transfer sets in `out` are reused only under the settings they were
        made with (`experiment.json`): other settings, or cached rows from before the file existed,
        are refused rather than mixed into the table."""
        path, settings = self.out / "experiment.json", self.settings()
        if path.exists():
            old = json.loads(path.read_text())
            if old != json.loads(json.dumps(settings)):
                diff = ", ".join(f"{k} {old.get(k)!r} -> {v!r}" for k, v in settings.items() if old.get(k) != v)
                raise DiodeError(f"{self.out}: holds an experiment with other settings ({diff}); use another --out")
        elif any((self.out / "rows").glob("*.json")):
            raise DiodeError(f"{self.out}: holds cached rows whose settings were not recorded; use another --out")
        else:
            atomic_write_json(path, settings)

    # -- data ------------------------------------------------------------------------------
    def _real(self):
        if self._real_cache is None:
            self._real_cache = self._load_real()
        return self._real_cache

    def _load_real(self):
        p = self.profile
        root = self.out / "data" / "real"
        if not (root / "data.yaml").exists():
            # Generated aside and renamed into place: processes sharing this folder (one per seed,
            # say) never read a half-written set; a process that loses the race uses the winner's.
            scratch = root.with_name(f"real.tmp-{os.getpid()}")
            generate_shapes(scratch, train=p.transfer_images, val=p.val_images, image_size=self.size, seed=1000,
                            progress=self.progress)
            try:
                scratch.rename(root)
            except OSError:
                shutil.rmtree(scratch, ignore_errors=True)
        train, val = open_dataset(root / "train"), open_dataset(root / "val")
        return train.load_all(self.size), val.load_all(self.size)

    def _transfer(self, row: str, count: int) -> tuple[torch.Tensor, float, float | None]:
        """(uint8 images, synthesis seconds, teacher agreement) of a row's transfer set."""
        p = self.profile
        if row == "noise":
            return noise_images("gaussian", count, self.size, seed=2000), 0.0, None
        if row == "ood":
            folder = self.out / "data" / "ood"
            if len(list(folder.glob("*.png"))) < p.transfer_images:
                generate_backgrounds(folder, p.transfer_images, self.size, seed=3000, progress=self.progress)
            return load_transfer_set(str(folder), self.size, num_images=count, seed=0, progress=False), 0.0, None
        recipe, overrides = SYNTH_ROWS[row.split("@")[0]]
        iterations = int(row.split("@")[1]) if "@" in row else (
            p.fast_iterations if recipe.startswith("fast") else p.synth_iterations)
        return self.synthesize_transfer(row, recipe, overrides, iterations, seed=4000, count=count)

    def synthesize_transfer(self, name: str, recipe: str, overrides: dict, iterations: int, seed: int,
                            count: int) -> tuple[torch.Tensor, float, float | None]:
        """Synthesise `profile.transfer_images` images with `recipe` rescaled to `iterations` in total into
        `synthetic/<name>` (resumable); (the first `count` as uint8, synthesis seconds, teacher agreement)."""
        cfg = _synth_config(recipe, overrides, self.profile, iterations)
        summary = synthesize_dataset(self.teacher, self.teacher_name, cfg, self.out / "synthetic" / name,
                                     self.profile.transfer_images, seed=seed, command=self.command,
                                     progress=self.progress)
        images = load_transfer_set(str(self.out / "synthetic" / name), self.size, num_images=count, seed=0,
                                   progress=False)
        return images, summary["synthesis_seconds"], summary["teacher_agreement"]

    # -- rows ------------------------------------------------------------------------------
    def run_row(self, row: str, seed: int, count: int | None = None) -> RowResult:
        count = count or self.profile.transfer_images
        key = f"{row}__n{count}__seed{seed}"
        cache = self.out / "rows" / f"{key}.json"
        if cache.exists():
            return RowResult(**json.loads(cache.read_text()))
        (train_images, train_targets), _ = self._real()
        started = time.time()
        if row in ("real-kd", "real-labels"):
            images, seconds, agreement = train_images[:count], 0.0, None
        else:
            images, seconds, agreement = self._transfer(row, count)
        self.log(f"row {row} (n={count}, seed {seed}): training the student on {len(images)} images")
        targets = train_targets[:count] if row == "real-labels" else None
        metrics = self.distil_student(key, images, seed, targets)
        result = RowResult(row, seed, metrics["map_50"], metrics["map"], len(images), seconds, agreement)
        atomic_write_json(cache, asdict(result))
        self.log(f"row {row} (n={count}, seed {seed}): student mAP@.5 {result.map_50:.3f} "
                 f"({time.time() - started:.0f} s)")
        return result

    def distil_student(self, key: str, images: torch.Tensor, seed: int, targets: list | None = None) -> dict:
        """A fresh student trained on `images` with the profile's KD budget into `students/<key>` (KD
        from the teacher unless `targets`); its real-val metrics."""
        p = self.profile
        _, (val_images, val_targets) = self._real()
        cfg = TrainConfig(epochs=p.kd_epochs, batch_size=p.kd_batch, seed=seed, eval_every=p.kd_epochs,
                          checkpoint_every=max(1, p.kd_epochs // 4))
        return train_student(self.teacher, self.student_arch, images, targets, val_images, val_targets, cfg,
                             self.out / "students" / key, kd=self.kd, progress=self.progress, command=self.command)

    def run(self) -> list[dict]:
        p = self.profile
        rows = []
        for row in ROWS:
            results = [self.run_row(row, s) for s in p.seeds]
            rows.append(self._aggregate(row, results))
        reference = next(r for r in rows if r["row"] == "real-kd")["map_50_mean"]
        for r in rows:
            r["pct_of_real_kd"] = round(100 * r["map_50_mean"] / reference, 1) if reference > 0 else None
        teacher_map = self._teacher_metrics()
        sweeps = self._sweeps()
        table = {"profile": self.profile_name, "profile_settings": asdict(p), "teacher": self.teacher_name,
                 "teacher_val_map_50": teacher_map["map_50"], "teacher_val_map": teacher_map["map"],
                 "student": self.student_arch, "kd_methods": ", ".join(self.kd.methods), "rows": rows,
                 "sweeps": sweeps}
        atomic_write_json(self.out / "table.json", table)
        atomic_write_text(self.out / "table.md", self._markdown(table))
        self._plots(sweeps)
        return rows

    def _aggregate(self, row: str, results: list[RowResult]) -> dict:
        m50 = [r.map_50 for r in results]
        m = [r.map for r in results]
        return {"row": row, "map_50_mean": statistics.mean(m50), "map_50_std": statistics.pstdev(m50),
                "map_mean": statistics.mean(m), "map_std": statistics.pstdev(m), "seeds": len(results),
                "images": results[0].images, "synthesis_seconds": results[0].synthesis_seconds,
                "teacher_agreement": results[0].teacher_agreement}

    def _teacher_metrics(self) -> dict:
        from diode.evaluation import evaluate_detector

        _, (val_images, val_targets) = self._real()
        return evaluate_detector(self.teacher, val_images, val_targets, self.teacher.class_names)

    def _sweeps(self) -> dict:
        p = self.profile
        seed = p.seeds[0]
        by_iterations = [{"iterations": it, "map_50": self.run_row(f"fast@{it}", seed).map_50}
                         for it in p.iteration_sweep]
        by_iterations.append({"iterations": p.fast_iterations, "map_50": self.run_row("fast", seed).map_50})
        by_images = [{"images": n, "map_50": self.run_row("fast", seed, count=n).map_50} for n in p.image_sweep]
        by_images.append({"images": p.transfer_images, "map_50": self.run_row("fast", seed).map_50})
        return {"fast_by_iterations": by_iterations, "fast_by_images": by_images}

    def _markdown(self, table: dict) -> str:
        p = self.profile
        lines = [f"# DIODE comparison, profile `{self.profile_name}`", "",
                 f"Teacher `{self.teacher_name}` (real-val mAP@.5 {table['teacher_val_map_50']:.3f}), student "
                 f"`{self.student_arch}` from scratch, {p.transfer_images} transfer images per row, "
                 f"{p.kd_epochs} KD epochs ({table['kd_methods']}), {p.val_images} fresh real val images, "
                 f"seeds {p.seeds}.", "",
                 "| row | mAP@.5 | mAP@[.5:.95] | % of real-KD | images | synthesis s | teacher agreement |",
                 "|---|---|---|---|---|---|---|"]
        for r in table["rows"]:
            agree = f"{r['teacher_agreement']:.3f}" if r["teacher_agreement"] is not None else "-"
            lines.append(f"| {r['row']} | {r['map_50_mean']:.3f} +- {r['map_50_std']:.3f} | {r['map_mean']:.3f} +- "
                         f"{r['map_std']:.3f} | {r['pct_of_real_kd']} | {r['images']} | {r['synthesis_seconds']:.0f} | "
                         f"{agree} |")
        return "\n".join(lines) + "\n"

    def _plots(self, sweeps: dict) -> None:
        for key, x, title, name in (("fast_by_iterations", "iterations", "student mAP@.5 vs synthesis iterations",
                                     "map_vs_iterations.png"),
                                    ("fast_by_images", "images", "student mAP@.5 vs synthetic images",
                                     "map_vs_images.png")):
            points = sorted(sweeps[key], key=lambda d: d[x])
            fig, ax = plt.subplots(figsize=(5, 3.2))
            ax.plot([d[x] for d in points], [d["map_50"] for d in points], "o-")
            ax.set_xlabel(x)
            ax.set_ylabel("student mAP@.5 (real val)")
            ax.set_title(title)
            buf = io.BytesIO()
            fig.savefig(buf, format="png", dpi=90, bbox_inches="tight")
            plt.close(fig)
            atomic_write_bytes(self.out / name, buf.getvalue())
