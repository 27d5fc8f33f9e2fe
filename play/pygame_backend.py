"""pygame-ce window: an OpenGL (moderngl) context when one can be made, else a plain software surface."""

from __future__ import annotations

import pygame

from play.backend import BackendError
from play.input import FocusLost, KeyEvent, MouseButton, MouseMotion, Quit, Resize
from play.keys import key_table


class PygameBackend:
    name = "pygame"

    def __init__(self, size: tuple[int, int], title: str, gl: bool = True):
        try:
            pygame.display.init()
        except pygame.error as e:
            raise BackendError(f"pygame cannot open a display: {e}") from None
        pygame.font.init()
        self.keys = key_table("pygame")
        self.ctx = None
        self.gl_problem = "disabled" if not gl else None
        if gl:
            self._open_gl(size)
        if self.ctx is None:
            try:
                pygame.display.set_mode(size, pygame.RESIZABLE)
            except pygame.error as e:
                raise BackendError(f"pygame cannot open a window: {e}") from None
        pygame.display.set_caption(title)
        pygame.key.set_repeat()

    def _open_gl(self, size: tuple[int, int]) -> None:
        """Try an OpenGL 3.3 core window with a moderngl context; on failure remember why."""
        import moderngl

        pygame.display.gl_set_attribute(pygame.GL_CONTEXT_MAJOR_VERSION, 3)
        pygame.display.gl_set_attribute(pygame.GL_CONTEXT_MINOR_VERSION, 3)
        pygame.display.gl_set_attribute(pygame.GL_CONTEXT_PROFILE_MASK, pygame.GL_CONTEXT_PROFILE_CORE)
        try:
            pygame.display.set_mode(size, pygame.OPENGL | pygame.DOUBLEBUF | pygame.RESIZABLE)
            self.ctx = moderngl.create_context()
        except (pygame.error, moderngl.Error) as e:
            self.gl_problem = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
            self.ctx = None

    def window_id(self) -> int | None:
        """The native (X11) window id, for automation; None where the driver has none."""
        return pygame.display.get_wm_info().get("window")

    def size(self) -> tuple[int, int]:
        return pygame.display.get_window_size()

    def surface(self):
        return pygame.display.get_surface()

    def events(self) -> list:
        out = []
        for e in pygame.event.get():
            if e.type == pygame.QUIT:
                out.append(Quit())
            elif e.type in (pygame.KEYDOWN, pygame.KEYUP):
                name = self.keys.get(e.key)
                if name is not None:
                    out.append(KeyEvent(name, e.type == pygame.KEYDOWN))
            elif e.type == pygame.MOUSEMOTION:
                out.append(MouseMotion(float(e.rel[0]), float(e.rel[1])))
            elif e.type in (pygame.MOUSEBUTTONDOWN, pygame.MOUSEBUTTONUP):
                out.append(MouseButton(e.button, e.type == pygame.MOUSEBUTTONDOWN))
            elif e.type == pygame.WINDOWSIZECHANGED:
                out.append(Resize(e.x, e.y))
            elif e.type == pygame.WINDOWFOCUSLOST:
                out.append(FocusLost())
        return out

    def set_mouse_captured(self, captured: bool) -> None:
        pygame.event.set_grab(captured)
        pygame.mouse.set_visible(not captured)
        try:
            pygame.mouse.set_relative_mode(captured)
        except pygame.error:
            pass  # drivers without relative mode still report motion while grabbed

    def toggle_fullscreen(self) -> str:
        try:
            pygame.display.toggle_fullscreen()
        except pygame.error as e:
            return f"fullscreen not available: {e}"
        return "fullscreen toggled"

    def present(self) -> None:
        pygame.display.flip()

    def close(self) -> None:
        pygame.display.quit()
