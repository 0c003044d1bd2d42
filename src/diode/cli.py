"""Command-line interface: parse, build through factories, call the library, set the exit code.

Exit codes: 0 success, 2 bad input (one line on stderr naming the problem, no traceback unless
``--debug``; this includes an output path that is not writable or on a read-only file system),
1 runtime failure (e.g. a full disk, also one line naming the file; or an unexpected error),
130 interrupted.
"""

from __future__ import annotations

import argparse
import collections
import errno
import json
import os
import shlex
import sys
import traceback
from pathlib import Path

import torch

from diode import __version__
from diode.errors import DiodeError


# A path the user gave that cannot be used (as the output-folder lock reports them): bad input,
# exit 2. Other OSErrors (full disk, I/O error) are runtime failures, exit 1.
_UNUSABLE_PATH = {errno.EACCES, errno.EPERM, errno.EROFS, errno.ENOENT, errno.ENOTDIR, errno.EISDIR,
                  errno.EEXIST, errno.ENAMETOOLONG}


def _image_size(values: list[int] | None) -> tuple[int, int] | None:
    if values is None:
        return None
    h, w = values
    if h < 1 or w < 1:
        raise DiodeError(f"--image-size must be positive, got {h} {w}")
    return h, w


def _device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise DiodeError(f"--device {name}: CUDA is not available on this machine")
    try:
        return torch.device(name)
    except RuntimeError:
        raise DiodeError(f"--device {name!r}: not a device name (auto, cpu, cuda, cuda:N)") from None


def _command_line(argv: list[str]) -> str:
    return "diode " + " ".join(shlex.quote(a) for a in argv)


def _check_multiple(image_size: tuple[int, int], multiple: int = 32) -> None:
    if image_size[0] % multiple or image_size[1] % multiple:
        raise DiodeError(f"--image-size {image_size[0]} {image_size[1]}: both sides must be multiples of {multiple}")


def _default_image_size(dataset) -> tuple[int, int]:
    """The dataset's most common image size, rounded up to multiples of 32."""
    if not dataset.records:
        raise DiodeError(f"{dataset.source}: dataset has no images")
    h, w = collections.Counter((r.height, r.width) for r in dataset.records).most_common(1)[0][0]
    return -(-h // 32) * 32, -(-w // 32) * 32


def _labels_to_model(dataset, class_names: list[str]) -> dict[int, int]:
    """Map the dataset's class indices to the model's by name; unknown names are an error."""
    missing = [n for n in dataset.class_names if n not in class_names]
    if missing:
        raise DiodeError(f"{dataset.source}: classes {missing} are not known to the model "
                         f"(model classes: {', '.join(class_names)})")
    return {i: class_names.index(n) for i, n in enumerate(dataset.class_names)}


def _remap(targets: list[dict], mapping: dict[int, int]) -> list[dict]:
    if all(k == v for k, v in mapping.items()):
        return targets
    lut = torch.tensor([mapping[i] for i in range(len(mapping))], dtype=torch.int64)
    return [{**t, "labels": lut[t["labels"]]} for t in targets]


def cmd_data_shapes(args: argparse.Namespace) -> int:
    from diode.data.shapes import generate_shapes

    size = _image_size(args.image_size)
    out = generate_shapes(args.out, args.train, args.val, size, args.seed, progress=not args.quiet)
    print(f"wrote {args.train} train + {args.val} val images ({size[0]}x{size[1]}) to {out} "
          f"(COCO: {out}/train, {out}/val; YOLO: {out}/data.yaml)")
    return 0


def cmd_detectors(args: argparse.Namespace) -> int:
    from diode.detectors.checkpoint import bundled_models, read_checkpoint
    from diode.detectors.registry import list_detectors

    print("architectures:")
    for name, desc in list_detectors().items():
        print(f"  {name:24s} {desc}")
    print("bundled checkpoints:")
    for name, path in bundled_models().items():
        meta = read_checkpoint(path)
        m = meta.get("metrics", {})
        print(f"  {name:24s} {meta['arch']}, {len(meta['class_names'])} classes, "
              f"{meta['image_size'][0]}x{meta['image_size'][1]}, val mAP@.5 {m.get('map_50', float('nan')):.3f}")
    return 0


def _training_run(args: argparse.Namespace):
    """(output folder, TrainConfig) shared by train and distill; refuses to overwrite a run."""
    from diode.config import AugmentConfig, TrainConfig

    out = Path(args.out)
    if (out / "last.pt").exists() and not args.resume:
        raise DiodeError(f"{out}: already holds a run (last.pt); pass --resume to continue it or choose another --out")
    if not 0 <= args.mosaic <= 1:
        raise DiodeError(f"--mosaic must be in [0, 1], got {args.mosaic}")
    try:
        return out, TrainConfig(epochs=args.epochs, batch_size=args.batch_size, seed=args.seed, lr=args.lr,
                                eval_every=args.eval_every, augment=AugmentConfig(mosaic_p=args.mosaic))
    except ValueError as exc:
        raise DiodeError(str(exc)) from None


def cmd_train(args: argparse.Namespace) -> int:
    from diode.data import open_dataset
    from diode.detectors.registry import build_detector
    from diode.io import atomic_write_yaml
    from diode.training.trainer import train_detector

    out, cfg = _training_run(args)
    train_set = open_dataset(args.data, split="train")
    val_set = open_dataset(args.val, split="val")
    image_size = _image_size(args.image_size) or _default_image_size(train_set)
    _check_multiple(image_size)
    rank, _, device = _distributed(args.device)
    torch.manual_seed(cfg.seed)
    model = build_detector(args.arch, class_names=train_set.class_names, image_size=image_size).to(device)
    from diode.detectors.backbones import imagenet_backbone, load_backbone_weights

    if args.backbone_weights:
        if args.init:
            raise DiodeError("--backbone-weights and --init both set the starting weights; pass one of them")
        load_backbone_weights(model, args.backbone_weights)
    elif imagenet_backbone(model) is not None and not (args.init or args.resume):
        # Never picked up implicitly (e.g. from an installed weights package): the user names the file.
        print(f"note: {args.arch} starts from a random backbone whose BN statistics stay frozen; pass "
              f"--backbone-weights PATH for ImageNet weights (docs/mobilenet-teacher.md)", file=sys.stderr)
    if args.init:
        from diode.detectors.checkpoint import load_detector

        init, _ = load_detector(args.init, trust_checkpoint=args.trust_checkpoint)
        if init.arch != args.arch or init.class_names != model.class_names:
            raise DiodeError(f"--init {args.init}: a {init.arch} for classes {init.class_names} cannot initialise "
                             f"a {args.arch} for classes {model.class_names}")
        model.load_state_dict(init.state_dict())
    print(f"training {args.arch} ({sum(p.numel() for p in model.parameters()) / 1e6:.2f}M parameters) on "
          f"{len(train_set)} images, {len(train_set.class_names)} classes, {image_size[0]}x{image_size[1]}, "
          f"{device}", flush=True)
    if len(val_set) == 0:
        raise DiodeError(f"{args.val}: validation set has no images")
    val_mapping = _labels_to_model(val_set, train_set.class_names)
    train_images, train_targets = train_set.load_all(image_size, progress=True)
    val_images, val_targets = val_set.load_all(image_size, progress=True)
    val_targets = _remap(val_targets, val_mapping)
    out.mkdir(parents=True, exist_ok=True)
    if rank == 0:
        atomic_write_yaml(out / "config.yaml", {"command": args.command, "arch": args.arch, "data": str(args.data),
                                                "val": str(args.val), "image_size": list(image_size),
                                                "train": cfg.to_dict()})

    def report(epoch) -> None:
        m = epoch.metrics
        val = f"  val mAP {m['map']:.3f}  mAP@.5 {m['map_50']:.3f}" if m else ""
        losses = "  ".join(f"{k} {v:.3f}" for k, v in epoch.loss.items())
        print(f"epoch {epoch.epoch:3d}/{cfg.epochs}  {losses}{val}", flush=True)

    result = train_detector(model, train_images, train_targets, val_images, val_targets, cfg, out,
                            command=args.command, resume=args.resume, on_epoch=report, progress=rank == 0)
    _end_distributed()
    if rank == 0:
        print(f"done: best val mAP {result.best_map:.3f}; checkpoints {out / 'best.pt'} and {out / 'last.pt'}")
    return 0


def _model_and_dataset(args: argparse.Namespace):
    """(device, detector, dataset) for the commands that run a model over a labelled dataset."""
    from diode.data import open_dataset
    from diode.detectors.checkpoint import load_detector

    device = _device(args.device)
    model, _ = load_detector(args.model, device=device, trust_checkpoint=args.trust_checkpoint)
    return device, model, open_dataset(args.data, split=args.split)


def cmd_evaluate(args: argparse.Namespace) -> int:
    from diode.evaluation import evaluate_detector, format_table
    from diode.io import atomic_write_json

    _, model, dataset = _model_and_dataset(args)
    mapping = _labels_to_model(dataset, model.class_names)
    images, targets = dataset.load_all(model.image_size, progress=True)
    targets = _remap(targets, mapping)
    metrics = evaluate_detector(model, images, targets, model.class_names, batch_size=args.batch_size,
                                progress=True)
    print(format_table(metrics))
    if args.json:
        atomic_write_json(args.json, {"model": str(args.model), "data": str(args.data), **metrics})
        print(f"metrics written to {args.json}")
    return 0


def cmd_predict(args: argparse.Namespace) -> int:
    from diode.report.grids import save_grid

    if args.num_images < 1:
        raise DiodeError(f"--num-images must be >= 1, got {args.num_images}")
    if not 0 <= args.score_thresh <= 1:
        raise DiodeError(f"--score-thresh must be in [0, 1], got {args.score_thresh}")
    device, model, dataset = _model_and_dataset(args)
    if len(dataset) == 0:
        raise DiodeError(f"{args.data}: dataset has no images")
    count = min(args.num_images, len(dataset))
    images = torch.stack([dataset.load(i, model.image_size)[0] for i in range(count)])
    with torch.inference_mode():
        predictions = model.predict(images.to(device).float() / 255, score_thresh=args.score_thresh)
    save_grid(args.out, images, predictions, model.class_names)
    print(f"wrote predictions of {args.model} on {count} images to {args.out}")
    return 0


def _distributed(device_arg: str) -> tuple[int, int, torch.device]:
    """(rank, world size, device) from torchrun's environment; initialises the process group."""
    import os

    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    if world == 1:
        return 0, 1, _device(device_arg)
    import torch.distributed as dist

    local = int(os.environ.get("LOCAL_RANK", "0"))
    if torch.cuda.is_available() and device_arg in ("auto", "cuda"):
        device = torch.device("cuda", local)
        torch.cuda.set_device(device)
        backend = "nccl"
    else:
        device, backend = torch.device("cpu"), "gloo"
    if not dist.is_initialized():
        dist.init_process_group(backend)
    return rank, world, device


def _end_distributed() -> None:
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()


def cmd_synthesize(args: argparse.Namespace) -> int:
    from diode.detectors.checkpoint import load_detector
    from diode.synthesis.recipes import build_config, load_recipe
    from diode.synthesis.runner import RunSpec, SynthesisRun
    from diode.synthesis.synthesizer import use_channels_last

    if args.num_images < 1:
        raise DiodeError(f"--num-images must be >= 1, got {args.num_images}")
    rank, world, device = _distributed(args.device)
    teacher, _ = load_detector(args.teacher, device=device, trust_checkpoint=args.trust_checkpoint)
    if use_channels_last(device, args.channels_last):
        teacher = teacher.to(memory_format=torch.channels_last)
    if args.compile:
        from diode.detectors.base import compile_network

        compile_network(teacher)
    cfg = build_config(load_recipe(args.recipe), batch_size=args.batch_size, iterations=args.iterations,
                       precision=args.precision, source=f"--recipe {args.recipe}")
    image_size = _image_size(args.image_size) or teacher.image_size
    _check_multiple(image_size)
    verifier = (load_detector(args.verifier, device=device, trust_checkpoint=args.trust_checkpoint)[0]
                if args.verifier else None)
    if verifier is not None and verifier.class_names != teacher.class_names:
        raise DiodeError(f"--verifier {args.verifier}: its classes differ from the teacher's")
    spec = RunSpec(args.num_images, image_size, args.seed, str(args.teacher), cfg)
    run = SynthesisRun(teacher, spec, Path(args.out), rank=rank, world_size=world, verifier=verifier,
                       command=args.command)
    run.check_or_write_settings()
    if rank == 0:
        print(f"synthesizing {spec.num_images} images ({image_size[0]}x{image_size[1]}) from {args.teacher} with "
              f"recipe {args.recipe}: {spec.num_batches} batches x {cfg.total_iterations} iterations, "
              f"{world} process(es) on {device}", flush=True)
    run.run(progress=not args.quiet and rank == 0)
    if world > 1:
        import torch.distributed as dist

        dist.barrier()
    if rank == 0:
        summary = run.merge()
        verifier_text = (f", verifier agreement {summary['verifier_agreement']:.3f}"
                         if summary["verifier_agreement"] is not None else "")
        print(f"done: {summary['num_images']} images, {summary['num_targets']} targets "
              f"({summary['fp_added']} from false-positive aggregation); teacher agreement (mAP@.5) "
              f"{summary['teacher_agreement']:.3f}{verifier_text}; dataset in {args.out}")
        _auto_report(Path(args.out))
    if world > 1:
        import torch.distributed as dist

        dist.destroy_process_group()
    return 0


def cmd_distill(args: argparse.Namespace) -> int:
    from diode.data import open_dataset
    from diode.detectors.checkpoint import load_detector
    from diode.detectors.registry import build_detector, list_detectors
    from diode.distill.losses import DistillConfig, DistillObjective, check_compatible, resolve_methods
    from diode.distill.sources import load_transfer_set
    from diode.io import atomic_write_yaml
    from diode.training.trainer import train_detector
    from diode.types import empty_target

    out, cfg = _training_run(args)
    rank, _, device = _distributed(args.device)
    teacher, _ = load_detector(args.teacher, device=device, trust_checkpoint=args.trust_checkpoint)
    image_size = teacher.image_size
    torch.manual_seed(cfg.seed)
    if args.student in list_detectors():
        student = build_detector(args.student, class_names=teacher.class_names, image_size=image_size).to(device)
    else:
        student = load_detector(args.student, device=device, trust_checkpoint=args.trust_checkpoint)[0]
        if tuple(student.image_size) != tuple(image_size):
            raise DiodeError(f"--student {args.student}: image size {student.image_size} differs from the "
                             f"teacher's {image_size}")
    try:
        kd = DistillConfig(methods=resolve_methods(args.method, teacher, student, image_size),
                           pseudo_score_thresh=args.pseudo_score_thresh)
    except ValueError as exc:
        raise DiodeError(str(exc)) from None
    check_compatible(teacher, student, kd, image_size)
    val_images, val_targets = torch.empty((0, 3, *image_size), dtype=torch.uint8), []
    if args.val:
        val_set = open_dataset(args.val, split="val")
        mapping = _labels_to_model(val_set, teacher.class_names)
        val_images, val_targets = val_set.load_all(image_size, progress=True)
        val_targets = _remap(val_targets, mapping)
    images = load_transfer_set(args.data, image_size, num_images=args.num_images, seed=cfg.seed)
    print(f"distilling {args.teacher} -> {args.student} ({sum(p.numel() for p in student.parameters()) / 1e6:.2f}M "
          f"parameters) on {len(images)} transfer images from {args.data}, method {args.method} "
          f"({', '.join(f'{k}={v:g}' for k, v in kd.methods.items())}), {device}", flush=True)
    out.mkdir(parents=True, exist_ok=True)
    if rank == 0:
        atomic_write_yaml(out / "config.yaml", {"command": args.command, "teacher": str(args.teacher),
                                                "student": str(args.student), "data": args.data,
                                                "val": args.val, "image_size": list(image_size),
                                                "distill": vars(kd), "train": cfg.to_dict()})

    def report(epoch) -> None:
        m = epoch.metrics
        val = f"  val mAP {m['map']:.3f}  mAP@.5 {m['map_50']:.3f}" if m else ""
        print(f"epoch {epoch.epoch:3d}/{cfg.epochs}  loss {sum(v for k, v in epoch.loss.items() if k in kd.methods):.4f}"
              f"{val}", flush=True)

    empty = [empty_target()] * len(images)
    result = train_detector(student, images, empty, val_images, val_targets, cfg, out, command=args.command,
                            resume=args.resume, on_epoch=report, objective=DistillObjective(teacher, kd),
                            progress=rank == 0)
    _end_distributed()
    if rank == 0:
        best = f"best val mAP {result.best_map:.3f}; " if args.val else ""
        print(f"done: {best}checkpoints {out / 'best.pt'} and {out / 'last.pt'}")
        _auto_report(out)
    return 0


def cmd_verify(args: argparse.Namespace) -> int:
    from diode.verify import verify_dataset

    checked, problems = verify_dataset(args.dataset)
    for problem in problems:
        print(problem)
    print(f"{args.dataset}: {checked} images checked, {len(problems)} problem(s)")
    return 1 if problems else 0


def cmd_report(args: argparse.Namespace) -> int:
    from diode.report.html import write_report

    print(f"report: {write_report(args.run_dir)}")
    return 0


def _auto_report(run_dir: Path) -> None:
    from diode.report.html import write_report

    print(f"report: {write_report(run_dir)}")


def cmd_experiment(args: argparse.Namespace) -> int:
    from diode.experiment import Experiment

    out = Path(args.out)
    experiment = Experiment(out, args.profile, teacher_name=args.teacher, student_arch=args.student,
                            device=_device(args.device))
    experiment.run()
    print((out / "table.md").read_text())
    _auto_report(out)
    return 0


def cmd_demo(args: argparse.Namespace) -> int:
    from diode.demo import run_demo

    out = Path(args.out)
    seed = {} if args.seed is None else {"seed": args.seed}
    result = run_demo(out, quick=args.quick, device=_device(args.device), **seed)
    print(f"demo finished in {result.seconds / 60:.1f} min: teacher mAP@.5 {result.teacher_map_50:.3f}, "
          f"student mAP@.5 {result.student_map_50:.3f} (distilled from synthetic images only; teacher "
          f"agreement on them {result.teacher_agreement:.3f}), both on fresh real val images; "
          f"report: {result.report}")
    return 0


def _locked_output(args: argparse.Namespace) -> Path | None:
    """The output folder a command writes, locked for the whole command (one writer per folder).

    Under torchrun only rank 0 holds it: the other ranks are the same job.
    """
    import os

    if args.command_name not in ("train", "distill", "synthesize", "demo", "experiment"):
        return None
    if int(os.environ.get("RANK", "0")) != 0:
        return None
    if args.out is None:  # demo / experiment defaults
        args.out = (f"runs/experiment-{args.profile}" if args.command_name == "experiment"
                    else "runs/demo-quick" if args.quick else "runs/demo")
    return Path(args.out)


def _add_trust_flag(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--trust-checkpoint", action="store_true",
                        help="allow full unpickling of model files that need it (e.g. an ultralytics .pt): "
                             "unpickling can run code, so only for files you trust")


def _add_mosaic_flag(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--mosaic", type=float, default=0.0, metavar="P",
                        help="probability that a training image is a 2x2 mosaic of four batch images (default 0)")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="diode", description="Data-free knowledge distillation of object detectors.")
    parser.add_argument("--version", action="version", version=f"diode {__version__}")
    parser.add_argument("--debug", action="store_true", help="show tracebacks for errors")
    parser.add_argument("--deterministic", action="store_true",
                        help="PyTorch's deterministic mode (bit-identical reruns on the same GPU model; "
                             "docs/determinism.md); an operation without a deterministic kernel is an error")
    sub = parser.add_subparsers(dest="command_name", required=True)

    data = sub.add_parser("data", help="generate datasets")
    data_sub = data.add_subparsers(dest="data_command", required=True)
    shapes = data_sub.add_parser("shapes", help="render the embedded shapes dataset (COCO + YOLO layouts)")
    shapes.add_argument("--out", required=True, help="output folder")
    shapes.add_argument("--train", type=int, default=2000, help="number of training images")
    shapes.add_argument("--val", type=int, default=500, help="number of validation images")
    shapes.add_argument("--image-size", type=int, nargs=2, default=[128, 128], metavar=("H", "W"))
    shapes.add_argument("--seed", type=int, default=0)
    shapes.add_argument("--quiet", action="store_true", help="no progress bar")
    shapes.set_defaults(func=cmd_data_shapes)

    det = sub.add_parser("detectors", help="list detector architectures and bundled checkpoints")
    det.set_defaults(func=cmd_detectors)

    train = sub.add_parser("train", help="supervised training of a detector")
    train.add_argument("--data", required=True, help="training set: COCO folder/json or YOLO data.yaml")
    train.add_argument("--val", required=True, help="validation set (a data.yaml uses its 'val' split)")
    train.add_argument("--arch", required=True, help="architecture name (see `diode detectors`)")
    train.add_argument("--out", required=True, help="run folder for checkpoints and logs")
    train.add_argument("--epochs", type=int, default=30)
    train.add_argument("--image-size", type=int, nargs=2, metavar=("H", "W"),
                       help="working size (default: the data's most common size, rounded up to 32)")
    train.add_argument("--batch-size", type=int, default=32)
    train.add_argument("--lr", type=float, default=2e-3, help="AdamW peak learning rate")
    train.add_argument("--eval-every", type=int, default=1, help="evaluate every N epochs")
    train.add_argument("--seed", type=int, default=0)
    _add_mosaic_flag(train)
    train.add_argument("--resume", action="store_true", help="continue the run in --out from last.pt")
    train.add_argument("--init", help="start from this checkpoint's weights (fine-tuning) instead of random init")
    train.add_argument("--backbone-weights", metavar="PATH",
                       help="local ImageNet state dict for the backbone, read weights-only (tv-fcos-mobilenetv2: "
                            "torchvision's mobilenet_v2 weights; see docs/mobilenet-teacher.md)")
    train.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:N")
    _add_trust_flag(train)
    train.set_defaults(func=cmd_train)

    ev = sub.add_parser("evaluate", help="COCO mAP of a detector on a labelled dataset")
    ev.add_argument("--model", required=True, help="checkpoint path or bundled name (e.g. shapes-teacher)")
    ev.add_argument("--data", required=True, help="COCO folder/json or YOLO data.yaml")
    ev.add_argument("--split", default="val", help="split of a YOLO data.yaml (default val)")
    ev.add_argument("--json", help="also write the metrics to this JSON file")
    ev.add_argument("--batch-size", type=int, default=64)
    ev.add_argument("--device", default="auto")
    _add_trust_flag(ev)
    ev.set_defaults(func=cmd_evaluate)

    pr = sub.add_parser("predict", help="draw a detector's predictions on dataset images (PNG grid)")
    pr.add_argument("--model", required=True, help="checkpoint path or bundled name")
    pr.add_argument("--data", required=True, help="COCO folder/json or YOLO data.yaml")
    pr.add_argument("--split", default="val")
    pr.add_argument("--out", required=True, help="PNG file to write")
    pr.add_argument("--num-images", type=int, default=16)
    pr.add_argument("--score-thresh", type=float, default=0.3)
    pr.add_argument("--device", default="auto")
    _add_trust_flag(pr)
    pr.set_defaults(func=cmd_predict)
    syn = sub.add_parser("synthesize", help="invert a detector into a labelled synthetic dataset (DIODE)")
    syn.add_argument("--teacher", required=True, help="checkpoint path or bundled name (e.g. shapes-teacher)")
    syn.add_argument("--out", required=True, help="dataset folder (rerun the same command to resume)")
    syn.add_argument("--num-images", type=int, required=True)
    syn.add_argument("--image-size", type=int, nargs=2, metavar=("H", "W"), help="default: the teacher's size")
    syn.add_argument("--batch-size", type=int, help="override the recipe's batch size")
    syn.add_argument("--iterations", type=int, help="total iterations per image (stages rescaled)")
    syn.add_argument("--recipe", default="fast", help="bundled recipe name (paper, fast) or a YAML path")
    syn.add_argument("--seed", type=int, default=0)
    syn.add_argument("--precision", choices=["fp32", "bf16"], help="override the recipe's precision")
    syn.add_argument("--channels-last", action=argparse.BooleanOptionalAction, default=None,
                     help="teacher in channels_last memory format (default: on for the CPU, where synthesis is "
                          "6-13 %% faster with it for the teachers in results/perf.md; off on GPUs)")
    syn.add_argument("--compile", action="store_true",
                     help="torch.compile the teacher's network, BN statistics included (fixed shapes; the "
                          "first iterations of each stage size wait for the compiler; needs a C++ compiler on CPU)")
    syn.add_argument("--verifier", help="a second detector measuring transferable agreement")
    syn.add_argument("--device", default="auto")
    _add_trust_flag(syn)
    syn.add_argument("--quiet", action="store_true", help="no progress bar")
    syn.set_defaults(func=cmd_synthesize)

    kd = sub.add_parser("distill", help="train a student from a teacher on a transfer set (no labels)")
    kd.add_argument("--teacher", required=True, help="checkpoint path or bundled name")
    kd.add_argument("--student", required=True, help="architecture name (from scratch) or checkpoint path")
    kd.add_argument("--data", required=True,
                    help="transfer set: synthesised or any dataset (labels ignored), image folder, noise:gaussian, noise:uniform")
    kd.add_argument("--out", required=True, help="run folder")
    kd.add_argument("--val", help="real labelled validation set for per-epoch mAP")
    kd.add_argument("--epochs", type=int, default=30)
    kd.add_argument("--method", default="auto",
                    help="auto (soft where the pair supports it, else pseudo-label), soft, output, output-weighted, "
                         "pseudo-label, or weighted combinations like 'pseudo-label=1,soft=0.5'")
    kd.add_argument("--pseudo-score-thresh", type=float, default=0.3, help="teacher score for pseudo-labels")
    kd.add_argument("--num-images", type=int, help="use at most this many transfer images (noise: draw this many)")
    kd.add_argument("--batch-size", type=int, default=32)
    kd.add_argument("--lr", type=float, default=2e-3)
    kd.add_argument("--eval-every", type=int, default=1)
    kd.add_argument("--seed", type=int, default=0)
    _add_mosaic_flag(kd)
    kd.add_argument("--resume", action="store_true")
    kd.add_argument("--device", default="auto")
    _add_trust_flag(kd)
    kd.set_defaults(func=cmd_distill)

    ver = sub.add_parser("verify", help="check a synthesised dataset against its manifest checksums")
    ver.add_argument("dataset", help="a `diode synthesize` output folder")
    ver.set_defaults(func=cmd_verify)

    rep = sub.add_parser("report", help="write RUN_DIR/report.html (self-contained) for a run folder")
    rep.add_argument("run_dir", help="a synthesis, training, distillation, demo or experiment folder")
    rep.set_defaults(func=cmd_report)

    exp = sub.add_parser("experiment", help="the paper's transfer-set comparison on the embedded domain")
    exp.add_argument("--profile", choices=["quick", "full"], default="quick")
    exp.add_argument("--out", help="output folder (default runs/experiment-PROFILE); reruns continue")
    exp.add_argument("--teacher", default="shapes-teacher")
    exp.add_argument("--student", default="yolo-lite-s-p2",
                     help="student architecture (default: the bundled teacher's, as in the paper)")
    exp.add_argument("--device", default="auto")
    exp.set_defaults(func=cmd_experiment)

    demo = sub.add_parser("demo", help="the main job on the embedded default (what `make demo` runs)")
    demo.add_argument("--out", help="output folder (default runs/demo, or runs/demo-quick)")
    demo.add_argument("--quick", action="store_true", help="smoke-sized run of the same pipeline")
    demo.add_argument("--device", default="auto")
    demo.add_argument("--seed", type=int, help="seed of the real val images, the synthesis and the distillation "
                                               "(default: the demo's own, fixed; another seed measures the spread)")
    demo.set_defaults(func=cmd_demo)
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = build_parser()
    args = parser.parse_args(argv)
    args.command = _command_line(argv)
    from diode.allocator import keep_freed_memory

    keep_freed_memory()  # no page faults for memory freed a moment ago (a CPU loop's activations)
    deterministic = torch.are_deterministic_algorithms_enabled()
    if args.deterministic:
        # cuBLAS needs this before its first matrix product to be deterministic.
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
        torch.use_deterministic_algorithms(True)
    try:
        folder = _locked_output(args)
        if folder is None:
            return args.func(args)
        from diode.lock import OutputLock

        with OutputLock(folder):
            return args.func(args)
    except DiodeError as exc:
        if args.debug:
            traceback.print_exc()
        print(f"diode: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("diode: interrupted", file=sys.stderr)
        return 130
    except OSError as exc:
        # The system refused a file operation: atomic writes left every earlier file intact.
        if args.debug:
            traceback.print_exc()
        where = f"{exc.filename}: " if exc.filename else ""
        name = f" ({errno.errorcode[exc.errno]})" if exc.errno in errno.errorcode else ""
        print(f"diode: error: {where}{exc.strerror or exc}{name}", file=sys.stderr)
        return 2 if exc.errno in _UNUSABLE_PATH else 1
    except Exception as exc:  # noqa: BLE001 - last resort: one line unless --debug
        if args.debug:
            traceback.print_exc()
        else:
            print(f"diode: error: unexpected {type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''} "
                  f"(rerun with --debug for the traceback)", file=sys.stderr)
        return 1
    finally:
        torch.use_deterministic_algorithms(deterministic)
