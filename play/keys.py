"""Backend-independent key names (used in the controls file) and their pygame / pyglet key codes."""

from __future__ import annotations

import string

_NAMED = {  # name: (pygame constant, pyglet constant)
    "space": ("K_SPACE", "SPACE"),
    "escape": ("K_ESCAPE", "ESCAPE"),
    "return": ("K_RETURN", "RETURN"),
    "tab": ("K_TAB", "TAB"),
    "backspace": ("K_BACKSPACE", "BACKSPACE"),
    "insert": ("K_INSERT", "INSERT"),
    "delete": ("K_DELETE", "DELETE"),
    "home": ("K_HOME", "HOME"),
    "end": ("K_END", "END"),
    "page up": ("K_PAGEUP", "PAGEUP"),
    "page down": ("K_PAGEDOWN", "PAGEDOWN"),
    "up": ("K_UP", "UP"),
    "down": ("K_DOWN", "DOWN"),
    "left": ("K_LEFT", "LEFT"),
    "right": ("K_RIGHT", "RIGHT"),
    "left shift": ("K_LSHIFT", "LSHIFT"),
    "right shift": ("K_RSHIFT", "RSHIFT"),
    "left ctrl": ("K_LCTRL", "LCTRL"),
    "right ctrl": ("K_RCTRL", "RCTRL"),
    "left alt": ("K_LALT", "LALT"),
    "right alt": ("K_RALT", "RALT"),
    "minus": ("K_MINUS", "MINUS"),
    "equals": ("K_EQUALS", "EQUAL"),
    "comma": ("K_COMMA", "COMMA"),
    "period": ("K_PERIOD", "PERIOD"),
    "slash": ("K_SLASH", "SLASH"),
    "semicolon": ("K_SEMICOLON", "SEMICOLON"),
}

KEY_CONSTANTS: dict[str, tuple[str, str]] = {
    **{c: (f"K_{c}", c.upper()) for c in string.ascii_lowercase},
    **{d: (f"K_{d}", f"_{d}") for d in string.digits},
    **{f"f{i}": (f"K_F{i}", f"F{i}") for i in range(1, 13)},
    **_NAMED,
}
"""Every key name the controls file accepts -> (pygame constant name, pyglet constant name)."""


class KeyNameError(ValueError):
    """A key name that the controls file does not know."""


def canonical_key(name: str) -> str:
    """The canonical spelling of a key name ("W" -> "w", "Left  Shift" -> "left shift")."""
    canonical = " ".join(str(name).lower().split())
    if canonical not in KEY_CONSTANTS:
        raise KeyNameError(f"unknown key name {name!r} (use a-z, 0-9, f1-f12 or one of: {', '.join(_NAMED)})")
    return canonical


def key_table(backend: str) -> dict[int, str]:
    """Key code of ``backend`` ("pygame" | "pyglet") -> canonical key name."""
    if backend == "pygame":
        import pygame

        return {getattr(pygame, pg): name for name, (pg, _) in KEY_CONSTANTS.items()}
    if backend == "pyglet":
        import pyglet

        pyglet.options["shadow_window"] = False
        from pyglet.window import key

        return {getattr(key, pk): name for name, (_, pk) in KEY_CONSTANTS.items()}
    raise ValueError(f"unknown backend {backend!r}")
