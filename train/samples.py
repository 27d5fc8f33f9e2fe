"""Sample videos: a clip generated block by block with the KV cache (:mod:`worldmodel.rollout`)
from its real first frame, beside the real clip."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Sequence

import torch
from torch import nn

from train.clips import Clip
from worldmodel import flow
from worldmodel.frames import to_uint8
from worldmodel.rollout import CachedRollout
from worldmodel.transformer import WorldDiT

Tensor = torch.Tensor


@dataclass(frozen=True)
class BlockSampler:
    """A ``sample_block`` for :func:`generate_ar`: noise from ``generator``, then ``flow.SAMPLERS[solver]``
    through ``sigmas`` (ending at 0), in a rollout guided with ``guidance``."""

    solver: str
    sigmas: tuple[float, ...]
    generator: torch.Generator
    guidance: float = 1.0

    def __call__(self, velocity: Callable, b: int, shape: tuple[int, ...]) -> Tensor:
        noise = torch.randn(shape, generator=self.generator, device=self.generator.device)
        return flow.SAMPLERS[self.solver](velocity, noise, self.sigmas, generator=self.generator)



@torch.no_grad()
def generate_ar(dit: WorldDiT, clip: Clip, first: Tensor, sample_block: BlockSampler, dtype=torch.float32) -> Tensor:
    """Latents ``[B, T, C, h, w]``: the given first frame ``first [B, 1, C, h, w]``, then each block
    sampled by ``sample_block`` against the KV cache (:meth:`CachedRollout.generate`)."""
    return CachedRollout(dit, clip, dtype, sample_block.guidance).generate(first, sample_block)



def ar_sample_video(autoencoder: nn.Module, dit: WorldDiT, clip: Clip, real_latents: Tensor, sample_block: BlockSampler,
                    dtype=torch.float32) -> Tensor:
    """Video: the real clip | ``dit`` generating it block by block from its real first frame, with
    the same actions and camera. ``real_latents [1, T, C, h, w]``."""
    latents = generate_ar(dit, clip, real_latents[:, :1], sample_block, dtype)
    return side_by_side(autoencoder.decode(real_latents), autoencoder.decode(latents))



def euler_block_sampler(sigmas: Sequence[float], guidance: float, generator: torch.Generator) -> BlockSampler:
    """A ``sample_block`` for :func:`generate_ar`: many-step guided Euler through ``sigmas`` (ending at 0; teachers)."""
    return BlockSampler("euler", tuple(sigmas), generator, float(guidance))



def few_step_block_sampler(sigmas: Sequence[float], generator: torch.Generator) -> BlockSampler:
    """A ``sample_block`` for :func:`generate_ar`: the student's few-step sampler at ``sigmas`` (as in play)."""
    return BlockSampler("renoise", (*sigmas, 0.0), generator)



def side_by_side(*frames: Tensor) -> Tensor:
    """Video uint8 ``[T, H, W * n, 3]``: the first clip of each ``frames [B, T, 3, H, W]``, left to right."""
    return torch.cat([to_uint8(f[0].float()) for f in frames], dim=2).cpu()
