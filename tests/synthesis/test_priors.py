"""Image priors and the BN feature-distribution loss against formulas written out by hand."""

from __future__ import annotations

import math

import pytest
import torch

from diode.synthesis.priors import bn_loss, image_l2, total_variation


def random_stats(channels: list[int], seed: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    g = torch.Generator().manual_seed(seed)
    return [(torch.randn(c, generator=g), torch.rand(c, generator=g) + 0.1) for c in channels]


def norm(v: torch.Tensor, p: float) -> float:
    """||v||_p = (sum |v_i|^p)^(1/p), not raised to p."""
    return sum(abs(float(x)) ** p for x in v) ** (1.0 / p)


@pytest.mark.parametrize("p", [2.0, 1.0])
def test_bn_loss_formula(p: float) -> None:
    channels = [3, 5, 2]
    recorded, running = random_stats(channels, 0), random_stats(channels, 1)
    layer_weights, mw, vw = [0.5, 2.0, 1.5], 0.7, 1.3
    # sum_l w_l * (mw * ||mu_l - rm_l||_p + vw * ||var_l - rv_l||_p)
    expected = sum(w * (mw * norm(mu - rm, p) + vw * norm(var - rv, p))
                   for w, (mu, var), (rm, rv) in zip(layer_weights, recorded, running))
    got = bn_loss(recorded, running, p=p, mean_weight=mw, var_weight=vw, layer_weights=layer_weights)
    assert got.shape == ()
    assert float(got) == pytest.approx(expected, rel=1e-5)
    # Default weights are all 1.
    expected_plain = sum(norm(mu - rm, p) + norm(var - rv, p) for (mu, var), (rm, rv) in zip(recorded, running))
    assert float(bn_loss(recorded, running, p=p)) == pytest.approx(expected_plain, rel=1e-5)


def test_bn_loss_hand_values() -> None:
    # One layer: mu - rm = (3, 4) -> L2 5, L1 7; var - rv = (0, -2) -> L2 2, L1 2.
    recorded = [(torch.tensor([3.0, 4.0]), torch.tensor([1.0, 1.0]))]
    running = [(torch.tensor([0.0, 0.0]), torch.tensor([1.0, 3.0]))]
    assert float(bn_loss(recorded, running, p=2)) == pytest.approx(5 + 2)
    assert float(bn_loss(recorded, running, p=1)) == pytest.approx(7 + 2)
    assert float(bn_loss(recorded, running, p=2, mean_weight=0.0)) == pytest.approx(2)
    assert float(bn_loss(recorded, running, p=2, var_weight=0.0, layer_weights=[3.0])) == pytest.approx(15)


@pytest.mark.parametrize("p", [2.0, 1.0])
def test_bn_loss_normalized_formula_and_scale_free(p: float) -> None:
    channels = [3, 5, 2]
    recorded, running = random_stats(channels, 3), random_stats(channels, 4)
    eps = 1e-5
    # sum_l ||mu - rm||_p / sqrt(s_l) + ||var - rv||_p / s_l, s_l = mean_c(rv) + eps
    expected = sum(norm(mu - rm, p) / math.sqrt(float(rv.mean()) + eps) + norm(var - rv, p) / (float(rv.mean()) + eps)
                   for (mu, var), (rm, rv) in zip(recorded, running))
    got = bn_loss(recorded, running, p=p, normalize=True)
    assert float(got) == pytest.approx(expected, rel=1e-5)
    # Scaling a layer's activations by k (mean by k, variance by k^2, on both sides) changes the
    # raw term by about k^2 but not the normalised one (up to eps).
    k = 30.0
    scaled = lambda stats: [(m * k, v * k * k) for m, v in stats]  # noqa: E731
    assert float(bn_loss(scaled(recorded), scaled(running), p=p, normalize=True)) == pytest.approx(expected, rel=1e-3)
    assert float(bn_loss(scaled(recorded), scaled(running), p=p)) > 100 * float(bn_loss(recorded, running, p=p))
    # A dead channel (running variance ~0) does not blow the term up.
    dead = [(torch.tensor([0.1, 1.0]), torch.tensor([0.4, 1.0]))]
    dead_running = [(torch.tensor([0.0, 1.0]), torch.tensor([1e-45, 1.0]))]
    assert float(bn_loss(dead, dead_running, p=p, normalize=True)) < 10


def test_bn_loss_zero_when_stats_match_and_differentiable() -> None:
    running = random_stats([4, 6], 2)
    recorded = [(m.clone(), v.clone()) for m, v in running]
    assert float(bn_loss(recorded, running)) == 0.0
    mu = torch.tensor([1.0, 2.0], requires_grad=True)
    loss = bn_loss([(mu, torch.ones(2))], [(torch.zeros(2), torch.ones(2))])
    loss.backward()
    assert torch.allclose(mu.grad, mu.detach() / mu.detach().norm())  # d||mu||_2 / d mu = mu / ||mu||


def test_total_variation_constant_image_is_zero() -> None:
    tv_l1, tv_l2 = total_variation(torch.full((2, 3, 5, 7), 0.37))
    assert float(tv_l1) == 0.0 and float(tv_l2) == 0.0


def test_total_variation_hand_made_2x2() -> None:
    # image [[a, b], [c, d]] = [[1, 2], [4, 8]]; the 4 neighbour directions:
    #   horizontal a-b = -1, c-d = -4   -> mean |.| = 2.5, L2 = sqrt(1 + 16) = sqrt(17)
    #   vertical   a-c = -3, b-d = -6   -> mean |.| = 4.5, L2 = sqrt(9 + 36) = sqrt(45)
    #   anti-diag  c-b = 2              -> mean |.| = 2,   L2 = 2
    #   diagonal   a-d = -7             -> mean |.| = 7,   L2 = 7
    # tv_l1 = 2.5 + 4.5 + 2 + 7 = 16; tv_l2 = sqrt(17) + sqrt(45) + 2 + 7.
    image = torch.tensor([[[[1.0, 2.0], [4.0, 8.0]]]])
    tv_l1, tv_l2 = total_variation(image)
    assert float(tv_l1) == pytest.approx(16.0)
    assert float(tv_l2) == pytest.approx(math.sqrt(17) + math.sqrt(45) + 9)
    # Batch of [image, 2 * image]: tv_l1 is a mean over the batch (1.5x), tv_l2 the mean of
    # per-image norms (1.5x as well).
    batch = torch.cat([image, 2 * image])
    tv_l1, tv_l2 = total_variation(batch)
    assert float(tv_l1) == pytest.approx(1.5 * 16.0)
    assert float(tv_l2) == pytest.approx(1.5 * (math.sqrt(17) + math.sqrt(45) + 9))
    # Two identical channels: the L1 mean is unchanged, each per-image L2 norm grows by sqrt(2).
    two = image.expand(1, 2, 2, 2)
    tv_l1, tv_l2 = total_variation(two)
    assert float(tv_l1) == pytest.approx(16.0)
    assert float(tv_l2) == pytest.approx(math.sqrt(2) * (math.sqrt(17) + math.sqrt(45)) + math.sqrt(2) * 9)


def test_total_variation_single_step_edge() -> None:
    # 3 x 3 image, left column 0, others 1: differences only cross the column-0/1 border.
    # horizontal: 3 of 6 pairs differ by 1 -> 0.5; vertical: 0; each diagonal: 2 of 4 pairs -> 0.5.
    image = torch.ones(1, 1, 3, 3)
    image[..., 0] = 0
    tv_l1, tv_l2 = total_variation(image)
    assert float(tv_l1) == pytest.approx(0.5 + 0 + 0.5 + 0.5)
    assert float(tv_l2) == pytest.approx(math.sqrt(3) + 0 + math.sqrt(2) + math.sqrt(2))


def test_image_l2() -> None:
    # Mean over the batch of each image's L2 norm: ones [3, 2, 2] has norm sqrt(12).
    images = torch.ones(2, 3, 2, 2) * torch.tensor([1.0, 2.0])[:, None, None, None]
    assert float(image_l2(images)) == pytest.approx(1.5 * math.sqrt(12))
    assert float(image_l2(torch.zeros(2, 3, 4, 4))) == 0.0


def test_tv_l1_gradient_written_out_matches_autograd() -> None:
    from diode.synthesis.priors import tv_l1

    x = torch.rand(2, 3, 6, 7, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(tv_l1, (x,))
    reference = sum((d.abs().mean() for d in (x[..., :, :-1] - x[..., :, 1:], x[..., :-1, :] - x[..., 1:, :],
                                              x[..., 1:, :-1] - x[..., :-1, 1:], x[..., :-1, :-1] - x[..., 1:, 1:])))
    assert tv_l1(x).item() == pytest.approx(reference.item(), rel=1e-12)


def test_tv_l1_backward_twice_through_a_retained_graph() -> None:
    """Backward scales the gradient buffer in place; a second backward through the same graph
    (retain_graph) rebuilds it and gives the same gradient, scaled by its own upstream gradient."""
    from diode.synthesis.priors import tv_l1

    x = torch.rand(2, 3, 6, 7, dtype=torch.float64, requires_grad=True)
    loss = tv_l1(x)
    (first,) = torch.autograd.grad(3.0 * loss, x, retain_graph=True)
    (second,) = torch.autograd.grad(-2.0 * loss, x)
    assert first.abs().sum() > 0
    assert torch.allclose(second, first * (-2.0 / 3.0))


def test_tv_l1_of_an_image_one_pixel_high_counts_only_its_row() -> None:
    from diode.synthesis.priors import tv_l1

    x = torch.tensor([[[[0.0, 1.0, 3.0]]]], dtype=torch.float64, requires_grad=True)
    loss = tv_l1(x)  # only the two right-neighbour differences exist: mean(1, 2)
    assert loss.item() == pytest.approx(1.5)
    loss.backward()
    assert x.grad.tolist() == [[[[-0.5, 0.0, 0.5]]]]
    assert torch.autograd.gradcheck(tv_l1, (torch.rand(2, 3, 5, 1, dtype=torch.float64, requires_grad=True),))


def test_tv_l1_of_bf16_images_sums_in_fp32_and_returns_a_bf16_gradient() -> None:
    from diode.synthesis.priors import tv_l1

    x = torch.rand(2, 3, 16, 16)
    xb = x.to(torch.bfloat16).requires_grad_(True)
    loss = tv_l1(xb)
    assert loss.dtype == torch.float32
    # Differences rounded to bf16, sums kept in fp32 (a bf16 sum of ~1,500 terms is off by ~1e-2).
    assert loss.item() == pytest.approx(tv_l1(xb.detach().float()).item(), rel=1e-4)
    loss.backward()
    assert xb.grad.dtype == torch.bfloat16

