"""Batches as the networks take them: a :class:`Clip` on the device (normalised actions, poses,
frames or cached latents), and its latents or frames."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from worldmodel.actions import ActionSpec, normalize_actions
from worldmodel.frames import to_model

Tensor = torch.Tensor


@dataclass
class Clip:
    """A batch on the device, as the networks take it: ``actions [B, T, A]`` normalised,
    ``poses [B, T, 4, 4]``, ``frames [B, T, 3, H, W]`` in [-1, 1] when the batch has frames, and
    ``latents [B, T, C, h, w]`` when it comes from the latent cache (:mod:`train.latents`)."""

    actions: Tensor
    poses: Tensor
    frames: Tensor | None = None
    latents: Tensor | None = None



def to_clip(batch: dict, action_spec: ActionSpec, device) -> Clip:
    """A data batch (uint8 frames or cached latents, raw actions) on ``device``."""
    actions = normalize_actions(batch["actions"].to(device, non_blocking=True).float(), action_spec)
    frames = to_model(batch["frames"].to(device, non_blocking=True)) if "frames" in batch else None
    latents = batch["latents"].to(device, non_blocking=True).float() if "latents" in batch else None
    return Clip(actions, batch["poses"].to(device, non_blocking=True).float(), frames, latents)



def first_clip(batch: dict, action_spec: ActionSpec, device) -> Clip:
    """The first clip of a batch, on the device (for sample videos)."""
    return to_clip({k: v[:1] for k, v in batch.items()}, action_spec, device)



@torch.no_grad()
def encode(autoencoder: nn.Module, frames: Tensor) -> Tensor:
    """Latents ``[B, T, C, h, w]`` in float32 (the autoencoder may run under autocast)."""
    return autoencoder.encode(frames).float()



def clip_latents(autoencoder: nn.Module, clip: Clip) -> Tensor:
    """The clip's latents ``[B, T, C, h, w]`` float32: cached, or encoded from its frames now."""
    return clip.latents if clip.latents is not None else encode(autoencoder, clip.frames)



def real_frames(autoencoder: nn.Module, clip: Clip) -> Tensor:
    """The clip's frames ``[B, T, 3, H, W]``: as loaded, or decoded from its cached latents."""
    return clip.frames if clip.frames is not None else autoencoder.decode(clip.latents)
