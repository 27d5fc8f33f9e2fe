"""Rectified flow: parameterisation, timestep shift and samplers, as plain tensor functions.

x_s = (1 - s) x0 + s eps with s in [0, 1] (the network sees t = 1000 s); the network predicts the
velocity v = eps - x0. Samplers, k-diffusion style: ``sample_x(model, x, sigmas, *, generator=None,
callback=None, noise=None)`` with a velocity ``model(x, sigma [B, T]) -> v`` (:func:`x0_denoiser`
converts), from ``x`` at ``sigmas[0]`` to the state at ``sigmas[-1]`` (the sample when they end at 0);
``callback({"i", "sigma", "x", "v"})`` sees each state before its step; fresh noise comes from
``noise`` (drawn in advance, e.g. outside a CUDA graph) or ``generator``. Their arithmetic uses the
float sigmas (no host-to-device copies). Shapes: x [B, T, C, h, w]; sigma [B, T] or a float.
"""

from __future__ import annotations

from typing import Callable, Sequence

import torch


def per_frame(sigma, like: torch.Tensor) -> torch.Tensor:
    """Broadcast ``sigma`` (float, [B] or [B, T]) against ``like [B, T, ...]``."""
    if isinstance(sigma, (int, float)):
        return float(sigma)  # a Python number: no host-to-device copy (CUDA-graph safe)
    s = torch.as_tensor(sigma, dtype=like.dtype, device=like.device)
    while s.ndim < like.ndim:
        s = s.unsqueeze(-1)
    return s


def add_noise(x0: torch.Tensor, eps: torch.Tensor, sigma) -> torch.Tensor:
    """x_s = (1 - s) x0 + s eps."""
    s = per_frame(sigma, x0)
    return (1 - s) * x0 + s * eps


def velocity_target(x0: torch.Tensor, eps: torch.Tensor) -> torch.Tensor:
    """v = eps - x0."""
    return eps - x0


def x0_from_v(x_t: torch.Tensor, v: torch.Tensor, sigma) -> torch.Tensor:
    return x_t - per_frame(sigma, x_t) * v


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


def frame_sigmas(sigma, x: torch.Tensor) -> torch.Tensor:
    """``sigma`` (a float: every frame at that level, or ``[B, T]``) as ``[B, T]`` for ``x [B, T, ...]``
    (a float in the dtype of ``x``)."""
    if isinstance(sigma, (int, float)):
        return x.new_full(x.shape[:2], float(sigma))
    return sigma


def apply_cfg(v_cond: torch.Tensor, v_uncond: torch.Tensor, guidance: float) -> torch.Tensor:
    """Classifier-free guidance ``v_u + w (v_c - v_u)`` of two predictions (velocities or x0s)."""
    return v_uncond + guidance * (v_cond - v_uncond)


def x0_denoiser(velocity_fn: Callable) -> Callable:
    """The one conversion between model conventions: a velocity model ``(x, sigma) -> v`` as an x0
    model ``(x, sigma) -> x0 = x - s v`` (``sigma`` a float or ``[B, T]``)."""
    return lambda x, sigma: x0_from_v(x, velocity_fn(x, sigma), sigma)


def euler_step(x: torch.Tensor, v: torch.Tensor, sigma, sigma_next) -> torch.Tensor:
    """One Euler step of the PF-ODE ``dx/ds = v`` from ``sigma`` to ``sigma_next`` (floats or ``[B, T]``)."""
    return x + per_frame(sigma_next - sigma, x) * v


def _sample(velocity: Callable, x: torch.Tensor, sigmas: Sequence[float], step: Callable, callback=None) -> torch.Tensor:
    """The samplers' one loop: ``x = step(x, velocity(x, s), s, s_next)`` from each level to the next."""
    sigmas = [float(s) for s in sigmas]
    for i, (s, s_next) in enumerate(zip(sigmas[:-1], sigmas[1:])):
        v = velocity(x, s)
        if callback is not None:
            callback({"i": i, "sigma": s, "x": x, "v": v})
        x = step(x, v, s, s_next)
    return x


def sample_euler(model: Callable, x: torch.Tensor, sigmas: Sequence[float], *, generator=None, callback=None,
                 noise=None) -> torch.Tensor:
    """Euler steps of the PF-ODE through ``sigmas`` (teachers; deterministic)."""
    return _sample(lambda x, s: model(x, frame_sigmas(s, x)), x, sigmas, euler_step, callback)


def sample_renoise(model: Callable, x: torch.Tensor, sigmas: Sequence[float], *, generator=None, callback=None,
                   noise=None) -> torch.Tensor:
    """Few-step student sampler: predict x0 at each level, re-noise it with fresh noise to the next
    (the next of ``noise``, else drawn from ``generator``); to a final 0 the step is x0 itself."""
    draws = None if noise is None else iter(noise)

    def renoise(x, v, s, s_next):
        x0 = x0_from_v(x, v, s)
        if s_next == 0.0:
            return x0
        eps = next(draws) if draws is not None else torch.randn(x0.shape, generator=generator, device=x0.device, dtype=x0.dtype)
        return add_noise(x0, eps, s_next)

    return _sample(lambda x, s: model(x, frame_sigmas(s, x)), x, sigmas, renoise, callback)


SAMPLERS = {"renoise": sample_renoise, "euler": sample_euler}
"""``sampler.solver`` -> sampler: "renoise" (students) or "euler" (teachers)."""
