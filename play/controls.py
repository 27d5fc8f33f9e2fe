"""The controls file: model action keys, client commands and mouse settings (TOML)."""

from __future__ import annotations

import math
import tomllib
from dataclasses import dataclass
from pathlib import Path

from worldmodel.actions import ActionSpec
from play.keys import KeyNameError, canonical_key

DEFAULT_CONTROLS = Path(__file__).with_name("default_controls.toml")
COMMANDS = (
    "release_mouse", "quit", "pause", "step", "reset", "hud", "record", "filter", "fullscreen", "screenshot",
    "steps_1", "steps_2", "steps_3", "steps_4",
)
MOUSE_FIELDS = ("sensitivity", "invert_y")
SECTIONS = ("keys", "mouse", "commands")


class ControlsError(ValueError):
    """A controls file that cannot be used."""


@dataclass(frozen=True)
class Controls:
    """Resolved controls: ``actions`` maps a model key to keyboard keys, ``commands`` a command to one key."""

    actions: dict[str, tuple[str, ...]]
    commands: dict[str, str]
    sensitivity: float
    invert_y: bool

    def bindings(self) -> dict[str, tuple[str, str]]:
        """Keyboard key -> ("action", model key) or ("command", command name)."""
        out = {}
        for action, keys in self.actions.items():
            for key in keys:
                out[key] = ("action", action)
        for command, key in self.commands.items():
            out[key] = ("command", command)
        return out


def _read_toml(path: Path) -> dict:
    try:
        with open(path, "rb") as f:
            return tomllib.load(f)
    except FileNotFoundError:
        raise ControlsError(f"controls file {path} does not exist") from None
    except tomllib.TOMLDecodeError as e:
        raise ControlsError(f"controls file {path} is not valid TOML: {e}") from None
    except OSError as e:
        raise ControlsError(f"controls file {path} cannot be read: {e.strerror}") from None


def _key(path: Path, where: str, name) -> str:
    if not isinstance(name, str):
        raise ControlsError(f"controls file {path}: {where} must be a key name string, got {name!r}")
    try:
        return canonical_key(name)
    except KeyNameError as e:
        raise ControlsError(f"controls file {path}: {where}: {e}") from None


def _check_sections(path: Path, data: dict) -> None:
    for section, table in data.items():
        if section not in SECTIONS:
            raise ControlsError(f"controls file {path}: unknown section [{section}] (known: {', '.join(SECTIONS)})")
        if not isinstance(table, dict):
            raise ControlsError(f"controls file {path}: [{section}] must be a table")
    for name in data.get("commands", {}):
        if name not in COMMANDS:
            raise ControlsError(f"controls file {path}: unknown command {name!r} in [commands] (known: {', '.join(COMMANDS)})")
    for name in data.get("mouse", {}):
        if name not in MOUSE_FIELDS:
            raise ControlsError(f"controls file {path}: unknown setting {name!r} in [mouse] (known: {', '.join(MOUSE_FIELDS)})")


def _action_keys(path: Path, action: str, keys) -> tuple[str, ...]:
    if isinstance(keys, str):
        keys = [keys]
    if not isinstance(keys, list) or not keys:
        raise ControlsError(f"controls file {path}: [keys] {action} must be a key name or a non-empty list of them")
    return tuple(_key(path, f"[keys] {action}", k) for k in keys)


def load_controls(spec: ActionSpec, path: str | Path | None = None) -> Controls:
    """The default controls, with the entries of the file at ``path`` replacing theirs, checked against ``spec``.

    Actions in ``path`` that ``spec`` lacks are an error; those of the default file are dropped.
    """
    default = _read_toml(DEFAULT_CONTROLS)
    _check_sections(DEFAULT_CONTROLS, default)
    user_path = Path(path) if path is not None else None
    user = _read_toml(user_path) if user_path is not None else {}
    if user_path is not None:
        _check_sections(user_path, user)
    actions = {}
    for action, keys in default["keys"].items():
        if action.upper() in spec.keys:
            actions[action.upper()] = _action_keys(DEFAULT_CONTROLS, action, keys)
    for action, keys in user.get("keys", {}).items():
        if action.upper() not in spec.keys:
            raise ControlsError(
                f"controls file {user_path}: unknown action {action!r} in [keys]; this model's keys are {', '.join(spec.keys)}"
            )
        actions[action.upper()] = _action_keys(user_path, action, keys)
    commands = {}
    for source, data in ((DEFAULT_CONTROLS, default), (user_path, user)):
        for name, key in data.get("commands", {}).items():
            commands[name] = _key(source, f"[commands] {name}", key)
    missing = [c for c in COMMANDS if c not in commands]
    if missing:
        raise ControlsError(f"controls file {DEFAULT_CONTROLS}: commands {missing} have no key")
    mouse = {**default.get("mouse", {}), **user.get("mouse", {})}
    origin = user_path if user.get("mouse") else DEFAULT_CONTROLS
    sensitivity = mouse.get("sensitivity", 1.0)
    if isinstance(sensitivity, bool) or not isinstance(sensitivity, (int, float)) or not (
        math.isfinite(sensitivity) and sensitivity > 0
    ):
        raise ControlsError(f"controls file {origin}: [mouse] sensitivity must be a positive number, got {sensitivity!r}")
    invert_y = mouse.get("invert_y", False)
    if not isinstance(invert_y, bool):
        raise ControlsError(f"controls file {origin}: [mouse] invert_y must be true or false, got {invert_y!r}")
    controls = Controls(actions, commands, float(sensitivity), invert_y)
    _check_conflicts(controls, user_path or DEFAULT_CONTROLS)
    return controls


def _check_conflicts(controls: Controls, path: Path) -> None:
    seen: dict[str, str] = {}
    uses = [(key, f"action {a}") for a, keys in controls.actions.items() for key in keys]
    uses += [(key, f"command {c}") for c, key in controls.commands.items()]
    for key, use in uses:
        if key in seen and seen[key] != use:
            raise ControlsError(f"controls file {path}: key {key!r} is bound to both {seen[key]} and {use}")
        seen[key] = use
