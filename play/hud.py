"""The heads-up display and the controls help: what they say (pure) and their rendering into RGBA pygame surfaces."""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass

WHITE = (235, 235, 235)
DIM = (150, 150, 150)
RED = (255, 70, 60)
YELLOW = (255, 210, 60)
BACKGROUND = (0, 0, 0, 170)
PADDING = 6
HELP_KEYS = ("f1", "slash")  # toggle the help overlay ("?" is shift + slash) unless the controls file binds them
ACTION_HELP = {"W": "walk forward", "S": "walk back", "A": "strafe left", "D": "strafe right", "SHIFT": "sprint"}
COMMAND_HELP = {
    "release_mouse": "free the mouse (a click captures it)", "quit": "quit",
    "pause": "pause / resume", "step": "one frame while paused", "reset": "a new world", "hud": "show / hide the HUD",
    "record": "start / stop recording", "filter": "scaling filter", "fullscreen": "fullscreen",
    "screenshot": "screenshot",
}


class RateMeter:
    """Events per second over the last ``window`` seconds."""

    def __init__(self, window: float = 1.0):
        self.window = window
        self.times: deque[float] = deque()

    def add(self, t: float) -> None:
        self.times.append(t)
        while self.times and self.times[0] < t - self.window:
            self.times.popleft()

    def rate(self, now: float) -> float:
        while self.times and self.times[0] < now - self.window:
            self.times.popleft()
        if len(self.times) < 2:
            return 0.0
        return (len(self.times) - 1) / max(self.times[-1] - self.times[0], 1e-9)


class MeanMeter:
    """Mean of the last ``size`` values (None before the first)."""

    def __init__(self, size: int = 30):
        self.values: deque[float] = deque(maxlen=size)

    def add(self, value: float) -> None:
        self.values.append(value)

    def mean(self) -> float | None:
        return sum(self.values) / len(self.values) if self.values else None


@dataclass
class HudState:
    display_fps: float = 0.0  # frames presented per second
    loop_hz: float = 0.0  # input sampling rate
    model_fps: float = 0.0
    target_fps: float = 0.0
    latency_ms: float | None = None  # input sampled -> frame presented
    generate_ms: float | None = None
    steps: int = 0
    keys: tuple[str, ...] = ()
    dx: float = 0.0
    dy: float = 0.0
    session_frames: int = 0
    session_seconds: float = 0.0
    recording: str | None = None  # episode name while recording
    recording_frames: int = 0
    recording_seconds: float = 0.0
    paused: bool = False
    mouse_captured: bool = True
    filter: str = "nearest"
    mode: str = "model"
    message: str = ""


def clock(seconds: float) -> str:
    minutes, secs = divmod(int(seconds), 60)
    return f"{minutes:d}:{secs:02d}"


def model_too_slow(state: HudState) -> bool:
    """The model makes fewer frames than the target rate (so input is merged, never queued)."""
    return state.session_frames > 2 and not state.paused and state.model_fps < 0.95 * state.target_fps


def hud_lines(state: HudState) -> list[tuple[str, tuple[int, int, int]]]:
    """The HUD's lines with their colours, top to bottom."""
    latency = "-" if state.latency_ms is None else f"{state.latency_ms:.0f} ms"
    generate = "-" if state.generate_ms is None else f"{state.generate_ms:.0f} ms"
    lines = [
        (f"model {state.model_fps:.1f} FPS (target {state.target_fps:g}) | display {state.display_fps:.0f} FPS | "
         f"input {state.loop_hz:.0f} Hz", WHITE),
        (f"latency {latency} input->photon | generate {generate} | steps {state.steps}", WHITE),
        (f"keys {' '.join(state.keys) or '-'} | mouse {state.dx:+.0f} {state.dy:+.0f}", WHITE),
        (f"session {state.session_frames} frames {clock(state.session_seconds)} | {state.mode} | {state.filter} | "
         "f1 or ?: help", DIM),
    ]
    if state.recording is not None:
        lines.append((f"REC {state.recording} {state.recording_frames} frames {clock(state.recording_seconds)}", RED))
    else:
        lines.append(("not recording", DIM))
    if model_too_slow(state):
        lines.append((f"model {state.model_fps:.0f} FPS < target {state.target_fps:g} FPS: input is merged, not queued", YELLOW))
    if state.paused:
        lines.append(("PAUSED", YELLOW))
    if not state.mouse_captured:
        lines.append(("mouse free: click in the window to capture it", YELLOW))
    if state.message:
        lines.append((state.message, YELLOW))
    return lines


def help_lines(controls) -> list[str]:
    """The controls help, one line per control, from ``controls`` (play.controls.Controls)."""
    lines = ["CONTROLS", "mouse: look around, turn left / right"]
    lines += [f"{' / '.join(keys)}: {ACTION_HELP.get(action, action)}" for action, keys in controls.actions.items()]
    lines += [f"{controls.commands[name]}: {text}" for name, text in COMMAND_HELP.items()]
    steps = [controls.commands[f"steps_{n}"] for n in range(1, 5)]
    lines += [f"{' '.join(steps)}: denoising steps per frame", "f1 or ?: show / hide this help"]
    return lines


class HudRenderer:
    """Renders HUD lines into an RGBA surface with pygame's font module (works with any backend)."""

    def __init__(self, size: int = 18):
        import pygame

        pygame.font.init()
        self.pygame = pygame
        self.font = pygame.font.Font(None, size)
        self._cache: tuple[list, object] | None = None

    def render(self, lines: list[tuple[str, tuple[int, int, int]]]):
        """A pygame Surface (SRCALPHA) holding ``lines`` on a translucent panel."""
        if self._cache is not None and self._cache[0] == lines:
            return self._cache[1]
        pg = self.pygame
        texts = [self.font.render(text, True, color) for text, color in lines]
        width = max(t.get_width() for t in texts) + 2 * PADDING
        height = sum(t.get_height() for t in texts) + 2 * PADDING
        surface = pg.Surface((width, height), pg.SRCALPHA)
        surface.fill(BACKGROUND)
        y = PADDING
        for t in texts:
            surface.blit(t, (PADDING, y))
            y += t.get_height()
        self._cache = (lines, surface)
        return surface
