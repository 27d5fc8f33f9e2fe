"""Recording play sessions in the episode format, one step appended (and flushed) per frame.

An episode starts at a reset (its first frame has the all-zero action) or, when recording is
switched on mid-session, at the frame on screen (stored with a zero action too). Its meta ``extra``
says how to reproduce it: ``start`` ("generated", "world", "image:<path>" or "frame"), ``steps``,
``model`` and ``model_seed``. Because every step is flushed as it is appended, a crash or kill
leaves a readable recording.
"""

from __future__ import annotations

import time
from pathlib import Path

from worldmodel.data.episode import EpisodeMeta, EpisodeWriter

from play.generator import Generated


def episode_path(directory: Path, seed: int) -> Path:
    """A new, unused episode directory name inside ``directory``."""
    stamp = time.strftime("%Y%m%d-%H%M%S")
    base = directory / f"play-{stamp}-seed{seed}"
    path, n = base, 1
    while path.exists():
        n += 1
        path = base.with_name(f"{base.name}-{n}")
    return path


class Recorder:
    """Writes episodes into ``directory``; ``meta_for(generated)`` gives each episode's EpisodeMeta."""

    def __init__(self, directory: str | Path, meta_for):
        self.directory = Path(directory)
        self.meta_for = meta_for
        self.writer: EpisodeWriter | None = None
        self.started_at = 0.0
        self.paths: list[Path] = []

    @property
    def active(self) -> bool:
        return self.writer is not None

    @property
    def frames(self) -> int:
        return self.writer.length if self.writer is not None else 0

    @property
    def name(self) -> str | None:
        return self.writer.path.name if self.writer is not None else None

    def start(self, first: Generated, now: float, mid_session: bool = False) -> Path:
        """Open a new episode whose first step is ``first`` (with a zero action when ``mid_session``)."""
        self.stop()
        meta = self.meta_for(first, mid_session)
        self.writer = EpisodeWriter(episode_path(self.directory, first.seed), meta)
        self.started_at = now if now is not None else 0.0
        self.paths.append(self.writer.path)
        self.append(first, now, zero_action=mid_session)
        return self.writer.path

    def append(self, generated: Generated, now: float | None, zero_action: bool = False) -> None:
        """One step; ``now`` (perf_counter seconds) stamps it, None stamps it ``index / fps``."""
        action = generated.action * 0 if zero_action else generated.action
        timestamp = None if now is None else max(now - self.started_at, 0.0)
        self.writer.append(generated.frame, action, generated.commanded_pose, generated.true_pose, timestamp)

    def stop(self) -> None:
        if self.writer is not None:
            self.writer.close()
            self.writer = None


def play_meta(generator, first: Generated, mid_session: bool, fps: float, model_name: str, model_seed: int | None,
              world_name: str | None) -> EpisodeMeta:
    """The meta of a recording made by the client."""
    extra = {
        "start": "frame" if mid_session else first.start,
        "steps": list(generator.session.steps) if generator.session is not None else None,
        "model": model_name, "model_seed": model_seed, "world": world_name, "mode": generator.mode,
    }
    return EpisodeMeta(generator.spec, generator.controller, float(fps), generator.height, generator.width, "play",
                       seed=first.seed, extra=extra)
