"""An FCOS detector on torchvision's MobileNetV2, whose backbone loads ImageNet weights from a file.

``fcos_mobilenet_v2`` builds the model behind ``tv-fcos-mobilenetv2`` (registered by
``torchvision_adapter``): torchvision's ``FCOS`` on :class:`MobileNetV2FPN`, sized for 128-px
inputs with objects spanning 6-70 % of the side.

- Backbone: ``torchvision.models.mobilenet_v2().features[:18]`` (the final 1x1 conv to 1280
  channels and the classifier are dropped), with its ``nn.BatchNorm2d`` layers kept as they are.
- Neck: a 3-level FPN (64 channels, BatchNorm after each conv, no extra pooled level) over the
  stride-8 (32 ch), stride-16 (96 ch) and stride-32 (320 ch) outputs: strides 8/16/32 give 16x16,
  8x8 and 4x4 grids at 128 px; a stride-64 level would be a 2x2 grid.
- Head: torchvision's ``FCOSHead`` (4 GroupNorm convs per branch, shared across levels). FCOS
  reads each level's scale range off its anchor size s (a location's largest box-side distance
  must lie in [4s, 8s); the first level has no lower bound, the last no upper one), so sizes
  4/8/16 px split the levels at 32 and 64 px, which suits 8-90 px objects (torchvision's
  800-px defaults, sizes 8..128 at 5 levels, would send almost everything to stride 8).
  The centre-sampling radius 3.0 (in units of s, torchvision default 1.5 in units of the stride)
  keeps FCOS's window of 1.5 strides around each box centre.
- Score threshold 0.05 before NMS (torchvision's FCOS default of 0.2 cuts low-confidence
  detections that mAP still counts), NMS IoU 0.6, images normalised with ImageNet's mean/std.

BN statistics. The MobileNetV2 BN layers stay in eval mode even when the detector is put in
train mode (:meth:`MobileNetV2FPN.train`): fine-tuning learns their affine weights but keeps the
running statistics loaded from ImageNet, because this teacher exists to carry BN statistics of
real natural images into synthesis (training-mode BN would overwrite them with the shapes
domain's within a few hundred steps, momentum 0.1); torchvision freezes them for the same reason
when it fine-tunes a pretrained backbone. The FPN's BN layers do train: they renormalise the
frozen backbone's features for the new domain.

ImageNet weights come only from a local file (:func:`load_backbone_weights`): a torchvision
``mobilenet_v2`` ImageNet state dict such as ``mobilenet_v2-b0353104.pth``, read with
``torch.load(weights_only=True)``. Nothing is downloaded.
"""

from __future__ import annotations

import pickle
from collections import OrderedDict
from pathlib import Path

import torch
from torch import nn
from torchvision.models import mobilenet_v2
from torchvision.models.detection.anchor_utils import AnchorGenerator
from torchvision.models.detection.fcos import FCOS, FCOSHead
from torchvision.ops import FeaturePyramidNetwork

from diode.errors import DiodeError

RETURN_STAGES = (6, 13, 17)  # indices in mobilenet_v2().features of the stride-8/16/32 outputs
STAGE_CHANNELS = (32, 96, 320)  # their channel counts
FPN_CHANNELS = 64
ANCHOR_SIZES = (4, 8, 16)  # px per level: FCOS scale ranges [0, 32), [32, 64), [64, inf)
CENTER_SAMPLING_RADIUS = 3.0  # in anchor sizes: 1.5 strides, FCOS's window


class MobileNetV2FPN(nn.Module):
    """MobileNetV2 features (ImageNet-loadable, BN statistics frozen) + a 3-level BN FPN.

    forward: images [B, 3, H, W] (normalised) -> OrderedDict "0", "1", "2" of
    [B, 64, H/8, W/8], [B, 64, H/16, W/16], [B, 64, H/32, W/32] (sides rounded up).
    """

    def __init__(self) -> None:
        super().__init__()
        self.features = mobilenet_v2(weights=None).features[: RETURN_STAGES[-1] + 1]
        self.fpn = FeaturePyramidNetwork(list(STAGE_CHANNELS), FPN_CHANNELS, norm_layer=nn.BatchNorm2d)
        self.out_channels = FPN_CHANNELS

    def forward(self, images: torch.Tensor) -> "OrderedDict[str, torch.Tensor]":
        levels = OrderedDict()
        x = images
        for index, stage in enumerate(self.features):
            x = stage(x)
            if index in RETURN_STAGES:
                levels[str(len(levels))] = x
        return self.fpn(levels)

    def train(self, mode: bool = True) -> "MobileNetV2FPN":
        """Set training mode, except the MobileNetV2 BN layers: they keep their running statistics."""
        super().train(mode)
        for m in self.features.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.eval()
        return self

    def load_imagenet(self, state_dict: dict[str, torch.Tensor], source: str) -> None:
        """Copy a torchvision ``mobilenet_v2`` state dict's ``features.0-17`` into the backbone.

        Its ``features.18`` and ``classifier`` entries (unused here) are ignored; any missing or
        misshapen entry raises DiodeError naming `source` and the first such key.
        """
        ours = self.features.state_dict()
        wanted = {f"features.{key}": key for key in ours}
        missing = [name for name in wanted if name not in state_dict]
        if missing:
            raise DiodeError(f"{source}: not a torchvision mobilenet_v2 state dict ({len(missing)} of "
                             f"{len(wanted)} backbone keys missing, e.g. {missing[0]!r})")
        for name, key in wanted.items():
            value = state_dict[name]
            if not isinstance(value, torch.Tensor) or value.shape != ours[key].shape:
                shape = tuple(value.shape) if isinstance(value, torch.Tensor) else type(value).__name__
                raise DiodeError(f"{source}: {name!r} has shape {shape}, mobilenet_v2 needs "
                                 f"{tuple(ours[key].shape)}")
        self.features.load_state_dict({key: state_dict[name] for name, key in wanted.items()})


def fcos_mobilenet_v2(*, num_classes: int, min_size: int, max_size: int) -> FCOS:
    """torchvision FCOS on :class:`MobileNetV2FPN` (random init; see the module docstring)."""
    backbone = MobileNetV2FPN()
    anchors = AnchorGenerator(tuple((size,) for size in ANCHOR_SIZES), ((1.0,),) * len(ANCHOR_SIZES))
    head = FCOSHead(backbone.out_channels, 1, num_classes)
    return FCOS(backbone, num_classes, min_size=min_size, max_size=max_size, anchor_generator=anchors,
                head=head, center_sampling_radius=CENTER_SAMPLING_RADIUS, score_thresh=0.05, nms_thresh=0.6)


def read_state_dict(path: str | Path) -> dict[str, torch.Tensor]:
    """A state dict from a local file, read with ``weights_only=True``; DiodeError if unreadable."""
    path = Path(path)
    if not path.is_file():
        raise DiodeError(f"{path}: backbone weights file not found")
    try:
        state_dict = torch.load(path, map_location="cpu", weights_only=True)
    except (pickle.UnpicklingError, RuntimeError, EOFError, OSError) as exc:
        first = str(exc).strip().splitlines()[0][:160] if str(exc).strip() else type(exc).__name__
        raise DiodeError(f"{path}: not a weights-only state dict ({first})") from None
    if not isinstance(state_dict, dict):
        raise DiodeError(f"{path}: holds a {type(state_dict).__name__}, not a state dict")
    return state_dict


def imagenet_backbone(model: nn.Module) -> MobileNetV2FPN | None:
    """`model`'s one :class:`MobileNetV2FPN` (``tv-fcos-mobilenetv2``), or None."""
    found = [m for m in model.modules() if isinstance(m, MobileNetV2FPN)]
    return found[0] if len(found) == 1 else None


def load_backbone_weights(model: nn.Module, path: str | Path) -> None:
    """Load a local torchvision ``mobilenet_v2`` ImageNet state dict into `model`'s backbone."""
    backbone = imagenet_backbone(model)
    if backbone is None:
        name = getattr(model, "arch", "") or type(model).__name__
        raise DiodeError(f"{name} has no MobileNetV2 backbone to load ImageNet weights into "
                         f"(tv-fcos-mobilenetv2 has one)")
    backbone.load_imagenet(read_state_dict(path), str(path))
