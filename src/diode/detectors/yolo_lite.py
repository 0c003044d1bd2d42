"""yolo-lite: the built-in one-stage YOLO-style detector family (our own design).

A CSP backbone (stride 32), an FPN + PAN neck and a coupled head on three levels (strides 8, 16,
32), with BatchNorm after every convolution (so DIODE's BN-statistics prior applies everywhere).
Each level has one anchor of side ``4 * stride``; a cell predicts (tx, ty, tw, th, objectness,
classes). Decoding follows YOLOv5: centre ``(grid + 2 sigmoid(t) - 0.5) * stride``, size
``anchor * (2 sigmoid(t))^2``, so a level covers objects from 0 to 4x its anchor.

Training assignment: a ground-truth box is matched at every level whose anchor differs from it
by less than ``ANCHOR_RATIO`` in width and height, and always at its best-matching level (so the
smallest and thinnest objects are learned too), in the cell holding its centre plus the two
nearest neighbour cells (more positives, faster convergence). Losses (named, unweighted):
``box`` = 1 - CIoU over positives, ``obj`` = BCE against the detached IoU at positives and 0
elsewhere (level-balanced), ``cls`` = BCE summed over classes, averaged over positives.

Soft-target distillation (:meth:`YoloLite.soft_distill`): every output channel is a sigmoid
logit, so the teacher's probabilities are targets for the student's logits, with the relative
entropy ``BCE(s, p_t) - H(p_t)`` (zero at a perfect match) as the distance: ``soft_obj`` over
every cell (mean per level, summed), ``soft_box_cls`` over box and class channels weighted by
the teacher's objectness, so background cells do not dominate.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn
from torchvision.ops import batched_nms, box_iou, complete_box_iou_loss

from diode.detectors.base import Detector
from diode.detectors.registry import register
from diode.types import ImageSize, Prediction, Target

STRIDES = (8, 16, 32)
STRIDES_P2 = (4, 8, 16, 32)  # with a stride-4 level for small objects
ANCHOR_RATIO = 4.0  # max width/height ratio between a box and a level's anchor to be matched
# Objectness weight per level: fine levels have many more cells (values as in YOLOv5).
SOFT_OBJ_WEIGHT = 4.0  # soft_distill: objectness term against the objectness-weighted box/class term
OBJ_BALANCE = {3: (4.0, 1.0, 0.4), 4: (4.0, 1.0, 0.25, 0.06)}


class ConvBN(nn.Sequential):
    """Conv (no bias) + BatchNorm + SiLU."""

    def __init__(self, c_in: int, c_out: int, k: int = 3, s: int = 1) -> None:
        super().__init__(nn.Conv2d(c_in, c_out, k, s, k // 2, bias=False),
                         nn.BatchNorm2d(c_out, eps=1e-3, momentum=0.03), nn.SiLU(inplace=True))


class Bottleneck(nn.Module):
    def __init__(self, c: int, shortcut: bool = True) -> None:
        super().__init__()
        self.conv1, self.conv2 = ConvBN(c, c, 3), ConvBN(c, c, 3)
        self.shortcut = shortcut

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.conv2(self.conv1(x))
        return x + y if self.shortcut else y


class CSPBlock(nn.Module):
    """Split into two halves, run `n` bottlenecks on one, concatenate every stage, fuse."""

    def __init__(self, c_in: int, c_out: int, n: int, shortcut: bool = True) -> None:
        super().__init__()
        self.hidden = c_out // 2
        self.split = ConvBN(c_in, 2 * self.hidden, 1)
        self.blocks = nn.ModuleList(Bottleneck(self.hidden, shortcut) for _ in range(n))
        self.fuse = ConvBN((2 + n) * self.hidden, c_out, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        parts = list(self.split(x).chunk(2, 1))
        for block in self.blocks:
            parts.append(block(parts[-1]))
        return self.fuse(torch.cat(parts, 1))


class SPPF(nn.Module):
    """Spatial pyramid pooling (fast): widens the receptive field of the deepest level."""

    def __init__(self, c: int) -> None:
        super().__init__()
        self.reduce, self.fuse = ConvBN(c, c // 2, 1), ConvBN(c * 2, c, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.reduce(x)
        p1 = F.max_pool2d(x, 5, 1, 2)
        p2 = F.max_pool2d(p1, 5, 1, 2)
        return self.fuse(torch.cat([x, p1, p2, F.max_pool2d(p2, 5, 1, 2)], 1))


class YoloLite(Detector):
    """One-stage detector; input sides must be multiples of 32."""

    def __init__(self, class_names: list[str], image_size: ImageSize, widths: tuple[int, ...],
                 depth: int, p2: bool = False) -> None:
        super().__init__(class_names, image_size)
        self.strides = STRIDES_P2 if p2 else STRIDES
        self.obj_balance = OBJ_BALANCE[len(self.strides)]
        if image_size[0] % STRIDES[-1] or image_size[1] % STRIDES[-1]:
            raise ValueError(f"image_size must be a multiple of {STRIDES[-1]}, got {tuple(image_size)}")
        c0, c1, c2, c3, c4 = widths
        self.stem = ConvBN(3, c0, 3, 2)
        self.stage2 = nn.Sequential(ConvBN(c0, c1, 3, 2), CSPBlock(c1, c1, depth))
        self.stage3 = nn.Sequential(ConvBN(c1, c2, 3, 2), CSPBlock(c2, c2, 2 * depth))
        self.stage4 = nn.Sequential(ConvBN(c2, c3, 3, 2), CSPBlock(c3, c3, 2 * depth))
        self.stage5 = nn.Sequential(ConvBN(c3, c4, 3, 2), CSPBlock(c4, c4, depth), SPPF(c4))
        self.top_down4 = CSPBlock(c4 + c3, c3, depth, shortcut=False)
        self.top_down3 = CSPBlock(c3 + c2, c2, depth, shortcut=False)
        self.down3, self.bottom_up4 = ConvBN(c2, c2, 3, 2), CSPBlock(c2 + c3, c3, depth, shortcut=False)
        self.down4, self.bottom_up5 = ConvBN(c3, c3, 3, 2), CSPBlock(c3 + c4, c4, depth, shortcut=False)
        if p2:  # stride-4 level: top-down into stage 2, then back up into the stride-8 level
            self.top_down2 = CSPBlock(c2 + c1, c1, depth, shortcut=False)
            self.down2, self.bottom_up3 = ConvBN(c1, c1, 3, 2), CSPBlock(c1 + c2, c2, depth, shortcut=False)
        self.num_outputs = 5 + self.num_classes
        level_widths = (c1, c2, c3, c4) if p2 else (c2, c3, c4)
        self.heads = nn.ModuleList(
            nn.Sequential(ConvBN(c, c, 3), nn.Conv2d(c, self.num_outputs, 1)) for c in level_widths)
        self.anchor_sizes = [4.0 * s for s in self.strides]
        self.register_buffer("anchors", torch.tensor(self.anchor_sizes), persistent=False)
        self.loss_weights = {"box": 1.0, "obj": 1.0, "cls": 1.0}
        # NMS IoU 0.5: chosen on the embedded val split (mAP@.5 0.855 vs 0.841 at 0.6, docs/shapes-teacher.md).
        self.score_thresh, self.iou_thresh, self.max_detections = 0.001, 0.5, 100
        self._init_head_biases()

    def _init_head_biases(self) -> None:
        # Start from a prior of about 5 objects per image per level and class probability 1/C,
        # so early training is not swamped by the loss of background cells.
        for head, stride in zip(self.heads, self.strides):
            cells = (self.image_size[0] // stride) * (self.image_size[1] // stride)
            p = min(5.0 / cells, 0.5)
            bias = head[-1].bias.data
            bias[4] = math.log(p / (1 - p))
            bias[5:] = math.log(1 / max(self.num_classes - 1, 1))

    def forward(self, images: torch.Tensor) -> list[torch.Tensor]:
        """images [B, 3, H, W] in [0, 1] -> raw head outputs, per level [B, H/s, W/s, 5 + C]."""
        if images.shape[-2] % STRIDES[-1] or images.shape[-1] % STRIDES[-1]:
            raise ValueError(f"input sides must be multiples of {STRIDES[-1]}, got {tuple(images.shape[-2:])}")
        x2 = self.stage2(self.stem(images))
        p3 = self.stage3(x2)
        p4 = self.stage4(p3)
        p5 = self.stage5(p4)
        t4 = self.top_down4(torch.cat([F.interpolate(p5, scale_factor=2.0), p4], 1))
        t3 = self.top_down3(torch.cat([F.interpolate(t4, scale_factor=2.0), p3], 1))
        levels = []
        if len(self.strides) == 4:
            t2 = self.top_down2(torch.cat([F.interpolate(t3, scale_factor=2.0), x2], 1))
            t3 = self.bottom_up3(torch.cat([self.down2(t2), t3], 1))
            levels.append(t2)
        b4 = self.bottom_up4(torch.cat([self.down3(t3), t4], 1))
        b5 = self.bottom_up5(torch.cat([self.down4(b4), p5], 1))
        levels += [t3, b4, b5]
        return [head(f).permute(0, 2, 3, 1) for head, f in zip(self.heads, levels)]

    def raw_outputs(self, images: torch.Tensor) -> list[torch.Tensor]:
        return self(images)

    def objectness(self, outputs: list[torch.Tensor]) -> list[torch.Tensor]:
        return [o[..., 4].float().sigmoid() for o in outputs]

    def soft_distill(self, student_outputs: list[torch.Tensor],
                     teacher_outputs: list[torch.Tensor]) -> dict[str, torch.Tensor]:
        obj, box_cls = student_outputs[0].new_zeros((), dtype=torch.float32), 0.0
        for s, t in zip(student_outputs, teacher_outputs):
            s, t = s.float(), t.float()
            p = t.sigmoid()
            distance = (F.binary_cross_entropy_with_logits(s, p, reduction="none")
                        - F.binary_cross_entropy_with_logits(t, p, reduction="none"))
            weight = p[..., 4]
            obj = obj + distance[..., 4].mean()
            rest = torch.cat([distance[..., :4], distance[..., 5:]], -1).mean(-1)
            box_cls = box_cls + (rest * weight).sum() / weight.sum().clamp(min=1e-6)
        return {"soft_obj": SOFT_OBJ_WEIGHT * obj, "soft_box_cls": box_cls}

    def _decode_boxes(self, raw: torch.Tensor, level: int, gx: torch.Tensor, gy: torch.Tensor) -> torch.Tensor:
        """raw [..., >=4] at cells (gx, gy) of `level` -> boxes [..., 4] xyxy pixels."""
        stride, anchor = self.strides[level], self.anchors[level]
        t = raw[..., :4].float().sigmoid()
        cx = (gx + 2 * t[..., 0] - 0.5) * stride
        cy = (gy + 2 * t[..., 1] - 0.5) * stride
        w = anchor * (2 * t[..., 2]) ** 2
        h = anchor * (2 * t[..., 3]) ** 2
        return torch.stack([cx - w / 2, cy - h / 2, cx + w / 2, cy + h / 2], -1)

    def decode(self, outputs: list[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        """Raw outputs -> (boxes [B, A, 4] xyxy, scores [B, A, C] = objectness * class prob)."""
        boxes, scores = [], []
        for level, raw in enumerate(outputs):
            b, h, w, _ = raw.shape
            gy, gx = torch.meshgrid(torch.arange(h, device=raw.device), torch.arange(w, device=raw.device),
                                    indexing="ij")
            boxes.append(self._decode_boxes(raw, level, gx, gy).reshape(b, h * w, 4))
            prob = raw[..., 4:5].float().sigmoid() * raw[..., 5:].float().sigmoid()
            scores.append(prob.reshape(b, h * w, self.num_classes))
        return torch.cat(boxes, 1), torch.cat(scores, 1)

    @torch.no_grad()
    def predict(self, images: torch.Tensor, score_thresh: float | None = None,
                iou_thresh: float | None = None) -> list[Prediction]:
        """Detections per image after class-aware NMS (at most `max_detections`)."""
        thresh = self.score_thresh if score_thresh is None else score_thresh
        iou_thresh = self.iou_thresh if iou_thresh is None else iou_thresh
        boxes, scores = self.decode(self(images))
        height, width = images.shape[-2:]
        predictions = []
        for img_boxes, img_scores in zip(boxes, scores):
            # Several classes per cell may pass: each (cell, class) pair is a candidate.
            cell, label = (img_scores > thresh).nonzero(as_tuple=True)
            score = img_scores[cell, label]
            if score.numel() > 30 * self.max_detections:
                score, top = score.topk(30 * self.max_detections)
                cell, label = cell[top], label[top]
            box = img_boxes[cell]
            box[:, 0::2] = box[:, 0::2].clamp(0, width)
            box[:, 1::2] = box[:, 1::2].clamp(0, height)
            keep = batched_nms(box, score, label, iou_thresh)[: self.max_detections]
            predictions.append({"boxes": box[keep], "scores": score[keep], "labels": label[keep]})
        return predictions

    @staticmethod
    def _flatten_targets(targets: list[Target]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(image index, boxes, labels) of every target box, on the targets' device (see `_assign`)."""
        boxes = torch.cat([t["boxes"].detach().float().reshape(-1, 4) for t in targets])
        labels = torch.cat([t["labels"].reshape(-1) for t in targets])
        counts = torch.tensor([len(t["labels"]) for t in targets])
        img_idx = torch.repeat_interleave(torch.arange(len(targets)), counts).to(boxes.device, non_blocking=True)
        return img_idx, boxes, labels

    def _assign(self, flat: tuple[torch.Tensor, torch.Tensor, torch.Tensor], level: int, h: int,
                w: int) -> tuple[torch.Tensor, ...]:
        """Positive (image, gy, gx, target box, label) tuples for one level, neighbours included.

        Computed where the targets are (the CPU in synthesis) and moved to the model's device in
        non-blocking copies: the selections by mask here would each make the host wait for the
        device if they ran there on targets from the host."""
        stride = self.strides[level]
        device = self.anchors.device
        img_idx, boxes, labels = flat
        wh = (boxes[:, 2:] - boxes[:, :2]).clamp(min=1e-3)
        # Width/height mismatch with every level's anchor [N, L]; a box is matched where the
        # mismatch is below ANCHOR_RATIO, and always at its best level, so tiny or thin objects
        # (sides under anchor / ANCHOR_RATIO) still get positives.
        anchors = self.anchors if self.anchors.device == boxes.device else torch.tensor(self.anchor_sizes)
        anchors = anchors[None, :, None]
        ratios = torch.maximum(wh[:, None] / anchors, anchors / wh[:, None]).amax(2)
        ok = (ratios[:, level] < ANCHOR_RATIO) | (ratios.argmin(1) == level)
        img_idx, boxes, labels = img_idx[ok], boxes[ok], labels[ok]
        centre = (boxes[:, :2] + boxes[:, 2:]) / 2 / stride  # in cell units
        cell = centre.floor()
        frac = centre - cell
        offsets = [torch.zeros_like(cell)]
        masks = [torch.ones(len(cell), dtype=torch.bool, device=cell.device)]
        # The two neighbours closest to the centre: left/right and up/down.
        for dim, limit in ((0, w), (1, h)):
            low = (frac[:, dim] < 0.5) & (cell[:, dim] > 0)
            high = (frac[:, dim] >= 0.5) & (cell[:, dim] < limit - 1)
            for sel, step in ((low, -1.0), (high, 1.0)):
                off = torch.zeros_like(cell)
                off[:, dim] = step
                offsets.append(off)
                masks.append(sel)
        cells = torch.cat([cell + o for o in offsets]).long()
        keep = torch.cat(masks)
        rep = len(offsets)
        cells = cells[keep]
        gx, gy = cells[:, 0].clamp(0, w - 1), cells[:, 1].clamp(0, h - 1)
        found = (img_idx.repeat(rep)[keep].long(), gy, gx, boxes.repeat(rep, 1)[keep], labels.repeat(rep)[keep])
        return tuple(t.to(device, non_blocking=True) for t in found)

    def loss(self, images: torch.Tensor, targets: list[Target]) -> dict[str, torch.Tensor]:
        """Named unweighted terms `box`, `obj`, `cls` (see the module docstring)."""
        outputs = self(images)
        zero = outputs[0].sum() * 0.0  # keeps the graph connected when there are no positives
        box_loss, obj_loss, cls_loss = zero, zero, zero
        n_pos = 0
        flat = self._flatten_targets(targets)
        for level, raw in enumerate(outputs):
            raw = raw.float()
            b, h, w, _ = raw.shape
            obj_target = torch.zeros(raw.shape[:3], device=raw.device)
            img, gy, gx, tbox, tlabel = self._assign(flat, level, h, w)
            if len(img):
                pred = raw[img, gy, gx]  # [P, 5 + C]
                pbox = self._decode_boxes(pred, level, gx.float(), gy.float())
                box_loss = box_loss + complete_box_iou_loss(pbox, tbox, reduction="sum")
                iou = box_iou(pbox.detach(), tbox).diagonal().clamp(min=0)
                obj_target[img, gy, gx] = iou.to(obj_target.dtype)
                onehot = F.one_hot(tlabel, self.num_classes).float()
                cls_loss = cls_loss + F.binary_cross_entropy_with_logits(pred[:, 5:], onehot, reduction="sum")
                n_pos += len(img)
            obj_loss = obj_loss + self.obj_balance[level] * F.binary_cross_entropy_with_logits(raw[..., 4], obj_target)
        n_pos = max(n_pos, 1)
        return {"box": box_loss / n_pos, "obj": obj_loss, "cls": cls_loss / n_pos}


def _builder(widths: tuple[int, ...], depth: int, p2: bool = False):
    def build(*, class_names: list[str], image_size: ImageSize) -> YoloLite:
        return YoloLite(class_names, image_size, widths, depth, p2)
    return build


register("yolo-lite-n", "built-in YOLO-style detector, about 0.3M parameters")(_builder((8, 16, 32, 48, 64), 1))
register("yolo-lite-s", "built-in YOLO-style detector, about 1.1M parameters")(_builder((16, 24, 48, 96, 128), 1))
register("yolo-lite-m", "built-in YOLO-style detector, about 4.1M parameters")(_builder((16, 32, 64, 128, 256), 2))
register("yolo-lite-n-p2", "yolo-lite-n plus a stride-4 level (yolo-lite-s-p2's head layout), about 0.3M parameters")(
    _builder((8, 16, 32, 48, 64), 1, p2=True))
register("yolo-lite-s-p2", "yolo-lite-s plus a stride-4 level for small objects, about 1.2M parameters")(
    _builder((16, 24, 48, 96, 128), 1, p2=True))
