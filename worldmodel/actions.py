"""The action schema shared by play, recordings, worlds and models.

A per-frame action is a float vector ``[A]`` laid out as ``keys multi-hot (K) | mouse dx | mouse dy``
with ``A = K + 2``. Mouse motion is in raw counts (pixels of relative mouse motion); the
:class:`ActionSpec` says how many radians of turn one count is. The spec is data: it is stored
in every recording's metadata and every model's checkpoint.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field

import torch

DEFAULT_KEYS = ("W", "A", "S", "D", "SHIFT")
"""Forward, strafe left, back, strafe right, sprint (doubles walking speed). No jump: neither world has one."""

TURN_NORM = 0.15
"""Radians of turn per frame that map to 1.0 in the model's normalised input."""


class ActionError(ValueError):
    """An action tensor or action spec that cannot be used."""


@dataclass(frozen=True)
class ActionSpec:
    """Which keys the action vector holds, and how mouse counts turn into radians."""

    keys: tuple[str, ...] = field(default=DEFAULT_KEYS)
    mouse_scale: float = 0.004  # radians of yaw/pitch per mouse count

    def __post_init__(self):
        object.__setattr__(self, "keys", tuple(str(k).upper() for k in self.keys))
        if len(set(self.keys)) != len(self.keys) or not self.keys:
            raise ActionError(f"action keys must be unique and non-empty, got {self.keys}")
        if not (math.isfinite(self.mouse_scale) and self.mouse_scale > 0):
            raise ActionError(f"mouse_scale must be a positive number, got {self.mouse_scale}")

    @property
    def width(self) -> int:
        """A: the length of one action vector."""
        return len(self.keys) + 2

    def key_index(self, key: str) -> int:
        try:
            return self.keys.index(key.upper())
        except ValueError:
            raise ActionError(f"unknown key {key!r}; this action spec has keys {list(self.keys)}") from None

    def pressed(self, action: torch.Tensor) -> tuple[str, ...]:
        """The keys held in ``action [A]``, in the spec's order."""
        return tuple(k for k, v in zip(self.keys, action[: len(self.keys)].tolist()) if v)

    def mouse(self, action: torch.Tensor) -> tuple[float, float]:
        """The mouse motion ``(dx, dy)`` of ``action [A]``, in counts."""
        return float(action[-2]), float(action[-1])

    def to_dict(self) -> dict:
        d = asdict(self)
        d["keys"] = list(self.keys)
        return d

    @classmethod
    def from_dict(cls, d: dict) -> "ActionSpec":
        unknown = set(d) - {"keys", "mouse_scale"}
        if unknown:
            raise ActionError(f"unknown action-spec fields {sorted(unknown)}")
        return cls(keys=tuple(d.get("keys", DEFAULT_KEYS)), mouse_scale=float(d.get("mouse_scale", 0.004)))


def make_action(spec: ActionSpec, keys=(), dx: float = 0.0, dy: float = 0.0) -> torch.Tensor:
    """One action ``[A]`` from pressed key names and mouse counts."""
    a = torch.zeros(spec.width)
    for k in keys:
        a[spec.key_index(k)] = 1.0
    a[-2], a[-1] = float(dx), float(dy)
    return a


def validate_actions(actions: torch.Tensor, spec: ActionSpec) -> torch.Tensor:
    """Check ``actions [..., A]``: right width, finite, keys exactly 0 or 1. Returns them as float32."""
    if not isinstance(actions, torch.Tensor):
        actions = torch.as_tensor(actions)
    if actions.ndim == 0 or actions.shape[-1] != spec.width:
        raise ActionError(f"actions have width {tuple(actions.shape)[-1:] or 'scalar'}, expected {spec.width} "
                          f"({len(spec.keys)} keys {list(spec.keys)} + mouse dx, dy)")
    actions = actions.float()
    if not torch.isfinite(actions).all():
        raise ActionError("actions contain NaN or infinite values")
    keys = actions[..., : len(spec.keys)]
    if not ((keys == 0) | (keys == 1)).all():
        raise ActionError("key entries of an action must be exactly 0 or 1")
    return actions


def normalize_actions(actions: torch.Tensor, spec: ActionSpec) -> torch.Tensor:
    """The model's view of ``actions [..., A]``: keys as they are, mouse turn in units of TURN_NORM radians.

    Mouse counts become radians first, so models do not depend on the recording's mouse scale.
    """
    k = len(spec.keys)
    return torch.cat([actions[..., :k], actions[..., k:] * (spec.mouse_scale / TURN_NORM)], dim=-1)
