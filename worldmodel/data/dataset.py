"""Fixed-length clips for training: from recorded episodes on disk, or generated on the fly from a world.

Both give dicts of ``frames uint8 [T, H, W, 3]``, ``actions float32 [T, A]`` (raw),
``poses float32 [T, 4, 4]`` (commanded) and ``true_poses float32 [T, 4, 4]`` (NaN where unknown);
:func:`play_clip` plays them batched, ``[B, T, ...]`` (train.data draws its seeds and warm-ups).
"""

from __future__ import annotations

import os
import warnings
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import Dataset

from worldmodel.data.episode import META_NAME, EpisodeFile
from worldmodel.data.splits import HELDOUT_SEED_START, SPLITS, SplitError


class DatasetError(ValueError):
    """Episodes that cannot be combined into one dataset, or dataset arguments that make no sense."""


def find_episodes(paths_or_dir) -> list[Path]:
    """Episode directories from one path or a list: an episode itself, or a folder searched recursively."""
    roots = [paths_or_dir] if isinstance(paths_or_dir, (str, os.PathLike)) else list(paths_or_dir)
    found = []
    for root in map(Path, roots):
        if (root / META_NAME).is_file():
            found.append(root)
        elif root.is_dir():
            found.extend(sorted(p.parent for p in root.rglob(META_NAME)))
        else:
            raise DatasetError(f"{root} is neither an episode nor a directory")
    if not found:
        raise DatasetError(f"no episodes (directories with {META_NAME}) found in {[str(r) for r in roots]}")
    return found


class ClipDataset(Dataset):
    """Every clip of ``clip_len`` consecutive steps, starts ``stride`` steps apart, from many episodes.

    The index keeps only each episode's record offsets (8 bytes per step); ``dataset[i]`` reads and
    decodes just that clip's records from disk, so workers hold no episode data between items.
    Episodes shorter than ``clip_len`` are skipped with a warning. All episodes must share the action
    spec and frame size.
    """

    def __init__(self, paths_or_dir, clip_len: int, stride: int = 1):
        if clip_len < 1 or stride < 1:
            raise DatasetError(f"clip_len and stride must be >= 1, got clip_len={clip_len}, stride={stride}")
        self.clip_len, self.stride = clip_len, stride
        self.episodes: list[EpisodeFile] = []
        starts, owners = [], []
        for path in find_episodes(paths_or_dir):
            episode = EpisodeFile(path)
            if len(episode) < clip_len:
                warnings.warn(f"episode {path} has {len(episode)} steps, fewer than clip_len={clip_len}; skipped")
                continue
            self._check_compatible(episode)
            clip_starts = np.arange(0, len(episode) - clip_len + 1, stride, dtype=np.int64)
            starts.append(clip_starts)
            owners.append(np.full(len(clip_starts), len(self.episodes), dtype=np.int64))
            self.episodes.append(episode)
        if not self.episodes:
            raise DatasetError(f"no episode has at least clip_len={clip_len} steps")
        self.starts = np.concatenate(starts)
        self.owners = np.concatenate(owners)

    def _check_compatible(self, episode: EpisodeFile) -> None:
        if not self.episodes:
            return
        first, m = self.episodes[0], episode.meta
        if m.action_spec != first.meta.action_spec:
            raise DatasetError(f"episode {episode.path} has action spec {m.action_spec.to_dict()}, "
                               f"but {first.path} has {first.meta.action_spec.to_dict()}")
        if (m.height, m.width) != (first.meta.height, first.meta.width):
            raise DatasetError(f"episode {episode.path} has {m.height}x{m.width} frames, "
                               f"but {first.path} has {first.meta.height}x{first.meta.width}")

    @property
    def action_spec(self):
        return self.episodes[0].meta.action_spec

    def __len__(self) -> int:
        return len(self.starts)

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        if not -len(self) <= index < len(self):
            raise IndexError(f"clip index {index} out of range for {len(self)} clips")
        start = int(self.starts[index])
        clip = self.episodes[self.owners[index]].read(start, start + self.clip_len)
        return {
            "frames": clip.frames,
            "actions": clip.actions,
            "poses": clip.commanded_poses,
            "true_poses": clip.true_poses,
        }


def world_seeds(rng: np.random.Generator, split: str, n: int) -> list[int]:
    """``n`` random world seeds from ``split`` (procedural: seeds below / from HELDOUT_SEED_START)."""
    if split not in SPLITS:
        raise SplitError(f"unknown split {split!r}; choose one of {list(SPLITS)}")
    offset = 0 if split == "train" else HELDOUT_SEED_START
    return [offset + int(s) for s in rng.integers(0, HELDOUT_SEED_START, n)]


def play_clip(world, policy, seeds: list[int], warmup: int, clip_len: int) -> dict[str, torch.Tensor]:
    """Reset ``world`` to ``seeds``, take ``warmup`` policy steps, then record ``clip_len`` frames ``[B, T, ...]``."""
    step = world.reset(seeds)
    action = torch.zeros(world.batch, world.action_spec.width)
    parts = {"frames": [], "actions": [], "poses": [], "true_poses": []}
    for t in range(warmup + clip_len):
        if t > 0:
            action = policy(t, step)
            step = world.step(action)
        if t >= warmup:
            now = (step.frames, action.float(), step.commanded_pose.float(), step.true_pose.float())
            for values, value in zip(parts.values(), now):
                values.append(value.cpu())
    return {key: torch.stack(values, 1) for key, values in parts.items()}
