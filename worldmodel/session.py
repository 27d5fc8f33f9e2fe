"""The autoregressive rollout engine: ``reset(start)``, then ``step(actions) -> frame``.

Each step integrates the actions into camera poses (the same controller as training), samples the
next latent block with the few-step student sampler (predict x0, re-noise to the next sigma)
against the KV cache, decodes it, and keeps the clean latents pending; ``commit()`` (called at the
start of the next step, or earlier by a client with idle time) runs the one t = 0 forward that
writes them into the cache. The cache is a fixed-size rolling window with sink frames, so memory
stays flat however long the session runs.

Batches. The rows of a session are independent plays; their noise comes from one generator per
*noise group* of rows (one group by default), so a session of several groups draws exactly what
separate sessions of those sizes and seeds would, and ``narrow`` drops groups whose plays have
ended. Classifier-free guidance runs the conditional and the unconditional prediction as one
forward of the doubled batch: the cache then holds each row twice (both halves written alike).
"""

from __future__ import annotations

import time
from typing import Sequence

import torch

from worldmodel.actions import normalize_actions, validate_actions
from worldmodel.camera import CameraState, rigid_inverse, state_to_pose, step_state
from worldmodel.flow import cfg_velocity, euler_sample, few_step_sample, x0_from_v
from worldmodel.frames import as_start_frames, to_model, to_uint8
from worldmodel.model import WorldModel


class SessionError(ValueError):
    """A session call that cannot be carried out."""


SOLVERS = ("renoise", "euler")
"""``sampler.solver``: "renoise" (students: predict x0, re-noise to the next sigma) or "euler" (teachers:
deterministic Euler steps through the sigmas, then to 0)."""


Seed = int | Sequence[tuple[int, int]]
"""A session's noise seed: one int for the whole batch, or (rows, seed) per noise group, in row order."""


def noise_groups(seed: Seed, batch: int) -> list[tuple[int, int]]:
    """(rows, seed) of each noise group of a batch of ``batch`` rows seeded by ``seed``."""
    groups = [(batch, seed)] if isinstance(seed, int) else [(int(rows), int(s)) for rows, s in seed]
    if any(rows < 1 for rows, _ in groups) or sum(rows for rows, _ in groups) != batch:
        raise SessionError(f"noise groups {groups} must have positive sizes adding up to the batch ({batch})")
    return groups


class Session:
    """A batch of ``batch`` play sessions of one model on one device (``seed``: see :data:`Seed`)."""

    def __init__(self, model: WorldModel, batch: int = 1, device="cpu", steps: Sequence[float] | None = None,
                 first_frame_steps: Sequence[float] | None = None, seed: Seed = 0, dtype: torch.dtype = torch.float32,
                 cuda_graphs: bool | None = None):
        self.device = torch.device(device)
        self.dtype = dtype
        self.model = model.to(self.device, dtype).eval()
        self.batch = batch
        sampler = model.config.sampler
        self.steps = list(steps if steps is not None else sampler.steps)
        self.first_frame_steps = list(first_frame_steps if first_frame_steps is not None else sampler.first_frame_steps)
        self.solver = str(sampler.get("solver", "renoise"))
        self.guidance = float(sampler.get("guidance", 1.0))
        if self.solver not in SOLVERS:
            raise SessionError(f"sampler.solver must be one of {list(SOLVERS)}, got {self.solver!r}")
        self._copies = 1 if self.guidance == 1.0 else 2  # rows per play in the cache and the network batch
        self.cache = model.dit.new_cache(self._copies * batch, self.device, dtype)
        self._keep = self._condition_mask(batch)  # kept: CUDA graphs read it
        if cuda_graphs is None:
            cuda_graphs = self.device.type == "cuda"
        if cuda_graphs and self.device.type != "cuda":
            raise SessionError("CUDA graphs need a CUDA device")
        self._cuda_graphs = cuda_graphs
        self._graphs = self._new_graphs()
        self._noise = [(rows, torch.Generator(self.device).manual_seed(s)) for rows, s in noise_groups(seed, batch)]
        self.state: CameraState | None = None
        self._pending = None
        self.frame_index = -1
        self.last_latency_s = 0.0

    def cast(self, dtype: torch.dtype) -> None:
        """Run in ``dtype`` from the next ``reset`` (weights, cache and noise); the current play ends."""
        self.dtype = dtype
        self.model.to(dtype)
        self.cache = self.model.dit.new_cache(self._copies * self.batch, self.device, dtype)
        self._graphs = self._new_graphs()
        self.state, self._pending, self.frame_index = None, None, -1

    @property
    def steps(self) -> list[float]:
        return self._steps

    @steps.setter
    def steps(self, sigmas: Sequence[float]):
        sigmas = [float(s) for s in sigmas]
        if not sigmas or sigmas[0] != 1.0 or any(b >= a for a, b in zip(sigmas, sigmas[1:])) or sigmas[-1] <= 0:
            raise SessionError(f"denoising steps must start at 1.0 and decrease to a value above 0, got {sigmas}")
        self._steps = sigmas

    @property
    def generator(self) -> torch.Generator:
        """The noise generator of a session with one noise group (e.g. to reseed it)."""
        if len(self._noise) != 1:
            raise SessionError(f"this session has {len(self._noise)} noise groups, each with its own generator")
        return self._noise[0][1]

    @property
    def pose(self) -> torch.Tensor:
        """World-from-camera ``[B, 4, 4]`` (float64, CPU) of the last frame."""
        if self.state is None:
            raise SessionError("call reset() before using the session")
        return state_to_pose(self.state)

    # -- batch layout

    def _condition_mask(self, batch: int) -> torch.Tensor | None:
        """``cond_keep [2B]`` of a guided forward (the conditional half first), or None unguided."""
        if self._copies == 1:
            return None
        return torch.arange(2 * batch, device=self.device) < batch

    def _new_graphs(self):
        """A fresh store of CUDA graphs (None without them)."""
        if not self._cuda_graphs:
            return None
        from worldmodel.cuda_graphs import GraphedFunction

        return GraphedFunction()

    def _twice(self, x: torch.Tensor) -> torch.Tensor:
        """``x [B, ...]`` as the network batch ``[copies * B, ...]`` (guided: both halves alike)."""
        return x if self._copies == 1 else torch.cat([x, x])

    def narrow(self, batch: int) -> None:
        """Keep the first ``batch`` rows (whole noise groups) and drop the others: their cache, camera,
        pending block and noise. The kept rows play on exactly as they would have."""
        sizes = [rows for rows, _ in self._noise]
        ends = [sum(sizes[: i + 1]) for i in range(len(sizes))]
        if batch not in ends:
            raise SessionError(f"can narrow only to whole noise groups: a batch in {ends}, got {batch}")
        rows = torch.cat([torch.arange(batch) + half * self.batch for half in range(self._copies)]).to(self.device)
        cache = self.model.dit.new_cache(self._copies * batch, self.device, self.dtype)
        cache.k.copy_(self.cache.k[:, rows])
        cache.v.copy_(self.cache.v[:, rows])
        cache.frames, cache.written = self.cache.frames, self.cache.written
        self.cache, self.batch, self._noise = cache, batch, self._noise[: ends.index(batch) + 1]
        self._keep, self._graphs = self._condition_mask(batch), self._new_graphs()
        if self.state is not None:
            self.state = CameraState(self.state.position[:batch], self.state.yaw[:batch], self.state.pitch[:batch])
        if self._pending is not None:
            self._pending = tuple(t[:batch] for t in self._pending)

    # -- model calls

    def _draw_noise(self, draws: int, block: tuple[int, ...]) -> torch.Tensor:
        """Noise ``[draws, B, *block]``: each noise group's rows from its own generator."""
        parts = [torch.randn((draws, rows, *block), generator=g, device=self.device, dtype=self.dtype)
                 for rows, g in self._noise]
        return parts[0] if len(parts) == 1 else torch.cat(parts, 1)

    def _velocity(self, x, sigma: float, actions, poses):
        """Guided velocity ``[B, Tb, C, h, w]`` of the block ``x`` at ``sigma`` against the cache: with
        guidance, the conditional and unconditional predictions come from one doubled-batch forward."""
        s = torch.full((self._copies * x.shape[0], x.shape[1]), sigma, device=self.device, dtype=self.dtype)
        v = self.model.dit.forward_cached(self._twice(x), s, self._twice(actions), self._twice(poses), self.cache,
                                          cond_keep=self._keep)
        if self._copies == 1:
            return v
        v_cond, v_uncond = v.chunk(2)
        return cfg_velocity(lambda _x, _s, cond: v_cond if cond else v_uncond, x, sigma, self.guidance)

    def _sample(self, actions, poses, sigmas):
        """Latents ``[B, Tb, C, h, w]`` and decoded frames uint8 ``[B, Tb, H, W, 3]`` of the next block."""
        cfg = self.model.dit.cfg
        draws = 1 if self.solver == "euler" else len(sigmas)
        noise = self._draw_noise(draws, (actions.shape[1], cfg.latent_channels, cfg.latent_height, cfg.latent_width))
        shape = tuple(noise.shape)
        sigmas = tuple(sigmas)

        def sample(noise, actions, poses):
            velocity = lambda x, sigma: self._velocity(x, sigma, actions, poses)  # noqa: E731
            if self.solver == "euler":  # guidance is in the velocity
                latents = euler_sample(lambda x, sigma, cond: velocity(x, sigma), noise[0], sigmas + (0.0,))
            else:
                latents = few_step_sample(lambda x, sigma: x0_from_v(x, velocity(x, sigma), sigma), noise[0], sigmas,
                                          renoise=noise[1:])
            return latents, to_uint8(self.model.autoencoder.decode(latents))

        if self._graphs is None:
            return sample(noise, actions, poses)
        key = ("sample", self.cache.frames, sigmas, shape)
        return tuple(t.clone() for t in self._graphs(key, sample, (noise, actions, poses)))

    def _model_poses(self, poses: list[torch.Tensor]) -> torch.Tensor:
        """Poses ``[B, 4, 4]`` (float64, CPU) of the frame before a block and the block's frames ->
        ``[B, Tb + 1, 4, 4]`` on the device, relative to the first: the model is invariant to that
        rigid transform, and float32 stays exact however far a session walks."""
        poses = torch.stack(poses, 1)
        return (rigid_inverse(poses[:, :1]) @ poses).to(self.device, torch.float32)

    def commit(self):
        """Write the last sampled (or forced) latents into the KV cache with one t = 0 forward."""
        if self._pending is None:
            return
        latents, actions, poses = (self._twice(t) for t in self._pending)
        self._pending = None
        zeros = torch.zeros(latents.shape[:2], device=self.device, dtype=self.dtype)
        if self._graphs is None:
            self.model.dit.forward_cached(latents, zeros, actions, poses, self.cache, write=True)
            return
        cache = self.cache

        def write(latents, zeros, actions, poses):
            self.model.dit.forward_cached(latents, zeros, actions, poses, cache, write=True)
            return ()

        def save():
            return cache.k.clone(), cache.v.clone(), cache.frames, cache.written

        def restore(state):
            cache.k.copy_(state[0])
            cache.v.copy_(state[1])
            cache.frames, cache.written = state[2], state[3]

        self._graphs(("commit", cache.frames, tuple(latents.shape)), write, (latents, zeros, actions, poses), save, restore)
        cache.advance(latents.shape[1])

    def _timed(self, fn):
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        start = time.perf_counter()
        out = fn()
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        self.last_latency_s = time.perf_counter() - start
        return out

    # -- public API

    @torch.no_grad()
    def reset(self, start=None) -> torch.Tensor:
        """Start a new session from ``start`` (uint8 ``[B, H, W, 3]`` or ``[H, W, 3]``, an image path,
        or None: the model generates the first frame). Returns the first frame uint8 ``[B, H, W, 3]``."""
        return self._timed(lambda: self._reset(start))

    def _reset(self, start):
        self.cache.reset()
        self._pending = None
        self.state = CameraState.start(self.batch, self.model.controller, dtype=torch.float64)
        poses = self._model_poses([state_to_pose(self.state)] * 2)
        actions = torch.zeros(self.batch, 1, self.model.action_spec.width, device=self.device, dtype=self.dtype)
        if start is None:
            latents, frames = self._sample(actions, poses, self.first_frame_steps)
            frames = frames[:, 0]
        else:
            frames = as_start_frames(start, self.batch, *self.model.frame_size).to(self.device)
            latents = self.model.autoencoder.encode(to_model(frames[:, None], self.dtype))
        self._pending = (latents, actions, poses)
        self.commit()
        self.frame_index = 0
        return frames.cpu()

    @torch.no_grad()
    def step(self, actions: torch.Tensor, force_frame: torch.Tensor | None = None,
             force_rows: torch.Tensor | None = None) -> torch.Tensor:
        """Generate the next frame(s) from ``actions [B, A]`` (frame-wise) or ``[B, Tb, A]`` (a block).

        Returns uint8 ``[B, H, W, 3]`` (or ``[B, Tb, H, W, 3]``). With ``force_frame`` (uint8, shaped
        like the result) the given frames, not the generated ones, go into the cache: teacher-forced
        evaluation. With ``force_rows`` (row indices ``[R]``) only those rows are forced, and
        ``force_frame`` holds just them (``[R, ...]``, in that order).
        """
        if self.state is None:
            raise SessionError("call reset() before step()")
        return self._timed(lambda: self._step(actions, force_frame, force_rows))

    def _step(self, actions, force_frame, force_rows):
        spec, tb = self.model.action_spec, self.model.dit.cfg.block_size
        try:
            actions = validate_actions(torch.as_tensor(actions).cpu(), spec)
        except ValueError as e:
            raise SessionError(str(e)) from None
        given, single = tuple(actions.shape), actions.ndim == 2
        actions = actions[:, None] if single else actions
        if actions.ndim != 3 or actions.shape[:2] != (self.batch, tb):
            want = f"[{self.batch}, {spec.width}]" if tb == 1 else f"[{self.batch}, {tb}, {spec.width}]"
            raise SessionError(f"actions must be {want} for this model (block size {tb}), got {given}")
        self.commit()
        poses = [state_to_pose(self.state)]
        for t in range(tb):
            self.state = step_state(self.state, actions[:, t], spec, self.model.controller)
            poses.append(state_to_pose(self.state))
        poses = self._model_poses(poses)
        model_actions = normalize_actions(actions, spec).to(self.device, self.dtype)
        latents, frames = self._sample(model_actions, poses, self.steps)
        if force_frame is not None:
            forced = torch.as_tensor(force_frame).to(self.device)
            forced = forced[:, None] if single else forced
            rows = None if force_rows is None else torch.as_tensor(force_rows, device=self.device)
            want = frames.shape if rows is None else (len(rows), *frames.shape[1:])
            if forced.shape != want or forced.dtype != torch.uint8:
                raise SessionError(f"force_frame must be uint8 shaped like the generated frames (of the forced rows), got {tuple(force_frame.shape)} {force_frame.dtype}")
            encoded = self.model.autoencoder.encode(to_model(forced, self.dtype))
            latents = encoded if rows is None else latents.index_copy(0, rows, encoded)
        self._pending = (latents, model_actions, poses)
        self.frame_index += tb
        return (frames[:, 0] if single else frames).cpu()
