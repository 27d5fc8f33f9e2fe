"""The interface every ground-truth world follows (procedural renderer, ViZDoom).

A world holds a batch of B independent episodes. ``reset(seeds)`` starts one per seed and returns
frame 0 (the all-zero action); ``step(actions [B, A])`` applies one action to each and returns the
next frame. ``commanded_pose`` is the controller's integration of the actions (exactly what
training recomputes from recorded actions); ``true_pose`` is where the camera really is after
the world's rules (collisions).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from worldmodel.actions import ActionSpec, validate_actions
from worldmodel.camera import CameraState, ControllerSpec, state_to_pose, step_state


class WorldError(ValueError):
    """A world that cannot be made or driven as asked."""


@dataclass
class WorldStep:
    frames: torch.Tensor  # uint8 [B, H, W, 3], CPU
    commanded_pose: torch.Tensor  # float32 [B, 4, 4]
    true_pose: torch.Tensor  # float32 [B, 4, 4]


class World:
    """Base class: keeps the commanded camera and validates actions; subclasses render."""

    name = "world"
    fps = 20

    def __init__(self, batch: int, height: int, width: int, action_spec: ActionSpec, controller: ControllerSpec):
        if batch < 1:
            raise WorldError(f"batch must be >= 1, got {batch}")
        self.batch, self.height, self.width = batch, height, width
        self.action_spec, self.controller = action_spec, controller
        self.commanded: CameraState | None = None

    def reset(self, seeds=None) -> WorldStep:
        seeds = list(range(self.batch)) if seeds is None else [int(s) for s in seeds]
        if len(seeds) != self.batch:
            raise WorldError(f"reset needs one seed per batch item ({self.batch}), got {len(seeds)}")
        self.commanded = CameraState.start(self.batch, self.controller, dtype=torch.float64)
        return self._reset(seeds)

    def step(self, actions) -> WorldStep:
        if self.commanded is None:
            raise WorldError("call reset() before step()")
        actions = validate_actions(torch.as_tensor(actions).cpu(), self.action_spec)
        if tuple(actions.shape) != (self.batch, self.action_spec.width):
            raise WorldError(f"actions must be [{self.batch}, {self.action_spec.width}], got {tuple(actions.shape)}")
        self.commanded = step_state(self.commanded, actions, self.action_spec, self.controller)
        return self._step(actions)

    def commanded_pose(self) -> torch.Tensor:
        return state_to_pose(self.commanded).float()

    def close(self):
        pass

    def _reset(self, seeds: list[int]) -> WorldStep:
        raise NotImplementedError

    def _step(self, actions: torch.Tensor) -> WorldStep:
        raise NotImplementedError
