"""Camera controller (actions -> commanded poses) and relative pose helpers.

Conventions. Poses are world-from-camera ``[..., 4, 4]`` with OpenCV camera axes (x right,
y down, z forward). The world uses the same axes at yaw = pitch = 0: gravity points along +y,
so the ground is the plane y = 0 and a standing camera has y = -eye_height.
Positive yaw turns right (forward z towards +x); positive pitch looks up.

One action moves the camera from frame t-1 to frame t: first turn (mouse), then walk along the
new heading (keys). The controller is the only place that integrates actions, in play and in
training alike; it ignores collisions (worlds report their own true poses).
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

import torch

from worldmodel.actions import ActionSpec, validate_actions


@dataclass(frozen=True)
class ControllerSpec:
    walk_speed: float = 0.12  # world units per frame
    sprint_factor: float = 2.0
    max_pitch: float = math.radians(80.0)
    eye_height: float = 1.0

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "ControllerSpec":
        unknown = set(d) - set(cls.__dataclass_fields__)
        if unknown:
            raise ValueError(f"unknown controller fields {sorted(unknown)}")
        return cls(**{k: float(v) for k, v in d.items()})


@dataclass
class CameraState:
    """Batched camera state: ``position [B, 3]``, ``yaw [B]``, ``pitch [B]`` (radians)."""

    position: torch.Tensor
    yaw: torch.Tensor
    pitch: torch.Tensor

    @classmethod
    def start(cls, batch: int, ctrl: ControllerSpec = ControllerSpec(), device=None, dtype=torch.float32):
        pos = torch.zeros(batch, 3, device=device, dtype=dtype)
        pos[:, 1] = -ctrl.eye_height
        zeros = torch.zeros(batch, device=device, dtype=dtype)
        return cls(pos, zeros, zeros.clone())

    def clone(self) -> "CameraState":
        return CameraState(self.position.clone(), self.yaw.clone(), self.pitch.clone())


def yaw_pitch_rotation(yaw: torch.Tensor, pitch: torch.Tensor) -> torch.Tensor:
    """World-from-camera rotation ``[..., 3, 3]`` = R_y(yaw) @ R_x(pitch)."""
    cy, sy, cp, sp = yaw.cos(), yaw.sin(), pitch.cos(), pitch.sin()
    zero, one = torch.zeros_like(yaw), torch.ones_like(yaw)
    r_yaw = torch.stack([cy, zero, sy, zero, one, zero, -sy, zero, cy], -1).unflatten(-1, (3, 3))
    r_pitch = torch.stack([one, zero, zero, zero, cp, -sp, zero, sp, cp], -1).unflatten(-1, (3, 3))
    return r_yaw @ r_pitch


def state_to_pose(state: CameraState) -> torch.Tensor:
    """World-from-camera ``[B, 4, 4]``."""
    b = state.position.shape[0]
    pose = torch.zeros(b, 4, 4, device=state.position.device, dtype=state.position.dtype)
    pose[:, :3, :3] = yaw_pitch_rotation(state.yaw, state.pitch)
    pose[:, :3, 3] = state.position
    pose[:, 3, 3] = 1.0
    return pose


def step_state(state: CameraState, action: torch.Tensor, spec: ActionSpec, ctrl: ControllerSpec) -> CameraState:
    """Apply one action ``[B, A]`` (validated) to ``state``; returns the new state."""
    k = {key: action[:, i] for i, key in enumerate(spec.keys)}
    dx, dy = action[:, -2].to(state.yaw.dtype), action[:, -1].to(state.yaw.dtype)
    yaw = torch.remainder(state.yaw + dx * spec.mouse_scale + math.pi, 2 * math.pi) - math.pi
    pitch = (state.pitch - dy * spec.mouse_scale).clamp(-ctrl.max_pitch, ctrl.max_pitch)
    zero = torch.zeros_like(yaw)
    forward = k.get("W", zero) - k.get("S", zero)
    strafe = k.get("D", zero) - k.get("A", zero)
    speed = ctrl.walk_speed * (1.0 + (ctrl.sprint_factor - 1.0) * k.get("SHIFT", zero))
    fwd = torch.stack([yaw.sin(), zero, yaw.cos()], -1)
    right = torch.stack([yaw.cos(), zero, -yaw.sin()], -1)
    move = speed[:, None] * (forward[:, None] * fwd + strafe[:, None] * right)
    return CameraState(state.position + move.to(state.position.dtype), yaw, pitch)


def integrate(actions: torch.Tensor, spec: ActionSpec, ctrl: ControllerSpec = ControllerSpec(),
              start: CameraState | None = None) -> tuple[torch.Tensor, CameraState]:
    """Commanded poses for ``actions [B, T, A]``: returns ``poses [B, T, 4, 4]`` and the final state.

    ``poses[:, t]`` is the pose after applying ``actions[:, t]`` to the pose of frame t-1 (or ``start``).
    """
    actions = validate_actions(actions, spec)
    if actions.ndim != 3:
        raise ValueError(f"actions must be [B, T, A], got shape {tuple(actions.shape)}")
    state = start.clone() if start is not None else CameraState.start(actions.shape[0], ctrl, actions.device)
    poses = []
    for t in range(actions.shape[1]):
        state = step_state(state, actions[:, t], spec, ctrl)
        poses.append(state_to_pose(state))
    return torch.stack(poses, 1), state


def rigid_inverse(pose: torch.Tensor) -> torch.Tensor:
    """Inverse of rigid transforms ``[..., 4, 4]`` (R^T, -R^T p), exact for rotations."""
    rot_t = pose[..., :3, :3].transpose(-1, -2)
    inv = torch.zeros_like(pose)
    inv[..., :3, :3] = rot_t
    inv[..., :3, 3] = -(rot_t @ pose[..., :3, 3:4]).squeeze(-1)
    inv[..., 3, 3] = 1.0
    return inv


def relative_motion(poses: torch.Tensor) -> torch.Tensor:
    """Per-frame motion ``[B, T, 4, 4]``: pose_{t-1}^-1 @ pose_t, identity for t = 0.

    A rigid transform G applied to all poses leaves it unchanged: what makes camera conditioning
    (and a rolling KV cache) independent of where a session is.
    """
    prev = torch.cat([poses[:, :1], poses[:, :-1]], 1)
    return rigid_inverse(prev) @ poses
