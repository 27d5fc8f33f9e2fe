"""Synchronous frame source of the client: a model session, a ground-truth world, or both side by side.

The world and the session are driven alike (``reset(seeds=...)`` and ``step(actions)``, each returning
a :class:`worldmodel.envs.WorldStep`); side by side, the world integrates each action into the camera
and the session takes that camera. Every reset and step returns a :class:`Generated` with the panels
to show (left to right: world, model) and what the recorder needs. Seeds make runs reproducible: a
reset with seed ``s`` resets both with ``s``, so the same seed and actions give the same frames (this
is what replay relies on). A chunk-wise model shows each frame ``block_size - 1`` steps late.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from worldmodel.flow import step_list

START_FRAMES = Path(__file__).resolve().parent.parent / "assets" / "start_frames"
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg")


@dataclass
class Generated:
    """One frame of the client. ``panels``: uint8 [H, W, 3] arrays, left to right; ``frame`` is the one
    recorded (the model's, or the world's without a model). ``action`` [A] (zeros after a reset),
    ``commanded_pose`` [4, 4], ``true_pose`` [4, 4] or None, ``generate_s`` the wall time it took."""

    index: int
    panels: list[np.ndarray]
    frame: np.ndarray
    action: torch.Tensor
    commanded_pose: torch.Tensor
    true_pose: torch.Tensor | None
    seed: int
    start: str
    steps: int
    generate_s: float


def start_images(world: str, directory: Path = START_FRAMES) -> list[Path]:
    """Shipped start frames for ``world``: ``assets/start_frames/<world>/*.png`` (sorted), else none."""
    folder = directory / world
    return sorted(p for p in folder.glob("*") if p.suffix.lower() in IMAGE_SUFFIXES) if folder.is_dir() else []


def native_bf16(cpuinfo: Path = Path("/proc/cpuinfo")) -> bool:
    """The CPU does bf16 arithmetic natively (AVX512-BF16 or AMX flags); elsewhere bf16 is emulated and slow."""
    try:
        flags = next((line for line in cpuinfo.read_text().splitlines() if line.startswith("flags")), "").split()
    except OSError:
        return False
    return "avx512_bf16" in flags or "amx_bf16" in flags


def play_dtype(device: torch.device) -> torch.dtype:
    """The dtype the client plays in on ``device``: bf16 on a CPU with native bf16 (about 1.3x faster per
    frame than fp32 on 2 cores), else float32."""
    return torch.bfloat16 if device.type == "cpu" and native_bf16() else torch.float32


class FrameGenerator:
    """Drives ``session`` (a worldmodel Session, batch 1) and/or ``world`` (a worldmodel World, batch 1).
    A float32 CPU session is cast to :func:`play_dtype` (``fast_cpu=False`` keeps it as it is)."""

    def __init__(self, session=None, world=None, start_frames: list[Path] = (), fast_cpu: bool = True):
        if session is None and world is None:
            raise ValueError("a frame generator needs a session, a world, or both")
        if fast_cpu and session is not None and session.dtype == torch.float32:
            dtype = play_dtype(session.device)
            if dtype != session.dtype:
                session.cast(dtype)
        self.session = session
        self.world = world
        self.start_frames = list(start_frames)
        self.default_steps = list(session.steps) if session is not None else []
        self.steps = len(self.default_steps)
        source = session if session is not None else world
        self.spec, self.controller, self.height, self.width = source.action_spec, source.controller, source.height, source.width
        if session is not None and world is not None and (world.height, world.width) != (self.height, self.width):
            raise ValueError(
                f"world {world.name} makes {world.width}x{world.height} frames but the model makes "
                f"{self.width}x{self.height}; they cannot run side by side"
            )

    @property
    def panel_count(self) -> int:
        return (self.world is not None) + (self.session is not None)

    @property
    def mode(self) -> str:
        return " | ".join(n for n, on in (("world", self.world), ("model", self.session)) if on is not None)

    def use_steps(self, sigmas: list[float]) -> None:
        """Sample with exactly these noise levels (e.g. a recording's)."""
        if self.session is not None:
            self.session.steps = sigmas
            self.steps = len(sigmas)

    def set_steps(self, n: int) -> None:
        if self.session is not None and n != self.steps:
            self.session.steps = step_list(n, self.default_steps)
            self.steps = n

    def start_for(self, seed: int) -> Path | None:
        """The shipped start frame for ``seed`` (they take turns), or None when none ship."""
        return self.start_frames[seed % len(self.start_frames)] if self.start_frames else None

    def reset(self, seed: int, start=None) -> Generated:
        """A new world from ``seed``. ``start``: an image path, uint8 [H, W, 3], or None (the model
        generates the first frame). With a world, the world's first frame is the start."""
        t0 = time.perf_counter()
        records = []
        kind = "generated" if start is None else ("image" if isinstance(start, (str, Path)) else "frame")
        if self.world is not None:
            records.append(self.world.reset([seed]))
            start, kind = records[0].frames[0], "world"
        if self.session is not None:
            records.append(self.session.reset(start, seeds=[seed]))
        self.seed, self.index = seed, 0
        self.start = f"image:{start}" if kind == "image" else kind
        return self._generated(records, torch.zeros(self.spec.width), t0)

    def step(self, action: torch.Tensor) -> Generated:
        """The next frame after ``action`` [A]: the world integrates it, the session takes its camera."""
        t0 = time.perf_counter()
        records, batch_action, camera = [], action[None].float(), None
        if self.world is not None:
            records.append(self.world.step(batch_action))
            camera = self.world.commanded
        if self.session is not None:
            records.append(self.session.step(batch_action, camera=camera))
        self.index += 1
        return self._generated(records, action.clone(), t0)

    def _generated(self, records, action: torch.Tensor, t0: float) -> Generated:
        """The client's frame from the step records (the world's first): panels left to right, poses of the first."""
        panels = [r.frames[0].numpy() for r in records]
        true_pose = None if records[0].true_pose is None else records[0].true_pose[0]
        return Generated(self.index, panels, panels[-1], action, records[0].commanded_pose[0], true_pose, self.seed,
                         self.start, self.steps, time.perf_counter() - t0)
