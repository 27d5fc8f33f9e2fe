"""Network copies (frozen, trainable, EMA) and the model-call closures ``(x, sigma [B, T]) -> v``
(or ``-> x0``) that :mod:`train.algorithms` and the samplers take, guided or not."""

from __future__ import annotations

import copy
from typing import Callable

import torch
from torch import nn

from train.clips import Clip
from worldmodel import flow
from worldmodel.transformer import WorldDiT

Tensor = torch.Tensor


def frozen(module: nn.Module) -> nn.Module:
    """``module`` in eval mode without gradients (teachers, score networks)."""
    return module.eval().requires_grad_(False)



def trainable_copy(module: nn.Module) -> nn.Module:
    return copy.deepcopy(module).train().requires_grad_(True)



def ema_copy(module: nn.Module) -> nn.Module:
    return frozen(copy.deepcopy(module))



def velocity_fn(dit: WorldDiT, clip: Clip, mode: str, clean: Tensor | None = None, cond_keep: Tensor | None = None,
                clean_sigma: Tensor | None = None) -> Callable:
    """``(x, sigma [B, T]) -> v`` of ``dit`` on this clip's conditioning (``clean_sigma``: the history's noise level)."""
    return lambda x, sigma: dit(x, sigma, clip.actions, clip.poses, mode=mode, clean=clean, cond_keep=cond_keep,
                                clean_sigma=clean_sigma).float()



def guided_velocity_fn(dit: WorldDiT, clip: Clip, mode: str, guidance: float, clean: Tensor | None = None,
                       clean_sigma: Tensor | None = None) -> Callable:
    """``(x, sigma [B, T]) -> v`` with classifier-free guidance on actions and camera
    (:func:`worldmodel.flow.apply_cfg`), the conditional and unconditional halves in one forward of
    twice the batch (one launch instead of two for the small networks)."""
    if guidance == 1.0:
        return velocity_fn(dit, clip, mode, clean, clean_sigma=clean_sigma)
    b = clip.actions.shape[0]
    twice = lambda t: None if t is None else torch.cat([t, t])  # noqa: E731
    keep = torch.arange(2 * b, device=clip.actions.device) < b
    actions, poses, clean2, clean_sigma2 = twice(clip.actions), twice(clip.poses), twice(clean), twice(clean_sigma)

    def guided(x, sigma):
        v = dit(twice(x), twice(sigma), actions, poses, mode=mode, clean=clean2, cond_keep=keep,
                clean_sigma=clean_sigma2).float()
        return flow.apply_cfg(*v.chunk(2), guidance)

    return guided



x0_fn = flow.x0_denoiser
"""``(x, sigma) -> x0`` from a velocity closure."""



def latent_shape(dit: WorldDiT, batch: int, frames: int) -> tuple[int, ...]:
    cfg = dit.cfg
    return (batch, frames, cfg.latent_channels, cfg.latent_height, cfg.latent_width)
