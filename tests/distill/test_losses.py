"""Distillation objectives: formulas, compatibility checks, and the `auto` choice."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from diode.detectors.registry import build_detector
from diode.distill.losses import DistillConfig, DistillObjective, check_compatible, resolve_methods
from diode.errors import DiodeError

NAMES = ["a", "b", "c"]
SIZE = (64, 64)


def _model(arch: str, seed: int):
    torch.manual_seed(seed)
    return build_detector(arch, class_names=NAMES, image_size=SIZE).eval()


def test_soft_distill_matches_the_formula_written_out():
    teacher = _model("yolo-lite-n-p2", 0)
    torch.manual_seed(1)
    t = [torch.randn(2, 3, 4, 5 + 3) * 3]
    s = [torch.randn(2, 3, 4, 5 + 3) * 3]
    p = torch.sigmoid(t[0])
    # relative entropy of Bernoulli(p) to Bernoulli(q) per channel: p log p/q + (1-p) log (1-p)/(1-q)
    q = torch.sigmoid(s[0])
    kl = p * torch.log(p / q) + (1 - p) * torch.log((1 - p) / (1 - q))
    obj = kl[..., 4].mean()
    rest = torch.cat([kl[..., :4], kl[..., 5:]], -1).mean(-1)
    box_cls = (rest * p[..., 4]).sum() / p[..., 4].sum()
    terms = teacher.soft_distill(s, t)
    assert terms["soft_obj"].item() == pytest.approx(4.0 * obj.item(), rel=1e-4)
    assert terms["soft_box_cls"].item() == pytest.approx(box_cls.item(), rel=1e-4)


def test_soft_distill_is_zero_at_a_perfect_match_and_has_gradients():
    teacher = _model("yolo-lite-s-p2", 0)
    x = torch.rand(2, 3, *SIZE)
    with torch.no_grad():
        t_raw = teacher.raw_outputs(x)
    same = teacher.soft_distill([o.clone() for o in t_raw], t_raw)
    assert all(abs(v.item()) < 1e-5 for v in same.values())
    student = _model("yolo-lite-s-p2", 1).train()
    terms = teacher.soft_distill(student.raw_outputs(x), t_raw)
    total = sum(terms.values())
    assert total.item() > 1e-3
    total.backward()
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in student.parameters())


def test_output_method_is_the_mean_squared_error_of_raw_outputs():
    teacher, student = _model("yolo-lite-n", 0), _model("yolo-lite-n", 1)
    x = torch.rand(2, 3, *SIZE)
    total, terms = DistillObjective(teacher, DistillConfig(methods={"output": 1.0}))(student, x, [])
    with torch.no_grad():
        expected = sum(F.mse_loss(s, t) for s, t in zip(student.raw_outputs(x), teacher.raw_outputs(x))) / 3
    assert terms["output"].item() == pytest.approx(expected.item(), rel=1e-5)
    assert total.item() == pytest.approx(expected.item(), rel=1e-5)


def test_auto_picks_soft_for_a_matching_head_layout_else_pseudo_labels():
    teacher = _model("yolo-lite-s-p2", 0)
    assert resolve_methods("auto", teacher, _model("yolo-lite-n-p2", 1), SIZE) == {"soft": 1.0}
    assert resolve_methods("auto", teacher, _model("yolo-lite-n", 1), SIZE) == {"pseudo-label": 1.0}
    assert resolve_methods("soft=1,pseudo-label=0.5", teacher, _model("yolo-lite-n", 1), SIZE) == {
        "soft": 1.0, "pseudo-label": 0.5}


def test_soft_across_head_layouts_is_refused_with_a_clear_message():
    teacher, student = _model("yolo-lite-s-p2", 0), _model("yolo-lite-n", 1)
    with pytest.raises(DiodeError, match="--method soft: .*head layouts"):
        check_compatible(teacher, student, DistillConfig(methods={"soft": 1.0}), SIZE)


def test_soft_objective_teaches_the_student_on_a_fixed_batch():
    teacher = _model("yolo-lite-s-p2", 0)
    student = _model("yolo-lite-n-p2", 1).train()
    objective = DistillObjective(teacher, DistillConfig(methods={"soft": 1.0}))
    x = torch.rand(4, 3, *SIZE)
    opt = torch.optim.Adam(student.parameters(), lr=3e-3)
    losses = []
    for _ in range(15):
        total, terms = objective(student, x, [])
        assert {"soft", "soft_obj", "soft_box_cls"} <= set(terms)
        opt.zero_grad()
        total.backward()
        opt.step()
        losses.append(total.item())
    assert losses[-1] < 0.5 * losses[0]
