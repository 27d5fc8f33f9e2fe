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


def sample_sigmas(batch: int, blocks: Tensor, generator: torch.Generator, *, distribution: str = "logit_normal",
                  loc: float = 0.0, scale: float = 1.0, low: float = 0.0, high: float = 1.0,
                  shift: float = 1.0) -> Tensor:
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


@torch.no_grad()
def consistency_target(teacher_velocity_fn: Callable, target_x0_fn: Callable, x_t: Tensor, sigma: Tensor,
                       sigma_next: Tensor) -> Tensor:
    """Causal CD target: one (guided) teacher Euler step ``sigma -> sigma_next``, then the target
    network's x0 at the new point: ``stopgrad(target_x0(x_t + (s' - s) v, s'))``."""
    x_next = flow.euler_step(x_t, teacher_velocity_fn(x_t, sigma), sigma, sigma_next)
    return target_x0_fn(x_next, sigma_next).detach()


def causal_cd_loss(student_x0_fn: Callable, teacher_velocity_fn: Callable, target_x0_fn: Callable, x0: Tensor,
                   eps: Tensor, sigma: Tensor, sigma_next: Tensor) -> Tensor:
    """Causal consistency distillation (Causal Forcing++): ``x_t`` built from real latents ``x0`` at
    ``sigma``; MSE between the student's x0 at ``(x_t, sigma)`` and :func:`consistency_target`.

    All three functions are teacher-forced on the same clean history by the caller; at
    ``sigma_next = 0`` the target is the teacher's Euler endpoint itself (x0_from_v(x, v, 0) = x).
    """
    x_t = flow.add_noise(x0, eps, sigma)
    target = consistency_target(teacher_velocity_fn, target_x0_fn, x_t, sigma, sigma_next)
    return mse(student_x0_fn(x_t, sigma), target)


# ----------------------------------------------------------------------------- causal sCM (stage 3c)


def sample_scm_sigmas(batch: int, blocks: Tensor, generator: torch.Generator, *, loc: float, scale: float,
                      p_one: float, low: float) -> Tensor:
    """sCM noise levels ``[B, T]``, one per block: exactly 1 with probability ``p_one`` (the student's
    first sampling step, which a logit-normal never reaches), else ``sigmoid(N(loc, scale^2))``
    clamped to ``[low, 1]``.

    In rectified flow ``s = sigma / (1 + sigma)`` for the EDM/TrigFlow noise level ``sigma = tan t``,
    so sCM's log-normal ``log sigma ~ N(P_mean, P_std^2)`` is this logit-normal with ``loc = P_mean``,
    ``scale = P_std``; a timestep shift ``k`` is ``loc + log k``.
    """
    if not 0.0 <= p_one <= 1.0 or not 0.0 < low < 1.0:
        raise AlgorithmError(f"sCM sigmas need 0 <= p_one <= 1 and 0 < low < 1, got p_one={p_one}, low={low}")
    n, device = _num_blocks(blocks), generator.device
    s = torch.sigmoid(loc + scale * torch.randn(batch, n, generator=generator, device=device)).clamp(min=low)
    one = torch.rand(batch, n, generator=generator, device=device) < p_one
    return _expand_blocks(torch.where(one, torch.ones_like(s), s), blocks)


def tangent_warmup(updates: int, warmup_steps: int) -> float:
    """The tangent warm-up factor ``r = min(1, updates / warmup_steps)`` (1 without warm-up)."""
    return 1.0 if warmup_steps <= 0 else min(1.0, updates / warmup_steps)


def scm_tangent(x0_tangent: Tensor, velocity_gap: Tensor, warmup: float) -> Tensor:
    """The warmed-up tangent ``g_r = r df + (1 - r)(v_T - v) = (v_T - v) - r s dv`` ``[B, T, C, h, w]``.

    ``x0_tangent`` is ``df``, the JVP of the student's ``f = x - s v`` along ``(v_T, 1)``, which is
    ``(v_T - v) - s dv`` with ``dv`` the network's JVP (``v`` the student's, ``v_T`` the guided
    teacher's velocity, ``velocity_gap = v_T - v``). sCM's tangent warm-up (Lu & Song 2024, "tangent warmup")
    scales by ``r`` the part of ``df/dt`` that carries the network's time derivative,
    ``sin t (x_t + sigma_d dF/dt)``, and keeps the velocity mismatch ``cos t (dx_t/dt - sigma_d F)``.
    In RF the coefficient of ``x`` in ``f`` is constant, so the warmed part is exactly ``-s dv`` and
    the kept part ``v_T - v``: at ``r = 0`` the update regresses the student's velocity onto the
    guided teacher's (stable from the teacher's weights), at ``r = 1`` it is the full sCM tangent.
    """
    return warmup * x0_tangent.float() + (1.0 - warmup) * velocity_gap.float()


def scm_loss(student_x0: Tensor, tangent: Tensor, weight: Tensor, blocks: Tensor,
             norm_const: float) -> tuple[Tensor, Tensor]:
    """Continuous-time consistency (sCM) in the rectified-flow x0 parameterisation, per block:
    ``mean_blocks || f - stopgrad(f - w g_hat) ||^2`` with ``g_hat = g / (||g|| + c)``; returns the
    loss and the mean block norm ``||g||`` (0-d, detached).

    ``student_x0 [B, T, C, h, w]`` is ``f = x_s - s v_theta(x_s, s)`` with gradient; ``tangent`` its
    (warmed-up, :func:`scm_tangent`) derivative ``g = df/ds`` along the teacher's PF-ODE
    ``dx/ds = v_T``, without gradient; ``weight [B, T]`` equal within a block; ``blocks [T]``.

    Why this is the continuous limit of causal CD (:func:`causal_cd_loss`): CD regresses ``f(x_s, s)``
    onto ``sg f(x_{s - D}, s - D)`` with ``x_{s - D} = x_s - D v_T``; to first order the target is
    ``f(x_s, s) - D g`` with ``g = (d/ds) f(x(s), s) = df/dx v_T + df/ds``, the JVP of ``f`` along
    ``(v_T, 1)``, so with the online weights as target CD's gradient is ``2 D g^T df/dtheta + O(D^2)``,
    the gradient of ``||f - sg(f - D g)||^2``. sCM keeps the limit with a weight ``w`` in place of
    ``D`` and a normalised tangent, whose gradient ``2 w g_hat^T df/dtheta`` per block (divided by the
    number of blocks) stays bounded where the JVP is large. ``f = x - s v`` is the x0 predictor the
    student samples with; ``f(x, 0) = x`` holds by construction, the role of TrigFlow's
    ``f = cos t x - sin t F``. Each noisy block is normalised on its own: teacher-forced, its ``f``
    depends on its own noisy input only (the history is clean, with zero tangent), so a block is one
    consistency sample with its own ``s``, the unit sCM normalises. The loss value is ``mean w^2
    ||g_hat||^2`` by construction; track the tangent norm, which falls as the student gets consistent.
    """
    n, b = _num_blocks(blocks), tangent.shape[0]
    index = blocks.to(tangent.device)
    dtype = torch.promote_types(student_x0.dtype, torch.float32)
    g = tangent.detach().to(dtype)
    frame_sq = g.pow(2).flatten(2).sum(-1)  # [B, T]
    block_norm = torch.zeros(b, n, device=g.device, dtype=dtype).index_add_(1, index, frame_sq).sqrt()  # [B, blocks]
    g_hat = g / flow.per_frame(_expand_blocks(block_norm, index) + norm_const, g)
    f = student_x0.to(dtype)
    # f - sg(f - w g_hat) written as (f - sg(f)) + w g_hat: exact when w g_hat is small against f
    residual = (f - f.detach()) + flow.per_frame(weight, f) * g_hat
    return residual.pow(2).sum() / (b * n), block_norm.mean().detach()


# ----------------------------------------------------------------------------- causal ODE (stage 3b)


@torch.no_grad()
def ode_trajectory(velocity_fn: Callable, noise: Tensor, sigmas: Tensor,
                   keep: Sequence[float]) -> tuple[Tensor, Tensor]:
    """Euler-integrate the PF-ODE (:func:`worldmodel.flow.sample_euler`) from ``noise`` at ``sigmas[0]``
    down to ``sigmas[-1] = 0``.

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
    states = {}

    def record(step):
        if step["i"] in positions:
            states[step["i"]] = step["x"]

    endpoint = flow.sample_euler(velocity_fn, noise, sigmas.tolist(), callback=record)
    return torch.stack([states[p] for p in positions]), endpoint


def sample_trajectory_points(num_points: int, batch: int, blocks: Tensor, generator: torch.Generator) -> Tensor:
    """Which stored trajectory point each block regresses from: long ``[B, T]`` in ``[0, num_points)``."""
    k = torch.randint(0, num_points, (batch, _num_blocks(blocks)), generator=generator, device=generator.device)
    return _expand_blocks(k, blocks)


def ode_regression_loss(student_x0_fn: Callable, states: Tensor, sigmas: Sequence[float], endpoint: Tensor,
                        points: Tensor) -> Tensor:
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


def dmd_loss(x0_generated: Tensor, real_x0_fn: Callable, fake_x0_fn: Callable, eps: Tensor,
             sigma: Tensor) -> tuple[Tensor, Tensor]:
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


def self_forcing_rollout(rollout, first: Tensor, noise: Tensor, sigmas: Sequence[float], exit_steps: Sequence[int],
                         trained_from: int = 0) -> Tensor:
    """The student plays a clip from its first frame ``first [B, 1, C, h, w]``, block after block on its
    own outputs (Self Forcing); returns the clip ``[B, T, C, h, w]``.

    ``rollout`` generates with the student's KV cache (a :class:`worldmodel.rollout.CachedRollout`). For
    block ``b`` (from 1) the few-step sampler (:func:`worldmodel.flow.sample_renoise`) starts from
    ``noise[:, 0]`` at ``sigmas[0]`` and runs under ``no_grad`` up to step ``e = exit_steps[b - 1]``
    (re-noising with ``noise[:, i]`` to ``sigmas[i]``); step ``e`` runs with gradient (if enabled) and its
    x0 is the block. The rollout then commits the clean block without gradient, so later blocks see a
    detached history. ``noise [B, K, T, C, h, w]`` with ``K = len(sigmas)``; ``sigmas`` without the final 0.
    Blocks that start before frame ``trained_from`` are played as in play instead: every step, no gradient
    (a long rollout whose loss sees only its last frames).
    """
    for b, exit_step in enumerate(exit_steps):
        if not 0 <= exit_step < len(sigmas):
            raise AlgorithmError(f"exit step {exit_step} of block {b} is outside the {len(sigmas)} sampling steps")

    def sample_block(velocity, b, shape):
        start, end = rollout.blocks[b]
        block_noise = noise[:, :, start:end].movedim(1, 0)
        if start < trained_from:
            with torch.no_grad():
                return flow.sample_renoise(velocity, block_noise[0], [*sigmas, 0.0], noise=block_noise[1:])
        exit_step = exit_steps[b - 1]
        with torch.no_grad():
            x = flow.sample_renoise(velocity, block_noise[0], sigmas[: exit_step + 1], noise=block_noise[1:])
        return flow.sample_renoise(velocity, x, [sigmas[exit_step], 0.0])

    return rollout.generate(first, sample_block)


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
