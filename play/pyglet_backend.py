"""pyglet window with a moderngl context; the same renderer and input layer as the pygame backend."""

from __future__ import annotations

import pyglet

pyglet.options["shadow_window"] = False
pyglet.options["debug_gl"] = False  # moderngl makes the GL calls; pyglet's per-call error checks only cost time

from play.backend import BackendError  # noqa: E402
from play.input import FocusLost, KeyEvent, MouseButton, MouseMotion, Quit, Resize  # noqa: E402
from play.keys import key_table  # noqa: E402


class PygletBackend:
    name = "pyglet"

    def __init__(self, size: tuple[int, int], title: str):
        import moderngl

        try:
            self.window = pyglet.window.Window(size[0], size[1], caption=title, resizable=True, vsync=False)
        except (pyglet.window.NoSuchDisplayException, pyglet.window.NoSuchConfigException) as e:
            raise BackendError(f"pyglet cannot open a window: {e}") from None
        self.window.switch_to()
        try:
            self.ctx = moderngl.create_context()
        except moderngl.Error as e:
            raise BackendError(f"pyglet window has no usable OpenGL 3.3 context: {e}") from None
        self.gl_problem = None
        self.keys = key_table("pyglet")
        self._queue: list = []
        self.window.push_handlers(self)

    # pyglet event handlers: queue normalised events; returning True stops pyglet's defaults
    # (which would close the window on Escape).
    def on_key_press(self, symbol, modifiers):
        name = self.keys.get(symbol)
        if name is not None:
            self._queue.append(KeyEvent(name, True))
        return True

    def on_key_release(self, symbol, modifiers):
        name = self.keys.get(symbol)
        if name is not None:
            self._queue.append(KeyEvent(name, False))
        return True

    def on_mouse_motion(self, x, y, dx, dy):
        self._queue.append(MouseMotion(float(dx), float(-dy)))  # pyglet's y points up

    def on_mouse_drag(self, x, y, dx, dy, buttons, modifiers):
        self._queue.append(MouseMotion(float(dx), float(-dy)))

    def on_mouse_press(self, x, y, button, modifiers):
        self._queue.append(MouseButton(button, True))

    def on_mouse_release(self, x, y, button, modifiers):
        self._queue.append(MouseButton(button, False))

    def on_resize(self, width, height):
        self._queue.append(Resize(*self.size()))

    def on_deactivate(self):
        self._queue.append(FocusLost())

    def on_close(self):
        self._queue.append(Quit())
        return True

    def window_id(self) -> int | None:
        """The native (X11) window id, for automation; pyglet keeps it in ``_window`` on Xlib."""
        return getattr(self.window, "_window", None)

    def size(self) -> tuple[int, int]:
        return tuple(self.window.get_framebuffer_size())

    def surface(self):
        raise BackendError("the pyglet backend always renders with OpenGL")

    def events(self) -> list:
        self.window.dispatch_events()
        out, self._queue = self._queue, []
        return out

    def set_mouse_captured(self, captured: bool) -> None:
        self.window.set_exclusive_mouse(captured)

    def toggle_fullscreen(self) -> str:
        self.window.set_fullscreen(not self.window.fullscreen)
        return "fullscreen on" if self.window.fullscreen else "fullscreen off"

    def present(self) -> None:
        self.window.flip()

    def close(self) -> None:
        _ = self.ctx.error  # reading it clears a pending GL error flag, which pyglet would raise on close
        self.window.close()
