"""The input layer shared by all window backends: normalised events -> per-frame model actions and commands."""

from __future__ import annotations

from dataclasses import dataclass, replace

import torch

from worldmodel.actions import ActionSpec, make_action
from play.controls import Controls


@dataclass(frozen=True)
class KeyEvent:
    name: str  # canonical key name (play.keys)
    down: bool


@dataclass(frozen=True)
class MouseMotion:
    dx: float  # counts, right positive
    dy: float  # counts, down positive


@dataclass(frozen=True)
class MouseButton:
    button: int
    down: bool


@dataclass(frozen=True)
class Resize:
    width: int
    height: int


@dataclass(frozen=True)
class FocusLost:
    pass


@dataclass(frozen=True)
class Quit:
    pass


Event = KeyEvent | MouseMotion | MouseButton | Resize | FocusLost | Quit


@dataclass(frozen=True)
class InputSample:
    """Pressed keys and mouse counts of one model action; times are ``time.perf_counter()`` seconds.

    ``first_sampled_at`` is when the oldest input merged into it was sampled, ``sampled_at`` the newest.
    """

    spec: ActionSpec
    keys: tuple[str, ...]
    dx: float
    dy: float
    first_sampled_at: float
    sampled_at: float

    @property
    def action(self) -> torch.Tensor:
        """The model action ``[A]``."""
        return make_action(self.spec, self.keys, self.dx, self.dy)


def action_sample(action: torch.Tensor, spec: ActionSpec, now: float) -> InputSample:
    """An input sample for a scripted or replayed action ``[A]``."""
    return InputSample(spec, spec.pressed(action), *spec.mouse(action), now, now)


def merge_samples(older: InputSample, newer: InputSample) -> InputSample:
    """One action for two ticks the model could not keep up with: newest keys, summed mouse motion."""
    return replace(newer, dx=older.dx + newer.dx, dy=older.dy + newer.dy, first_sampled_at=older.first_sampled_at)


class InputMapper:
    """Tracks held keys and mouse motion; ``sample`` turns them into one action and clears the motion."""

    def __init__(self, controls: Controls, spec: ActionSpec):
        self.controls = controls
        self.spec = spec
        self.bindings = controls.bindings()
        self.held: set[str] = set()
        self._dx = 0.0
        self._dy = 0.0

    def key(self, name: str, down: bool) -> str | None:
        """Update held keys; returns the command bound to ``name`` when it is pressed, else None."""
        if down:
            self.held.add(name)
        else:
            self.held.discard(name)
        kind, target = self.bindings.get(name, (None, None))
        return target if kind == "command" and down else None

    def motion(self, dx: float, dy: float) -> None:
        sign_y = -1.0 if self.controls.invert_y else 1.0
        self._dx += dx * self.controls.sensitivity
        self._dy += dy * self.controls.sensitivity * sign_y

    def release_all(self) -> None:
        """Forget held keys and pending motion (focus lost, mouse released)."""
        self.held.clear()
        self._dx = self._dy = 0.0

    def pressed_actions(self) -> tuple[str, ...]:
        """Model keys currently pressed, in the action spec's order."""
        down = {self.bindings[k][1] for k in self.held if self.bindings.get(k, ("",))[0] == "action"}
        return tuple(k for k in self.spec.keys if k in down)

    def sample(self, now: float) -> InputSample:
        keys = self.pressed_actions()
        dx, dy = self._dx, self._dy
        self._dx = self._dy = 0.0
        return InputSample(self.spec, keys, dx, dy, now, now)
