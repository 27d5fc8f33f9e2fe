"""The interactive loop: window events -> input -> generation worker -> frames, HUD, recording.

Each loop iteration (``tick``, up to ``display_fps`` times a second) handles events, posts the input
to the worker at the model's frame rate (``target_fps``), takes every finished frame (recording
each), and redraws the window only when something on it changed (a new frame at once, the HUD's
text a few times a second, the help overlay); between iterations it sleeps, so generation has the
cores. It never waits for the model: live input that the model could not take yet is merged into
the one waiting job and kept fresh until the worker takes it. Latency is measured from when a
frame's input was last sampled to when the buffer holding the frame was swapped to the screen.
The controls are printed at start, and F1 or ``?`` shows them over the frames.
"""

from __future__ import annotations

import json
import statistics
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import torch

from play.hud import HELP_KEYS, WHITE, YELLOW, HudRenderer, HudState, MeanMeter, RateMeter, help_lines, hud_lines
from play.input import FocusLost, InputMapper, KeyEvent, MouseButton, MouseMotion, Quit, Resize, action_sample
from play.recorder import Recorder
from play.renderer import FILTERS
from play.worker import GenerationWorker, ResetJob, Result, StepJob

MESSAGE_SECONDS = 3.0
HUD_REFRESH_S = 0.25  # the HUD's text updates this often, and at once on input
REDRAW_S = 0.5  # redraw at least this often even when nothing changed


@dataclass
class AppOptions:
    target_fps: float  # model frames per second the input is sampled at (the world's frame rate)
    display_fps: float = 60.0  # loop rate: events and input are sampled this often
    max_frames: int | None = None  # quit once this many frames (the reset frame included) were shown
    seed: int = 0
    start: object = None  # the first reset's start (see FrameGenerator.reset)
    filter: str = "nearest"
    hud: bool = True
    record: bool = False  # record from the first frame
    screenshot_dir: Path = Path("screenshots")
    screenshot_at: int | None = None  # save a screenshot when this frame is shown...
    screenshot_path: Path | None = None  # ...here
    capture_mouse: bool = True


class JsonLog:
    """Debug log, one JSON object per line (``--log-json``), flushed per line; inert without a path."""

    def __init__(self, path: str | Path | None):
        self.t0 = time.perf_counter()
        self.file = open(path, "w") if path is not None else None

    def write(self, event: str, **fields) -> None:
        if self.file is not None:
            record = {"event": event, "t": round(time.perf_counter() - self.t0, 6), **fields}
            self.file.write(json.dumps(record) + "\n")
            self.file.flush()

    def close(self) -> None:
        if self.file is not None:
            self.file.close()


class App:
    """One window's game loop. ``actions`` (an iterator of ``[A]``) replaces live input (script, replay)."""

    def __init__(self, backend, renderer, worker: GenerationWorker, mapper: InputMapper, recorder: Recorder,
                 options: AppOptions, log: JsonLog, actions: Iterator[torch.Tensor] | None = None):
        self.backend, self.renderer, self.worker, self.mapper = backend, renderer, worker, mapper
        self.recorder, self.options, self.log, self.actions = recorder, options, log, actions
        self.hud_renderer, self.help_renderer = HudRenderer(), HudRenderer(21)
        self.hud_on, self.filter = options.hud, options.filter
        self.help_on = False
        self.help = help_lines(mapper.controls)
        print("\n".join(self.help) + "\n(f1 or ? in the window shows these controls)", flush=True)
        self.paused = self.step_once = self.finished = False
        self.running = True
        self.seed = options.seed
        self.recording_wanted = options.record
        self.captured = False
        self.panels: list = []
        self.last: Result | None = None
        self.submitted = self.generated = 0
        self.session_started = time.perf_counter()
        self.next_tick = self.next_loop = self.hud_refresh_at = self.drawn_at = time.perf_counter()
        self.dirty = True
        self.hud_lines: list = []
        self.display_meter, self.model_meter, self.loop_meter = RateMeter(), RateMeter(), RateMeter()
        self.latency_meter, self.generate_meter = MeanMeter(), MeanMeter()
        self.latencies: list[float] = []
        self.generate_times: list[float] = []
        self.presents = self.loops = 0
        self.first_done = self.last_done = None
        self.message, self.message_until = "", 0.0
        self.screenshot_pending: Path | None = None
        self.started_at = time.perf_counter()
        self.set_captured(options.capture_mouse)
        self.worker.submit(ResetJob(self.seed, options.start))
        self.log.write("start", backend=backend.name, renderer=renderer.name, gl_problem=backend.gl_problem,
                       window_id=backend.window_id(),
                       window=list(backend.size()), mode=worker.generator.mode, steps=worker.steps,
                       target_fps=options.target_fps, live=actions is None)

    # -- input

    def set_captured(self, captured: bool) -> None:
        self.captured = captured
        self.backend.set_mouse_captured(captured)
        self.log.write("capture", captured=captured)

    def say(self, text: str) -> None:
        self.message, self.message_until = text, time.perf_counter() + MESSAGE_SECONDS
        self.log.write("message", text=text)

    def handle(self, event, now: float) -> None:
        if isinstance(event, KeyEvent):
            command = self.mapper.key(event.name, event.down)
            self.log.write("key", name=event.name, down=event.down, command=command)
            if command is not None:
                self.command(command, now)
            elif event.down and event.name in HELP_KEYS and event.name not in self.mapper.bindings:
                self.help_on = not self.help_on
                self.dirty = True
                self.log.write("help", on=self.help_on)
        elif isinstance(event, MouseMotion):
            if self.captured:
                self.mapper.motion(event.dx, event.dy)
            self.log.write("mouse", dx=event.dx, dy=event.dy, captured=self.captured)
        elif isinstance(event, MouseButton):
            self.log.write("button", button=event.button, down=event.down)
            if event.down and not self.captured:
                self.set_captured(True)
        elif isinstance(event, Resize):
            self.renderer.resize(*self.backend.size())
            self.dirty = True
            self.log.write("resize", size=list(self.backend.size()))
        elif isinstance(event, FocusLost):
            self.mapper.release_all()
        elif isinstance(event, Quit):
            self.running = False

    def command(self, name: str, now: float) -> None:
        if name == "quit":
            self.running = False
        elif name == "release_mouse":
            self.set_captured(False)
            self.mapper.release_all()
        elif name == "pause":
            self.paused = not self.paused
            self.next_tick = now
        elif name == "step":
            self.step_once = self.paused
        elif name == "reset":
            self.seed += 1
            self.worker.submit(ResetJob(self.seed, self.worker.generator.start_for(self.seed)))
            self.say(f"new world, seed {self.seed}")
        elif name == "hud":
            self.hud_on = not self.hud_on
            self.dirty = True
        elif name == "record":
            self.toggle_recording(now)
        elif name == "filter":
            self.filter = FILTERS[(FILTERS.index(self.filter) + 1) % len(FILTERS)]
            self.dirty = True
        elif name == "fullscreen":
            self.say(self.backend.toggle_fullscreen())
        elif name == "screenshot":
            self.screenshot_pending = self.options.screenshot_dir / time.strftime("play-%Y%m%d-%H%M%S.png")
        elif name.startswith("steps_"):
            self.worker.steps = int(name.removeprefix("steps_"))
            self.say(f"{self.worker.steps} denoising steps per frame")

    def toggle_recording(self, now: float) -> None:
        if self.recorder.active or (self.recording_wanted and self.last is None):
            path = self.recorder.writer.path if self.recorder.active else None
            self.recorder.stop()
            self.recording_wanted = False
            self.say(f"recording stopped: {path}")
            self.log.write("record", on=False, path=str(path))
            return
        self.recording_wanted = True
        if self.last is not None:
            first = self.last.generated
            path = self.recorder.start(first, now, mid_session=first.index != 0)
            self.say(f"recording to {path}")
            self.log.write("record", on=True, path=str(path))

    # -- generation

    def feed(self, now: float) -> None:
        """Post this tick's input to the worker (at the target frame rate; never queues)."""
        limit = self.options.max_frames
        if self.finished or (limit is not None and self.submitted + 1 >= limit):
            return
        if self.actions is None and not self.paused and self.worker.mailbox.holds_step:
            self.worker.submit(StepJob(self.mapper.sample(now)), merge=True)  # keep the waiting input fresh
            return
        if self.paused:
            if self.actions is None:
                self.mapper.sample(now)  # motion made while paused is dropped, not saved up
            if not self.step_once:
                return
            self.step_once = False
        elif now < self.next_tick:
            return
        if self.actions is None:
            status = self.worker.submit(StepJob(self.mapper.sample(now)), merge=True)
        else:
            if not self.worker.mailbox.empty:
                return  # scripted input waits for the model instead of merging
            action = next(self.actions, None)
            if action is None:
                self.finished = True
                self.say("input finished")
                return
            status = self.worker.submit(StepJob(action_sample(action, self.worker.generator.spec, now)), merge=False)
        self.submitted += status == "placed"
        self.next_tick = max(self.next_tick + 1.0 / self.options.target_fps, now)

    def accept(self, result: Result) -> None:
        """Take one finished frame: stats, recording."""
        g = result.generated
        self.generated += 1
        self.model_meter.add(result.done_at)
        self.first_done = self.first_done or result.done_at
        self.last_done = result.done_at
        self.generate_meter.add(g.generate_s * 1000)
        self.generate_times.append(g.generate_s)
        if g.index == 0:
            self.session_started = result.done_at
            if self.recording_wanted:
                path = self.recorder.start(g, result.done_at)
                self.log.write("record", on=True, path=str(path))
        elif self.recorder.active:
            self.recorder.append(g, result.done_at)
        self.last = result

    # -- the loop

    def hud_state(self, now: float) -> HudState:
        g = self.last.generated if self.last is not None else None
        dx, dy = self.mapper.spec.mouse(g.action) if g is not None else (0.0, 0.0)
        keys = self.mapper.pressed_actions() if self.actions is None else (self.last.sample.keys if self.last and self.last.sample else ())
        return HudState(
            display_fps=self.display_meter.rate(now),
            loop_hz=self.loop_meter.rate(now),
            model_fps=self.model_meter.rate(now),
            target_fps=self.options.target_fps,
            latency_ms=self.latency_meter.mean(),
            generate_ms=self.generate_meter.mean(),
            steps=self.worker.steps,
            keys=keys,
            dx=dx,
            dy=dy,
            session_frames=g.index if g is not None else 0,
            session_seconds=now - self.session_started if g is not None else 0.0,
            recording=self.recorder.name,
            recording_frames=self.recorder.frames,
            recording_seconds=now - self.recorder.started_at if self.recorder.active else 0.0,
            paused=self.paused,
            mouse_captured=self.captured,
            filter=self.filter,
            mode=self.worker.generator.mode,
            message=self.message if now < self.message_until else ("generating the first frame..." if g is None else ""),
        )

    def tick(self) -> bool:
        """One loop iteration: events and input every time; a redraw only when something on screen changed."""
        now = time.perf_counter()
        self.loop_meter.add(now)
        self.loops += 1
        events = self.backend.events()
        for event in events:
            self.handle(event, now)
        if self.worker.error is not None:
            raise self.worker.error
        self.feed(now)
        results = self.worker.results()
        for result in results:
            self.accept(result)
        if results:
            self.panels = results[-1].generated.panels
            self.dirty = True
        if self.hud_on and (events or now >= self.hud_refresh_at):  # not per frame: text and upload cost
            lines = hud_lines(self.hud_state(now))
            self.hud_refresh_at = now + HUD_REFRESH_S
            self.dirty |= lines != self.hud_lines
            self.hud_lines = lines
        if self.dirty or self.screenshot_pending or now >= self.drawn_at + REDRAW_S:
            self.present(results[-1] if results else None)
        limit = self.options.max_frames
        if limit is not None and self.generated >= limit:
            self.running = False
        self.next_loop = max(self.next_loop + 1.0 / self.options.display_fps, time.perf_counter())
        if self.running:  # a finished frame is shown at once, not at the next loop deadline
            self.worker.wait(max(self.next_loop - time.perf_counter(), 0.0))
        return self.running

    def present(self, newest: Result | None) -> None:
        hud = self.hud_renderer.render(self.hud_lines) if self.hud_on and self.hud_lines else None
        help = None
        if self.help_on:
            help = self.help_renderer.render([(self.help[0], YELLOW)] + [(line, WHITE) for line in self.help[1:]])
        self.renderer.draw(self.panels, hud, self.filter, help)
        self.save_screenshots()
        self.backend.present()
        presented = self.drawn_at = time.perf_counter()
        self.dirty = False
        self.presents += 1
        self.display_meter.add(presented)
        if newest is not None:
            self.log_frame(newest, presented)

    def log_frame(self, result: Result, presented: float) -> None:
        g, sample = result.generated, result.sample
        latency = presented - sample.sampled_at if sample is not None else None
        if latency is not None:
            self.latency_meter.add(latency * 1000)
            self.latencies.append(latency)
        self.log.write("frame", index=g.index, seed=g.seed, action=[round(v, 4) for v in g.action.tolist()],
                       keys=list(sample.keys) if sample else [], steps=g.steps,
                       generate_ms=round(g.generate_s * 1000, 3),
                       latency_ms=None if latency is None else round(latency * 1000, 3),
                       oldest_input_ms=None if sample is None else round((presented - sample.first_sampled_at) * 1000, 3))

    def save_screenshots(self) -> None:
        from PIL import Image

        paths = []
        if self.screenshot_pending is not None:
            paths.append(self.screenshot_pending)
            self.screenshot_pending = None
        at, path = self.options.screenshot_at, self.options.screenshot_path
        if at is not None and path is not None and self.generated >= at and self.last is not None:
            paths.append(path)
            self.options.screenshot_at = None
        for path in paths:
            path.parent.mkdir(parents=True, exist_ok=True)
            Image.fromarray(self.renderer.screenshot()).save(path)
            self.say(f"screenshot {path}")
            self.log.write("screenshot", path=str(path))

    def run(self) -> dict:
        """Loop until quit; returns the session summary (also logged)."""
        try:
            while self.tick():
                pass
        finally:
            summary = self.close()
        return summary

    def close(self) -> dict:
        self.worker.stop()
        self.recorder.stop()
        summary = self.summary()
        self.log.write("summary", **summary)
        self.log.close()
        self.backend.close()
        return summary

    def summary(self) -> dict:
        elapsed = time.perf_counter() - self.started_at
        ms = lambda values: round(1000 * values, 2)  # noqa: E731
        lat = sorted(self.latencies)
        return {
            "frames": self.generated,
            "presents": self.presents,
            "seconds": round(elapsed, 3),
            "display_fps": round(self.presents / elapsed, 2) if elapsed > 0 else 0.0,
            "loops": self.loops,
            "model_fps": round((self.generated - 1) / (self.last_done - self.first_done), 2)
            if self.generated > 1 and self.last_done > self.first_done else None,
            "generate_ms_mean": ms(statistics.fmean(self.generate_times[1:])) if len(self.generate_times) > 1 else None,
            "latency_ms_mean": ms(statistics.fmean(lat)) if lat else None,
            "latency_ms_median": ms(statistics.median(lat)) if lat else None,
            "latency_ms_p90": ms(lat[int(0.9 * (len(lat) - 1))]) if lat else None,
            "merged_inputs": self.worker.mailbox.merged,
            "recordings": [str(p) for p in self.recorder.paths],
        }
