"""`--compile`: the teacher's network under torch.compile gives the synthesis loop the same loss
terms and input gradient as eager mode, BN statistics recorded inside the compiled graph, and the
next iteration reuses the graph. (One small graph: compiling on two CPU cores takes about a minute.)"""

from __future__ import annotations

import shutil

import pytest
import torch

from diode.config import LossWeights
from diode.detectors.base import compile_network
from diode.detectors.registry import build_detector
from diode.synthesis.recipes import build_config, load_recipe
from diode.synthesis.synthesizer import TERMS, Synthesizer
from diode.synthesis.targets import sample_one_box

pytestmark = pytest.mark.skipif(not (shutil.which("c++") or shutil.which("g++")),
                                reason="torch.compile on the CPU needs a C++ compiler")


def _terms_and_grad(synth: Synthesizer, images: torch.Tensor, targets, weights: LossWeights):
    x = images.clone().requires_grad_(True)
    total, terms = synth._losses(x, targets, weights, synth._bn_loss(), log=True)
    total.backward()
    return {k: float(terms[k].detach()) for k in TERMS} | {"total": float(total.detach())}, x.grad


def test_compiled_teacher_same_terms_and_gradient_as_eager() -> None:
    from torch._dynamo.utils import counters

    torch.manual_seed(0)
    teacher = build_detector("yolo-lite-n", class_names=["a", "b", "c"], image_size=(32, 32)).eval()
    with torch.no_grad():  # running statistics away from the init values, as in a trained teacher
        for _, bn in teacher.bn_layers():
            bn.running_mean.uniform_(-0.5, 0.5)
            bn.running_var.uniform_(0.5, 2.0)
    cfg = build_config(load_recipe("fast"), batch_size=2)
    weights = LossWeights(task=1.0, bn=0.1, bn_first=1.0, tv_l1=1.0, tv_l2=0.5, l2=0.1)
    synth = Synthesizer(teacher, cfg)
    gen = torch.Generator().manual_seed(1)
    targets = sample_one_box(2, (32, 32), 3, gen)
    images = torch.rand(2, 3, 32, 32, generator=gen)
    eager_terms, eager_grad = _terms_and_grad(synth, images, targets, weights)

    graphs = counters["stats"]["unique_graphs"]
    restore = compile_network(teacher)
    try:
        compiled_terms, compiled_grad = _terms_and_grad(synth, images, targets, weights)
        assert counters["stats"]["unique_graphs"] > graphs  # the forward did run compiled
        for name, value in eager_terms.items():
            assert compiled_terms[name] == pytest.approx(value, rel=1e-4, abs=1e-6), name
        scale = eager_grad.abs().max()
        assert (compiled_grad - eager_grad).abs().max() <= 1e-4 * scale
        # A second step reuses the graph (no recompilation per iteration).
        graphs = counters["stats"]["unique_graphs"]
        assert _terms_and_grad(synth, images.flip(-1), targets, weights)[1].abs().sum() > 0
        assert counters["stats"]["unique_graphs"] == graphs
    finally:
        restore()
        synth.close()
    assert "forward" not in teacher.__dict__


def test_synthesize_compile_flag_compiles_the_teacher_network(tmp_path, monkeypatch) -> None:
    """`diode synthesize --compile` hands the loaded teacher to `compile_network` before the run
    (spied here: compiling for real is the test above)."""
    import diode.detectors.base as base
    from diode.cli import main
    from diode.detectors.checkpoint import save_checkpoint

    seen = []
    monkeypatch.setattr(base, "compile_network", lambda detector, **options: seen.append(detector))
    teacher = build_detector("yolo-lite-n", class_names=["a", "b"], image_size=(32, 32)).eval()
    save_checkpoint(tmp_path / "teacher.pt", teacher, command="test")
    (tmp_path / "recipe.yaml").write_text("stages:\n  - {iterations: 2}\n")
    args = ["synthesize", "--teacher", str(tmp_path / "teacher.pt"), "--num-images", "2", "--batch-size", "2",
            "--recipe", str(tmp_path / "recipe.yaml"), "--quiet", "--device", "cpu"]
    assert main([*args, "--out", str(tmp_path / "plain")]) == 0
    assert seen == []
    assert main([*args, "--out", str(tmp_path / "compiled"), "--compile"]) == 0
    assert len(seen) == 1 and seen[0].class_names == ["a", "b"]
    assert (tmp_path / "compiled" / "annotations.json").exists()
