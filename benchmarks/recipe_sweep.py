"""Synthesis recipe sweep: teacher and verifier agreement of small synthesised sets per variant.

Each variant is a recipe (default: the pinned `sweep_base.yaml` next to this script, so a variant
does not change meaning when `fast` does) plus overrides (`stage` overrides apply to every stage); all run in
one process on the same teacher, targets seed and image count. Prints one JSON line per variant
(and appends it to --out). The `fast` recipe's values were chosen from such sweeps (results/).

    python benchmarks/recipe_sweep.py --variants benchmarks/sweep_variants.yaml --num-images 64
"""

from __future__ import annotations

import argparse
import copy
import json
import tempfile
import time
from pathlib import Path

import torch
import yaml

from diode.allocator import keep_freed_memory
from diode.detectors.checkpoint import load_detector
from diode.pipeline import synthesize_dataset
from diode.synthesis.recipes import build_config, load_recipe


SWEEP_BASE = Path(__file__).with_name("sweep_base.yaml")


def _merge(base: dict, over: dict) -> None:
    for key, value in over.items():
        if isinstance(value, dict) and isinstance(base.get(key), dict):
            _merge(base[key], value)
        else:
            base[key] = copy.deepcopy(value)


def variant_config(spec: dict, batch_size: int | None, iteration_scale: float = 1.0):
    spec = copy.deepcopy(spec)
    raw = load_recipe(spec.pop("recipe", str(SWEEP_BASE)))
    iterations = spec.pop("iterations", None) or sum(s.get("iterations", 0) for s in raw["stages"])
    iterations = max(len(raw["stages"]), round(iterations * iteration_scale))
    stage = spec.pop("stage", None)
    _merge(raw, spec)
    for st in raw["stages"] if stage else []:
        _merge(st, stage)
    return build_config(raw, batch_size=batch_size, iterations=iterations, source="sweep")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--variants", required=True, help="YAML mapping name -> {recipe, iterations, overrides}")
    parser.add_argument("--only", help="comma-separated variant names")
    parser.add_argument("--num-images", type=int, default=64)
    parser.add_argument("--batch-size", type=int)
    parser.add_argument("--seed", type=int, default=4000)
    parser.add_argument("--iteration-scale", type=float, default=1.0, help="multiply every variant's iterations (dry runs)")
    parser.add_argument("--out", help="append JSON lines here")
    parser.add_argument("--keep", help="keep the synthesised sets under this folder")
    parser.add_argument("--teacher", default="shapes-teacher", help="bundled name or checkpoint")
    parser.add_argument("--verifier", default="shapes-verifier", help="bundled name or checkpoint")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = parser.parse_args()
    keep_freed_memory()  # as the CLI does (diode.allocator)
    variants = yaml.safe_load(Path(args.variants).read_text())
    names = args.only.split(",") if args.only else list(variants)
    teacher = load_detector(args.teacher, device=args.device)[0]
    verifier = load_detector(args.verifier, device=args.device)[0]
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(args.keep or tmp)
        for name in names:
            cfg = variant_config(variants[name], args.batch_size, args.iteration_scale)
            started = time.time()
            summary = synthesize_dataset(teacher, args.teacher, cfg, root / name, args.num_images, args.seed,
                                         progress=False, verifier=verifier)
            row = {"variant": name, "teacher": args.teacher, "spec": variants[name], "images": args.num_images,
                   "iterations": sum(s.iterations for s in cfg.stages),
                   "teacher_agreement": round(summary["teacher_agreement"], 4),
                   "verifier_agreement": round(summary.get("verifier_agreement") or -1, 4),
                   "fp_added": summary.get("fp_added"), "seconds": round(time.time() - started, 1),
                   "device": str(args.device),
                   "card": torch.cuda.get_device_name(0) if str(args.device).startswith("cuda") else None}
            print(json.dumps(row), flush=True)
            if args.out:
                with open(args.out, "a") as f:
                    f.write(json.dumps(row) + "\n")


if __name__ == "__main__":
    main()
