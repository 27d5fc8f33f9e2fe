"""The interface every ground-truth world follows (procedural renderer, ViZDoom).

A world holds a batch of B independent episodes. ``reset(seeds)`` starts one per seed and returns
frame 0 (the all-zero action); ``step(actions [B, A])`` applies one action to each and returns the
next frame. ``commanded_pose`` is the controller's integration of the actions, computed here with
:func:`worldmodel.camera.step_state` from :meth:`CameraState.start` in float64, exactly what
training and play recompute from recorded actions; ``true_pose`` is where the camera really is
after the world's own rules (collisions, momentum), expressed in the same episode frame (both
start at the same pose).
"""

from __future__ import annotations

import numbers
from dataclasses import dataclass

import torch

from worldmodel.actions import ActionSpec, validate_actions
from worldmodel.camera import CameraState, ControllerSpec, state_to_pose, step_state


class WorldError(ValueError):
    """A world that cannot be made or driven as asked."""


@dataclass
class WorldStep:
    """What a world returns after a reset or a step; every tensor is on the CPU."""

    frames: torch.Tensor  # uint8 [B, H, W, 3]
    commanded_pose: torch.Tensor  # float32 [B, 4, 4], world-from-camera, OpenCV axes
    true_pose: torch.Tensor | None  # float32 [B, 4, 4], same frame as commanded_pose (None from a model session)
    restarted: torch.Tensor | None = None  # bool [B]: the world restarted this item's episode (Doom level exit)


def check_seeds(seeds, batch: int) -> list[int]:
    """One non-negative integer seed per batch item."""
    seeds = list(seeds)
    if len(seeds) != batch:
        raise WorldError(f"reset needs one seed per batch item ({batch}), got {len(seeds)}")
    for s in seeds:
        if isinstance(s, torch.Tensor) and s.ndim == 0 and not s.is_floating_point():
            s = int(s)
        if isinstance(s, bool) or not isinstance(s, numbers.Integral):
            raise WorldError(f"seeds must be integers, got {s!r}")
        if int(s) < 0:
            raise WorldError(f"seeds must be non-negative, got {int(s)}")
    return [int(s) for s in seeds]


class World:
    """Base class: validates seeds and actions and keeps the commanded camera; subclasses render.

    Subclasses set ``name`` and ``fps`` and implement ``_reset(seeds) -> WorldStep`` and
    ``_step(actions [B, A] float32 CPU) -> WorldStep`` (called after ``self.commanded`` advanced).
    """

    name = "world"
    fps = 20.0

    def __init__(self, batch: int, height: int, width: int, action_spec: ActionSpec, controller: ControllerSpec):
        if isinstance(batch, bool) or not isinstance(batch, int) or batch < 1:
            raise WorldError(f"batch must be a positive integer, got {batch!r}")
        if min(height, width) < 8:
            raise WorldError(f"frames must be at least 8x8 pixels, got {height}x{width}")
        self.batch, self.height, self.width = batch, int(height), int(width)
        self.action_spec, self.controller = action_spec, controller
        self.commanded: CameraState | None = None

    def reset(self, seeds=None) -> WorldStep:
        """Start one episode per seed (default ``0 .. B-1``); returns frame 0."""
        seeds = check_seeds(range(self.batch) if seeds is None else seeds, self.batch)
        self.commanded = CameraState.start(self.batch, self.controller, dtype=torch.float64)
        return self._reset(seeds)

    def step(self, actions) -> WorldStep:
        """Apply ``actions [B, A]`` (raw: keys 0/1, mouse counts); returns the next frame."""
        if self.commanded is None:
            raise WorldError("call reset() before step()")
        actions = validate_actions(torch.as_tensor(actions).detach().cpu(), self.action_spec)
        if tuple(actions.shape) != (self.batch, self.action_spec.width):
            raise WorldError(f"actions must be [{self.batch}, {self.action_spec.width}], got {tuple(actions.shape)}")
        self.commanded = step_state(self.commanded, actions, self.action_spec, self.controller)
        return self._step(actions)

    def commanded_pose(self) -> torch.Tensor:
        """The commanded pose of every batch item, float32 ``[B, 4, 4]``."""
        return state_to_pose(self.commanded).float()

    def close(self):
        """Release engines and worker processes (nothing to do for a pure-torch world)."""

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    def _reset(self, seeds: list[int]) -> WorldStep:
        raise NotImplementedError

    def _step(self, actions: torch.Tensor) -> WorldStep:
        raise NotImplementedError
