"""Rectified flow: parameterisation, timestep shift and samplers, as plain tensor functions.

x_s = (1 - s) x0 + s eps with s in [0, 1] (the network sees t = 1000 s); the network predicts the
velocity v = eps - x0. Samplers take the model as a function, k-diffusion style.
Shapes: x [B, T, C, h, w]; sigma [B, T] (one noise level per frame) or a float.
"""

from __future__ import annotations

from typing import Callable, Sequence

import torch


def _per_frame(sigma, like: torch.Tensor) -> torch.Tensor:
    """Broadcast ``sigma`` (float, [B] or [B, T]) against ``like [B, T, ...]``."""
    if isinstance(sigma, (int, float)):
        return float(sigma)  # a Python number: no host-to-device copy (CUDA-graph safe)
    s = torch.as_tensor(sigma, dtype=like.dtype, device=like.device)
    while s.ndim < like.ndim:
        s = s.unsqueeze(-1)
    return s


def add_noise(x0: torch.Tensor, eps: torch.Tensor, sigma) -> torch.Tensor:
    """x_s = (1 - s) x0 + s eps."""
    s = _per_frame(sigma, x0)
    return (1 - s) * x0 + s * eps


def velocity_target(x0: torch.Tensor, eps: torch.Tensor) -> torch.Tensor:
    """v = eps - x0."""
    return eps - x0


def x0_from_v(x_t: torch.Tensor, v: torch.Tensor, sigma) -> torch.Tensor:
    return x_t - _per_frame(sigma, x_t) * v


def shift_sigma(sigma, shift: float):
    """Timestep shift s' = k s / (1 + (k - 1) s); k > 1 spends more steps at high noise."""
    return shift * sigma / (1 + (shift - 1) * sigma)


def sigma_grid(num_steps: int, shift: float = 1.0) -> torch.Tensor:
    """``num_steps + 1`` decreasing noise levels from 1 to 0, shifted."""
    return shift_sigma(torch.linspace(1.0, 0.0, num_steps + 1, dtype=torch.float64), shift).float()


def step_list(num_steps: int, default: Sequence[float] | None = None, shift: float = 1.0) -> list[float]:
    """The ``num_steps`` noise levels of a few-step sampler: ``sigma_grid(num_steps, shift)`` without its final 0.

    With ``default`` (a sampler's own list, e.g. ``model.DEFAULT_SAMPLER["steps"]``): ``default`` itself when
    it has ``num_steps`` levels; otherwise the grid whose shift maps the unshifted second level of a
    ``len(default)``-step grid onto ``default[1]`` (``shift`` is then ignored).
    """
    if num_steps < 1:
        raise ValueError(f"steps per frame must be at least 1, got {num_steps}")
    if default is not None:
        if num_steps == len(default):
            return [float(v) for v in default]
        shift = 1.0
        if len(default) >= 2:
            u, s = 1.0 - 1.0 / len(default), default[1]  # unshifted and shifted second level
            shift = s * (1.0 - u) / (u * (1.0 - s))
    return [float(v) for v in sigma_grid(num_steps, shift)[:-1]]


def cfg_velocity(velocity_fn: Callable, x: torch.Tensor, sigma, guidance: float) -> torch.Tensor:
    """Classifier-free guidance: v_u + w (v_c - v_u); ``velocity_fn(x, sigma, cond: bool)``."""
    v_cond = velocity_fn(x, sigma, True)
    if guidance == 1.0:
        return v_cond
    v_uncond = velocity_fn(x, sigma, False)
    return v_uncond + guidance * (v_cond - v_uncond)


def euler_sample(
    velocity_fn: Callable, x: torch.Tensor, sigmas: Sequence[float], guidance: float = 1.0
) -> torch.Tensor:
    """Integrate the PF-ODE from ``sigmas[0]`` to ``sigmas[-1]`` with Euler steps (teacher sampler).

    ``velocity_fn(x, sigma: float, cond: bool) -> v``; returns x at ``sigmas[-1]``.
    """
    for s, s_next in zip(sigmas[:-1], sigmas[1:]):
        v = cfg_velocity(velocity_fn, x, float(s), guidance)
        x = x + (float(s_next) - float(s)) * v
    return x


def few_step_sample(
    x0_fn: Callable, noise: torch.Tensor, sigmas: Sequence[float], generator: torch.Generator | None = None,
    renoise: torch.Tensor | None = None,
) -> torch.Tensor:
    """Few-step student sampler: predict x0, re-noise with fresh noise to the next sigma.

    ``x0_fn(x, sigma: float) -> x0``; ``sigmas`` e.g. (1.0, 0.5); ``noise`` is x at ``sigmas[0]``
    (pure Gaussian noise when it is 1). The fresh noise is drawn from ``generator``, or taken from
    ``renoise [len(sigmas) - 1, *noise.shape]`` (drawn in advance, e.g. outside a CUDA graph).
    Returns the last x0 prediction.
    """
    x, x0 = noise, noise
    for i, s in enumerate(sigmas):
        x0 = x0_fn(x, float(s))
        if i + 1 < len(sigmas):
            eps = renoise[i] if renoise is not None else torch.randn(x0.shape, generator=generator, device=x0.device, dtype=x0.dtype)
            x = add_noise(x0, eps, float(sigmas[i + 1]))
    return x0
