"""Play's wrapper over the rollout: ``reset(start)``, then ``step(actions)``, each returning the step
record a ground-truth world returns (:class:`worldmodel.envs.WorldStep`), so play drives both alike.

Each step integrates the actions into camera poses (the same controller as training; or takes the
camera of a world that integrated them), samples the next latent block with the checkpoint's
sampler against the KV cache (:class:`worldmodel.rollout.Rollout`), decodes it, and keeps the clean
latents pending: the next step's first forward writes them into the cache (a folded commit, one
forward fewer a frame than a t = 0 forward of their own), noised to ``sampler.context_noise`` first when
that is above 0 (the network is told the level). The cache is a fixed-size rolling window with sink
frames, so memory stays flat however long the session runs. A chunk-wise model takes a whole block of actions a step, or one action a step: then the actions are buffered
into blocks (:class:`worldmodel.rollout.FrameBuffer`) and each frame shows ``block_size - 1`` steps late.

Batches. The rows of a session are independent plays; their noise comes from one generator per
*noise group* of rows (one group by default), so a session of several groups draws exactly what
separate sessions of those sizes and seeds would, and ``narrow`` drops groups whose plays have
ended. On CUDA, sampling (with its folded commit) replays CUDA graphs (:mod:`worldmodel.cuda_graphs`).
"""

from __future__ import annotations

import math
from typing import Sequence

import torch

from worldmodel.actions import normalize_actions, validate_actions
from worldmodel.camera import CameraState, rigid_inverse, state_to_pose, step_state
from worldmodel.cuda_graphs import GraphedFunction
from worldmodel.envs.base import WorldStep
from worldmodel.flow import SAMPLERS, add_noise
from worldmodel.frames import as_start_frames, to_model, to_uint8
from worldmodel.model import WorldModel
from worldmodel.rollout import FrameBuffer, Rollout, block_poses


class SessionError(ValueError):
    """A session call that cannot be carried out."""


SOLVERS = tuple(SAMPLERS)
"""``sampler.solver``: "renoise" (students: predict x0, re-noise to the next sigma) or "euler" (teachers:
deterministic Euler steps through the sigmas, then to 0)."""


Seed = int | Sequence[tuple[int, int] | int]
"""A session's noise seed: one int for the whole batch, or per noise group in row order (rows, seed),
or a bare seed for a group of one row (a world's one seed per row)."""


def noise_groups(seed: Seed, batch: int) -> list[tuple[int, int]]:
    """(rows, seed) of each noise group of a batch of ``batch`` rows seeded by ``seed``."""
    if isinstance(seed, int):
        groups = [(batch, seed)]
    else:
        groups = [(1, int(g)) if isinstance(g, int) else (int(g[0]), int(g[1])) for g in seed]
    if any(rows < 1 for rows, _ in groups) or sum(rows for rows, _ in groups) != batch:
        raise SessionError(f"noise groups {groups} must have positive sizes adding up to the batch ({batch})")
    return groups


class Session:
    """A batch of ``batch`` play sessions of one model on one device (``seed``: see :data:`Seed`); like a
    world it has an ``action_spec``, a ``controller`` and a frame ``height`` and ``width``."""

    def __init__(self, model: WorldModel, batch: int = 1, device="cpu", steps: Sequence[float] | None = None,
                 first_frame_steps: Sequence[float] | None = None, seed: Seed = 0, dtype: torch.dtype = torch.float32,
                 cuda_graphs: bool | None = None):
        self.device = torch.device(device)
        self.model = model.to(self.device, dtype).eval()
        self.batch, self.action_spec, self.controller = batch, model.action_spec, model.controller
        self.height, self.width = model.frame_size
        sampler = model.config.sampler
        self.steps = list(steps if steps is not None else sampler.steps)
        self.first_frame_steps = list(first_frame_steps if first_frame_steps is not None else sampler.first_frame_steps)
        self.solver = str(sampler.get("solver", "renoise"))
        self.guidance = float(sampler.get("guidance", 1.0))
        if not math.isfinite(self.guidance) or self.guidance < 0:
            raise SessionError(f"sampler.guidance must be a finite number >= 0, got {self.guidance}")
        self.context_noise = float(sampler.get("context_noise", 0.0))
        if not 0.0 <= self.context_noise < 1.0:
            raise SessionError(f"sampler.context_noise must be in [0, 1), got {self.context_noise}")
        if self.solver not in SOLVERS:
            raise SessionError(f"sampler.solver must be one of {list(SOLVERS)}, got {self.solver!r}")
        if cuda_graphs is None:
            cuda_graphs = self.device.type == "cuda"
        if cuda_graphs and self.device.type != "cuda":
            raise SessionError("CUDA graphs need a CUDA device")
        self._cuda_graphs = cuda_graphs
        self._reseed(seed)
        self.cast(dtype)

    def cast(self, dtype: torch.dtype) -> None:
        """Run in ``dtype`` from the next ``reset`` (weights, cache and noise); the current play ends."""
        self.dtype = dtype
        self.model.to(dtype)
        self.rollout = Rollout(self.model.dit, self.batch, self.device, dtype, self.guidance, self.context_noise)
        self._graphs = GraphedFunction() if self._cuda_graphs else None
        self.state, self._pending, self.frame_index = None, None, -1

    @property
    def cache(self):
        return self.rollout.cache

    def compile(self) -> None:
        """Compile the DiT's blocks for a full KV cache (``WorldDiT.compile_full_cache``), now: a scratch
        session of the same batch, device and dtype plays past the window's capacity (this session's
        noise and state are untouched). About 15% faster frames on a 2-core CPU, after
        about half a minute of compiling."""
        self.model.dit.compile_full_cache()
        steps = self.steps if len(self.steps) > 1 else [1.0, 0.5]  # two steps at least: both forward shapes
        scratch = Session(self.model, self.batch, self.device, steps, self.first_frame_steps, dtype=self.dtype,
                          cuda_graphs=self._cuda_graphs)
        scratch.reset(None)
        action = torch.zeros(self.batch, self.model.dit.cfg.block_size, self.action_spec.width)
        for _ in range(scratch.cache.capacity + 2):
            scratch.step(action)

    @property
    def steps(self) -> list[float]:
        return self._steps

    @steps.setter
    def steps(self, sigmas: Sequence[float]):
        sigmas = [float(s) for s in sigmas]
        if not sigmas or sigmas[0] != 1.0 or any(b >= a for a, b in zip(sigmas, sigmas[1:])) or sigmas[-1] <= 0:
            raise SessionError(f"denoising steps must start at 1.0 and decrease to a value above 0, got {sigmas}")
        self._steps = sigmas

    def _reseed(self, seed: Seed) -> None:
        self._noise = [(rows, torch.Generator(self.device).manual_seed(s)) for rows, s in noise_groups(seed, self.batch)]

    def narrow(self, batch: int) -> None:
        """Keep the first ``batch`` rows (whole noise groups) and drop the others: their cache, camera,
        pending block, buffered steps and noise. The kept rows play on exactly as they would have."""
        sizes = [rows for rows, _ in self._noise]
        ends = [sum(sizes[: i + 1]) for i in range(len(sizes))]
        if batch not in ends:
            raise SessionError(f"can narrow only to whole noise groups: a batch in {ends}, got {batch}")
        self.rollout.narrow(batch)
        self.batch, self._noise = batch, self._noise[: ends.index(batch) + 1]
        self._graphs = GraphedFunction() if self._cuda_graphs else None
        if self.state is not None:
            self._buffer.narrow(batch)
            self.state = CameraState(self.state.position[:batch], self.state.yaw[:batch], self.state.pitch[:batch])
            self._before, self._shown = self._before[:batch], self._shown[:batch]
        if self._pending is not None:
            self._pending = tuple(t[:batch] for t in self._pending)

    # -- model calls

    def _draw_noise(self, draws: int, block: tuple[int, ...]) -> torch.Tensor:
        """Noise ``[draws, B, *block]``: each noise group's rows from its own generator."""
        parts = [torch.randn((draws, rows, *block), generator=g, device=self.device, dtype=self.dtype)
                 for rows, g in self._noise]
        return parts[0] if len(parts) == 1 else torch.cat(parts, 1)

    def _sample(self, actions, poses, sigmas):
        """Latents ``[B, Tb, C, h, w]`` and decoded frames uint8 ``[B, Tb, H, W, 3]`` of the next block; the
        pending block goes into the cache in the same first forward (a folded commit)."""
        cfg = self.model.dit.cfg
        draws = 1 if self.solver == "euler" else len(sigmas)
        noise = self._draw_noise(draws, (actions.shape[1], cfg.latent_channels, cfg.latent_height, cfg.latent_width))
        sigmas = (*sigmas, 0.0)
        pending, self._pending = self._pending or (), None
        if pending and self.context_noise > 0:  # the history the network sees carries sampler.context_noise
            latents = pending[0]
            eps = self._draw_noise(1, tuple(latents.shape[1:]))[0]
            pending = (add_noise(latents, eps, self.context_noise), *pending[1:])

        def sample(noise, actions, poses, *commit):
            latents = self.rollout.sample(noise[0], sigmas, actions, poses, self.solver, noise=noise[1:], commit=commit or None)
            return latents, to_uint8(self.model.autoencoder.decode(latents))

        if self._graphs is None:
            return sample(noise, actions, poses, *pending)
        key = ("sample", self.cache.frames, sigmas, tuple(noise.shape), tuple(pending[0].shape) if pending else None)
        cache = self.cache

        def save():
            return cache.k.clone(), cache.v.clone(), cache.frames, cache.written

        def restore(state):  # warm-up and capture write the pending block too: undo it
            cache.k.copy_(state[0])
            cache.v.copy_(state[1])
            cache.frames, cache.written = state[2], state[3]

        out = self._graphs(key, sample, (noise, actions, poses, *pending), save, restore)
        if pending:  # the graph holds only the device work of the write: advance the host-side counters
            cache.advance(pending[0].shape[1])
        return tuple(t.clone() for t in out)

    def _block_inputs(self, actions: torch.Tensor, poses: torch.Tensor):
        """Raw ``actions [B, Tb, A]`` and the block's poses ``[B, Tb, 4, 4]`` (float64, CPU) -> the model's
        actions and poses ``[B, Tb + 1, 4, 4]`` on the device, relative to the frame before the block:
        the model is invariant to that rigid transform, and float32 stays exact however far a session walks."""
        poses, self._before = block_poses(poses, self._before), poses[:, -1]
        poses = (rigid_inverse(poses[:, :1]) @ poses).to(self.device, torch.float32)
        return normalize_actions(actions, self.action_spec).to(self.device, self.dtype), poses

    # -- public API

    @torch.no_grad()
    def reset(self, start=None, seeds: Seed | None = None) -> WorldStep:
        """Start a new session from ``start`` (uint8 ``[B, H, W, 3]`` or ``[H, W, 3]``, an image path, or
        None: the model generates the first frame), reseeding the noise with ``seeds`` (see :data:`Seed`;
        None: draw on). Returns the first frame uint8 ``[B, H, W, 3]`` and its pose."""
        if seeds is not None:
            self._reseed(seeds)
        self.cache.reset()
        self._buffer = FrameBuffer(self.model.dit.cfg.block_size)
        self.state = CameraState.start(self.batch, self.controller, dtype=torch.float64)
        pose, self._before = state_to_pose(self.state), None
        actions, poses = self._block_inputs(torch.zeros(self.batch, 1, self.action_spec.width), pose[:, None])
        if start is None:
            latents, frames = self._sample(actions, poses, self.first_frame_steps)
            frames = frames[:, 0]
        else:
            frames = as_start_frames(start, self.batch, self.height, self.width).to(self.device)
            latents = self.model.autoencoder.encode(to_model(frames[:, None], self.dtype))
        self._pending = (latents, actions, poses)
        self.frame_index = 0
        self._shown = frames.cpu()
        return WorldStep(self._shown, pose.float(), None)

    @torch.no_grad()
    def step(self, actions: torch.Tensor, force_frame: torch.Tensor | None = None,
             force_rows: torch.Tensor | None = None, camera: CameraState | None = None) -> WorldStep:
        """The next frame(s) from ``actions [B, A]`` (a frame) or ``[B, Tb, A]`` (a whole block).

        The record's frames are uint8 ``[B, H, W, 3]`` (or ``[B, Tb, H, W, 3]``), its commanded pose the
        camera after the actions ``[B, 4, 4]`` (or each frame's, ``[B, Tb, 4, 4]``); a model has no true
        pose (None). A chunk-wise model stepped a frame at a time shows the frames of each full block of
        actions, one a step (before the first: the start frame). ``camera``: the camera after ``actions
        [B, A]`` as a world beside the session integrated them (taken instead of integrating again).
        With ``force_frame`` (uint8, shaped like the generated frames) the given frames, not the generated
        ones, go into the cache: teacher-forced evaluation (of whole blocks). With ``force_rows`` (row
        indices ``[R]``) only those rows are forced, and ``force_frame`` holds just them (``[R, ...]``).
        """
        if self.state is None:
            raise SessionError("call reset() before step()")
        spec, tb = self.action_spec, self.model.dit.cfg.block_size
        try:
            actions = validate_actions(torch.as_tensor(actions).cpu(), spec)
        except ValueError as e:
            raise SessionError(str(e)) from None
        single = actions.ndim == 2
        if tuple(actions.shape) not in ((self.batch, spec.width), (self.batch, tb, spec.width)):
            want = f"[{self.batch}, {spec.width}]" + ("" if tb == 1 else f" or [{self.batch}, {tb}, {spec.width}]")
            raise SessionError(f"actions must be {want} for this model (block size {tb}), got {tuple(actions.shape)}")
        if force_frame is not None and single and tb > 1:
            raise SessionError(f"force_frame goes with a whole block of actions [{self.batch}, {tb}, {spec.width}]")
        forced = torch.as_tensor(force_frame)[:, None] if force_frame is not None and single else force_frame
        poses = []
        for action in (actions[:, None] if single else actions).unbind(1):
            self.state = step_state(self.state, action, spec, self.controller) if camera is None else camera
            poses.append(state_to_pose(self.state))
            block = self._buffer.push(action, poses[-1])
            if block is not None:
                self._buffer.put(self._generate(*block, forced, force_rows))
        shown = []
        for _ in poses:
            frame = self._buffer.pop()
            self._shown = self._shown if frame is None else frame
            shown.append(self._shown)
        if single:
            return WorldStep(shown[0], poses[0].float(), None)
        return WorldStep(torch.stack(shown, 1), torch.stack(poses, 1).float(), None)

    def _generate(self, actions, poses, force_frame, force_rows) -> torch.Tensor:
        """Frames uint8 ``[B, Tb, H, W, 3]`` (CPU) of the block of raw ``actions [B, Tb, A]`` at ``poses
        [B, Tb, 4, 4]``; its latents (or the forced frames') are left pending."""
        model_actions, model_poses = self._block_inputs(actions, poses)
        latents, frames = self._sample(model_actions, model_poses, self.steps)
        if force_frame is not None:
            forced = torch.as_tensor(force_frame).to(self.device)
            rows = None if force_rows is None else torch.as_tensor(force_rows, device=self.device)
            want = frames.shape if rows is None else (len(rows), *frames.shape[1:])
            if forced.shape != want or forced.dtype != torch.uint8:
                raise SessionError(f"force_frame must be uint8 shaped like the generated frames (of the forced rows), got {tuple(force_frame.shape)} {force_frame.dtype}")
            encoded = self.model.autoencoder.encode(to_model(forced, self.dtype))
            latents = encoded if rows is None else latents.index_copy(0, rows, encoded)
        self._pending = (latents, model_actions, model_poses)
        self.frame_index += actions.shape[1]
        return frames.cpu()
