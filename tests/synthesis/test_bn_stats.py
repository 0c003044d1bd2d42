"""BN statistics recorder: per-channel mean and biased variance of each selected BN layer's input.

Parity with the formula written out here (mu_c = mean over (B, H, W) of x[:, c],
var_c = mean over (B, H, W) of (x[:, c] - mu_c)^2), layer selection by count and glob pattern,
frozen BN found by its buffers, recording only inside `recording()`, hook removal, gradients.
"""

from __future__ import annotations

import pytest
import torch
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode
from torchvision.ops import FrozenBatchNorm2d

from diode.detectors.base import Detector
from diode.detectors.registry import build_detector
from diode.errors import DiodeError
from diode.synthesis.bn_stats import BNStatsRecorder, select_bn_layers


class TinyNet(Detector):
    """Conv -> BN -> ReLU -> Conv -> BN, split in two named stages so globs can tell them apart."""

    def __init__(self, frozen: bool = False) -> None:
        super().__init__(["a"], (8, 8))
        bn = FrozenBatchNorm2d if frozen else nn.BatchNorm2d
        self.stage1 = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), bn(4))
        self.stage2 = nn.Sequential(nn.ReLU(), nn.Conv2d(4, 5, 3, padding=1), bn(5))
        with torch.no_grad():  # non-trivial running statistics, so input != output statistics
            for m in (self.stage1[1], self.stage2[2]):
                m.running_mean.uniform_(-1, 1)
                m.running_var.uniform_(0.5, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.stage2(self.stage1(x))


def manual_stats(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """mu_c = sum_{b,h,w} x / (B H W); var_c = sum_{b,h,w} (x - mu_c)^2 / (B H W) (biased)."""
    n = x.shape[0] * x.shape[2] * x.shape[3]
    mu = x.sum(dim=(0, 2, 3)) / n
    var = ((x - mu[None, :, None, None]) ** 2).sum(dim=(0, 2, 3)) / n
    return mu, var


def capture_inputs(modules: list[nn.Module]) -> tuple[list[torch.Tensor], list]:
    """Independent forward pre-hooks storing each module's input."""
    seen: list[torch.Tensor] = [None] * len(modules)  # type: ignore[list-item]

    def make(i: int):
        def hook(module, inputs):
            seen[i] = inputs[0].detach().clone()
        return hook
    handles = [m.register_forward_pre_hook(make(i)) for i, m in enumerate(modules)]
    return seen, handles


@pytest.mark.parametrize("frozen", [False, True])
def test_records_input_mean_and_biased_var(frozen: bool) -> None:
    torch.manual_seed(0)
    net = TinyNet(frozen).eval()
    layers = net.bn_layers()
    assert [n for n, _ in layers] == ["stage1.1", "stage2.2"]
    recorder = BNStatsRecorder(layers)
    seen, handles = capture_inputs([m for _, m in layers])
    x = torch.randn(3, 3, 6, 7)
    with recorder.recording():
        net(x)
    for h in handles:
        h.remove()
    for (mean, var), inp in zip(recorder.recorded(), seen):
        mu, v = manual_stats(inp)
        assert torch.allclose(mean, mu, atol=1e-6)
        assert torch.allclose(var, v, atol=1e-6)
    # The first BN's input is the first conv's output, not the BN output.
    conv_out = net.stage1[0](x)
    mu, v = manual_stats(conv_out)
    assert torch.allclose(recorder.recorded()[0][0], mu, atol=1e-6)
    bn_out_mu, _ = manual_stats(net.stage1(x))
    assert not torch.allclose(recorder.recorded()[0][0], bn_out_mu, atol=1e-3)
    recorder.remove()


def test_running_returns_buffers() -> None:
    net = TinyNet()
    recorder = BNStatsRecorder(net.bn_layers())
    for (rm, rv), (_, m) in zip(recorder.running(), net.bn_layers()):
        assert torch.equal(rm, m.running_mean) and torch.equal(rv, m.running_var)
    recorder.remove()


def test_nothing_recorded_outside_recording() -> None:
    torch.manual_seed(0)
    net = TinyNet().eval()
    recorder = BNStatsRecorder(net.bn_layers())
    net(torch.randn(2, 3, 5, 5))
    assert recorder.stats == [None, None]
    with pytest.raises(RuntimeError, match="not reached"):
        recorder.recorded()
    x = torch.randn(2, 3, 5, 5)
    with recorder.recording():
        net(x)
    kept = [(m.clone(), v.clone()) for m, v in recorder.recorded()]
    net(torch.randn(2, 3, 5, 5) * 10 + 3)  # outside again: must not overwrite
    for (m0, v0), (m1, v1) in zip(kept, recorder.recorded()):
        assert torch.equal(m0, m1) and torch.equal(v0, v1)
    recorder.remove()


def test_recorded_raises_for_layer_not_reached() -> None:
    net = TinyNet().eval()
    recorder = BNStatsRecorder(net.bn_layers())
    with recorder.recording():
        net.stage1(torch.randn(2, 3, 5, 5))  # stage2's BN never runs
    with pytest.raises(RuntimeError, match="stage2.2"):
        recorder.recorded()
    recorder.remove()


def test_layers_restored_after_recording_and_after_remove() -> None:
    net = TinyNet().eval()
    modules = [m for _, m in net.bn_layers()]
    recorder = BNStatsRecorder(net.bn_layers())
    assert all("forward" not in m.__dict__ for m in modules)  # nothing attached outside recording
    with recorder.recording():
        assert all("forward" in m.__dict__ for m in modules)
        net(torch.randn(2, 3, 5, 5))
    assert all("forward" not in m.__dict__ for m in modules)
    recorder.remove()
    with recorder.recording():
        net(torch.randn(2, 3, 5, 5))
        assert all("forward" not in m.__dict__ for m in modules)
    assert recorder.stats == [None, None]


def test_restores_a_forward_set_on_the_instance() -> None:
    net = TinyNet().eval()
    bn = net.stage1[1]
    custom = bn.forward
    bn.forward = lambda x: custom(x) * 1.0  # someone else's instance-level override
    mine = bn.__dict__["forward"]
    recorder = BNStatsRecorder(net.bn_layers())
    with recorder.recording():
        net(torch.randn(2, 3, 5, 5))
    assert bn.__dict__["forward"] is mine
    recorder.remove()


@pytest.mark.parametrize("frozen", [False, True])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16-autocast"])
@pytest.mark.parametrize("memory_format", [torch.contiguous_format, torch.channels_last], ids=["nchw", "nhwc"])
def test_fused_layer_same_output_and_gradient_as_layer_plus_stats(frozen: bool, dtype: torch.dtype,
                                                                  memory_format: torch.memory_format) -> None:
    """While recording, a frozen BN runs fused with its statistics (fp32) or as the layer plus
    `channel_mean_var` (bf16 input): the network's output and the gradient of a loss on output
    and statistics together match the unrecorded layers plus the written-out statistics, for
    NCHW activations (per-channel sums) and channels_last ones (column groups of the wide view)."""
    torch.manual_seed(0)
    net = TinyNet(frozen).eval()
    if not frozen:
        with torch.no_grad():
            for m in (net.stage1[1], net.stage2[2]):
                m.weight.uniform_(0.5, 2)
                m.bias.uniform_(-1, 1)
    for p in net.parameters():
        p.requires_grad_(False)
    net = net.to(memory_format=memory_format)
    recorder = BNStatsRecorder(net.bn_layers())
    x = torch.randn(2, 3, 5, 6).to(memory_format=memory_format).requires_grad_(True)
    autocast = lambda: torch.autocast("cpu", dtype=torch.bfloat16, enabled=dtype == torch.bfloat16)  # noqa: E731
    with recorder.recording(), autocast():
        out = net(x).float()
    path = "_FrozenBNWithMoments" if dtype == torch.float32 else "_ChannelMoments"
    assert all(type(m1.grad_fn).__name__.startswith(path) for m1, _ in recorder.stats)
    assert all((k > 0) == (memory_format == torch.channels_last) for k in recorder.groups)
    loss = out.square().sum() + sum(m.square().sum() + v.sum() for m, v in recorder.recorded())
    (grad,) = torch.autograd.grad(loss, x)
    x2 = x.detach().clone().requires_grad_(True)
    with autocast():
        h1 = net.stage1[0](x2)
        h2 = net.stage2[1](net.stage2[0](net.stage1[1](h1)))
        out2 = net.stage2[2](h2).float()
    stats = [manual_stats(h.float()) for h in (h1, h2)]
    expected_loss = out2.square().sum() + sum(m.square().sum() + v.sum() for m, v in stats)
    (expected,) = torch.autograd.grad(expected_loss, x2)
    tol = 1e-4 if dtype == torch.float32 else 5e-2
    assert torch.allclose(out, out2, atol=tol, rtol=tol)
    assert torch.allclose(grad, expected, atol=tol, rtol=tol)
    assert grad.abs().sum() > 0
    recorder.remove()


def test_bn_in_training_mode_runs_its_own_forward() -> None:
    """A BN layer in training mode is not a fixed affine map: the recorder leaves its forward
    (batch statistics, running-statistics update) alone and only records its input."""
    torch.manual_seed(0)
    net = TinyNet()
    net.train()
    before = net.stage1[1].running_mean.clone()
    recorder = BNStatsRecorder(net.bn_layers())
    x = torch.randn(4, 3, 5, 5)
    with recorder.recording():
        out = net(x)
    assert not torch.equal(net.stage1[1].running_mean, before)  # its own forward ran
    mu, v = manual_stats(net.stage1[0](x))
    assert torch.allclose(recorder.recorded()[0][0], mu, atol=1e-6)
    assert torch.allclose(out.mean((0, 2, 3)), torch.zeros(5), atol=1e-5)  # batch-normalised output
    recorder.remove()


def test_gradients_flow_from_stats_to_input() -> None:
    torch.manual_seed(0)
    net = TinyNet().eval()
    recorder = BNStatsRecorder(net.bn_layers())
    x = torch.randn(2, 3, 5, 5, requires_grad=True)
    with recorder.recording():
        net(x)
    loss = sum(m.square().sum() + v.sum() for m, v in recorder.recorded())
    (grad,) = torch.autograd.grad(loss, x)
    # Same loss through the written-out formula on a fresh forward.
    x2 = x.detach().clone().requires_grad_(True)
    h1 = net.stage1[0](x2)
    h2 = net.stage2[1](net.stage2[0](net.stage1[1](h1)))
    expected_loss = sum(manual_stats(h)[0].square().sum() + manual_stats(h)[1].sum() for h in (h1, h2))
    (expected,) = torch.autograd.grad(expected_loss, x2)
    assert grad.abs().sum() > 0
    assert torch.allclose(grad, expected, atol=1e-5)
    recorder.remove()


def test_select_all_count_and_patterns() -> None:
    layers = TinyNet().bn_layers()
    names = lambda chosen: [n for n, _ in chosen]  # noqa: E731
    assert names(select_bn_layers(layers, None)) == ["stage1.1", "stage2.2"]
    assert names(select_bn_layers(layers, "all")) == ["stage1.1", "stage2.2"]
    assert names(select_bn_layers(layers, 1)) == ["stage1.1"]
    assert names(select_bn_layers(layers, 5)) == ["stage1.1", "stage2.2"]  # more than there are: all
    assert names(select_bn_layers(layers, "stage2*")) == ["stage2.2"]
    assert names(select_bn_layers(layers, "stage2*, stage1.1")) == ["stage1.1", "stage2.2"]  # layer order kept
    assert names(select_bn_layers(layers, "*.1")) == ["stage1.1"]


@pytest.mark.parametrize("selection", ["nothing*", "Stage2*", 0, -1, ","])
def test_select_nothing_raises(selection) -> None:
    with pytest.raises(DiodeError):
        select_bn_layers(TinyNet().bn_layers(), selection)


def test_frozen_bn_found_by_buffers() -> None:
    net = TinyNet(frozen=True)
    layers = net.bn_layers()
    assert [type(m) for _, m in layers] == [FrozenBatchNorm2d, FrozenBatchNorm2d]


def test_yolo_lite_every_bn_found_and_glob() -> None:
    teacher = build_detector("yolo-lite-n", class_names=["a", "b"], image_size=(64, 64)).eval()
    layers = teacher.bn_layers()
    assert len(layers) == sum(isinstance(m, nn.BatchNorm2d) for m in teacher.modules())
    stage2 = select_bn_layers(layers, "stage2*")
    assert stage2 and all(n.startswith("stage2") for n, _ in stage2)
    assert len(stage2) == sum(isinstance(m, nn.BatchNorm2d) for m in teacher.stage2.modules())
    recorder = BNStatsRecorder(layers)
    x = torch.rand(2, 3, 64, 64)
    with recorder.recording():
        teacher(x)
    stats = recorder.recorded()
    assert len(stats) == len(layers)
    assert all(m.shape == (layer.num_features,) and v.shape == m.shape and (v >= 0).all()
               for (m, v), (_, layer) in zip(stats, layers))
    mu, var = manual_stats(teacher.stem[0](x))  # the first BN's input is the stem conv output
    assert torch.allclose(stats[0][0], mu, atol=1e-5) and torch.allclose(stats[0][1], var, atol=1e-5)
    # Another input size (a multi-resolution stage) and batch: each layer's count follows it.
    for size, batch in ((32, 3), (64, 2)):
        x = torch.rand(batch, 3, size, size)
        with recorder.recording():
            teacher(x)
        mu, var = manual_stats(teacher.stem[0](x))
        first = recorder.recorded()[0]
        assert torch.allclose(first[0], mu, atol=1e-5) and torch.allclose(first[1], var, atol=1e-5)
    recorder.remove()


def test_channel_mean_var_matches_var_mean_with_its_written_out_gradient() -> None:
    from diode.synthesis.bn_stats import channel_mean_var

    x = (torch.randn(3, 4, 5, 6, dtype=torch.float64) * 2 + 1).requires_grad_(True)
    mean, var = channel_mean_var(x)
    ref_var, ref_mean = torch.var_mean(x, dim=(0, 2, 3), unbiased=False)
    assert torch.allclose(mean, ref_mean) and torch.allclose(var, ref_var)
    assert torch.autograd.gradcheck(channel_mean_var, (x,))


@pytest.mark.parametrize("memory_format", [torch.contiguous_format, torch.channels_last])
def test_fused_frozen_bn_gradcheck(memory_format: torch.memory_format) -> None:
    """The fused layer + moments function against numerical gradients, for each output alone and
    together (float64), in both memory formats (channels_last takes other kernels: the moments
    as (mean, var) of column groups of the wide view, merged per channel by `_Layout`, the affine
    map broadcast); the layer's output keeps the format, and the statistics are the input's."""
    from diode.synthesis.bn_stats import _channel, _FrozenBNWithMoments, _groups, _Layout

    g = torch.Generator().manual_seed(0)
    x = (torch.randn(2, 3, 4, 5, dtype=torch.float64, generator=g) * 2 + 1).to(memory_format=memory_format)
    x.requires_grad_(True)
    scale = torch.rand(3, dtype=torch.float64, generator=g) + 0.5
    shift = torch.randn(3, dtype=torch.float64, generator=g)
    channel = _channel(scale, shift)
    k = _groups(x)
    assert k == (8 if memory_format == torch.channels_last else 0)  # 8 groups of 5 pixels: 24 columns
    fn = lambda x: _FrozenBNWithMoments.apply(x, channel, k)  # noqa: E731
    assert torch.autograd.gradcheck(fn, (x,))
    for i in range(3):
        assert torch.autograd.gradcheck(lambda x: fn(x)[i], (x,))
    layout = _Layout([3 * max(k, 1)], [k], [40], x.device)
    assert torch.autograd.gradcheck(lambda x: layout(*fn(x)[1:]), (x,))
    y, first, second = fn(x)
    assert y.is_contiguous(memory_format=memory_format)
    assert torch.allclose(y, x * scale.view(1, -1, 1, 1) + shift.view(1, -1, 1, 1))
    mean, var = layout(first, second)
    expected = manual_stats(x)
    assert torch.allclose(mean, expected[0]) and torch.allclose(var, expected[1])


def test_recording_follows_changes_to_a_layer_between_recordings() -> None:
    """The fused forward of each layer is built once and reused; a change to the layer's running
    statistics (in place or replaced), its parameters, its mode or an instance-level forward is
    seen by the next recording."""
    torch.manual_seed(0)
    net = TinyNet().eval()
    for p in net.parameters():
        p.requires_grad_(False)
    recorder = BNStatsRecorder(net.bn_layers())
    x = torch.randn(2, 3, 5, 5)

    def check() -> None:
        with recorder.recording():
            out = net(x)
        assert torch.allclose(out, net(x), atol=1e-6)

    check()
    bn = net.stage2[2]
    with torch.no_grad():
        bn.running_var.mul_(3.0)  # in place
    check()
    bn.running_mean = torch.full_like(bn.running_mean, 0.5)  # replaced
    check()
    bn.weight = nn.Parameter(torch.full_like(bn.weight, 2.0), requires_grad=False)
    check()
    bn.forward = lambda t: torch.zeros_like(t)  # an instance-level forward of someone else
    with recorder.recording():
        assert torch.equal(net(x), torch.zeros(2, 5, 5, 5))
    del bn.forward
    bn.train()  # batch statistics now: the layer's own forward, which updates its running mean
    before = bn.running_mean.clone()
    with recorder.recording():
        net(x)
    assert not torch.equal(bn.running_mean, before)
    recorder.remove()


def test_bn_layers_are_found_by_their_running_statistics_whatever_holds_them() -> None:
    """Buffers (BatchNorm2d, FrozenBatchNorm2d) or plain tensor attributes count; a BatchNorm
    without running statistics (track_running_stats=False) does not."""

    class PlainStats(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.running_mean, self.running_var = torch.zeros(3), torch.ones(3)

    class Net(Detector):
        def __init__(self) -> None:
            super().__init__(["a"], (8, 8))
            self.layers = nn.ModuleList([nn.BatchNorm2d(3), FrozenBatchNorm2d(3), PlainStats(),
                                         nn.BatchNorm2d(3, track_running_stats=False), nn.Conv2d(3, 3, 1)])

    assert [name for name, _ in Net().bn_layers()] == ["layers.0", "layers.1", "layers.2"]


class _RecordOps(TorchDispatchMode):
    """Records the name of every ATen operation run inside it."""

    def __init__(self) -> None:
        super().__init__()
        self.names: list[str] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.names.append(str(func))
        return func(*args, **(kwargs or {}))


def test_moments_of_a_channels_last_activation_need_no_copy() -> None:
    """The statistics of a channels_last activation on the CPU (the batch-statistics kernel on its
    wide view, benchmarks/bn_moments.py) copy nothing (no clone or copy among the operations run)
    and give the input's per-channel mean and variance."""
    from diode.synthesis.bn_stats import _groups, _Layout, _moments

    x = (torch.randn(4, 6, 5, 7) * 3 + 2).to(memory_format=torch.channels_last)
    k = _groups(x)
    assert k == 4  # 140 pixels: 4 groups of 35, 24 columns
    with _RecordOps() as ops:
        first, second, _ = _moments(x, k)
    assert not [name for name in ops.names if "clone" in name or "copy" in name]
    mean, var = _Layout([first.numel()], [k], [140], x.device)(first, second)
    expected = manual_stats(x)
    assert torch.allclose(mean, expected[0], atol=1e-5) and torch.allclose(var, expected[1], rtol=1e-5)


@pytest.mark.parametrize("shape", [(4, 6, 5, 7), (1, 3, 1, 1), (3, 5, 3, 3), (2, 200, 4, 4), (8, 12, 16, 16)])
def test_column_groups_follow_the_pixel_count(shape) -> None:
    """k doubles while a row of the wide view is under 128 columns and the pixels divide evenly
    (an odd count stays at one group); NCHW and non-float activations are summed instead."""
    from diode.synthesis.bn_stats import _groups

    b, c, h, w = shape
    x = torch.randn(shape).to(memory_format=torch.channels_last)
    k = _groups(x)
    if x.is_contiguous():  # one pixel: NCHW as well, summed
        assert k == 0
    else:
        n = b * h * w
        assert k >= 1 and n % k == 0 and (k * c >= 128 or n % (2 * k) != 0)
    assert _groups(torch.randn(shape)) == 0
    assert _groups(torch.randn(4, 6, 5, 7).to(torch.float16).to(memory_format=torch.channels_last)) == 0


def test_layers_with_sums_and_with_column_groups_merge_together() -> None:
    """A recording mixing NCHW layers (sums) and channels_last ones (column groups) gives every
    layer its input's statistics: `_Layout` over the concatenation, gradients included."""
    from diode.synthesis.bn_stats import _channel_moments, _Layout

    g = torch.Generator().manual_seed(1)
    xs = [(torch.randn(2, 3, 4, 6, dtype=torch.float64, generator=g) + 1).requires_grad_(True),
          (torch.randn(2, 5, 4, 4, dtype=torch.float64, generator=g) * 2).to(memory_format=torch.channels_last)
          .detach().requires_grad_(True),
          (torch.randn(3, 2, 3, 3, dtype=torch.float64, generator=g) - 1).to(memory_format=torch.channels_last)
          .detach().requires_grad_(True)]

    def stats(*xs):
        parts = [_channel_moments(x) for x in xs]
        layout = _Layout([f.numel() for f, _, _ in parts], [k for _, _, k in parts],
                         [x.numel() // x.shape[1] for x in xs], xs[0].device)
        assert [k > 0 for _, _, k in parts] == [False, True, True]
        return layout(torch.cat([f for f, _, _ in parts]), torch.cat([h for _, h, _ in parts]))

    mean, var = stats(*xs)
    expected = [manual_stats(x) for x in xs]
    assert torch.allclose(mean, torch.cat([m for m, _ in expected]))
    assert torch.allclose(var, torch.cat([v for _, v in expected]))
    assert torch.autograd.gradcheck(stats, tuple(xs))


class Blocks(nn.Module):
    """Three conv-BN pairs followed by activations (two in one Sequential) and a last BN that
    ends its Sequential: the first three fold into their convs while recording, the last not."""

    def __init__(self, frozen: bool = False, bias: bool = False) -> None:
        super().__init__()
        bn = FrozenBatchNorm2d if frozen else nn.BatchNorm2d
        self.a = nn.Sequential(nn.Conv2d(3, 6, 3, padding=1, bias=bias), bn(6), nn.SiLU(inplace=True))
        self.b = nn.Sequential(nn.Conv2d(6, 5, 1, bias=bias), bn(5), nn.ReLU(inplace=True),
                               nn.Conv2d(5, 4, 3, padding=1, bias=bias), bn(4), nn.SiLU(inplace=True))
        self.c = nn.Sequential(nn.Conv2d(4, 4, 1), bn(4))
        g = torch.Generator().manual_seed(3)
        with torch.no_grad():
            for m in self.modules():
                if isinstance(m, (nn.BatchNorm2d, FrozenBatchNorm2d)):
                    m.running_mean.uniform_(-1, 1, generator=g)
                    m.running_var.uniform_(0.5, 2, generator=g)
                    m.weight.uniform_(0.5, 2, generator=g)
                    m.bias.uniform_(-1, 1, generator=g)
        self.eval().requires_grad_(False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.c(self.b(self.a(x)))

    def layers(self) -> list[tuple[str, nn.Module]]:
        return [(n, m) for n, m in self.named_modules() if isinstance(m, (nn.BatchNorm2d, FrozenBatchNorm2d))]


def _bn_inputs(net: Blocks, x: torch.Tensor) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """The network's output and its BN layers' inputs, by hand (no recorder), differentiable."""
    inputs = []

    def run(seq: nn.Sequential, h: torch.Tensor) -> torch.Tensor:
        for m in seq:
            if isinstance(m, (nn.BatchNorm2d, FrozenBatchNorm2d)):
                inputs.append(h)
            h = m(h) if not isinstance(m, (nn.SiLU, nn.ReLU)) else type(m)()(h)  # out of place
        return h
    out = run(net.c, run(net.b, run(net.a, x)))
    return out, inputs


@pytest.mark.parametrize("frozen", [False, True], ids=["bn", "frozen-bn"])
@pytest.mark.parametrize("bias", [False, True], ids=["no-bias", "bias"])
@pytest.mark.parametrize("memory_format", [torch.contiguous_format, torch.channels_last], ids=["nchw", "nhwc"])
def test_conv_bn_pairs_fold_with_the_same_output_statistics_and_gradient(frozen: bool, bias: bool,
                                                                           memory_format: torch.memory_format) -> None:
    """Given the network, the recorder runs each conv-BN-activation triple of a Sequential as one
    convolution (the BN in its weight and bias) and takes the statistics of its output back to
    the BN input's: the network's output, every layer's statistics and the gradient of a loss on
    output and statistics match the network run by hand; the BN that ends its Sequential is not
    folded; the Sequentials and activations are left as they were."""
    torch.manual_seed(0)
    net = Blocks(frozen, bias).to(memory_format=memory_format)
    recorder = BNStatsRecorder(net.layers(), root=net)
    x = torch.randn(2, 3, 6, 8).to(memory_format=memory_format).requires_grad_(True)
    for _ in range(2):  # the second recording reuses the folded forwards
        with recorder.recording():
            out = net(x)
        assert [f is not None for f in recorder.folded] == [True, True, True, False]
        means, variances = recorder.recorded_flat()
        loss = out.square().sum() + means.square().sum() + variances.sum()
        (grad,) = torch.autograd.grad(loss, x)
    x2 = x.detach().clone().requires_grad_(True)
    out2, inputs = _bn_inputs(net, x2)
    stats = [manual_stats(h) for h in inputs]
    expected_loss = out2.square().sum() + sum(m.square().sum() + v.sum() for m, v in stats)
    (expected,) = torch.autograd.grad(expected_loss, x2)
    assert torch.allclose(out, out2, atol=1e-5, rtol=1e-5)
    assert torch.allclose(means, torch.cat([m for m, _ in stats]), atol=1e-5, rtol=1e-4)
    assert torch.allclose(variances, torch.cat([v for _, v in stats]), atol=1e-5, rtol=1e-4)
    assert torch.allclose(grad, expected, atol=1e-4, rtol=1e-4)
    assert all("forward" not in m.__dict__ for m in net.modules())
    assert all(m.inplace for m in net.modules() if isinstance(m, (nn.SiLU, nn.ReLU)))
    recorder.remove()


def test_pairs_not_folded_where_the_fold_would_change_something() -> None:
    """Hooks on the conv or the BN, a trainable conv, a channel with a near-zero scale, bf16
    autocast or a Sequential with its own forward: those pairs run as modules (the BN fused with
    its statistics or recording them), with the same statistics as by hand."""
    torch.manual_seed(0)
    x = torch.randn(2, 3, 6, 8)

    def folded(net: Blocks, autocast: bool = False) -> list[bool]:
        recorder = BNStatsRecorder(net.layers(), root=net)
        with recorder.recording(), torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
            net(x)
        stats = [manual_stats(h.float()) for h in _bn_inputs(net, x)[1]]
        tol = 5e-2 if autocast else 1e-4
        for (m, v), (m2, v2) in zip(recorder.recorded(), stats):
            assert torch.allclose(m, m2, atol=tol, rtol=tol) and torch.allclose(v, v2, atol=tol, rtol=tol)
        result = [f is not None for f in recorder.folded]
        recorder.remove()
        return result

    assert folded(Blocks()) == [True, True, True, False]
    net = Blocks()
    handle = net.a[0].register_forward_hook(lambda m, i, o: None)
    assert folded(net) == [False, True, True, False]
    handle.remove()
    assert folded(net) == [True, True, True, False]  # hooks gone: folded again
    handle = net.b[4].register_forward_pre_hook(lambda m, i: None)
    assert folded(net) == [True, True, False, False]
    handle.remove()
    handle = nn.modules.module.register_module_forward_hook(lambda m, i, o: None)  # every module's
    assert folded(net) == [False, False, False, False]
    handle.remove()
    net = Blocks()
    net.b[0].weight.requires_grad_(True)
    assert folded(net) == [True, False, True, False]
    net = Blocks()
    with torch.no_grad():
        net.a[1].weight[2] = 1e-6  # that channel's x could not be told from y in fp32
    assert folded(net) == [False, True, True, False]
    assert folded(Blocks(), autocast=True) == [False, False, False, False]

    class OwnForward(nn.Sequential):
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return super().forward(x)
    net = Blocks()
    net.a = OwnForward(*net.a)
    assert folded(net) == [False, True, True, False]


def test_folded_pairs_follow_changes_to_the_conv_and_the_bn() -> None:
    """A change to a folded BN's statistics or to its conv's weight between recordings is in the
    next recording's output and statistics."""
    torch.manual_seed(0)
    net = Blocks()
    recorder = BNStatsRecorder(net.layers(), root=net)
    x = torch.randn(2, 3, 6, 8)

    def check() -> None:
        with recorder.recording():
            out = net(x)
        assert recorder.folded[0] is not None
        out2, inputs = _bn_inputs(net, x)
        assert torch.allclose(out, out2, atol=1e-5)
        assert torch.allclose(recorder.recorded()[0][1], manual_stats(inputs[0])[1], rtol=1e-4)

    check()
    with torch.no_grad():
        net.a[1].running_var.mul_(3.0)
    check()
    with torch.no_grad():
        net.a[0].weight.mul_(-2.0)
    check()
    recorder.remove()
