"""Command line for recordings.

    python -m worldmodel.data collect --world procedural|doom --episodes N --frames F --out DIR
                                      [--seed S] [--policy mix] [--batch B] [--device cpu|cuda]
                                      [--split train|heldout] [--size HxW]
    python -m worldmodel.data sheet EPISODE --out sheet.png [--every K] [--cols C] [--scale S]
    python -m worldmodel.data video EPISODE --out video.mp4 [--scale S]
    python -m worldmodel.data info EPISODE      (exit status 2 if a record is out of order or impossible)
    python -m worldmodel.data export EPISODE --format npz [--out FILE.npz]
    python -m worldmodel.data bench EPISODE      (write/read frames/s and bytes/frame of a copy)
    python -m worldmodel.data stats DIR_OR_EPISODE... [--json OUT] [--turn-threshold DEG] [--move-threshold UNITS]

Bad inputs print one line ``error: ...`` and exit with status 2. Outputs are written to a temp
name and renamed when complete, so a failing run never replaces an existing file.
"""

from __future__ import annotations

import json
import math
import sys
import warnings
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageDraw
from tqdm import tqdm

from worldmodel.cli_args import ArgumentParser, device_name, int_in, parse_size, positive_int, run_cli, seed_int
from worldmodel.data.episode import STEPS_NAME, EpisodeFile, EpisodeMeta, EpisodeWriter
from worldmodel.envs import WORLDS
from worldmodel.files import atomic_output, write_text_atomic
from worldmodel.data.splits import SPLITS, split_options, split_seeds
from worldmodel.data.stats import MOVE_UNITS, TURN_DEG, format_stats, recording_stats

LABEL_HEIGHT = 12
MAX_SCALE = 16
EXPORT_FORMATS = ("npz",)


class CliError(ValueError):
    """A command-line argument that cannot be used."""


def collect(args) -> None:
    """Play ``args.episodes`` episodes of ``args.frames`` frames, ``args.batch`` at a time, into ``args.out``.

    Episode i plays the i-th seed of the split from ``--seed``; Doom plays the split's maps.
    """
    from worldmodel.envs import make_world
    from worldmodel.envs.policies import make_policy

    seeds = split_seeds(args.split, args.episodes, args.seed)
    out = Path(args.out)
    names = [f"{args.world}-{s:07d}" for s in seeds]
    existing = [n for n in names if (out / n).exists()]
    if existing:
        raise CliError(f"{out} already holds {len(existing)} of these episodes (e.g. {existing[0]}); "
                       f"choose another --out or --seed")
    options = split_options(args.world, args.split)
    if args.size is not None:
        options["width"], options["height"] = args.size
    batch = min(args.batch, args.episodes)
    with (make_world(args.world, batch=batch, device=args.device, **options) as world,
          tqdm(total=args.episodes * args.frames, unit="frame", desc=f"collect {args.world}") as bar):
        for first in range(0, args.episodes, batch):
            chunk = seeds[first : first + batch]
            padded = chunk + [chunk[-1]] * (batch - len(chunk))  # a short last batch: extra items are dropped
            policy = make_policy(args.policy, world.action_spec, batch=batch, seed=chunk[0])
            extra = {"policy": args.policy, "policy_seed": chunk[0], "split": args.split, "world_options": options}
            metas = [EpisodeMeta(world.action_spec, world.controller, fps=world.fps, height=world.height,
                                 width=world.width, source=args.world, seed=s, extra=extra) for s in chunk]
            paths = [out / n for n in names[first : first + batch]]
            record(world, policy, padded, args.frames, list(zip(paths, metas)), bar)
    print(f"wrote {args.episodes} episodes of {args.frames} frames to {out}")


def record(world, policy, seeds: list[int], frames: int, episodes: list[tuple[Path, EpisodeMeta]], bar) -> None:
    """Reset ``world`` to ``seeds`` and write its first ``len(episodes)`` batch items, ``frames`` steps each."""
    writers = []
    try:
        for path, meta in episodes:
            writers.append(EpisodeWriter(path, meta))
        step = world.reset(seeds)
        action = torch.zeros(world.batch, world.action_spec.width)
        for t in range(frames):
            if t > 0:
                action = policy(t, step)
                step = world.step(action)
            images, actions = step.frames.cpu(), action.float().cpu()
            commanded, true = step.commanded_pose.float().cpu(), step.true_pose.float().cpu()
            for i, writer in enumerate(writers):
                writer.append(images[i], actions[i], commanded[i], true[i], t / world.fps)
            bar.update(len(writers))
    finally:
        for writer in writers:
            writer.close()


def contact_sheet(frames: np.ndarray, indices: list[int], cols: int, scale: int) -> Image.Image:
    """A grid of ``frames[indices]`` (uint8 [T, H, W, 3]), each scaled by ``scale`` and labelled with its index."""
    h, w = frames.shape[1] * scale, frames.shape[2] * scale
    rows = math.ceil(len(indices) / cols)
    sheet = Image.new("RGB", (cols * w, rows * (h + LABEL_HEIGHT)), (0, 0, 0))
    draw = ImageDraw.Draw(sheet)
    for n, t in enumerate(indices):
        x, y = (n % cols) * w, (n // cols) * (h + LABEL_HEIGHT)
        tile = Image.fromarray(frames[t]).resize((w, h), Image.NEAREST)
        sheet.paste(tile, (x, y + LABEL_HEIGHT))
        draw.text((x + 2, y), f"t={t}", fill=(255, 255, 255))
    return sheet


def sheet(args) -> None:
    out = Path(args.out)
    if out.suffix.lower() != ".png":
        raise CliError(f"--out must be a .png file, got {out}")
    episode = EpisodeFile(args.episode).read()
    if len(episode) == 0:
        raise CliError(f"episode {args.episode} has no readable steps")
    every = args.every or math.ceil(len(episode) / 64)
    indices = list(range(0, len(episode), every))
    image = contact_sheet(episode.frames.numpy(), indices, min(args.cols, len(indices)), args.scale)
    with atomic_output(out) as tmp:
        image.save(tmp)
    print(f"wrote {out}: {len(indices)} of {len(episode)} frames, every {every}")


def video(args) -> None:
    from worldmodel.video import export_episode

    out = Path(args.out)
    if out.suffix.lower() != ".mp4":
        raise CliError(f"--out must be an .mp4 file, got {out}")
    count = export_episode(args.episode, out, args.scale)
    print(f"wrote {out}: {count} frames")


def info(args) -> None:
    """Print the meta, length and status; every record is decoded, and the first bad one is the error."""
    episode = EpisodeFile(args.episode)
    print(f"episode: {episode.path}")
    print(json.dumps(episode.meta.to_dict(), indent=2))
    print(f"steps: {len(episode)} ({len(episode) / episode.meta.fps:.2f} s at {episode.meta.fps} fps)")
    episode.check()
    print(f"status: {episode.status}")


def export(args) -> None:
    """Write the episode's actions, commanded and true poses, timestamps and meta to an ``.npz``
    (plain arrays and strings, readable with numpy alone; the frames go to ``video``)."""
    out = Path(args.out) if args.out is not None else Path(args.episode).with_suffix(".npz")
    if out.suffix.lower() != ".npz":
        raise CliError(f"--out must be an .npz file, got {out}")
    episode = EpisodeFile(args.episode).read()
    arrays = {
        "actions": episode.actions.numpy(), "commanded_poses": episode.commanded_poses.numpy(),
        "true_poses": episode.true_poses.numpy(), "timestamps": episode.timestamps.numpy(),
        "keys": np.array(episode.meta.action_spec.keys), "meta": np.array(json.dumps(episode.meta.to_dict())),
    }
    with atomic_output(out) as tmp:
        np.savez(tmp, **arrays)
    print(f"wrote {out}: {len(episode)} steps ({', '.join(arrays)})")


def bench(args) -> None:
    """Print write and read throughput and bytes per frame, re-writing ``args.episode`` into a temporary copy."""
    import tempfile
    import time

    source = EpisodeFile(args.episode).read()
    if len(source) == 0:
        raise CliError(f"episode {args.episode} has no readable steps")
    frames, actions = source.frames.numpy(), source.actions.numpy()
    commanded, true = source.commanded_poses.numpy(), source.true_poses.numpy()
    with tempfile.TemporaryDirectory() as tmp:
        start = time.perf_counter()
        with EpisodeWriter(Path(tmp) / "copy", source.meta) as writer:
            for t in range(len(source)):
                writer.append(frames[t], actions[t], commanded[t], true[t], float(source.timestamps[t]))
        write_s = time.perf_counter() - start
        start = time.perf_counter()
        copy = EpisodeFile(Path(tmp) / "copy").read()
        read_s = time.perf_counter() - start
        if not torch.equal(copy.frames, source.frames):
            raise CliError("the re-written copy does not read back bit-exact")
        size = (Path(tmp) / "copy" / STEPS_NAME).stat().st_size
    n, m = len(source), source.meta
    print(f"{n} frames {m.height}x{m.width}: write {n / write_s:.0f} frames/s, read {n / read_s:.0f} frames/s "
          f"({read_s:.3f} s for all), {size / n:.0f} bytes/frame on disk ({size / frames.nbytes:.1%} of raw)")


def stats(args) -> None:
    """Print the motion statistics of the recordings in ``args.paths``; with ``--json`` also write them."""
    result = recording_stats(args.paths, args.turn_threshold, args.move_threshold)
    print(format_stats(result))
    if args.json is not None:
        write_text_atomic(args.json, json.dumps(result, indent=2) + "\n")
        print(f"wrote {args.json}")


def build_parser() -> ArgumentParser:
    parser = ArgumentParser(prog="python -m worldmodel.data", description="Collect and inspect recordings.")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("collect", help="record episodes from a world with an exploration policy")
    p.add_argument("--world", required=True, choices=WORLDS)
    p.add_argument("--episodes", required=True, type=positive_int)
    p.add_argument("--frames", required=True, type=positive_int, help="frames per episode, the reset frame included")
    p.add_argument("--out", required=True, help="directory to hold the episodes")
    p.add_argument("--seed", type=seed_int, default=0, help="index of the first seed within the split")
    p.add_argument("--policy", default="mix")
    p.add_argument("--batch", type=int_in(1, 4096), default=16, help="episodes played at once by one batched world")
    p.add_argument("--device", type=device_name, default="cpu")
    p.add_argument("--split", choices=SPLITS, default="train")
    p.add_argument("--size", type=parse_size, default=None, help="frame size WIDTHxHEIGHT (default: the world's)")
    p.set_defaults(run=collect)

    p = sub.add_parser("sheet", help="write a PNG contact sheet of an episode")
    p.add_argument("episode")
    p.add_argument("--out", required=True)
    p.add_argument("--every", type=positive_int, default=None, help="show every K-th frame (default: at most 64 tiles)")
    p.add_argument("--cols", type=int_in(1, 64), default=8)
    p.add_argument("--scale", type=int_in(1, MAX_SCALE), default=1, help="nearest-neighbour upscale factor")
    p.set_defaults(run=sheet)

    p = sub.add_parser("video", help="write an mp4 of an episode")
    p.add_argument("episode")
    p.add_argument("--out", required=True)
    p.add_argument("--scale", type=int_in(1, MAX_SCALE), default=4, help="nearest-neighbour upscale factor")
    p.set_defaults(run=video)

    p = sub.add_parser("export", help="write actions, poses and timestamps to a file usable without this package")
    p.add_argument("episode")
    p.add_argument("--format", choices=EXPORT_FORMATS, default="npz", help="npz: numpy arrays (default)")
    p.add_argument("--out", default=None, help="output file (default: EPISODE.npz beside the episode folder)")
    p.set_defaults(run=export)

    p = sub.add_parser("bench", help="measure write/read speed and size on disk with a copy of an episode")
    p.add_argument("episode")
    p.set_defaults(run=bench)

    p = sub.add_parser("stats", help="motion statistics of recordings: turning, moving, idle, yaw/pitch rates, keys")
    p.add_argument("paths", nargs="+", metavar="DIR_OR_EPISODE", help="episodes, or folders searched for them")
    p.add_argument("--json", default=None, help="also write the statistics (totals and per episode) to this JSON file")
    p.add_argument("--turn-threshold", type=float, default=TURN_DEG, help="deg/frame of |yaw rate| above which a frame turns")
    p.add_argument("--move-threshold", type=float, default=MOVE_UNITS, help="world units/frame above which a frame moves")
    p.set_defaults(run=stats)

    p = sub.add_parser("info", help="print an episode's meta, length and recovery status")
    p.add_argument("episode")
    p.set_defaults(run=info)
    return parser


def show_warning(message, category, filename, lineno, file=None, line=None) -> None:
    print(f"warning: {message}", file=sys.stderr)


def run(argv: list[str] | None) -> int:
    args = build_parser().parse_args(argv)
    with warnings.catch_warnings():
        warnings.showwarning = show_warning
        args.run(args)
    return 0


def main(argv: list[str] | None = None) -> int:
    return run_cli(lambda: run(argv), "interrupted; episodes written so far are closed and readable")


if __name__ == "__main__":
    sys.exit(main())
