"""mp4 output: frames written as they come (headless runs) and the export of a recorded episode."""

from __future__ import annotations

import warnings
from pathlib import Path

import numpy as np

VIDEO_SUFFIXES = (".mp4", ".mkv", ".mov", ".webm", ".avi")


class VideoError(ValueError):
    """A video that cannot be written as asked."""


def check_video_path(path: str | Path) -> Path:
    path = Path(path)
    if path.suffix.lower() not in VIDEO_SUFFIXES:
        raise VideoError(f"video output {path} must end in one of {', '.join(VIDEO_SUFFIXES)}")
    if path.is_dir():
        raise VideoError(f"video output {path} is a directory")
    return path


def even_frame(frame: np.ndarray, scale: int = 1) -> np.ndarray:
    """``frame`` uint8 [H, W, 3] upscaled ``scale`` times (nearest) and padded to even sides (for yuv420p)."""
    if scale > 1:
        frame = frame.repeat(scale, axis=0).repeat(scale, axis=1)
    h, w = frame.shape[:2]
    return np.pad(frame, ((0, h % 2), (0, w % 2), (0, 0)))


def side_by_side(panels: list[np.ndarray], gap: int) -> np.ndarray:
    """Panels uint8 [H, W, 3] joined left to right with ``gap`` black columns between them."""
    h = panels[0].shape[0]
    spacer = np.zeros((h, gap, 3), np.uint8)
    parts = [p for panel in panels for p in (spacer, panel)][1:]
    return np.concatenate(parts, axis=1)


class VideoWriter:
    """Appends uint8 [H, W, 3] frames to an H.264 video; use as a context manager."""

    def __init__(self, path: str | Path, fps: float, scale: int = 1):
        import imageio.v2 as imageio

        self.path = check_video_path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.scale = scale
        self.frames = 0
        self._writer = imageio.get_writer(self.path, fps=fps, codec="libx264", quality=8, macro_block_size=1,
                                          pixelformat="yuv420p")

    def append(self, frame: np.ndarray) -> None:
        self._writer.append_data(even_frame(np.ascontiguousarray(frame), self.scale))
        self.frames += 1

    def close(self) -> None:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            self._writer.close()

    def __enter__(self) -> "VideoWriter":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def export_episode(episode: str | Path, out: str | Path, scale: int = 1, fps: float | None = None) -> int:
    """Write the frames of a recorded episode to a video; returns the number of frames written."""
    from worldmodel.data.episode import read_episode

    check_video_path(out)
    ep = read_episode(episode)
    if len(ep) == 0:
        raise VideoError(f"episode {episode} holds no frames")
    with VideoWriter(out, fps or ep.meta.fps, scale) as writer:
        for frame in ep.frames.numpy():
            writer.append(frame)
    return len(ep)
