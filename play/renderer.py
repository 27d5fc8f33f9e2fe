"""Draws the frames (one panel each, side by side) and the HUD into the window.

Two renderers with one interface: :class:`GLRenderer` (moderngl; textures scaled by a shader) and
:class:`SoftwareRenderer` (pygame blits; used where no OpenGL context can be created, e.g. SDL's
dummy video driver). Both: ``draw(frames, hud, filter)``, ``resize(w, h)``, ``screenshot()``.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

FILTERS = ("nearest", "smooth", "sharp")
SHARPEN_STRENGTH = 0.8  # unsharp-mask gain of the "sharp" filter
PANEL_GAP = 4  # pixels between side-by-side panels
SHADERS = Path(__file__).with_name("shaders")
HUD_MARGIN = 8


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
    """moderngl renderer: one texture per panel, the HUD as an alpha-blended overlay texture."""

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
        self.overlay = None
        self._overlay_source = None
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

    def draw(self, frames: list[np.ndarray], hud, filter: str) -> None:
        """``frames``: uint8 [H, W, 3] arrays, left to right; ``hud``: a pygame RGBA surface or None."""
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
            self._draw_overlay(hud)

    def _draw_overlay(self, hud) -> None:
        import pygame

        mgl = self.moderngl
        size = hud.get_size()
        if self.overlay is None or self.overlay.size != size:
            if self.overlay is not None:
                self.overlay.release()
            self.overlay = self.ctx.texture(size, 4, alignment=1)
            self.overlay.filter = (mgl.NEAREST, mgl.NEAREST)
            self._overlay_source = None
        if self._overlay_source is not hud:
            self.overlay.write(pygame.image.tobytes(hud, "RGBA"))
            self._overlay_source = hud
        self.ctx.enable(mgl.BLEND)
        self.ctx.blend_func = mgl.SRC_ALPHA, mgl.ONE_MINUS_SRC_ALPHA
        self.overlay.use(0)
        self.overlay_program["u_overlay"].value = 0
        self._place(self.overlay_program, (HUD_MARGIN, HUD_MARGIN, *size))
        self.overlay_quad.render(mgl.TRIANGLE_STRIP)
        self.ctx.disable(mgl.BLEND)

    def finish(self) -> None:
        """Wait until the GPU has drawn the frame, so that presenting it is what the latency measures."""
        self.ctx.finish()

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

    def draw(self, frames: list[np.ndarray], hud, filter: str) -> None:
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

    def finish(self) -> None:
        """Blits are complete when ``draw`` returns; nothing to wait for."""

    def screenshot(self) -> np.ndarray:
        target = self.surface()
        w, h = target.get_size()
        return np.frombuffer(self.pygame.image.tobytes(target, "RGB"), np.uint8).reshape(h, w, 3).copy()
