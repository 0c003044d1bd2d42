"""torchvision detection models behind the detector protocol (STYLE.md).

Registered names and the torchvision builders they wrap (``FAMILIES``; always ``weights=None,
weights_backbone=None``: nothing is downloaded, every model starts from torchvision's own
initialisation, and with no pretrained weights torchvision keeps ``nn.BatchNorm2d`` everywhere
instead of swapping in ``FrozenBatchNorm2d``, so the BN-statistics prior applies to them):

- ``tv-fasterrcnn-mobilenet``: ``fasterrcnn_mobilenet_v3_large_fpn`` (background index)
- ``tv-fasterrcnn-resnet50``: ``fasterrcnn_resnet50_fpn`` (background index)
- ``tv-retinanet``: ``retinanet_resnet50_fpn`` (no background index)
- ``tv-fcos``: ``fcos_resnet50_fpn`` (no background index)
- ``tv-ssd``: ``ssd300_vgg16`` (background index; VGG-16 has no BN layers at all)
- ``tv-ssdlite``: ``ssdlite320_mobilenet_v3_large`` (background index)

and our own composition of torchvision parts (``IMAGENET_BACKBONE_FAMILIES``), random init too,
whose backbone can load ImageNet weights from a local file
(:func:`diode.detectors.backbones.load_backbone_weights`, the CLI's ``--backbone-weights``):

- ``tv-fcos-mobilenetv2``: FCOS on MobileNetV2 + FPN, strides 8/16/32, for 128-px inputs (no
  background index); its MobileNetV2 BN layers keep their running statistics even in train mode
  (see :mod:`diode.detectors.backbones` for the design and why)

Label mapping. Our labels are 0-based indices into ``class_names``. Faster R-CNN and SSD score
a softmax over classes in which torchvision reserves index 0 for background: they get
``num_classes = C + 1`` and ``torchvision label = ours + 1`` (``label_offset == 1``). RetinaNet
and FCOS use one sigmoid per class with no background logit: they get ``num_classes = C`` and
the labels unchanged (``label_offset == 0``). :meth:`TorchvisionDetector.to_torchvision_labels`
and :meth:`TorchvisionDetector.from_torchvision_labels` are the two directions.

Image size. The models' internal ``GeneralizedRCNNTransform`` normalises the [0, 1] images
itself (each family's own mean/std) and is pinned to the detector's ``image_size`` (H, W):
``min_size = min(H, W)``, ``max_size = max(H, W)``, so an ``image_size`` input is never
rescaled (torchvision's default would resize to 800 px). SSDlite gets ``fixed_size`` equal to
``image_size``. SSD300 is the exception: its default boxes are tiled in hard-coded 300-px steps
and its VGG extra layers need inputs of about 260 px or more, so ``tv-ssd`` keeps torchvision's
native 300x300 canvas: images are resized to it bilinearly (differentiable) and boxes mapped
back to the ``image_size`` frame. Inputs must be exactly ``[B, 3, H, W]`` with ``(H, W) ==
image_size`` (anything else raises ``ValueError``), so a size mismatch is never silently rescaled.

Losses. torchvision returns losses only in training mode. :meth:`TorchvisionDetector.loss`
switches every non-BN module to training mode for the call and restores the previous modes
afterwards; BN layers keep whatever mode the caller set: inside ``loss_mode()`` (or on a detector
in eval mode) they use and keep their running statistics, while a detector in plain ``train()``
mode updates them, as when it is trained (all but the frozen MobileNetV2 ones of
``tv-fcos-mobilenetv2``). Terms are renamed to short keys: ``cls``, ``box``
(second stage / single stage), ``rpn_obj``, ``rpn_box`` (Faster R-CNN's RPN), ``ctr`` (FCOS
centerness). ``loss_weights`` is 1.0 for each, as torchvision trains them.

Reproducible sampling. Faster R-CNN samples RPN anchors and RoI proposals with ``torch.randperm``
on the global RNG, and the transform draws its training size from it too. Each ``loss`` call
therefore runs under ``torch.random.fork_rng`` re-seeded from the ``generator_seed`` attribute
(default 0): the loss is a deterministic function of weights, images, targets and that seed, and
the caller's global RNG state is left untouched. ``generator_seed = None`` restores torchvision's
behaviour (fresh draws from the global RNG on every call, e.g. when training the detector itself).
The CPU generator and the CUDA generator of the images' device are forked and seeded.

Predictions. :meth:`TorchvisionDetector.predict` runs torchvision's own post-processing in eval
mode under ``no_grad``; the score and NMS IoU thresholds (``score_thresh``/``iou_thresh``,
initialised from each family's torchvision defaults, overridable per call) and ``max_detections``
(100) are written into the model for the call and restored afterwards, so they act before NMS
exactly as in torchvision. Labels are mapped back to 0-based indices and boxes clamped to the
image.
"""

from __future__ import annotations

import contextlib
import functools
from dataclasses import dataclass
from typing import Callable, Iterator

import torch
from torch import nn
from torchvision.models import detection as tvd
from torchvision.models.detection.transform import GeneralizedRCNNTransform

from diode.detectors.backbones import fcos_mobilenet_v2
from diode.detectors.base import Detector
from diode.detectors.registry import register
from diode.types import ImageSize, Prediction, Target

SSD300_CANVAS = (300, 300)  # (H, W) SSD300 always works at


@dataclass(frozen=True)
class _Family:
    builder: Callable[..., nn.Module]  # (num_classes=, and min_size=/max_size= unless "ssd") -> model
    background: bool  # torchvision's num_classes counts a background class at index 0
    loss_names: dict[str, str]  # torchvision loss key -> our short key
    kind: str  # "rcnn" (transform via min/max_size, thresholds on roi_heads), "dense", "ssd"
    description: str


_RCNN_LOSSES = {"loss_classifier": "cls", "loss_box_reg": "box",
                "loss_objectness": "rpn_obj", "loss_rpn_box_reg": "rpn_box"}
_DENSE_LOSSES = {"classification": "cls", "bbox_regression": "box"}
_FCOS_LOSSES = {"classification": "cls", "bbox_regression": "box", "bbox_ctrness": "ctr"}


def _untrained(builder: Callable[..., nn.Module]) -> Callable[..., nn.Module]:
    """A torchvision builder that downloads nothing: no detector, no backbone weights."""
    return functools.partial(builder, weights=None, weights_backbone=None)


FAMILIES: dict[str, _Family] = {
    "tv-fasterrcnn-mobilenet": _Family(
        _untrained(tvd.fasterrcnn_mobilenet_v3_large_fpn), True, _RCNN_LOSSES, "rcnn",
        "torchvision Faster R-CNN, MobileNetV3-Large FPN backbone (random init)"),
    "tv-fasterrcnn-resnet50": _Family(
        _untrained(tvd.fasterrcnn_resnet50_fpn), True, _RCNN_LOSSES, "rcnn",
        "torchvision Faster R-CNN, ResNet-50 FPN backbone (random init)"),
    "tv-retinanet": _Family(
        _untrained(tvd.retinanet_resnet50_fpn), False, _DENSE_LOSSES, "dense",
        "torchvision RetinaNet, ResNet-50 FPN backbone (random init)"),
    "tv-fcos": _Family(
        _untrained(tvd.fcos_resnet50_fpn), False, _FCOS_LOSSES, "dense",
        "torchvision FCOS, ResNet-50 FPN backbone (random init)"),
    "tv-ssd": _Family(
        _untrained(tvd.ssd300_vgg16), True, _DENSE_LOSSES, "ssd",
        "torchvision SSD300, VGG-16 backbone without BN, fixed 300x300 canvas (random init)"),
    "tv-ssdlite": _Family(
        _untrained(tvd.ssdlite320_mobilenet_v3_large), True, _DENSE_LOSSES, "ssd",
        "torchvision SSDlite, MobileNetV3-Large backbone (random init)"),
}

IMAGENET_BACKBONE_FAMILIES: dict[str, _Family] = {
    "tv-fcos-mobilenetv2": _Family(
        fcos_mobilenet_v2, False, _FCOS_LOSSES, "dense",
        "torchvision FCOS, MobileNetV2 FPN at strides 8/16/32 (random init; --backbone-weights: "
        "ImageNet, BN statistics frozen)"),
}


class TorchvisionDetector(Detector):
    """A torchvision detection model (``self.model``) adapted to the detector protocol."""

    fixed_input_size = True  # inputs must be exactly image_size (see the module docstring)

    def __init__(self, class_names: list[str], image_size: ImageSize, family: str) -> None:
        super().__init__(class_names, image_size)
        spec = FAMILIES.get(family) or IMAGENET_BACKBONE_FAMILIES.get(family)
        if spec is None:
            raise ValueError(f"unknown torchvision family {family!r}")
        height, width = self.image_size
        if height < 1 or width < 1:
            raise ValueError(f"image_size must be positive, got {self.image_size}")
        self.family = family
        self.label_offset = 1 if spec.background else 0
        self._loss_names = dict(spec.loss_names)
        num_classes = self.num_classes + self.label_offset
        if spec.kind == "ssd":
            model = spec.builder(num_classes=num_classes)
            # SSD's builders hard-code their canvas; replace the transform, keeping its mean/std.
            canvas = SSD300_CANVAS if family == "tv-ssd" else self.image_size
            old = model.transform
            model.transform = GeneralizedRCNNTransform(
                min(canvas), max(canvas), old.image_mean, old.image_std, size_divisible=1,
                fixed_size=(canvas[1], canvas[0]))  # torchvision's fixed_size is (W, H)
        else:
            model = spec.builder(num_classes=num_classes, min_size=min(height, width), max_size=max(height, width))
        self.model = model
        self._thresholds = model.roi_heads if spec.kind == "rcnn" else model
        self.score_thresh = float(self._thresholds.score_thresh)
        self.iou_thresh = float(self._thresholds.nms_thresh)
        self.max_detections = 100
        self.generator_seed: int | None = 0
        self.loss_weights = {name: 1.0 for name in self._loss_names.values()}

    # ----- label and target mapping ----------------------------------------------------------

    def to_torchvision_labels(self, labels: torch.Tensor) -> torch.Tensor:
        """Our 0-based labels -> torchvision's class indices (``+ label_offset``)."""
        return labels.to(torch.int64) + self.label_offset

    def from_torchvision_labels(self, labels: torch.Tensor) -> torch.Tensor:
        """torchvision's class indices -> our 0-based labels (``- label_offset``)."""
        return labels.to(torch.int64) - self.label_offset

    def _check_images(self, images: torch.Tensor) -> None:
        height, width = self.image_size
        if (not isinstance(images, torch.Tensor) or images.dim() != 4 or images.shape[1] != 3
                or tuple(images.shape[-2:]) != (height, width)):
            shape = list(images.shape) if isinstance(images, torch.Tensor) else type(images).__name__
            raise ValueError(f"{self.arch or self.family}: expected images [B, 3, {height}, {width}] "
                             f"(the detector's image_size), got {shape}")
        if not images.is_floating_point():
            raise ValueError(f"{self.arch or self.family}: images must be floating point in [0, 1], "
                             f"got {images.dtype}")

    def _to_torchvision_targets(self, targets: list[Target], batch: int,
                                device: torch.device) -> list[dict[str, torch.Tensor]]:
        if len(targets) != batch:
            raise ValueError(f"got {len(targets)} targets for {batch} images")
        converted = []
        for i, target in enumerate(targets):
            # Checked where the targets are (the host in synthesis), then moved without blocking:
            # a blocking copy, or checks on the device, would make the host wait for the GPU.
            boxes = target["boxes"].to(dtype=torch.float32).reshape(-1, 4)
            labels = target["labels"].to(dtype=torch.int64).reshape(-1)
            if len(boxes) != len(labels):
                raise ValueError(f"target {i}: {len(boxes)} boxes but {len(labels)} labels")
            if len(labels) and (labels.min() < 0 or labels.max() >= self.num_classes):
                raise ValueError(f"target {i}: labels must lie in [0, {self.num_classes}), "
                                 f"got {labels.tolist()}")
            if len(boxes) and (boxes[:, 2:] <= boxes[:, :2]).any():
                raise ValueError(f"target {i}: every box needs x2 > x1 and y2 > y1")
            converted.append({"boxes": boxes.to(device, non_blocking=True),
                              "labels": self.to_torchvision_labels(labels).to(device, non_blocking=True)})
        return converted

    # ----- protocol ----------------------------------------------------------------------------

    @contextlib.contextmanager
    def _sampling_rng(self, device: torch.device) -> Iterator[None]:
        """Fork and seed the CPU (and the images' CUDA) generator from ``generator_seed``."""
        if self.generator_seed is None:
            yield
            return
        seed = int(self.generator_seed)
        cuda = [device.index if device.index is not None else torch.cuda.current_device()] \
            if device.type == "cuda" else []
        with torch.random.fork_rng(devices=cuda):
            torch.default_generator.manual_seed(seed)
            for index in cuda:
                with torch.cuda.device(index):
                    torch.cuda.manual_seed(seed)
            yield

    def network(self) -> nn.Module:
        """The backbone (and FPN): torchvision's transform, heads and loss stay eager."""
        return self.model.backbone

    def loss(self, images: torch.Tensor, targets: list[Target]) -> dict[str, torch.Tensor]:
        """torchvision's training losses under short names (see the module docstring)."""
        self._check_images(images)
        tv_targets = self._to_torchvision_targets(targets, len(images), images.device)
        bns = {m for _, m in self.bn_layers()}
        modes = {m: m.training for m in self.model.modules()}
        try:
            for m in self.model.modules():
                if m not in bns:
                    m.training = True  # set per module: .train() would recurse into BN children
            with self._sampling_rng(images.device):
                raw = self.model(list(images), tv_targets)
        finally:
            for m, training in modes.items():
                m.training = training
        return {self._loss_names.get(k, k): v for k, v in raw.items()}

    @torch.no_grad()
    def predict(self, images: torch.Tensor, score_thresh: float | None = None,
                iou_thresh: float | None = None) -> list[Prediction]:
        """torchvision's post-processed detections, 0-based labels, at most ``max_detections``."""
        self._check_images(images)
        holder = self._thresholds
        saved = (holder.score_thresh, holder.nms_thresh, holder.detections_per_img)
        modes = {m: m.training for m in self.modules()}
        try:
            holder.score_thresh = float(self.score_thresh if score_thresh is None else score_thresh)
            holder.nms_thresh = float(self.iou_thresh if iou_thresh is None else iou_thresh)
            holder.detections_per_img = int(self.max_detections)
            self.eval()
            outputs = self.model(list(images))
        finally:
            holder.score_thresh, holder.nms_thresh, holder.detections_per_img = saved
            for m, training in modes.items():
                m.training = training
        height, width = self.image_size
        predictions = []
        for out in outputs:
            labels = self.from_torchvision_labels(out["labels"])
            keep = (labels >= 0) & (labels < self.num_classes)
            boxes = out["boxes"][keep].float()
            boxes[:, 0::2] = boxes[:, 0::2].clamp(0, width)
            boxes[:, 1::2] = boxes[:, 1::2].clamp(0, height)
            predictions.append({"boxes": boxes[: self.max_detections],
                                "labels": labels[keep][: self.max_detections],
                                "scores": out["scores"][keep].float()[: self.max_detections]})
        return predictions


def _builder(family: str) -> Callable[..., TorchvisionDetector]:
    def build(*, class_names: list[str], image_size: ImageSize) -> TorchvisionDetector:
        return TorchvisionDetector(class_names, image_size, family)
    return build


for _name, _spec in {**FAMILIES, **IMAGENET_BACKBONE_FAMILIES}.items():
    register(_name, _spec.description)(_builder(_name))
