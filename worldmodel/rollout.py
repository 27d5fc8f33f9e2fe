"""The one KV-cached block loop: a model's cache, a block's inputs, sampling a block, committing it.

Frames are generated block by block (the start frame is a block of its own, then blocks of
``block_size`` frames): a block is sampled from noise through given sigmas against the frames held
in the KV cache, then one t = 0 forward of the clean block writes it into the cache (the commit); play
and :class:`CachedRollout` fold that forward into the next block's first one (one forward over [clean
block | noisy block]), unless that one carries gradient.
Play (:class:`worldmodel.session.Session`), the training stages (self forcing, sample videos) and
the evaluation all generate through :class:`Rollout`; :class:`CachedRollout` drives it over a clip.

Classifier-free guidance runs the conditional and the unconditional prediction as one forward of
the doubled batch: the cache then holds each row twice (both halves written alike).
Shapes: x, latents ``[B, Tb, C, h, w]``; actions ``[B, Tb, A]`` (normalised); poses
``[B, Tb + 1, 4, 4]``, the frame before the block first (:func:`block_poses`).
"""

from __future__ import annotations

from typing import Callable

import torch

from worldmodel import flow
from worldmodel.transformer import WorldDiT, block_ids


def block_ranges(num_frames: int, block_size: int) -> list[tuple[int, int]]:
    """Frame ranges ``[start, end)`` of the blocks of a clip (the first frame is a block of its own)."""
    ids = block_ids(num_frames, block_size).tolist()
    return [(ids.index(b), len(ids) - ids[::-1].index(b)) for b in range(ids[-1] + 1)]


def block_poses(poses: torch.Tensor, before: torch.Tensor | None = None) -> torch.Tensor:
    """A block's poses ``[B, Tb + 1, 4, 4]``: the frame before it ``before [B, 4, 4]``, then its own
    ``poses [B, Tb, 4, 4]``. The first block has no frame before it: it repeats its first pose (no motion)."""
    return torch.cat([poses[:, :1] if before is None else before[:, None], poses], 1)


class Rollout:
    """The KV cache of ``dit`` for ``batch`` rows (twice that with guidance ``guidance`` != 1).
    ``context_noise``: the noise level the committed blocks carry, given to the network with them (0: clean;
    the caller noises them, :func:`worldmodel.flow.add_noise`)."""

    def __init__(self, dit: WorldDiT, batch: int, device=None, dtype=torch.float32, guidance: float = 1.0,
                 context_noise: float = 0.0):
        self.dit, self.guidance, self.device = dit, float(guidance), torch.device(device or "cpu")
        self.context_noise = float(context_noise)
        self.copies = 1 if self.guidance == 1.0 else 2  # rows per play in the cache and the network batch
        self.cache = dit.new_cache(self.copies * batch, self.device, dtype)
        self.keep = self._condition_mask(batch)  # kept: CUDA graphs read it

    def _condition_mask(self, batch: int) -> torch.Tensor | None:
        """``cond_keep [2B]`` of a guided forward (the conditional half first), or None unguided."""
        return None if self.copies == 1 else torch.arange(2 * batch, device=self.device) < batch

    def _twice(self, x: torch.Tensor) -> torch.Tensor:
        """``x [B, ...]`` as the network batch ``[copies * B, ...]`` (guided: both halves alike)."""
        return x if self.copies == 1 else torch.cat([x, x])

    def denoiser(self, actions: torch.Tensor, poses: torch.Tensor, commit: tuple | None = None) -> Callable:
        """The guided velocity model ``(x, sigma) -> v`` of the block with these inputs against the
        cache (``sigma`` a float or ``[B, Tb]``; ``v`` in the dtype of ``x``). ``commit``: a clean block
        ``(latents, actions, poses)`` that the first call's forward also writes into the cache (a folded
        commit, see ``WorldDiT.forward_cached``); if that call runs under grad mode (a self-forcing exit step), the
        commit is written by a forward of its own, without gradient, first."""

        def velocity(x, sigma):
            nonlocal commit
            if commit is not None and torch.is_grad_enabled():
                self.write(*commit)
                commit = None
            folded, commit = None if commit is None else tuple(self._twice(t) for t in commit), None
            sigma = flow.frame_sigmas(sigma, x)
            v = self.dit.forward_cached(self._twice(x), self._twice(sigma), self._twice(actions), self._twice(poses),
                                        self.cache, cond_keep=self.keep, commit=folded,
                                        commit_sigma=self.context_noise).to(x.dtype)
            return v if self.copies == 1 else flow.apply_cfg(*v.chunk(2), self.guidance)

        return velocity

    def sample(self, x, sigmas, actions, poses, solver: str = "renoise", *, generator=None, noise=None,
               commit: tuple | None = None) -> torch.Tensor:
        """The block from ``x`` at ``sigmas[0]`` through ``sigmas`` (ending at 0) with ``flow.SAMPLERS[solver]``;
        ``commit``: the previous block, written into the cache by the first forward (:meth:`denoiser`)."""
        return flow.SAMPLERS[solver](self.denoiser(actions, poses, commit), x, sigmas, generator=generator, noise=noise)

    @torch.no_grad()
    def write(self, latents: torch.Tensor, actions: torch.Tensor, poses: torch.Tensor) -> None:
        """The commit: the block ``latents`` (at noise level ``context_noise``) into the cache with one forward."""
        sigma = latents.new_full(latents.shape[:2], self.context_noise)
        self.dit.forward_cached(self._twice(latents), self._twice(sigma), self._twice(actions), self._twice(poses),
                                self.cache, write=True)

    def narrow(self, batch: int) -> None:
        """Keep the cache of the first ``batch`` rows (of each half)."""
        rows = self.cache.k.shape[1] // self.copies
        keep = torch.cat([torch.arange(batch) + half * rows for half in range(self.copies)]).to(self.device)
        cache = self.dit.new_cache(self.copies * batch, self.device, self.cache.k.dtype)
        cache.k.copy_(self.cache.k[:, keep])
        cache.v.copy_(self.cache.v[:, keep])
        cache.frames, cache.written = self.cache.frames, self.cache.written
        self.cache, self.keep = cache, self._condition_mask(batch)


class CachedRollout(Rollout):
    """One clip generated block by block: block ``b`` takes its inputs from ``clip`` (normalised
    ``actions [B, T, A]`` and ``poses [B, T, 4, 4]``, e.g. a ``train.clips.Clip``)."""

    def __init__(self, dit: WorldDiT, clip, dtype=torch.float32, guidance: float = 1.0):
        super().__init__(dit, clip.actions.shape[0], clip.actions.device, dtype, guidance)
        self.clip = clip
        self.blocks = block_ranges(clip.actions.shape[1], dit.cfg.block_size)

    def block_inputs(self, b: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Block ``b``'s actions ``[B, Tb, A]`` and poses ``[B, Tb + 1, 4, 4]`` (:func:`block_poses`)."""
        start, end = self.blocks[b]
        before = self.clip.poses[:, start - 1] if start else None
        return self.clip.actions[:, start:end], block_poses(self.clip.poses[:, start:end], before)

    def block_denoiser(self, b: int, previous: torch.Tensor | None = None) -> Callable:
        """Block ``b``'s velocity model ``(x, sigma) -> v`` (:meth:`denoiser`) given the blocks committed so far and
        ``previous [B, Tb', C, h, w]``, the clean block ``b - 1``, if given: its first forward commits it."""
        return self.denoiser(*self.block_inputs(b), None if previous is None else (previous, *self.block_inputs(b - 1)))

    def commit(self, latents: torch.Tensor, b: int) -> None:
        """Write the clean block ``b`` ``latents [B, Tb, C, h, w]`` into the cache."""
        self.write(latents, *self.block_inputs(b))

    def generate(self, first: torch.Tensor, sample_block: Callable) -> torch.Tensor:
        """Latents ``[B, T, C, h, w]``: the given first frame ``first [B, 1, C, h, w]``, then each block from
        ``sample_block(velocity, b, shape) -> latents`` (``velocity``: :meth:`block_denoiser`); each block is
        committed (detached, without gradient) by the next one's first forward."""
        out = [first]
        for b, (start, end) in enumerate(self.blocks[1:], 1):
            velocity = self.block_denoiser(b, out[-1].detach())
            out.append(sample_block(velocity, b, (first.shape[0], end - start, *first.shape[2:])))
        return torch.cat(out, 1)


class FrameBuffer:
    """Per-frame inputs gathered into blocks of ``size`` frames, and each block's frames handed out one
    a step: a chunk-wise model stepped frame by frame shows each frame ``size - 1`` steps late."""

    def __init__(self, size: int):
        self.size, self.inputs, self.outputs = size, [], []

    def push(self, *inputs: torch.Tensor) -> list[torch.Tensor] | None:
        """One frame's inputs (each ``[B, ...]``); the block's (each ``[B, size, ...]``) once it is full."""
        self.inputs.append(inputs)
        if len(self.inputs) < self.size:
            return None
        block, self.inputs = self.inputs, []
        return [torch.stack(parts, 1) for parts in zip(*block)]

    def put(self, frames: torch.Tensor) -> None:
        """A block's outputs ``[B, size, ...]``, handed out by :meth:`pop` in order."""
        self.outputs += frames.unbind(1)

    def pop(self) -> torch.Tensor | None:
        """The next frame's output ``[B, ...]``, or None before the first block is full."""
        return self.outputs.pop(0) if self.outputs else None

    def narrow(self, batch: int) -> None:
        """Keep the first ``batch`` rows of everything held."""
        self.inputs = [tuple(t[:batch] for t in frame) for frame in self.inputs]
        self.outputs = [t[:batch] for t in self.outputs]
