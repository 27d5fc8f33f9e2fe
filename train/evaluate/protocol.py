"""The protocol: evaluation settings, held-out ground truth (episodes and their open-loop replay) and
rollouts of the model played side by side in one batched session, with the "repeat the last frame" baselines."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable

import torch
from tqdm import tqdm

from worldmodel.idm import observed_poses
from worldmodel.rollout import FrameBuffer

HORIZONS = (1, 8, 32, 128)


class EvalError(ValueError):
    """Settings or inputs an evaluation cannot run with."""


@dataclass(frozen=True)
class EvalSettings:
    world: str
    clips: int = 16
    horizon: int = 128
    horizons: tuple[int, ...] = HORIZONS
    long_frames: int = 2000
    long_clips: int = 4
    window: int = 200
    speed_frames: int = 100
    seed: int = 0
    device: str = "cpu"
    world_device: str | None = None  # where the procedural world renders (default: ``device``)
    world_options: dict = field(default_factory=dict)

    def __post_init__(self):
        if self.clips < 2:
            raise EvalError(f"--clips must be >= 2 (the swap test pairs clips), got {self.clips}")
        if self.horizon < 1 or self.long_frames < 2 or self.long_clips < 1 or self.speed_frames < 1:
            raise EvalError(
                f"need horizon >= 1, long frames >= 2, long clips >= 1, speed frames >= 1; got {self.horizon}, "
                f"{self.long_frames}, {self.long_clips}, {self.speed_frames}"
            )
        if self.window < 1 or self.window * self.long_clips < 2 or self.window > self.long_frames:
            raise EvalError(f"--window must be in 1..long frames ({self.long_frames}) and give >= 2 samples over "
                            f"{self.long_clips} long clips, got {self.window}")
        if any(h < 1 for h in self.horizons):
            raise EvalError(f"horizons must be positive, got {self.horizons}")

    @property
    def report_horizons(self) -> list[int]:
        """The horizons that fit into ``horizon``, and ``horizon`` itself."""
        return sorted({h for h in self.horizons if h <= self.horizon} | {self.horizon})


SessionFactory = Callable[[int, object], object]
"""``make_session(batch, seed)`` -> an object with ``reset(start)``, ``step(actions [B, Tb, A], force_frame=None,
force_rows=None)`` (both returning a record with ``frames``) and ``narrow(batch)`` like
:class:`worldmodel.session.Session`; ``seed`` is an int or (rows, seed) per noise group
(:data:`worldmodel.session.Seed`)."""


# ---------------------------------------------------------------- ground truth


SEED_BLOCKS = {"clips": 0, "long": 1, "reference": 2}
"""Each set of held-out episodes draws from its own block of seeds (per ``--seed``)."""


def seed_block(settings: EvalSettings, which: str) -> int:
    """The first world (and policy) seed of the held-out set ``which`` of :data:`SEED_BLOCKS` under ``--seed``."""
    return (settings.seed * len(SEED_BLOCKS) + SEED_BLOCKS[which]) * 10_000


def heldout_episodes(settings: EvalSettings, which: str, count: int, length: int, policy: str = "mix") -> dict:
    """``count`` held-out ground-truth episodes of ``length`` frames played by ``policy``: frames uint8
    ``[B, T, H, W, 3]``, actions ``[B, T, A]``, poses ``[B, T, 4, 4]`` (what the frames show), and the world seeds."""
    from worldmodel.data.dataset import play_clip
    from worldmodel.data.splits import heldout_seeds
    from worldmodel.envs.policies import make_policy

    block = seed_block(settings, which)
    seeds = heldout_seeds(count, start=block)
    with heldout_world(settings, count) as world:
        clip = play_clip(world, make_policy(policy, world.action_spec, batch=count, seed=block), seeds, 0, length)
    poses = observed_poses(clip["true_poses"], clip["poses"])
    return {"frames": clip["frames"], "actions": clip["actions"], "poses": poses, "seeds": seeds}


def heldout_options(settings: EvalSettings) -> dict:
    """World options for held-out play: Doom plays its held-out maps."""
    from worldmodel.data.splits import split_options

    return split_options(settings.world, "heldout", settings.world_options)


def heldout_world(settings: EvalSettings, batch: int):
    """The world of ``settings`` for held-out play, ``batch`` items (close it: ``with``)."""
    from worldmodel.envs import make_world

    return make_world(settings.world, batch=batch, device=settings.world_device or settings.device,
                      **heldout_options(settings))


def replay(settings: EvalSettings, seeds: list[int], actions: torch.Tensor) -> torch.Tensor:
    """Frames uint8 ``[B, T, H, W, 3]`` the world shows for ``seeds`` under ``actions [B, T, A]`` (open loop)."""
    with heldout_world(settings, len(seeds)) as world:
        frames = [world.reset(seeds).frames]
        frames += [world.step(actions[:, t]).frames for t in range(1, actions.shape[1])]
    return torch.stack(frames, 1)


# ---------------------------------------------------------------- rollouts


@dataclass(frozen=True)
class Run:
    """A batch of rollouts: start frames uint8 ``start [B, H, W, 3]``, then one step per action of
    ``actions [B, T, A]`` from t = 1; with ``forced [B, T, H, W, 3]`` each step writes those frames into
    the cache (teacher forcing) and returns its one-step prediction."""

    start: torch.Tensor
    actions: torch.Tensor
    forced: torch.Tensor | None = None

    @property
    def rows(self) -> int:
        return self.actions.shape[0]

    @property
    def length(self) -> int:
        return self.actions.shape[1]


def frame_at(x: torch.Tensor, t: int, repeat_last: bool = False) -> torch.Tensor:
    """Frame ``t`` of ``x [B, T, ...]`` as ``[B, ...]``; past the end zeros, or the last frame."""
    if t < x.shape[1]:
        return x[:, t]
    return x[:, -1] if repeat_last else x.new_zeros(x[:, -1].shape)


def play_runs(session, runs: list[Run], block_size: int = 1, desc: str = "rollout") -> list[torch.Tensor]:
    """Frames uint8 ``[B_i, T_i, H, W, 3]`` of each run, played side by side in ``session`` (its batch:
    the runs' rows in order), the frames gathered into blocks of ``block_size`` (one step each) by
    :class:`worldmodel.rollout.FrameBuffer`. Runs come longest first: once a run has ended its rows
    leave the session (``narrow``) at the next block. A last block that overhangs a run is padded (zero
    actions, its last forced frame) and cut off."""
    lengths = [r.length for r in runs]
    if lengths != sorted(lengths, reverse=True):
        raise EvalError(f"runs must come longest first, got lengths {lengths}")
    offsets = [sum(r.rows for r in runs[:i]) for i in range(len(runs) + 1)]
    first = session.reset(torch.cat([r.start for r in runs])).frames
    frames = [[f[:, None]] for f in first.split([r.rows for r in runs])]
    live, buffer = len(runs), FrameBuffer(block_size)
    end = 1 + -(-(lengths[0] - 1) // block_size) * block_size  # whole blocks after the start frame
    for t in tqdm(range(1, end), desc=desc, leave=False, disable=lengths[0] < 64):
        if not buffer.inputs and lengths[live - 1] <= t:
            live = sum(length > t for length in lengths)
            session.narrow(offsets[live])
        forcing = [i for i in range(live) if runs[i].forced is not None]
        actions = torch.cat([frame_at(r.actions, t) for r in runs[:live]])
        forced = [torch.cat([frame_at(runs[i].forced, t, repeat_last=True) for i in forcing])] if forcing else []
        block = buffer.push(actions, *forced)
        if block is None:
            continue
        force, rows = (block[1] if forcing else None), None
        if forcing and len(force) < offsets[live]:  # some rows play freely: name the forced ones
            rows = torch.cat([torch.arange(offsets[i], offsets[i + 1]) for i in forcing])
        out = session.step(block[0], force_frame=force, force_rows=rows).frames
        for i, part in enumerate(out.split([r.rows for r in runs[:live]])):
            frames[i].append(part[:, : lengths[i] - (t + 1 - block_size)])
    return [torch.cat(f, 1) for f in frames]


def rollout(session, start: torch.Tensor, actions: torch.Tensor, block_size: int = 1,
            forced: torch.Tensor | None = None, desc: str = "rollout") -> torch.Tensor:
    """Frames uint8 ``[B, T, H, W, 3]`` of one :class:`Run` in ``session`` (see :func:`play_runs`)."""
    return play_runs(session, [Run(start, actions, forced)], block_size, desc)[0]


def rollouts(make_session: SessionFactory, runs: dict[str, Run], seed: int, block_size: int = 1) -> dict[str, torch.Tensor]:
    """Frames of each named run, all played in one session: the rows of each run are a noise group
    seeded by ``seed``, so each run draws the noise that ``rollout(make_session(run.rows, seed), ...)``
    would, and gives its frames (up to the rounding of a larger batch)."""
    names = sorted(runs, key=lambda n: -runs[n].length)
    session = make_session(sum(r.rows for r in runs.values()), [(runs[n].rows, seed) for n in names])
    return dict(zip(names, play_runs(session, [runs[n] for n in names], block_size, desc="rollouts")))


def repeat_first(frames: torch.Tensor) -> torch.Tensor:
    """The autoregressive "repeat the last frame" baseline: the start frame forever ``[B, T, ...]``."""
    return frames[:, :1].expand_as(frames)


def repeat_previous(frames: torch.Tensor) -> torch.Tensor:
    """The teacher-forced "repeat the last frame" baseline: frame t-1 of ground truth predicts frame t."""
    return torch.cat([frames[:, :1], frames[:, :-1]], 1)
