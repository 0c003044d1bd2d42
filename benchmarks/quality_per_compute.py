"""Student quality per synthesis compute: `paper` vs `fast` at increasing iteration budgets.

Every cell (recipe, total iterations per image, seed) synthesises the same number of images with
the recipe rescaled to that many iterations (stages keep their proportions), distils a fresh
student with the same KD budget and scores it on real validation images (METHOD.md sections 4
and 7); the seed drives both the synthesis and the KD run. Finished cells are cached as JSON in
`OUT/cells/`, so rerunning the same command skips them. Prints one JSON object (rows with mean
and std over seeds, and a verdict: the cheapest `fast` row within 2 % of the costliest `paper`
row's mAP@.5) and writes `OUT/table.json` and `OUT/table.md`.

    python benchmarks/quality_per_compute.py --num-images 128 --epochs 60 --seeds 0 1 2 --out runs/qpc
"""

from __future__ import annotations

import argparse
import hashlib
import json
import platform
import shlex
import statistics
import sys
import time
from pathlib import Path

import torch

from diode.allocator import keep_freed_memory
from diode.experiment import Experiment, Profile
from diode.io import atomic_write_json, atomic_write_text
from diode.synthesis.recipes import load_recipe

TOLERANCE = 0.98  # `fast` matches `paper` when its mean mAP@.5 is at least this fraction of it
SYNTH_SEED = 4000  # synthesis seed = SYNTH_SEED + cell seed (as `diode experiment` uses 4000)


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--recipes", nargs="+", choices=["paper", "fast"], default=["paper", "fast"])
    parser.add_argument("--paper-iterations", nargs="+", type=int, default=[1000, 2000, 4000],
                        help="total synthesis iterations per image of the `paper` rows")
    parser.add_argument("--fast-iterations", nargs="+", type=int, default=[250, 500, 1000],
                        help="total synthesis iterations per image of the `fast` rows")
    parser.add_argument("--num-images", type=int, default=128, help="synthetic transfer images per cell")
    parser.add_argument("--batch-size", type=int, default=32, help="synthesis batch size (both recipes)")
    parser.add_argument("--epochs", type=int, default=60, help="KD epochs (the same for every cell)")
    parser.add_argument("--kd-batch-size", type=int, default=32)
    parser.add_argument("--val-images", type=int, default=300, help="fresh real validation images")
    parser.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    parser.add_argument("--student", default="yolo-lite-s-p2")
    parser.add_argument("--teacher", default="shapes-teacher")
    parser.add_argument("--out", required=True, help="work folder (cells cached here; rerun to resume)")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--report-only", action="store_true",
                        help="build the table from the cached cells only (missing cells are left out, not run): "
                             "gathers cells computed by several processes, e.g. one per seed")
    return parser


def _machine(device: torch.device) -> dict:
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
    else:
        name = platform.processor() or platform.machine()
        cpuinfo = Path("/proc/cpuinfo")
        if cpuinfo.exists():
            name = next((line.split(":", 1)[1].strip() for line in cpuinfo.read_text().splitlines()
                         if line.startswith("model name")), name)
    return {"torch": torch.__version__, "device": str(device), "device_name": name,
            "threads": torch.get_num_threads()}


def _check_settings(out: Path, settings: dict) -> None:
    """Cells are comparable only under the settings they were made with: refuse a mismatch."""
    path = out / "settings.json"
    if path.exists():
        old = json.loads(path.read_text())
        if old != settings:
            diff = {k: (old.get(k), v) for k, v in settings.items() if old.get(k) != v}
            raise SystemExit(f"{out}: cached cells were made with other settings {diff} (old, new); "
                             f"use another --out")
    else:
        atomic_write_json(path, settings)


def recipe_fingerprint(recipe: str) -> str:
    """SHA-256 of the recipe's content (as loaded): a cached cell counts only for the recipe it ran."""
    return hashlib.sha256(json.dumps(load_recipe(recipe), sort_keys=True).encode()).hexdigest()


def _cached_cell(out: Path, recipe: str, iterations: int, seed: int) -> dict | None:
    """A finished cell from `out/cells/`, or None; refuses one made with another version of the recipe."""
    cache = out / "cells" / f"{recipe}@{iterations}__seed{seed}.json"
    if not cache.exists():
        return None
    cell = json.loads(cache.read_text())
    if cell.get("recipe_sha256") != recipe_fingerprint(recipe):
        raise SystemExit(f"{cache}: made with another version of the recipe {recipe!r} (it changed since); "
                         f"use another --out")
    return cell


def _cell(exp: Experiment, recipe: str, iterations: int, seed: int, log) -> dict:
    """One (recipe, iterations, seed) cell: synthesise, distil, score; read from its cache if done."""
    key = f"{recipe}@{iterations}__seed{seed}"
    cached = _cached_cell(exp.out, recipe, iterations, seed)
    if cached is not None:
        return cached
    fingerprint = recipe_fingerprint(recipe)
    cache = exp.out / "cells" / f"{key}.json"
    n = exp.profile.transfer_images
    log(f"cell {key}: synthesising {n} images")
    images, seconds, agreement = exp.synthesize_transfer(key, recipe, {}, iterations, seed=SYNTH_SEED + seed,
                                                         count=n)
    log(f"cell {key}: distilling the student ({exp.profile.kd_epochs} epochs)")
    started = time.time()
    metrics = exp.distil_student(key, images, seed)
    cell = {"recipe": recipe, "recipe_sha256": fingerprint, "iterations": iterations, "seed": seed,
            "map_50": metrics["map_50"],
            "map": metrics["map"], "synthesis_seconds": seconds, "teacher_agreement": agreement,
            "kd_seconds": round(time.time() - started, 2)}
    atomic_write_json(cache, cell)
    log(f"cell {key}: student mAP@.5 {cell['map_50']:.3f}, synthesis {seconds:.1f} s")
    return cell


def _row(cells: list[dict], num_images: int, batch_size: int) -> dict:
    def mean_std(key: str) -> tuple[float, float]:
        values = [c[key] for c in cells]
        return statistics.mean(values), statistics.pstdev(values)

    recipe, iterations = cells[0]["recipe"], cells[0]["iterations"]
    m50, m50_std = mean_std("map_50")
    m, m_std = mean_std("map")
    secs, secs_std = mean_std("synthesis_seconds")
    return {"recipe": recipe, "iterations": iterations, "image_iterations": num_images * iterations,
            "batch_iterations": -(-num_images // batch_size) * iterations,
            "map_50_mean": m50, "map_50_std": m50_std, "map_mean": m, "map_std": m_std,
            "synthesis_seconds_mean": secs, "synthesis_seconds_std": secs_std,
            "seeds": [c["seed"] for c in cells], "per_seed": cells}


def _verdict(rows: list[dict]) -> dict:
    paper = [r for r in rows if r["recipe"] == "paper"]
    reference = max(paper, key=lambda r: r["iterations"]) if paper else None
    match = None
    if reference is not None:
        match = next((r for r in sorted(rows, key=lambda r: r["iterations"])
                      if r["recipe"] == "fast" and r["map_50_mean"] >= TOLERANCE * reference["map_50_mean"]), None)
    fraction = match["iterations"] / reference["iterations"] if match else None
    return {
        "tolerance": TOLERANCE,
        "reference": {k: reference[k] for k in ("recipe", "iterations", "map_50_mean", "synthesis_seconds_mean")}
        if reference else None,
        "fast_match": {k: match[k] for k in ("recipe", "iterations", "map_50_mean", "synthesis_seconds_mean")}
        if match else None,
        "iteration_fraction": fraction,
        "seconds_fraction": match["synthesis_seconds_mean"] / reference["synthesis_seconds_mean"]
        if match and reference["synthesis_seconds_mean"] > 0 else None,
        "meets_target": fraction is not None and fraction <= 0.25,  # the goal: <= 25 % of the iterations
    }


def _markdown(table: dict) -> str:
    s, m, v = table["settings"], table["machine"], table["verdict"]
    lines = ["# Student quality per synthesis compute", "", "```", table["command"], "```", "",
             f"Machine: torch {m['torch']}, {m['device']} ({m['device_name']}), {m['threads']} threads. "
             f"Teacher `{s['teacher']}`, student `{s['student']}` from scratch, {s['num_images']} synthetic "
             f"images per cell (synthesis batch {s['batch_size']}), {s['epochs']} KD epochs (batch "
             f"{s['kd_batch_size']}, {table['kd_methods']}), {s['val_images']} fresh real val images, "
             f"seeds {table['seeds']}.", "",
             "| recipe | iterations / image | image-iterations | seeds | synthesis s | mAP@.5 | mAP@[.5:.95] |",
             "|---|---|---|---|---|---|---|"]
    for r in table["rows"]:
        lines.append(f"| {r['recipe']} | {r['iterations']} | {r['image_iterations']} | {len(r['seeds'])} | "
                     f"{r['synthesis_seconds_mean']:.1f} +- {r['synthesis_seconds_std']:.1f} | "
                     f"{r['map_50_mean']:.3f} +- {r['map_50_std']:.3f} | {r['map_mean']:.3f} +- {r['map_std']:.3f} |")
    lines.append("")
    if v["reference"] is None:
        lines.append("Verdict: no `paper` row, no reference.")
    elif v["fast_match"] is None:
        lines.append(f"Verdict: no `fast` row reaches {v['tolerance']:.0%} of `paper`@{v['reference']['iterations']} "
                     f"(mAP@.5 {v['reference']['map_50_mean']:.3f}).")
    else:
        secs = f", {v['seconds_fraction']:.0%} of its synthesis seconds" if v["seconds_fraction"] is not None else ""
        ratio = v["fast_match"]["map_50_mean"] / v["reference"]["map_50_mean"] if v["reference"]["map_50_mean"] else 0
        lines.append(f"Verdict: `fast`@{v['fast_match']['iterations']} (mAP@.5 {v['fast_match']['map_50_mean']:.3f}, "
                     f"{ratio:.0%} of it) reaches the `paper`@{v['reference']['iterations']} student (mAP@.5 "
                     f"{v['reference']['map_50_mean']:.3f}; at least {v['tolerance']:.0%} of it counts) at "
                     f"{v['iteration_fraction']:.0%} of its iterations{secs}; "
                     f"target <= 25 %: {'met' if v['meets_target'] else 'not met'}.")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> dict:
    args = _parser().parse_args(argv)
    argv = sys.argv[1:] if argv is None else argv
    budgets = {"paper": args.paper_iterations, "fast": args.fast_iterations}
    for name in ("num_images", "batch_size", "epochs", "kd_batch_size", "val_images"):
        if getattr(args, name) < 1:
            raise SystemExit(f"--{name.replace('_', '-')} must be >= 1, got {getattr(args, name)}")
    if any(it < 1 for r in args.recipes for it in budgets[r]):
        raise SystemExit("--paper-iterations / --fast-iterations must all be >= 1")
    keep_freed_memory()  # as the CLI does (diode.allocator)
    out, device = Path(args.out), torch.device(args.device)
    settings = {"teacher": args.teacher, "student": args.student, "num_images": args.num_images,
                "batch_size": args.batch_size, "epochs": args.epochs, "kd_batch_size": args.kd_batch_size,
                "val_images": args.val_images}
    _check_settings(out, settings)
    command = shlex.join(["python", "benchmarks/quality_per_compute.py", *argv])
    # synth_iterations / fast_iterations are unused here (every cell names its iterations): fixed,
    # so that adding a budget to the command keeps the folder's recorded settings.
    profile = Profile(transfer_images=args.num_images, synth_iterations=0, fast_iterations=0,
                      synth_batch=args.batch_size, kd_epochs=args.epochs,
                      kd_batch=args.kd_batch_size, val_images=args.val_images, seeds=list(args.seeds))

    def log(line: str) -> None:
        print(line, file=sys.stderr, flush=True)

    exp = Experiment(out, "quality-per-compute", teacher_name=args.teacher, student_arch=args.student,
                     device=device, progress=sys.stderr.isatty(), log=log, profile=profile, command=command)
    rows = []
    for recipe in args.recipes:
        for it in sorted(set(budgets[recipe])):
            if args.report_only:
                cells = [c for seed in args.seeds if (c := _cached_cell(out, recipe, it, seed)) is not None]
            else:
                cells = [_cell(exp, recipe, it, seed, log) for seed in args.seeds]
            if cells:
                rows.append(_row(cells, args.num_images, args.batch_size))
    seeds_found = sorted({seed for r in rows for seed in r["seeds"]})
    table = {"command": command, "machine": _machine(device), "settings": settings,
             "seeds": seeds_found if args.report_only else list(args.seeds),
             "kd_methods": ", ".join(exp.kd.methods), "rows": rows, "verdict": _verdict(rows)}
    atomic_write_json(out / "table.json", table)
    atomic_write_text(out / "table.md", _markdown(table))
    print(json.dumps(table))
    return table


if __name__ == "__main__":
    main()
