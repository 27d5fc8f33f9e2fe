"""Runs without a window: a scripted or replayed input through the generator, into a video and/or a recording."""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator

import torch
from tqdm import tqdm

from play.generator import FrameGenerator, Generated
from play.recorder import Recorder
from play.renderer import PANEL_GAP
from play.video import VideoWriter, side_by_side


def run_headless(generator: FrameGenerator, actions: Iterator[torch.Tensor], frames: int, seed: int, start=None,
                 video: VideoWriter | None = None, recorder: Recorder | None = None,
                 on_frame: Callable[[Generated], None] | None = None) -> dict:
    """Reset with ``seed``/``start``, then step through ``actions`` until ``frames`` frames (the first
    included) were made or the actions end. Returns a summary (frames, seconds, fps, generate_ms_mean)."""
    started = time.perf_counter()
    times = []
    with tqdm(total=frames, unit="frame", desc="generating", leave=False) as progress:
        generated = generator.reset(seed, start)
        if recorder is not None:
            recorder.start(generated, None)
        count = 0
        while True:
            count += 1
            progress.update()
            if video is not None:
                video.append(side_by_side(generated.panels, PANEL_GAP))
            if on_frame is not None:
                on_frame(generated)
            if count >= frames:
                break
            action = next(actions, None)
            if action is None:
                break
            generated = generator.step(action)
            times.append(generated.generate_s)
            if recorder is not None:
                recorder.append(generated, None)
    if recorder is not None:
        recorder.stop()
    seconds = time.perf_counter() - started
    return {
        "frames": count,
        "seconds": round(seconds, 3),
        "fps": round(count / seconds, 2),
        "generate_ms_mean": round(1000 * sum(times) / len(times), 2) if times else None,
    }
