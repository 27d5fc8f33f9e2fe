"""The adversarial term of the autoencoder stage: a patch discriminator and its losses.

Reconstruction losses (L1, SSIM) pull the decoder towards the mean of what a latent could show, a
blur; a discriminator that judges local patches of real and decoded frames pushes it back towards
frames with the truth's detail. The generator's term is weighted adaptively, by the ratio of the two
terms' gradient norms at the decoder's last layer, so that ``autoencoder.adversarial_weight`` means
the same at any loss scale (VQGAN's balance, arXiv 2012.09841).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn


class PatchDiscriminator(nn.Module):
    """Frames ``[N, in_channels, H, W]`` in [-1, 1] -> logits ``[N, 1, H / 2^L, W / 2^L]``, one per patch
    (``L = len(channels)`` stride-2 levels; > 0 reads "real")."""

    def __init__(self, in_channels: int = 3, channels: tuple[int, ...] = (64, 128, 256)):
        super().__init__()
        if len(channels) < 1 or min(channels) < 1:
            raise ValueError(f"discriminator channels must be a non-empty list of positive integers, got {list(channels)}")
        layers: list[nn.Module] = [nn.Conv2d(in_channels, channels[0], 4, stride=2, padding=1), nn.LeakyReLU(0.2)]
        for c_in, c_out in zip(channels, channels[1:]):
            layers += [nn.Conv2d(c_in, c_out, 4, stride=2, padding=1), nn.GroupNorm(math.gcd(32, c_out), c_out),
                       nn.LeakyReLU(0.2)]
        layers.append(nn.Conv2d(channels[-1], 1, 3, padding=1))
        self.layers = nn.Sequential(*layers)

    def forward(self, frames: torch.Tensor) -> torch.Tensor:
        return self.layers(frames)


def discriminator_loss(real_logits: torch.Tensor, fake_logits: torch.Tensor) -> torch.Tensor:
    """Hinge loss of the discriminator: ``(mean relu(1 - real) + mean relu(1 + fake)) / 2`` (0-d)."""
    return 0.5 * (F.relu(1.0 - real_logits).mean() + F.relu(1.0 + fake_logits).mean())


def generator_loss(fake_logits: torch.Tensor) -> torch.Tensor:
    """The decoder's adversarial term: ``-mean(fake logits)`` (0-d)."""
    return -fake_logits.mean()


def adaptive_weight(reconstruction: torch.Tensor, adversarial: torch.Tensor, last_layer: torch.Tensor,
                    max_weight: float = 1e4, eps: float = 1e-4) -> torch.Tensor:
    """``|d reconstruction / d W| / (|d adversarial / d W| + eps)`` at the weight ``W = last_layer``,
    clamped to ``[0, max_weight]`` and detached (0-d): the adversarial term's gradient at the decoder's
    output then has the reconstruction's size. Both graphs are kept for the backward pass."""
    g_rec, = torch.autograd.grad(reconstruction, last_layer, retain_graph=True)
    g_adv, = torch.autograd.grad(adversarial, last_layer, retain_graph=True)
    return (g_rec.float().norm() / (g_adv.float().norm() + eps)).clamp(0.0, max_weight).detach()
