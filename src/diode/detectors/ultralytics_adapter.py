"""ultralytics detectors behind the detector protocol (optional extra: ``diode-kd[ultralytics]``).

ultralytics is AGPL-3.0 licensed and not a dependency of diode: this module imports it only when
it is installed (version 8.4 or later, whose heads return dicts of named outputs) and registers
its architectures only then (``ul-yolov8n``, ``ul-yolov8s``, ``ul-yolo11n``, ``ul-yolov5nu``, ``ul-yolov3u``,
``ul-yolov3-tinyu``), built from the model YAMLs ultralytics ships, with random weights and no
download. ``wrap_checkpoint`` wraps a trained ultralytics ``.pt`` (unpickled by the caller).

Offline and out of the home directory: ultralytics configures itself from environment variables
read once, when it is first imported. Unless the user has set them, this module sets, before that
import, ``YOLO_CONFIG_DIR`` to a per-user folder under the system temp directory (ultralytics
writes its ``settings.json`` there instead of under ``~/.config``), ``YOLO_OFFLINE=1`` (skips its
DNS connectivity probe; offline it sends no telemetry and runs no update checks),
``YOLO_AUTOINSTALL=false`` (it never pip-installs a missing requirement) and
``YOLO_VERBOSE=false``; it also turns its ``sync`` (telemetry) setting off in that folder.

Loss: ultralytics' own ``v8DetectionLoss`` (task-aligned assignment). Our targets are converted
to its batch format (``batch_idx``, ``cls``, ``bboxes`` as normalised cx, cy, w, h). The terms
``box`` (CIoU), ``cls`` (BCE) and ``dfl`` (distribution focal loss; ``l1`` for heads without DFL)
are returned per batch and unweighted: ultralytics multiplies each by a gain (``loss_weights``:
the checkpoint's training gains, else its defaults 7.5, 0.5, 1.5) and the sum by the batch size,
so ``weighted_loss(terms) * batch_size`` is the loss ultralytics trains on.

End-to-end heads (YOLOv10, YOLO26) train a one-to-one branch beside the one-to-many one; loss and
prediction both use the one-to-many branch only (NMS-based, like the other families). Prediction
decodes it (DFL) and applies class-aware NMS. The model is never fused, so every BatchNorm layer
stays in place for DIODE's BN-statistics prior.
"""

from __future__ import annotations

import importlib.util
import os
import tempfile
from pathlib import Path
from types import SimpleNamespace

import torch
from torch import nn
from torchvision.ops import batched_nms, box_convert

from diode.detectors.base import Detector
from diode.detectors.registry import register
from diode.errors import DiodeError
from diode.types import ImageSize, Prediction, Target

# name -> (YAML path under ultralytics/cfg/models, scale letter, description); the name without
# its "ul-" prefix is ultralytics' own model name (its checkpoints record it as `yaml_file`).
ARCHITECTURES = {
    "ul-yolov8n": ("v8/yolov8.yaml", "n", "ultralytics YOLOv8n (optional extra, AGPL-3.0), about 3.0M parameters"),
    "ul-yolov8s": ("v8/yolov8.yaml", "s", "ultralytics YOLOv8s (optional extra, AGPL-3.0), about 11M parameters"),
    "ul-yolo11n": ("11/yolo11.yaml", "n", "ultralytics YOLO11n (optional extra, AGPL-3.0), about 2.6M parameters"),
    "ul-yolov5nu": ("v5/yolov5.yaml", "n",
                    "ultralytics YOLOv5nu, anchor-free head (optional extra, AGPL-3.0), about 2.5M parameters"),
    "ul-yolov3-tinyu": ("v3/yolov3-tiny.yaml", "",
                        "ultralytics YOLOv3-tinyu, anchor-free head (optional extra, AGPL-3.0), about 12M parameters"),
    "ul-yolov3u": ("v3/yolov3.yaml", "",
                   "ultralytics YOLOv3u, anchor-free head (optional extra, AGPL-3.0), about 104M parameters"),
}
MIN_VERSION = (8, 4)


def _import_ultralytics() -> bool:
    """Configure ultralytics for offline use (module docstring), import it; False when unusable."""
    if importlib.util.find_spec("ultralytics") is None:
        return False
    uid = os.getuid() if hasattr(os, "getuid") else 0
    ours = Path(tempfile.gettempdir()) / f"diode-ultralytics-{uid}"
    os.environ.setdefault("YOLO_CONFIG_DIR", str(ours))
    os.environ.setdefault("YOLO_OFFLINE", "1")
    os.environ.setdefault("YOLO_AUTOINSTALL", "false")
    os.environ.setdefault("YOLO_VERBOSE", "false")
    try:
        import ultralytics
        from ultralytics.utils import SETTINGS
    except ImportError:
        return False
    if SETTINGS.get("sync") and Path(SETTINGS.file).is_relative_to(ours):
        SETTINGS.update(sync=False)  # only in our own settings folder, never in a user's
    try:
        return tuple(int(part) for part in ultralytics.__version__.split(".")[:2]) >= MIN_VERSION
    except ValueError:
        return False


AVAILABLE = _import_ultralytics()


class UltralyticsDetector(Detector):
    """An ultralytics ``DetectionModel`` (kept whole in ``self.model``) in our data contract."""

    def __init__(self, model: nn.Module, class_names: list[str], image_size: ImageSize,
                 loss_weights: dict[str, float] | None = None) -> None:
        super().__init__(class_names, image_size)
        from ultralytics.nn.modules.head import Detect
        from ultralytics.nn.tasks import DetectionModel

        head = model.model[-1]
        if type(model) is not DetectionModel or not isinstance(head, Detect) or head.cv2 is None:
            raise DiodeError(f"unsupported ultralytics model {type(model).__name__} with head "
                             f"{type(head).__name__}: only unfused detection models are supported")
        if head.nc != self.num_classes:
            raise ValueError(f"the model predicts {head.nc} classes but {self.num_classes} class names were given")
        self.max_stride = int(model.stride.max())
        if image_size[0] % self.max_stride or image_size[1] % self.max_stride:
            raise ValueError(f"image_size must be a multiple of {self.max_stride}, got {tuple(image_size)}")
        self.model = model
        self.extra_term = "dfl" if head.reg_max > 1 else "l1"
        gains = loss_weights or _default_gains()
        self.loss_weights = {"box": gains["box"], "cls": gains["cls"], self.extra_term: gains["dfl"]}
        # The criterion reads its gains from model.args: unit gains keep our terms unweighted.
        model.args = SimpleNamespace(box=1.0, cls=1.0, dfl=1.0)
        # ultralytics' validation defaults; at most 100 detections like the other detectors.
        self.score_thresh, self.iou_thresh, self.max_detections = 0.001, 0.7, 100

    @property
    def head(self) -> nn.Module:
        return self.model.model[-1]

    def network(self) -> nn.Module:
        """ultralytics' DetectionModel: its loss is computed outside, on the head outputs."""
        return self.model

    def sequential_blocks(self) -> list[tuple[nn.Module, tuple[str, ...]]]:
        """ultralytics' ``Conv`` blocks (and subclasses keeping its forward, e.g. ``DWConv``):
        ``act(bn(conv(x)))``."""
        from ultralytics.nn.modules.conv import Conv

        return [(m, ("conv", "bn", "act")) for m in self.model.modules()
                if isinstance(m, Conv) and type(m).forward is Conv.forward and "forward" not in m.__dict__]

    def _check_size(self, images: torch.Tensor) -> None:
        if images.shape[-2] % self.max_stride or images.shape[-1] % self.max_stride:
            raise ValueError(f"input sides must be multiples of {self.max_stride} (as image_size {self.image_size} "
                             f"is), got {tuple(images.shape[-2:])}")

    def _raw(self, images: torch.Tensor) -> dict[str, torch.Tensor]:
        """Head outputs of the one-to-many branch: boxes [B, 4 * reg_max, A], scores [B, C, A], feats."""
        self._check_size(images)
        out = self.model(images)
        out = out[1] if isinstance(out, tuple) else out  # eval mode: (decoded, raw)
        return out.get("one2many", out)

    def raw_outputs(self, images: torch.Tensor) -> list[torch.Tensor]:
        """[box distributions [B, A, 4 * reg_max], class logits [B, A, C]] over all A anchor points."""
        raw = self._raw(images)
        return [raw["boxes"].transpose(1, 2), raw["scores"].transpose(1, 2)]

    def objectness(self, outputs: list[torch.Tensor]) -> list[torch.Tensor]:
        # Anchor-free heads have no objectness: the best class probability plays its role.
        best = outputs[1].float().sigmoid().amax(-1)
        return [best for _ in outputs]

    def decode(self, raw: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        """Raw head outputs -> (boxes [B, A, 4] xyxy pixels, class probabilities [B, A, C])."""
        from ultralytics.utils.tal import dist2bbox, make_anchors

        points, strides = make_anchors(raw["feats"], self.head.stride, 0.5)  # [A, 2] cells, [A, 1]
        distances = self.head.dfl(raw["boxes"].float())  # [B, 4, A] left, top, right, bottom in cells
        boxes = dist2bbox(distances, points.T.unsqueeze(0), xywh=False, dim=1) * strides.T
        return boxes.transpose(1, 2), raw["scores"].float().sigmoid().transpose(1, 2)

    @torch.no_grad()
    def predict(self, images: torch.Tensor, score_thresh: float | None = None,
                iou_thresh: float | None = None) -> list[Prediction]:
        """Detections per image after class-aware NMS (at most `max_detections`), best first."""
        thresh = self.score_thresh if score_thresh is None else score_thresh
        iou_thresh = self.iou_thresh if iou_thresh is None else iou_thresh
        boxes, scores = self.decode(self._raw(images))
        height, width = images.shape[-2:]
        predictions = []
        for img_boxes, img_scores in zip(boxes, scores):
            # Every (anchor, class) pair above the threshold is a candidate, as in ultralytics' multi-label NMS.
            anchor, label = (img_scores > thresh).nonzero(as_tuple=True)
            score = img_scores[anchor, label]
            if score.numel() > 30 * self.max_detections:
                score, top = score.topk(30 * self.max_detections)
                anchor, label = anchor[top], label[top]
            box = img_boxes[anchor]
            box[:, 0::2] = box[:, 0::2].clamp(0, width)
            box[:, 1::2] = box[:, 1::2].clamp(0, height)
            keep = batched_nms(box, score, label, iou_thresh)[: self.max_detections]
            predictions.append({"boxes": box[keep], "scores": score[keep], "labels": label[keep]})
        return predictions

    def loss(self, images: torch.Tensor, targets: list[Target]) -> dict[str, torch.Tensor]:
        """Named unweighted terms `box`, `cls`, `dfl` (or `l1`) per batch (see the module docstring)."""
        from ultralytics.utils.loss import v8DetectionLoss

        raw = self._raw(images)
        device = images.device
        height, width = images.shape[-2:]
        # Built on the host and moved in non-blocking copies (a blocking one waits for the device).
        boxes = torch.cat([t["boxes"].float().reshape(-1, 4) for t in targets])
        boxes = box_convert(boxes, "xyxy", "cxcywh") / boxes.new_tensor([width, height, width, height])
        batch = {  # ultralytics' batch format: one row per object
            "batch_idx": torch.cat([torch.full((len(t["labels"]),), float(i)) for i, t in enumerate(targets)]),
            "cls": torch.cat([t["labels"].reshape(-1) for t in targets]).float().view(-1, 1),
            "bboxes": boxes,
        }
        batch = {key: value.to(device, non_blocking=True) for key, value in batch.items()}
        # Built per call: the criterion captures the model's device and strides when constructed.
        total, _ = v8DetectionLoss(self.model)(raw, batch)  # [3] terms (unit gains) * batch size
        if total.shape != (3,):
            raise RuntimeError(f"unexpected ultralytics loss shape {tuple(total.shape)}; "
                               f"needs ultralytics >= {'.'.join(map(str, MIN_VERSION))}")
        box, cls, extra = (total / images.shape[0]).unbind()
        return {"box": box, "cls": cls, self.extra_term: extra}


def _default_gains() -> dict[str, float]:
    from ultralytics.utils import DEFAULT_CFG_DICT

    return {key: float(DEFAULT_CFG_DICT[key]) for key in ("box", "cls", "dfl")}


def build_model(config: str, scale: str, num_classes: int, yaml_file: str = "") -> nn.Module:
    """A randomly initialised ``DetectionModel`` from a YAML shipped with ultralytics (no download)."""
    from ultralytics.nn.tasks import DetectionModel
    from ultralytics.utils import ROOT, YAML

    cfg = YAML.load(ROOT / "cfg" / "models" / config)
    cfg.update(nc=num_classes, scale=scale, yaml_file=yaml_file)
    return DetectionModel(cfg, verbose=False)


def _builder(name: str, config: str, scale: str):
    def build(*, class_names: list[str], image_size: ImageSize) -> UltralyticsDetector:
        model = build_model(config, scale, len(class_names), yaml_file=f"{name.removeprefix('ul-')}.yaml")
        return UltralyticsDetector(model, class_names, image_size)
    return build


def wrap_checkpoint(checkpoint: object) -> UltralyticsDetector | None:
    """Wrap an unpickled ultralytics training checkpoint (a dict whose ``ema`` or ``model`` is a
    ``DetectionModel``); None for anything else. Its class names come from ``model.names``, its
    image size from the training ``imgsz``; the training loss gains become ``loss_weights``."""
    if not AVAILABLE or not isinstance(checkpoint, dict):
        return None
    from ultralytics.nn.tasks import DetectionModel

    model = checkpoint.get("ema")  # ultralytics' own loaders prefer the EMA weights too
    model = checkpoint.get("model") if model is None else model
    if not isinstance(model, DetectionModel):
        return None
    model = model.float().requires_grad_(True)  # released checkpoints are half precision and frozen
    train_args = {**_as_dict(getattr(model, "args", None)), **_as_dict(checkpoint.get("train_args"))}
    imgsz = train_args.get("imgsz", 640)
    image_size = (int(imgsz), int(imgsz)) if isinstance(imgsz, (int, float)) else (int(imgsz[0]), int(imgsz[-1]))
    names = model.names if isinstance(model.names, dict) else dict(enumerate(model.names))
    gains = {**_default_gains(), **{k: float(train_args[k]) for k in ("box", "cls", "dfl") if k in train_args}}
    detector = UltralyticsDetector(model, [str(names[i]) for i in range(len(names))], image_size, gains)
    # Our checkpoints rebuild by name: keep one when the model is a registered architecture.
    name = f"ul-{Path(str(model.yaml.get('yaml_file', ''))).stem}"
    detector.arch = name if name in ARCHITECTURES else ""
    return detector


def _as_dict(args: object) -> dict:
    if isinstance(args, dict):
        return args
    return dict(vars(args)) if args is not None and hasattr(args, "__dict__") else {}


if AVAILABLE:
    for _name, (_config, _scale, _description) in ARCHITECTURES.items():
        register(_name, _description)(_builder(_name, _config, _scale))
