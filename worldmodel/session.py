"""The autoregressive rollout engine: ``reset(start)``, then ``step(actions) -> frame``.

Each step integrates the actions into camera poses (the same controller as training), samples the
next latent block with the few-step student sampler (predict x0, re-noise to the next sigma)
against the KV cache, decodes it, and keeps the clean latents pending; ``commit()`` (called at the
start of the next step, or earlier by a client with idle time) runs the one t = 0 forward that
writes them into the cache. The cache is a fixed-size rolling window with sink frames, so memory
stays flat however long the session runs.
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


class Session:
    """A batch of ``batch`` play sessions of one model on one device."""

    def __init__(self, model: WorldModel, batch: int = 1, device="cpu", steps: Sequence[float] | None = None,
                 first_frame_steps: Sequence[float] | None = None, seed: int = 0, dtype: torch.dtype = torch.float32,
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
        self.cache = model.dit.new_cache(batch, self.device, dtype)
        self._uncond = torch.zeros(batch, dtype=torch.bool, device=self.device)  # kept: CUDA graphs read it
        if cuda_graphs is None:
            cuda_graphs = self.device.type == "cuda"
        if cuda_graphs and self.device.type != "cuda":
            raise SessionError("CUDA graphs need a CUDA device")
        if cuda_graphs:
            from worldmodel.cuda_graphs import GraphedFunction

            self._graphs = GraphedFunction()
        else:
            self._graphs = None
        self.generator = torch.Generator(self.device).manual_seed(seed)
        self.state: CameraState | None = None
        self._pending = None
        self.frame_index = -1
        self.last_latency_s = 0.0

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
    def pose(self) -> torch.Tensor:
        """World-from-camera ``[B, 4, 4]`` (float64, CPU) of the last frame."""
        if self.state is None:
            raise SessionError("call reset() before using the session")
        return state_to_pose(self.state)

    # -- model calls

    def _sample(self, actions, poses, sigmas):
        """Latents ``[B, Tb, C, h, w]`` and decoded frames uint8 ``[B, Tb, H, W, 3]`` of the next block."""
        cfg = self.model.dit.cfg
        draws = 1 if self.solver == "euler" else len(sigmas)
        shape = (draws, self.batch, actions.shape[1], cfg.latent_channels, cfg.latent_height, cfg.latent_width)
        noise = torch.randn(shape, generator=self.generator, device=self.device, dtype=self.dtype)
        sigmas = tuple(sigmas)
        uncond = self._uncond

        def sample(noise, actions, poses):
            def velocity(x, sigma, cond=True):
                s = torch.full(x.shape[:2], sigma, device=self.device, dtype=self.dtype)
                return self.model.dit.forward_cached(x, s, actions, poses, self.cache, cond_keep=None if cond else uncond)

            if self.solver == "euler":
                latents = euler_sample(velocity, noise[0], sigmas + (0.0,), self.guidance)
            else:
                x0_fn = lambda x, sigma: x0_from_v(x, cfg_velocity(velocity, x, sigma, self.guidance), sigma)  # noqa: E731
                latents = few_step_sample(x0_fn, noise[0], sigmas, renoise=noise[1:])
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
        latents, actions, poses = self._pending
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
    def step(self, actions: torch.Tensor, force_frame: torch.Tensor | None = None) -> torch.Tensor:
        """Generate the next frame(s) from ``actions [B, A]`` (frame-wise) or ``[B, Tb, A]`` (a block).

        Returns uint8 ``[B, H, W, 3]`` (or ``[B, Tb, H, W, 3]``). With ``force_frame`` (uint8, same
        shape as the result) the given frames, not the generated ones, go into the cache: teacher-forced
        evaluation.
        """
        if self.state is None:
            raise SessionError("call reset() before step()")
        return self._timed(lambda: self._step(actions, force_frame))

    def _step(self, actions, force_frame):
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
            if forced.shape != frames.shape or forced.dtype != torch.uint8:
                raise SessionError(f"force_frame must be uint8 shaped like the generated frames, got {tuple(force_frame.shape)} {force_frame.dtype}")
            latents = self.model.autoencoder.encode(to_model(forced, self.dtype))
        self._pending = (latents, model_actions, poses)
        self.frame_index += tb
        return (frames[:, 0] if single else frames).cpu()
