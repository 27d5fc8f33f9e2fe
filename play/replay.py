"""Replaying a recording: its actions back through the model (or the world), from the same start.

A recording made by the client stores how its first frame came about (meta ``extra.start``): a
frame the model generated is regenerated from the recorded seed; any other start (a world's frame,
an image, the frame on screen when recording began, or a collected episode's first frame) is
reused from the recording itself. With the same model, seed and steps, the replayed frames equal
the recorded ones.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from worldmodel.data.episode import Episode, read_episode


class ReplayError(ValueError):
    """A recording that cannot be replayed here."""


@dataclass
class ReplayPlan:
    episode: Episode
    seed: int
    start: torch.Tensor | None  # uint8 [H, W, 3], or None: the model generates the first frame
    actions: torch.Tensor  # [T - 1, A], the actions after the first frame
    steps: list[float] | None  # the recorded noise levels, None if unknown
    note: str | None  # a reason the replay may differ from the recording


def plan_replay(path: str | Path, generator, model_name: str | None) -> ReplayPlan:
    """How to replay the episode at ``path`` with ``generator`` (a FrameGenerator)."""
    episode = read_episode(path)
    meta = episode.meta
    if len(episode) == 0:
        raise ReplayError(f"recording {path} holds no frames")
    if meta.action_spec != generator.spec:
        raise ReplayError(
            f"recording {path} has actions {meta.action_spec.keys} (mouse scale {meta.action_spec.mouse_scale}) but this "
            f"model has {generator.spec.keys} (mouse scale {generator.spec.mouse_scale})"
        )
    if generator.session is not None and (meta.height, meta.width) != (generator.height, generator.width):
        raise ReplayError(
            f"recording {path} has {meta.width}x{meta.height} frames but the model makes {generator.width}x{generator.height}"
        )
    extra = meta.extra
    generated = extra.get("start") == "generated"
    steps = extra.get("steps")
    recorded_model = extra.get("model")
    note = None
    if recorded_model is not None and model_name is not None and recorded_model != model_name:
        note = f"recorded with model {recorded_model}, replaying with {model_name}"
    return ReplayPlan(episode=episode, seed=meta.seed if meta.seed is not None else 0,
                      start=None if generated else episode.frames[0], actions=episode.actions[1:],
                      steps=[float(s) for s in steps] if steps else None, note=note)
