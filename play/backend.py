"""Window backends: the interface the app loop uses, opening one by name, and the display check.

A backend has ``name``, ``ctx`` (a moderngl context, or None for the software path), and
``events() -> list[play.input.Event]``, ``size() -> (w, h)`` (drawable pixels), ``surface()``
(software path only), ``set_mouse_captured(bool)``, ``toggle_fullscreen() -> str`` (a message),
``present()``, ``close()``, ``window_id()`` (the native window id or None).
"""

from __future__ import annotations

import os
import sys

BACKENDS = ("pygame", "pyglet")
HEADLESS_HINT = "python -m play --headless --frames N --script assets/scripts/demo.txt --out video.mp4"


class BackendError(ValueError):
    """A window that cannot be opened."""


def display_problem(backend: str) -> str | None:
    """Why no window can be opened here (one line), or None when one can be tried."""
    if not sys.platform.startswith("linux"):
        return None
    if os.environ.get("DISPLAY") or os.environ.get("WAYLAND_DISPLAY"):
        return None
    if backend == "pygame" and os.environ.get("SDL_VIDEODRIVER", "") in ("dummy", "offscreen", "kmsdrm"):
        return None
    return f"no display found (DISPLAY and WAYLAND_DISPLAY are unset); run without a window: {HEADLESS_HINT}"


def open_backend(name: str, size: tuple[int, int], title: str, gl: bool = True):
    """Open a window with backend ``name``; ``gl=False`` skips OpenGL (pygame only)."""
    if name not in BACKENDS:
        raise BackendError(f"unknown backend {name!r} (choose from {', '.join(BACKENDS)})")
    problem = display_problem(name)
    if problem:
        raise BackendError(problem)
    if name == "pygame":
        from play.pygame_backend import PygameBackend

        return PygameBackend(size, title, gl=gl)
    from play.pyglet_backend import PygletBackend

    return PygletBackend(size, title)
