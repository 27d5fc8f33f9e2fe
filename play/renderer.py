"""Draws the frames (one panel each, side by side) and the HUD into the window.

Two renderers with one interface: :class:`GLRenderer` (moderngl; textures scaled by a shader) and
:class:`SoftwareRenderer` (pygame blits; used where no OpenGL context can be created, e.g. SDL's
dummy video driver). Both: ``draw(frames, hud, filter, help)``, ``resize(w, h)``, ``screenshot()``.
Neither waits for the GPU (moderngl would hold the GIL while it waits, stalling generation): the
backend's buffer swap is where a frame is done.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

FILTERS = ("nearest", "smooth", "sharp")
SHARPEN_STRENGTH = 0.8  # unsharp-mask gain of the "sharp" filter
PANEL_GAP = 4  # pixels between side-by-side panels
SHADERS = Path(__file__).with_name("shaders")
HUD_MARGIN = 8


def centred(window: tuple[int, int], size: tuple[int, int]) -> tuple[int, int]:
    """Top-left corner of a ``size`` (w, h) rectangle centred in ``window`` (w, h), kept on screen."""
    return max((window[0] - size[0]) // 2, 0), max((window[1] - size[1]) // 2, 0)


def panel_rects(window: tuple[int, int], frame: tuple[int, int], panels: int, gap: int = PANEL_GAP):
    """Pixel rectangles ``(x, y, w, h)`` (top-left origin) of ``panels`` frames of size ``frame`` (w, h),
    side by side, as large as fits in ``window`` (w, h) with the aspect kept, centred."""
    win_w, win_h = window
    frame_w, frame_h = frame
    gaps = gap * (panels - 1)
    scale = max(min((win_w - gaps) / (panels * frame_w), win_h / frame_h), 1e-6)
    w, h = frame_w * scale, frame_h * scale
    x0 = (win_w - panels * w - gaps) / 2
    y0 = (win_h - h) / 2
    return [(x0 + i * (w + gap), y0, w, h) for i in range(panels)]


def sharpen(frame: np.ndarray, strength: float = SHARPEN_STRENGTH) -> np.ndarray:
    """Unsharp mask of ``frame`` uint8 [H, W, 3]: c + k (c - mean of the 4 neighbours), edges clamped."""
    c = frame.astype(np.float32)
    p = np.pad(c, ((1, 1), (1, 1), (0, 0)), mode="edge")
    blur = 0.25 * (p[:-2, 1:-1] + p[2:, 1:-1] + p[1:-1, :-2] + p[1:-1, 2:])
    return np.clip(np.rint(c + strength * (c - blur)), 0, 255).astype(np.uint8)


class GLRenderer:
    """moderngl renderer: one texture per panel; the HUD and the help as alpha-blended overlay textures."""

    name = "gl"

    def __init__(self, ctx, size: tuple[int, int]):
        import moderngl

        self.moderngl = moderngl
        self.ctx = ctx
        vert = (SHADERS / "quad.vert").read_text()
        self.frame_program = ctx.program(vertex_shader=vert, fragment_shader=(SHADERS / "frame.frag").read_text())
        self.overlay_program = ctx.program(vertex_shader=vert, fragment_shader=(SHADERS / "overlay.frag").read_text())
        corners = np.array([0, 0, 1, 0, 0, 1, 1, 1], dtype="f4")
        self.vbo = ctx.buffer(corners.tobytes())
        self.frame_quad = ctx.vertex_array(self.frame_program, [(self.vbo, "2f", "in_corner")])
        self.overlay_quad = ctx.vertex_array(self.overlay_program, [(self.vbo, "2f", "in_corner")])
        self.textures: list = []
        self.overlays: dict[str, tuple] = {}  # slot -> (texture, the surface last uploaded to it)
        self.resize(*size)

    def resize(self, width: int, height: int) -> None:
        self.size = (max(width, 1), max(height, 1))
        self.ctx.viewport = (0, 0, *self.size)

    def _texture(self, i: int, frame: np.ndarray):
        h, w = frame.shape[:2]
        while len(self.textures) <= i:
            self.textures.append(None)
        tex = self.textures[i]
        if tex is None or tex.size != (w, h):
            if tex is not None:
                tex.release()
            tex = self.ctx.texture((w, h), 3, alignment=1)
            tex.repeat_x = tex.repeat_y = False
            self.textures[i] = tex
        tex.write(np.ascontiguousarray(frame).tobytes())
        return tex

    def _place(self, program, rect) -> None:
        program["u_rect"].value = tuple(float(v) for v in rect)
        program["u_window"].value = tuple(float(v) for v in self.size)

    def draw(self, frames: list[np.ndarray], hud, filter: str, help=None) -> None:
        """``frames``: uint8 [H, W, 3] arrays, left to right; ``hud`` (top left) and ``help`` (centred):
        pygame RGBA surfaces or None."""
        mgl = self.moderngl
        self.ctx.clear(0.0, 0.0, 0.0)
        if frames:
            h, w = frames[0].shape[:2]
            smooth = filter != "nearest"
            for i, (frame, rect) in enumerate(zip(frames, panel_rects(self.size, (w, h), len(frames)))):
                tex = self._texture(i, frame)
                tex.filter = (mgl.LINEAR, mgl.LINEAR) if smooth else (mgl.NEAREST, mgl.NEAREST)
                tex.use(0)
                self.frame_program["u_frame"].value = 0
                self.frame_program["u_texel"].value = (1.0 / w, 1.0 / h)
                self.frame_program["u_sharpen"].value = SHARPEN_STRENGTH if filter == "sharp" else 0.0
                self._place(self.frame_program, rect)
                self.frame_quad.render(mgl.TRIANGLE_STRIP)
        if hud is not None:
            self._draw_overlay("hud", hud, (HUD_MARGIN, HUD_MARGIN))
        if help is not None:
            self._draw_overlay("help", help, centred(self.size, help.get_size()))

    def _draw_overlay(self, slot: str, surface, corner: tuple[int, int]) -> None:
        """Blend ``surface`` at ``corner``; its texture is uploaded again only when the surface changed."""
        import pygame

        mgl = self.moderngl
        size = surface.get_size()
        texture, source = self.overlays.get(slot, (None, None))
        if texture is None or texture.size != size:
            if texture is not None:
                texture.release()
            texture, source = self.ctx.texture(size, 4, alignment=1), None
            texture.filter = (mgl.NEAREST, mgl.NEAREST)
        if source is not surface:
            texture.write(pygame.image.tobytes(surface, "RGBA"))
        self.overlays[slot] = (texture, surface)
        self.ctx.enable(mgl.BLEND)
        self.ctx.blend_func = mgl.SRC_ALPHA, mgl.ONE_MINUS_SRC_ALPHA
        texture.use(0)
        self.overlay_program["u_overlay"].value = 0
        self._place(self.overlay_program, (*corner, *size))
        self.overlay_quad.render(mgl.TRIANGLE_STRIP)
        self.ctx.disable(mgl.BLEND)

    def screenshot(self) -> np.ndarray:
        """The bound framebuffer (the window's back buffer) as uint8 [H, W, 3], top row first; call before presenting."""
        w, h = self.size
        data = self.ctx.fbo.read(viewport=(0, 0, w, h), components=3, alignment=1)
        return np.frombuffer(data, np.uint8).reshape(h, w, 3)[::-1].copy()


class SoftwareRenderer:
    """pygame blit renderer for windows without OpenGL; ``surface`` returns the current display surface."""

    name = "software"

    def __init__(self, surface):
        import pygame

        self.pygame = pygame
        self.surface = surface

    def resize(self, width: int, height: int) -> None:
        """The display surface follows the window by itself."""

    def draw(self, frames: list[np.ndarray], hud, filter: str, help=None) -> None:
        pg = self.pygame
        target = self.surface()
        target.fill((0, 0, 0))
        if frames:
            h, w = frames[0].shape[:2]
            for frame, (x, y, rw, rh) in zip(frames, panel_rects(target.get_size(), (w, h), len(frames))):
                source = sharpen(frame) if filter == "sharp" else frame
                image = pg.image.frombuffer(np.ascontiguousarray(source).tobytes(), (w, h), "RGB")
                size = (max(int(round(rw)), 1), max(int(round(rh)), 1))
                scaled = pg.transform.scale(image, size) if filter == "nearest" else pg.transform.smoothscale(image, size)
                target.blit(scaled, (int(round(x)), int(round(y))))
        if hud is not None:
            target.blit(hud, (HUD_MARGIN, HUD_MARGIN))
        if help is not None:
            target.blit(help, centred(target.get_size(), help.get_size()))

    def screenshot(self) -> np.ndarray:
        target = self.surface()
        w, h = target.get_size()
        return np.frombuffer(self.pygame.image.tobytes(target, "RGB"), np.uint8).reshape(h, w, 3).copy()
