"""The training algorithms of every stage, as small pure functions over tensors.

Networks come in as plain functions that close over their conditioning (actions, poses, clean
history), in the style of :mod:`worldmodel.flow`:

- ``velocity_fn(x [B, T, C, h, w], sigma [B, T]) -> v`` (v = eps - x0; guidance already applied),
- ``x0_fn(x, sigma) -> x0``.

Noise levels are per frame, ``sigma [B, T]``, and equal within a block: ``blocks [T]`` gives the
block index of each frame (consecutive from 0, as :func:`worldmodel.transformer.block_ids`
makes them; all zeros gives one level per clip). Randomness enters only as tensors or explicit
``torch.Generator`` objects, never through the global RNG, so a caller can make every decision
reproducible (resume) and identical across ranks (distributed training).
"""

from __future__ import annotations

from typing import Callable, Sequence

import torch
import torch.nn.functional as F
from einops import repeat

from worldmodel import flow

Tensor = torch.Tensor
SIGMA_DISTRIBUTIONS = ("logit_normal", "uniform")


class AlgorithmError(ValueError):
    """Arguments an algorithm cannot work with."""


def _per_frame(sigma: Tensor, like: Tensor) -> Tensor:
    """``sigma [B, T]`` -> ``[B, T, 1, 1, 1]`` in the dtype of ``like``."""
    return sigma.to(like.dtype).reshape(*sigma.shape, *([1] * (like.ndim - sigma.ndim)))


def _num_blocks(blocks: Tensor) -> int:
    """Number of blocks of ``blocks [T]``, which must count up from 0 in steps of at most one."""
    steps = blocks[1:] - blocks[:-1]
    if blocks.ndim != 1 or len(blocks) == 0 or int(blocks[0]) != 0 or bool(((steps < 0) | (steps > 1)).any()):
        raise AlgorithmError(f"block ids must be [T] counting up from 0 by 0 or 1, got {blocks.tolist()}")
    return int(blocks[-1]) + 1


def _expand_blocks(per_block: Tensor, blocks: Tensor) -> Tensor:
    """``[B, num_blocks]`` -> ``[B, T]``: each frame gets its block's value."""
    return per_block[:, blocks.to(per_block.device)]


def mse(pred: Tensor, target: Tensor) -> Tensor:
    """Mean squared error in float32 (bf16 predictions are upcast)."""
    return F.mse_loss(pred.float(), target.float())


# ----------------------------------------------------------------------------- flow matching


def sample_sigmas(
    batch: int,
    blocks: Tensor,
    generator: torch.Generator,
    *,
    distribution: str = "logit_normal",
    loc: float = 0.0,
    scale: float = 1.0,
    low: float = 0.0,
    high: float = 1.0,
    shift: float = 1.0,
) -> Tensor:
    """Training noise levels ``[B, T]``, one per block, drawn on the generator's device.

    ``u`` is drawn per block from ``logit_normal`` (``sigmoid(N(loc, scale^2))``, SD3's choice:
    most samples at mid noise) or ``uniform`` on ``[low, high]``; then the timestep shift
    ``s = k u / (1 + (k - 1) u)`` with ``k = shift`` moves mass to higher noise, matching the
    shifted sampling grid.
    """
    n = _num_blocks(blocks)
    device = generator.device
    if distribution == "logit_normal":
        u = torch.sigmoid(loc + scale * torch.randn(batch, n, generator=generator, device=device))
    elif distribution == "uniform":
        if not 0.0 <= low <= high <= 1.0:
            raise AlgorithmError(f"uniform sigma range needs 0 <= low <= high <= 1, got [{low}, {high}]")
        u = low + (high - low) * torch.rand(batch, n, generator=generator, device=device)
    else:
        raise AlgorithmError(f"unknown sigma distribution {distribution!r}; choose one of {list(SIGMA_DISTRIBUTIONS)}")
    return _expand_blocks(flow.shift_sigma(u, shift), blocks)


def keep_conditions(batch: int, drop_prob: float, generator: torch.Generator) -> Tensor:
    """Condition dropout for classifier-free guidance: bool ``[B]``, False with probability ``drop_prob``."""
    if not 0.0 <= drop_prob <= 1.0:
        raise AlgorithmError(f"condition drop probability must be in [0, 1], got {drop_prob}")
    return torch.rand(batch, generator=generator, device=generator.device) >= drop_prob


def flow_matching_loss(velocity_fn: Callable, x0: Tensor, eps: Tensor, sigma: Tensor) -> Tensor:
    """MSE between ``velocity_fn(x_s, sigma)`` and the target ``eps - x0``, with ``x_s = (1 - s) x0 + s eps``.

    ``x0, eps [B, T, C, h, w]``, ``sigma [B, T]``. Condition dropout is the caller's closure
    (``keep_conditions`` decides which samples lose their actions and poses).
    """
    return mse(velocity_fn(flow.add_noise(x0, eps, sigma), sigma), flow.velocity_target(x0, eps))


def critic_loss(critic_velocity_fn: Callable, x0_generated: Tensor, eps: Tensor, sigma: Tensor) -> Tensor:
    """Flow-matching loss of the fake-score critic on detached generator samples ``x0_generated``.

    The critic learns the score of the generator's current distribution; no gradient reaches the generator.
    """
    return flow_matching_loss(critic_velocity_fn, x0_generated.detach(), eps, sigma)


# ----------------------------------------------------------------------------- causal CD (stage 3a)


def distillation_grid(num_steps: int, shift: float, include: Sequence[float] = ()) -> Tensor:
    """Teacher grid ``[N + 1]`` from 1 to 0 (:func:`worldmodel.flow.sigma_grid`), with the student's
    few-step sigmas ``include`` merged in, so that the student's sampling points are grid points."""
    if num_steps < 1:
        raise AlgorithmError(f"a distillation grid needs at least one step, got {num_steps}")
    extra = [float(s) for s in include]
    if any(not 0.0 < s <= 1.0 for s in extra):
        raise AlgorithmError(f"student sigmas must lie in (0, 1], got {extra}")
    grid = torch.cat([flow.sigma_grid(num_steps, shift), torch.tensor(extra, dtype=torch.float32)])
    grid = torch.sort(grid, descending=True).values
    keep = torch.ones_like(grid, dtype=torch.bool)
    keep[1:] = (grid[:-1] - grid[1:]) > 1e-6
    return grid[keep]


def sample_grid_pairs(grid: Tensor, batch: int, blocks: Tensor, generator: torch.Generator) -> tuple[Tensor, Tensor]:
    """Adjacent grid points per block: ``sigma = grid[i]`` and ``sigma_next = grid[i + 1]``, ``[B, T]`` each,
    with ``i`` uniform over the ``len(grid) - 1`` intervals."""
    i = torch.randint(0, len(grid) - 1, (batch, _num_blocks(blocks)), generator=generator, device=generator.device)
    grid = grid.to(generator.device)
    return _expand_blocks(grid[i], blocks), _expand_blocks(grid[i + 1], blocks)


def euler_step(x: Tensor, v: Tensor, sigma: Tensor, sigma_next: Tensor) -> Tensor:
    """One Euler step of the PF-ODE dx/ds = v from ``sigma`` to ``sigma_next`` (``[B, T]`` each)."""
    return x + _per_frame(sigma_next - sigma, x) * v


@torch.no_grad()
def consistency_target(
    teacher_velocity_fn: Callable, target_x0_fn: Callable, x_t: Tensor, sigma: Tensor, sigma_next: Tensor
) -> Tensor:
    """Causal CD target: one (guided) teacher Euler step ``sigma -> sigma_next``, then the target
    network's x0 at the new point: ``stopgrad(target_x0(x_t + (s' - s) v, s'))``."""
    x_next = euler_step(x_t, teacher_velocity_fn(x_t, sigma), sigma, sigma_next)
    return target_x0_fn(x_next, sigma_next).detach()


def causal_cd_loss(
    student_x0_fn: Callable,
    teacher_velocity_fn: Callable,
    target_x0_fn: Callable,
    x0: Tensor,
    eps: Tensor,
    sigma: Tensor,
    sigma_next: Tensor,
) -> Tensor:
    """Causal consistency distillation (Causal Forcing++): ``x_t`` built from real latents ``x0`` at
    ``sigma``; MSE between the student's x0 at ``(x_t, sigma)`` and :func:`consistency_target`.

    All three functions are teacher-forced on the same clean history by the caller; at
    ``sigma_next = 0`` the target is the teacher's Euler endpoint itself (x0_from_v(x, v, 0) = x).
    """
    x_t = flow.add_noise(x0, eps, sigma)
    target = consistency_target(teacher_velocity_fn, target_x0_fn, x_t, sigma, sigma_next)
    return mse(student_x0_fn(x_t, sigma), target)


# ----------------------------------------------------------------------------- causal ODE (stage 3b)


@torch.no_grad()
def ode_trajectory(
    velocity_fn: Callable, noise: Tensor, sigmas: Tensor, keep: Sequence[float]
) -> tuple[Tensor, Tensor]:
    """Euler-integrate the PF-ODE from ``noise`` at ``sigmas[0]`` down to ``sigmas[-1] = 0``.

    ``sigmas [N + 1]`` decreasing; ``velocity_fn(x, sigma [B, T])``. Returns the states at the
    ``keep`` sigmas (each must be on the grid), ``[K, B, T, C, h, w]``, and the endpoint ``[B, T, C, h, w]``.
    """
    sigmas = sigmas.double().cpu()
    if float(sigmas[-1]) != 0.0 or not bool((sigmas[:-1] > sigmas[1:]).all()):
        raise AlgorithmError("an ODE trajectory needs strictly decreasing sigmas ending at 0")
    positions = []
    for s in keep:
        hit = (sigmas - float(s)).abs() < 1e-6
        if not bool(hit.any()):
            raise AlgorithmError(f"sigma {s} to keep is not on the trajectory grid")
        positions.append(int(hit.nonzero()[0]))
    b, t = noise.shape[:2]
    states, x = {}, noise
    for i in range(len(sigmas) - 1):
        if i in positions:
            states[i] = x
        s = torch.full((b, t), float(sigmas[i]), device=x.device)
        s_next = torch.full((b, t), float(sigmas[i + 1]), device=x.device)
        x = euler_step(x, velocity_fn(x, s), s, s_next)
    return torch.stack([states[p] for p in positions]), x


def sample_trajectory_points(num_points: int, batch: int, blocks: Tensor, generator: torch.Generator) -> Tensor:
    """Which stored trajectory point each block regresses from: long ``[B, T]`` in ``[0, num_points)``."""
    k = torch.randint(0, num_points, (batch, _num_blocks(blocks)), generator=generator, device=generator.device)
    return _expand_blocks(k, blocks)


def ode_regression_loss(
    student_x0_fn: Callable, states: Tensor, sigmas: Sequence[float], endpoint: Tensor, points: Tensor
) -> Tensor:
    """Causal ODE distillation: per block, the stored state at point ``points [B, T]`` (of ``states
    [K, B, T, C, h, w]`` taken at ``sigmas [K]``) goes through the student; its x0 regresses onto the
    trajectory's endpoint ``[B, T, C, h, w]``."""
    points = points.to(states.device)
    index = repeat(points, "b t -> 1 b t c h w", c=states.shape[3], h=states.shape[4], w=states.shape[5])
    x = states.gather(0, index)[0]
    sigma = torch.as_tensor([float(s) for s in sigmas], device=states.device)[points]
    return mse(student_x0_fn(x, sigma), endpoint)


# ----------------------------------------------------------------------------- DMD (stage 4)


def dmd_direction(x0_generated: Tensor, x0_real: Tensor, x0_fake: Tensor) -> Tensor:
    """DMD's gradient ``(x0_fake - x0_real) / mean|x0_generated - x0_real|`` (mean per sample).

    With Tweedie, ``x0_fake - x0_real`` is ``s^2/(1-s)`` times ``score_fake - score_real``: the
    gradient of KL(fake || real) with respect to the sample, normalised per sample as in DMD.
    """
    dims = tuple(range(1, x0_generated.ndim))
    norm = (x0_generated.float() - x0_real.float()).abs().mean(dim=dims, keepdim=True)
    return torch.nan_to_num((x0_fake.float() - x0_real.float()) / norm)


def dmd_loss(
    x0_generated: Tensor, real_x0_fn: Callable, fake_x0_fn: Callable, eps: Tensor, sigma: Tensor
) -> tuple[Tensor, Tensor]:
    """Generator loss ``0.5 * ||x - stopgrad(x - grad)||^2`` (mean) whose gradient in x is the
    DMD direction (divided by the element count). The generated clip ``[B, T, C, h, w]`` is noised to
    ``sigma [B, T]`` with ``eps``; the real (guided teacher) and fake (critic) x0 predictions run
    without gradient. Returns the loss and the direction."""
    with torch.no_grad():
        x_t = flow.add_noise(x0_generated.detach(), eps, sigma)
        grad = dmd_direction(x0_generated.detach(), real_x0_fn(x_t, sigma), fake_x0_fn(x_t, sigma))
    x = x0_generated.float()
    return 0.5 * F.mse_loss(x, (x - grad).detach()), grad


def sample_exit_steps(num_blocks: int, num_steps: int, generator: torch.Generator) -> list[int]:
    """A random exit step per block, uniform in ``[0, num_steps)``. Pass a generator every rank
    creates identically, so all ranks run the same number of forwards."""
    return torch.randint(0, num_steps, (num_blocks,), generator=generator, device=generator.device).tolist()


def self_forcing_rollout(
    x0_fn: Callable,
    commit_fn: Callable,
    noise_fn: Callable,
    sigmas: Sequence[float],
    exit_steps: Sequence[int],
) -> list[Tensor]:
    """The student generates blocks one after another from its own outputs (Self Forcing).

    For block ``b``: start from ``noise_fn(b, 0)`` at ``sigmas[0]``; the few-step sampler
    (x0 prediction, re-noise with ``noise_fn(b, i)`` to ``sigmas[i]``) runs under ``no_grad`` up to
    ``exit_steps[b]``; the step at ``exit_steps[b]`` runs with gradient (if enabled) and its x0 is
    the block's output. ``commit_fn(x0.detach(), b)`` then writes the clean block into the
    student's KV cache under ``no_grad``, so later blocks see a detached history.

    ``x0_fn(x [B, Tb, C, h, w], sigma: float, b) -> x0``. Returns the output blocks.
    """
    outputs = []
    for b, exit_step in enumerate(exit_steps):
        if not 0 <= exit_step < len(sigmas):
            raise AlgorithmError(f"exit step {exit_step} of block {b} is outside the {len(sigmas)} sampling steps")
        x = noise_fn(b, 0)
        with torch.no_grad():
            for i in range(exit_step):
                x = flow.add_noise(x0_fn(x, float(sigmas[i]), b), noise_fn(b, i + 1), float(sigmas[i + 1]))
        x0 = x0_fn(x, float(sigmas[exit_step]), b)
        with torch.no_grad():
            commit_fn(x0.detach(), b)
        outputs.append(x0)
    return outputs


# ----------------------------------------------------------------------------- EMA


@torch.no_grad()
def ema_update(ema: Sequence[Tensor], online: Sequence[Tensor], decay: float) -> None:
    """In place: ``ema = decay * ema + (1 - decay) * online`` for floating tensors; others are copied."""
    if not 0.0 <= decay <= 1.0:
        raise AlgorithmError(f"EMA decay must be in [0, 1], got {decay}")
    ema, online = list(ema), list(online)
    if len(ema) != len(online):
        raise AlgorithmError(f"EMA has {len(ema)} tensors but the model has {len(online)}")
    floats = [(e, o) for e, o in zip(ema, online) if e.is_floating_point()]
    if floats:
        torch._foreach_lerp_([e for e, _ in floats], [o.to(e.dtype) for e, o in floats], 1.0 - decay)
    for e, o in zip(ema, online):
        if not e.is_floating_point():
            e.copy_(o)
