"""Command line of the client: builds the model, world, input and window from the options and runs them.

    python -m play [--checkpoint PATH | --untrained [--preset tiny]] [--world NAME] [--side-by-side | --world-only]
                   [--backend pygame|pyglet] [--record DIR] [--replay EPISODE] [--script FILE] ...
    python -m play --headless --frames N --script FILE --out video.mp4
    python -m play export EPISODE --out video.mp4

Problems with files or options print one line ``error: ...`` and exit with status 2 (an OSError
names the path and its cause). The video of a headless run is written under a temp name and renamed
when the run succeeds, so a failing run never replaces an existing ``--out`` file.
"""

from __future__ import annotations

import argparse
import itertools
import os
import sys
from contextlib import nullcontext
from pathlib import Path

import torch

os.environ.setdefault("PYGAME_HIDE_SUPPORT_PROMPT", "1")

from play.backend import BACKENDS, BackendError, display_problem, open_backend
from play.generator import FrameGenerator, start_images
from play.recorder import Recorder, play_meta
from play.renderer import FILTERS, PANEL_GAP
from worldmodel.cli_args import ArgumentParser, device_name, float_in, int_in, parse_size, positive_int, run_cli, seed_int
from worldmodel.envs import WORLD_CLASSES, WORLDS

ASSETS = Path(__file__).resolve().parent.parent / "assets"
SHIPPED_MODELS = ASSETS / "models"
DEFAULT_WORLD = "procedural"
WINDOW_HEIGHT = 512  # default window height in pixels; the width follows the frames' aspect
MAX_WINDOW_WIDTH = 1280  # the default window fits a 1280-pixel-wide screen
MAX_FPS = 1000.0
MAX_SCALE = 16
MAX_THREADS = 1024
MAX_STEPS = 64  # denoising steps per frame


class PlayError(ValueError):
    """Options that cannot be used together, or a missing file."""


def known_world(text: str) -> str:
    """An argparse type: a known ground-truth world."""
    if text not in WORLDS:
        raise argparse.ArgumentTypeError(f"unknown world {text!r}; the known worlds (with shipped models and "
                                         f"--untrained) are {', '.join(WORLDS)}")
    return text


def shipped_model_files() -> str:
    """The shipped model files, for the help (``assets/models/<world>-01-of-02.safetensors`` ...)."""
    names = sorted(p.name for world in WORLDS for p in SHIPPED_MODELS.glob(f"{world}*.safetensors"))
    return ", ".join(f"assets/models/{n}" for n in names) or "none shipped"


def build_parser() -> ArgumentParser:
    p = ArgumentParser(
        prog="python -m play",
        description="Play a world model with WASD and the mouse; record, replay, run headless. "
                    "Export a recording: python -m play export EPISODE --out video.mp4",
    )
    m = p.add_argument_group("model and world")
    m.add_argument("--checkpoint", type=Path, help="model checkpoint: one .safetensors file, or NAME.safetensors for its "
                                                  f"shards NAME-01-of-NN... (default: the shipped model of --world: "
                                                  f"{shipped_model_files()})")
    m.add_argument("--untrained", action="store_true", help="play a randomly initialised model (no checkpoint needed)")
    m.add_argument("--preset", default="tiny", help="model size for --untrained: tiny, default or large (default tiny)")
    m.add_argument("--model-seed", type=seed_int, default=0, help="weight seed for --untrained (default 0)")
    m.add_argument("--world", type=known_world, help="ground-truth world (procedural, doom): picks the shipped model and the world "
                                   "for --side-by-side / --world-only (default: the model's own)")
    both = m.add_mutually_exclusive_group()
    both.add_argument("--side-by-side", action="store_true", help="the same input drives the real world (left) and the model (right)")
    both.add_argument("--world-only", action="store_true", help="play (or replay through) the ground-truth world, no model")
    m.add_argument("--steps", type=int_in(1, MAX_STEPS), help="denoising steps per frame (default: the model's; keys 1-4 change it live)")
    m.add_argument("--seed", type=seed_int, default=0, help="world seed of the first reset (each reset adds 1)")
    m.add_argument("--start", type=Path, help="start image (default: a shipped start frame, else the model generates one)")
    m.add_argument("--device", type=device_name, default="cuda" if torch.cuda.is_available() else "cpu",
                   help="cpu, cuda or cuda:N (default: cuda if present)")
    m.add_argument("--threads", type=int_in(1, MAX_THREADS), help="CPU threads for generation (default: all cores but one, "
                                                        "which the display loop keeps)")
    m.add_argument("--fps", type=float_in(0, MAX_FPS), help="model frames per second (default: the world's frame rate)")
    m.add_argument("--compile", action="store_true", help="compile the model for a full KV cache before playing: about 15%% "
                   "faster frames on a 2-core CPU, about half a minute more at start")
    w = p.add_argument_group("window")
    w.add_argument("--backend", choices=BACKENDS, default="pygame")
    w.add_argument("--size", type=parse_size, default=None, help="window size WIDTHxHEIGHT")
    w.add_argument("--filter", choices=FILTERS, default="nearest", help="scaling filter (key f cycles)")
    w.add_argument("--no-hud", action="store_true", help="start with the HUD hidden (key h toggles it)")
    w.add_argument("--controls", type=Path, help="controls file (TOML) overriding play/default_controls.toml")
    w.add_argument("--display-fps", type=float_in(0, MAX_FPS), default=60.0, help="loop rate: input sampling and redraw cap (default 60)")
    w.add_argument("--no-capture", action="store_true", help="do not capture the mouse at start (click to capture)")
    w.add_argument("--no-gl", action="store_true", help="draw with plain pygame blits instead of OpenGL")
    r = p.add_argument_group("recording, replay, headless")
    r.add_argument("--record", type=Path, metavar="DIR", help="record from the first frame into DIR")
    r.add_argument("--record-dir", type=Path, default=Path("recordings"), help="where the record key writes (default recordings/)")
    r.add_argument("--replay", type=Path, metavar="EPISODE", help="play a recording's actions back (through the model, or the world with --world-only)")
    r.add_argument("--script", type=Path, help="scripted input file (format: play/script.py, example: assets/scripts/demo.txt)")
    r.add_argument("--headless", action="store_true", help="run without a window (needs --out and/or --record)")
    r.add_argument("--frames", type=positive_int, help="stop after N frames (the first frame included)")
    r.add_argument("--out", type=Path, help="video file of the run (headless)")
    r.add_argument("--scale", type=int_in(1, MAX_SCALE), default=1, help="video upscaling factor (headless, default 1)")
    d = p.add_argument_group("debugging")
    d.add_argument("--log-json", type=Path, help="write events, frames and a summary as JSON lines (also headless)")
    d.add_argument("--screenshot", type=Path, help="save a screenshot of the window (PNG) when frame --screenshot-at is shown")
    d.add_argument("--screenshot-at", type=positive_int, default=1)
    d.add_argument("--screenshot-dir", type=Path, default=Path("screenshots"), help="where the screenshot key saves")
    return p


def build_export_parser() -> ArgumentParser:
    p = ArgumentParser(prog="python -m play export", description="Write a recording's frames to a video.")
    p.add_argument("episode", type=Path)
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--scale", type=int_in(1, MAX_SCALE), default=1)
    p.add_argument("--fps", type=float_in(0, MAX_FPS))
    return p


def check_options(args) -> None:
    if args.untrained and args.checkpoint:
        raise PlayError("--untrained and --checkpoint exclude each other")
    if args.world_only and (args.untrained or args.checkpoint or args.steps or args.compile):
        raise PlayError("--world-only runs no model: drop --untrained / --checkpoint / --steps / --compile")
    if args.replay and args.script:
        raise PlayError("--replay and --script are two input sources: choose one")
    if args.headless:
        if args.out is None and args.record is None:
            raise PlayError("a headless run needs --out VIDEO and/or --record DIR, otherwise nothing is kept")
        if args.frames is None and args.replay is None:
            raise PlayError("a headless run needs --frames N (or --replay EPISODE, which sets it)")
        if args.controls is not None:
            raise PlayError("--controls maps live keys and a headless run takes none: drop it (input comes from "
                            "--script or --replay)")
    elif args.out is not None:
        raise PlayError("--out writes the video of a headless run: add --headless")
    if args.start is not None and (args.side_by_side or args.world_only):
        raise PlayError("--start cannot be used with a world: the world's first frame is the start")
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        raise PlayError(f"--device {args.device}: no CUDA device is available here (use --device cpu)")
    if args.compile and args.device.startswith("cuda"):
        raise PlayError("--compile is for a model on the CPU (a CUDA session replays CUDA graphs)")
    if args.start is not None and not args.start.is_file():
        raise PlayError(f"start image {args.start} does not exist")
    for flag, folder in (("--record", args.record), ("--record-dir", args.record_dir)):
        if folder is not None and folder.exists() and not folder.is_dir():
            raise PlayError(f"{flag} {folder} is a file; recordings go into a folder")


def load_model(args):
    """(model or None, model name for recordings, weight seed or None)."""
    if args.world_only:
        return None, None, None
    from worldmodel.model import build_model

    if args.untrained:
        model = build_model(preset=args.preset, world=args.world or DEFAULT_WORLD, seed=args.model_seed)
        return model, f"untrained:{args.preset}", args.model_seed
    from worldmodel.checkpoint import CheckpointError, checkpoint_files, load

    path = args.checkpoint
    if path is None:
        path = SHIPPED_MODELS / f"{args.world or DEFAULT_WORLD}.safetensors"
        try:
            checkpoint_files(path)  # one file or a complete set of shards
        except CheckpointError:
            raise PlayError(f"no shipped model at {path}; pass --checkpoint PATH, or --untrained to play a "
                            f"randomly initialised model (--preset tiny|default)")
    return load(path, device=args.device), str(path), None


def recorded_world(episode: Path | None) -> str:
    """The world a recording was made in (for replaying it through that world), else the default world."""
    if episode is None:
        return DEFAULT_WORLD
    from worldmodel.data.episode import read_meta

    meta = read_meta(episode)
    for name in (meta.extra.get("world"), meta.source):
        if name in WORLDS:
            return name
    return DEFAULT_WORLD


def make_generator(args, model):
    """The FrameGenerator (session and/or world) for the options, and the name of the model's world."""
    session = world = None
    world_name = args.world or (str(model.config.world) if model is not None else recorded_world(args.replay))
    if model is not None:
        from worldmodel.session import Session

        session = Session(model, batch=1, device=args.device)
    if args.side_by_side or args.world_only:
        from worldmodel.envs import make_world

        size = {}
        if model is not None:
            size["height"], size["width"] = model.frame_size
        world = make_world(world_name, batch=1, device=args.device, **size)
    generator = FrameGenerator(session, world, start_images(world_name))
    if args.steps is not None:
        generator.set_steps(args.steps)
    if args.compile and session is not None:
        print("compiling the model for a full KV cache (about half a minute on 2 CPU cores)...", flush=True)
        session.compile()
    return generator, world_name


def target_fps(args, generator, world_name: str) -> float:
    """--fps, else the frame rate of the model's world (its class attribute; the world is not started)."""
    if args.fps is not None:
        return args.fps
    if generator.world is not None:
        return float(generator.world.fps)
    if world_name not in WORLD_CLASSES:
        raise PlayError(f"the model's world {world_name!r} has no known frame rate; pass --fps")
    import importlib

    module, name = WORLD_CLASSES[world_name]
    return float(getattr(importlib.import_module(module), name).fps)


def input_source(args, generator, model_name):
    """(actions iterator or None for live input, first reset's seed, first reset's start, replay note)."""
    spec = generator.spec
    if args.replay is not None:
        from play.replay import plan_replay

        plan = plan_replay(args.replay, generator, model_name)
        if plan.steps is not None and args.steps is None:
            generator.use_steps(plan.steps)
        if args.frames is None:
            args.frames = len(plan.episode)
        return iter(plan.actions), plan.seed, plan.start, plan.note
    start = args.start if args.start is not None else generator.start_for(args.seed)
    if args.script is not None:
        from play.script import load_script, script_cycle

        return script_cycle(load_script(args.script, spec), spec), args.seed, start, None
    if args.headless:
        return itertools.repeat(torch.zeros(spec.width)), args.seed, start, None
    return None, args.seed, start, None


def build(args):
    """Everything but the window: (generator, recorder, actions, seed, start, fps, note)."""
    check_options(args)
    if not args.headless:
        problem = display_problem(args.backend)
        if problem:
            raise BackendError(problem)
    torch.set_num_threads(args.threads or max(1, (os.cpu_count() or 1) - 1))
    model, model_name, model_seed = load_model(args)
    generator, world_name = make_generator(args, model)
    actions, seed, start, note = input_source(args, generator, model_name)
    fps = target_fps(args, generator, world_name)
    recorder = Recorder(
        args.record or args.record_dir,
        lambda first, mid: play_meta(generator, first, mid, fps, model_name, model_seed, world_name),
    )
    return generator, recorder, actions, seed, start, fps, note


def default_window_size(panels: int, frame_width: int, frame_height: int) -> tuple[int, int]:
    """(width, height): ``panels`` frames side by side at WINDOW_HEIGHT, shrunk to fit MAX_WINDOW_WIDTH."""
    gaps = (panels - 1) * PANEL_GAP
    height = min(WINDOW_HEIGHT, (MAX_WINDOW_WIDTH - gaps) * frame_height // (panels * frame_width))
    return panels * round(height * frame_width / frame_height) + gaps, height


def build_app(args):
    """The windowed app for parsed ``args`` (not yet running)."""
    from play.app import App, AppOptions, JsonLog
    from play.controls import load_controls
    from play.input import InputMapper
    from play.renderer import GLRenderer, SoftwareRenderer
    from play.worker import GenerationWorker

    generator, recorder, actions, seed, start, fps, note = build(args)
    controls = load_controls(generator.spec, args.controls)
    size = args.size or default_window_size(generator.panel_count, generator.width, generator.height)
    backend = open_backend(args.backend, size, "worldmodel play", gl=not args.no_gl)
    renderer = GLRenderer(backend.ctx, backend.size()) if backend.ctx is not None else SoftwareRenderer(backend.surface)
    options = AppOptions(
        target_fps=fps, display_fps=args.display_fps, max_frames=args.frames, seed=seed, start=start,
        filter=args.filter, hud=not args.no_hud, record=args.record is not None,
        screenshot_dir=args.screenshot_dir, screenshot_at=args.screenshot_at if args.screenshot else None,
        screenshot_path=args.screenshot, capture_mouse=not args.no_capture,
    )
    app = App(backend, renderer, GenerationWorker(generator).start(), InputMapper(controls, generator.spec), recorder,
              options, JsonLog(args.log_json), actions)
    if note:
        app.say(f"note: {note}")
    return app


def run_headless_cli(args) -> dict:
    from play.app import JsonLog
    from play.headless import run_headless
    from worldmodel.video import VideoWriter, check_video_path

    if args.out is not None:
        check_video_path(args.out)
    generator, recorder, actions, seed, start, fps, note = build(args)
    if note:
        print(f"note: {note}", file=sys.stderr)
    video = VideoWriter(args.out, fps, args.scale) if args.out is not None else None
    log = JsonLog(args.log_json)
    try:
        with video or nullcontext():
            summary = run_headless(generator, actions, args.frames, seed, start, video,
                                   recorder if args.record is not None else None, log=log)
        log.write("summary", **summary)
    finally:
        log.close()
    summary["video"] = str(args.out) if args.out is not None else None
    summary["recordings"] = [str(p) for p in recorder.paths]
    return summary


def export_main(argv: list[str]) -> int:
    from worldmodel.video import export_episode

    args = build_export_parser().parse_args(argv)
    count = export_episode(args.episode, args.out, args.scale, args.fps)
    print(f"wrote {count} frames to {args.out}")
    return 0


def describe(summary: dict) -> str:
    parts = [f"{summary['frames']} frames"]
    for key, label in (("model_fps", "model FPS"), ("fps", "FPS"), ("display_fps", "display FPS"),
                       ("generate_ms_mean", "ms per frame"), ("latency_ms_mean", "ms input->photon")):
        if summary.get(key) is not None:
            parts.append(f"{summary[key]} {label}")
    for path in summary.get("recordings", []):
        parts.append(f"recorded {path}")
    if summary.get("video"):
        parts.append(f"video {summary['video']}")
    return "; ".join(parts)


def run(argv: list[str]) -> int:
    if argv and argv[0] == "export":
        return export_main(argv[1:])
    args = build_parser().parse_args(argv)
    if args.headless:
        print(describe(run_headless_cli(args)))
    else:
        print(describe(build_app(args).run()))
    return 0


def main(argv: list[str] | None = None) -> int:
    return run_cli(lambda: run(list(sys.argv[1:] if argv is None else argv)))
