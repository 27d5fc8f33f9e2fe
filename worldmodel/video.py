"""Video output (H.264 through imageio-ffmpeg): frames written as they come, and the export of a
recorded episode (used by ``python -m play`` and ``python -m worldmodel.data``).

A video is written under a temp name and renamed into place only when it is complete: a failing
run never replaces an existing file. ffmpeg failures become one-line :class:`VideoError`s.
"""

from __future__ import annotations

import warnings
from contextlib import contextmanager
from pathlib import Path

import numpy as np

from worldmodel.data.episode import read_episode
from worldmodel.files import PendingFile

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


class VideoWriter:
    """Appends uint8 [H, W, 3] frames to an H.264 video; use as a context manager: the video is
    renamed into place when the block succeeds and discarded when it raises."""

    def __init__(self, path: str | Path, fps: float, scale: int = 1):
        import imageio.v2 as imageio

        self.path = check_video_path(path)
        self.scale = scale
        self.frames = 0
        self._file = PendingFile(self.path)
        with self._ffmpeg():
            self._writer = imageio.get_writer(self._file.tmp, fps=fps, codec="libx264", quality=8, macro_block_size=1,
                                              pixelformat="yuv420p")

    @contextmanager
    def _ffmpeg(self):
        """Turn the writer's failures (ffmpeg died, disk full) into one VideoError; the file is discarded."""
        try:
            yield
        except (OSError, RuntimeError) as error:
            self._file.discard()
            cause = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
            raise VideoError(f"video {self.path} could not be written: {cause}") from None

    def append(self, frame: np.ndarray) -> None:
        with self._ffmpeg():
            self._writer.append_data(even_frame(np.ascontiguousarray(frame), self.scale))
        self.frames += 1

    def _close_writer(self) -> None:
        with self._ffmpeg(), warnings.catch_warnings():
            warnings.simplefilter("ignore")
            self._writer.close()

    def close(self) -> None:
        """Finish the video and rename it into place."""
        self._close_writer()
        try:
            if not self._file.tmp.is_file():
                raise VideoError(f"video {self.path} could not be written: ffmpeg ended without writing it")
            self._file.commit()
        finally:
            self._file.discard()

    def abort(self) -> None:
        """Stop writing and remove the unfinished video (an existing file at ``path`` stays as it was)."""
        try:
            self._close_writer()
        except VideoError:
            pass  # the run already failed for another reason; that one is reported
        finally:
            self._file.discard()

    def __enter__(self) -> "VideoWriter":
        return self

    def __exit__(self, kind, error, tb) -> None:
        if error is None:
            self.close()
        else:
            self.abort()


def export_episode(episode: str | Path, out: str | Path, scale: int = 1, fps: float | None = None) -> int:
    """Write the frames of a recorded episode to a video; returns the number of frames written."""
    check_video_path(out)
    ep = read_episode(episode)
    if len(ep) == 0:
        raise VideoError(f"episode {episode} holds no frames")
    with VideoWriter(out, fps or ep.meta.fps, scale) as writer:
        for frame in ep.frames.numpy():
            writer.append(frame)
    return len(ep)
