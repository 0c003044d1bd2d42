"""Distillation objectives: named, unweighted terms combined with explicit weights.

- ``output``: MSE between the student's and the teacher's raw head outputs over every location
  (the paper's KD); needs identical head layouts.
- ``output-weighted``: the same MSE weighted per location by the teacher's objectness (plus a
  small floor), so the many background locations do not dominate.
- ``soft``: dense soft targets in the detector's own output space (``Detector.soft_distill``:
  for yolo-lite, the teacher's sigmoid probabilities as targets of the student's logits, box and
  class channels weighted by the teacher's objectness); same head layout only. The most
  informative signal per image: it learns several times faster than ``output`` or pseudo-labels.
- ``pseudo-label``: the teacher's detections after NMS (score above a threshold) become targets
  for the student's own detection loss; works across architectures.
- ``auto`` (the CLI default): ``soft`` when the pair supports it, else ``pseudo-label``.
The teacher runs without autograd on exactly the augmented batch the student sees.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from diode.detectors.base import Detector
from diode.errors import DiodeError
from diode.types import Target

METHODS = ("output", "output-weighted", "soft", "pseudo-label")
RAW_METHODS = ("output", "output-weighted", "soft")  # need matching raw head outputs


@dataclass
class DistillConfig:
    methods: dict[str, float] = field(default_factory=lambda: {"pseudo-label": 1.0})  # method -> weight
    pseudo_score_thresh: float = 0.3  # teacher detections above this become pseudo-labels
    weight_floor: float = 0.05  # output-weighted: minimum per-location weight

    def __post_init__(self) -> None:
        unknown = [m for m in self.methods if m not in METHODS]
        if unknown or not self.methods:
            raise ValueError(f"--method: unknown {unknown or 'empty'}; valid: {', '.join(METHODS)}")
        if any(w < 0 for w in self.methods.values()):
            raise ValueError("--method weights must be >= 0")
        if not 0 <= self.pseudo_score_thresh <= 1:
            raise ValueError(f"--pseudo-score-thresh must be in [0, 1], got {self.pseudo_score_thresh}")


def parse_methods(text: str) -> dict[str, float]:
    """'pseudo-label' or 'pseudo-label=1,output-weighted=0.5' -> {method: weight}."""
    methods: dict[str, float] = {}
    for part in text.split(","):
        name, _, weight = part.strip().partition("=")
        try:
            methods[name.strip()] = float(weight) if weight else 1.0
        except ValueError:
            raise DiodeError(f"--method {text!r}: weight {weight!r} is not a number") from None
    return methods


def _raw_problem(teacher: Detector, student: Detector, image_size, soft: bool) -> str | None:
    """Why raw-output distillation (``soft`` too when asked) cannot work for the pair, or None."""
    probe = torch.zeros(1, 3, *image_size, device=next(student.parameters()).device)
    with torch.no_grad():
        try:
            t_raw = teacher.raw_outputs(probe.to(next(teacher.parameters()).device))
            s_raw = student.raw_outputs(probe)
        except NotImplementedError as exc:
            return f"it needs raw head outputs: {exc}"
        t_shapes, s_shapes = [tuple(o.shape) for o in t_raw], [tuple(o.shape) for o in s_raw]
        if t_shapes != s_shapes:
            return (f"it needs identical head layouts, teacher {t_shapes} vs student {s_shapes}; "
                    "use pseudo-label for different architectures")
        if soft:
            try:
                teacher.soft_distill([o.to(t_raw[0].device) for o in s_raw], t_raw)
            except NotImplementedError as exc:
                return str(exc)
    return None


def resolve_methods(text: str, teacher: Detector, student: Detector, image_size) -> dict[str, float]:
    """--method text -> {method: weight}; ``auto`` is ``soft`` where the pair supports it, else
    ``pseudo-label``."""
    if text.strip() == "auto":
        return {"soft": 1.0} if _raw_problem(teacher, student, image_size, soft=True) is None \
            else {"pseudo-label": 1.0}
    return parse_methods(text)


def check_compatible(teacher: Detector, student: Detector, cfg: DistillConfig, image_size) -> None:
    """Fail early, naming the problem, when the pair cannot be distilled with `cfg`."""
    if teacher.class_names != student.class_names:
        raise DiodeError(f"teacher and student classes differ ({len(teacher.class_names)} vs "
                         f"{len(student.class_names)}): the student must be built for the teacher's classes")
    raw = [m for m in cfg.methods if m in RAW_METHODS]
    if raw:
        problem = _raw_problem(teacher, student, image_size, soft="soft" in raw)
        if problem:
            raise DiodeError(f"--method {raw[0]}: {problem}")


class DistillObjective:
    """Callable objective for the trainer: (student, images, _) -> (weighted total, terms)."""

    def __init__(self, teacher: Detector, cfg: DistillConfig) -> None:
        self.teacher = teacher.eval()
        for p in teacher.parameters():
            p.requires_grad_(False)
        self.cfg = cfg

    def __call__(self, student: Detector, images: torch.Tensor, _targets: list[Target]):
        cfg = self.cfg
        terms: dict[str, torch.Tensor] = {}
        with torch.no_grad():
            need_raw = any(m in RAW_METHODS for m in cfg.methods)
            t_raw = self.teacher.raw_outputs(images) if need_raw else None
            pseudo = (self.teacher.predict(images, score_thresh=cfg.pseudo_score_thresh)
                      if "pseudo-label" in cfg.methods else None)
        total = images.new_zeros(())
        if need_raw:
            s_raw = student.raw_outputs(images)
            if "output" in cfg.methods:
                terms["output"] = sum(((s.float() - t.float()) ** 2).mean() for s, t in zip(s_raw, t_raw)) / len(s_raw)
            if "output-weighted" in cfg.methods:
                weights = [w.clamp(min=cfg.weight_floor) for w in self.teacher.objectness(t_raw)]
                terms["output-weighted"] = sum(
                    (((s.float() - t.float()) ** 2).mean(-1) * w).sum() / w.sum()
                    for s, t, w in zip(s_raw, t_raw, weights)) / len(s_raw)
            if "soft" in cfg.methods:
                soft_terms = self.teacher.soft_distill(s_raw, t_raw)
                terms["soft"] = sum(soft_terms.values())
                terms.update({k: v.detach() for k, v in soft_terms.items()})
        if pseudo is not None:
            targets = [{"boxes": p["boxes"].detach(), "labels": p["labels"].detach()} for p in pseudo]
            student_terms = student.loss(images, targets)
            terms["pseudo-label"] = student.weighted_loss(student_terms)
            terms.update({f"pl_{k}": v.detach() for k, v in student_terms.items()})
        for name, weight in cfg.methods.items():
            total = total + weight * terms[name]
        return total, terms
