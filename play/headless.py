"""Runs without a window: a scripted or replayed input through the generator, into a video and/or a recording."""

from __future__ import annotations

import time
from collections.abc import Iterator

import numpy as np
import torch
from tqdm import tqdm

from play.generator import FrameGenerator
from play.recorder import Recorder
from play.renderer import PANEL_GAP
from worldmodel.video import VideoWriter


def side_by_side(panels: list[np.ndarray], gap: int) -> np.ndarray:
    """Panels uint8 [H, W, 3] joined left to right with ``gap`` black columns between them."""
    h = panels[0].shape[0]
    spacer = np.zeros((h, gap, 3), np.uint8)
    parts = [p for panel in panels for p in (spacer, panel)][1:]
    return np.concatenate(parts, axis=1)


def run_headless(generator: FrameGenerator, actions: Iterator[torch.Tensor], frames: int, seed: int, start=None,
                 video: VideoWriter | None = None, recorder: Recorder | None = None,
                 log=None) -> dict:
    """Reset with ``seed``/``start``, then step through ``actions`` until ``frames`` frames (the first
    included) were made or the actions end; each frame is written to ``log`` (a play.app.JsonLog) if
    given. Returns a summary (frames, seconds, fps, generate_ms_mean)."""
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
            if log is not None:
                log.write("frame", index=generated.index, seed=generated.seed, steps=generated.steps,
                          action=[round(v, 4) for v in generated.action.tolist()],
                          generate_ms=round(generated.generate_s * 1000, 3))
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
