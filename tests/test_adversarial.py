"""The autoencoder's adversarial term: patch logits' shapes, the hinge losses and the adaptive balance
against hand computations in float64."""

from __future__ import annotations

import pytest
import torch

from train.adversarial import PatchDiscriminator, adaptive_weight, discriminator_loss, generator_loss


@pytest.mark.parametrize("size, channels", [((32, 32), (8, 16, 16)), ((120, 160), (8, 16, 16)), ((64, 48), (4, 8))])
def test_patch_logits_have_one_value_per_patch(size, channels):
    frames = torch.rand(3, 3, *size) * 2 - 1
    logits = PatchDiscriminator(3, channels)(frames)
    scale = 2 ** len(channels)
    assert logits.shape == (3, 1, size[0] // scale, size[1] // scale)


def test_hinge_losses_match_a_hand_computation():
    real = torch.tensor([2.0, -0.5, 0.25], dtype=torch.float64)
    fake = torch.tensor([0.3, -2.0], dtype=torch.float64)
    expected = 0.5 * ((0.0 + 1.5 + 0.75) / 3 + (1.3 + 0.0) / 2)
    assert discriminator_loss(real, fake).item() == pytest.approx(expected, abs=1e-15)
    assert generator_loss(fake).item() == pytest.approx(0.85, abs=1e-15)


def test_adaptive_weight_is_the_ratio_of_gradient_norms_at_the_weight():
    """For y = W x: d sum(y^2) / dW = 2 y x^T and d sum(a * y) / dW = a x^T."""
    torch.manual_seed(0)
    w = torch.randn(4, 5, dtype=torch.float64, requires_grad=True)
    x, a = torch.randn(5, 1, dtype=torch.float64), torch.randn(4, 1, dtype=torch.float64)
    y = w @ x
    reconstruction, adversarial = y.pow(2).sum(), (a * y).sum()
    expected = (2 * y.detach() @ x.T).norm() / ((a @ x.T).norm() + 1e-4)
    weight = adaptive_weight(reconstruction, adversarial, w)
    assert weight.item() == pytest.approx(expected.item(), rel=1e-6)  # the norms are taken in float32
    assert not weight.requires_grad
    (reconstruction + weight * adversarial).backward()  # both graphs were kept
    assert adaptive_weight((w ** 2).sum(), (w * 0).sum(), w, max_weight=7.0).item() == 7.0  # no adversarial gradient: the cap
