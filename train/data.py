"""Training batches addressed by step number, from a world (generated on the fly) or from recordings.

The batch of step k is a pure function of (seed, k): a resumed run reads exactly the batches an
uninterrupted run would, with no loader state to save. Rank r of W takes rows ``[r*b, (r+1)*b)``
of the global batch of ``W*b`` clips. For recordings, the global batch is the same whatever W is
(one shuffled order of all clips per epoch), so a 2-GPU run sees the data of a 1-GPU run at the
same global batch. Worlds play each rank's clips from seeds drawn from (seed, k, rank), built on
:func:`worldmodel.data.dataset.play_clip` (addressable by step; Doom plays the split's maps).

Every batch is a dict of CPU tensors ``frames uint8 [b, T, H, W, 3]``, ``actions [b, T, A]`` (raw),
``poses [b, T, 4, 4]`` (commanded), ``true_poses [b, T, 4, 4]``.
"""

from __future__ import annotations

import hashlib
import itertools
from dataclasses import dataclass

import numpy as np
import torch
from torch.utils.data import DataLoader, IterableDataset, Sampler, get_worker_info

from worldmodel.actions import ActionSpec
from worldmodel.camera import ControllerSpec
from worldmodel.data.dataset import ClipDataset, DatasetError, play_clip, world_seeds
from worldmodel.data.splits import split_options

SOURCES = ("world", "recordings")


class TrainDataError(ValueError):
    """A data configuration that cannot produce training batches."""


@dataclass(frozen=True)
class DataInfo:
    """What a model must agree with to train on this data."""

    source: str  # world name, or "custom" for recordings
    action_spec: ActionSpec
    controller: ControllerSpec
    height: int
    width: int
    fps: float


def derive_seed(*parts) -> int:
    """A 63-bit seed from any printable parts (stable across processes and machines)."""
    digest = hashlib.blake2b("/".join(map(str, parts)).encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") & ((1 << 63) - 1)


def _collate(items: list[dict]) -> dict[str, torch.Tensor]:
    return {k: torch.stack([it[k] for it in items]) for k in items[0]}


def _iterate(steps):
    """``steps`` is a start step (endless) or a list of steps."""
    return itertools.count(steps) if isinstance(steps, int) else iter(steps)


class _RecordingSteps(Sampler):
    """Per step, this rank's indices into a ClipDataset: consecutive slices of one endless sequence
    of per-epoch permutations (epoch e shuffled by (seed, e))."""

    def __init__(self, num_clips: int, global_batch: int, rank: int, world_size: int, seed, steps):
        self.n, self.global_batch, self.seed, self.steps = num_clips, global_batch, seed, steps
        self.local = global_batch // world_size
        self.offset = rank * self.local
        self._perm_epoch, self._perm = -1, None

    def _position(self, p: int) -> int:
        epoch, i = divmod(p, self.n)
        if epoch != self._perm_epoch:
            self._perm = np.random.default_rng(derive_seed(self.seed, "epoch", epoch)).permutation(self.n)
            self._perm_epoch = epoch
        return int(self._perm[i])

    def indices(self, step: int) -> list[int]:
        first = step * self.global_batch + self.offset
        return [self._position(p) for p in range(first, first + self.local)]

    def __iter__(self):
        for step in _iterate(self.steps):
            yield self.indices(step)


class _WorldSteps(IterableDataset):
    """Clips played in a world, one batch per step; DataLoader worker w of n plays the steps at
    positions w, w + n, ... (the loader returns them in order)."""

    def __init__(self, data_cfg, local_batch: int, rank: int, seed, steps):
        self.cfg, self.batch, self.rank, self.seed, self.steps = data_cfg, local_batch, rank, seed, steps

    def __iter__(self):
        from worldmodel.envs import make_world
        from worldmodel.envs.policies import make_policy

        info = get_worker_info()
        worker, workers = (info.id, info.num_workers) if info is not None else (0, 1)
        cfg = self.cfg
        options = split_options(cfg.world, cfg.split, cfg.world_options)
        world = make_world(cfg.world, batch=self.batch, device="cpu", **options)
        try:
            for step in itertools.islice(_iterate(self.steps), worker, None, workers):
                rng = np.random.default_rng(derive_seed(self.seed, "world", step, self.rank))
                seeds = world_seeds(rng, cfg.split, self.batch)
                warmup = int(rng.integers(0, cfg.max_warmup + 1))
                policy = make_policy(cfg.policy, world.action_spec, batch=self.batch, seed=int(rng.integers(1 << 31)))
                yield play_clip(world, policy, seeds, warmup, cfg.clip_len)
        finally:
            world.close()


class StepBatches:
    """This rank's batches for steps ``start, start + 1, ...`` of a run (see the module docstring).

    ``salt`` separates independent streams of one run (training batches, ODE trajectory batches,
    latent statistics)."""

    def __init__(self, data_cfg, seed: int, rank: int = 0, world_size: int = 1, salt: str = "train"):
        if data_cfg.source not in SOURCES:
            raise TrainDataError(f"data.source must be one of {list(SOURCES)}, got {data_cfg.source!r}")
        if data_cfg.batch % world_size:
            raise TrainDataError(f"data.batch {data_cfg.batch} (global) does not split over {world_size} ranks")
        if data_cfg.clip_len < 1 or data_cfg.batch < 1:
            raise TrainDataError(f"data.clip_len and data.batch must be >= 1, got {data_cfg.clip_len}, {data_cfg.batch}")
        self.cfg, self.rank, self.world_size = data_cfg, rank, world_size
        self.seed = (seed, salt)
        self.local_batch = data_cfg.batch // world_size
        self.dataset = None
        if data_cfg.source == "recordings":
            if not data_cfg.recordings:
                raise TrainDataError("data.source=recordings needs data.recordings (an episode folder or a list of them)")
            recordings = data_cfg.recordings
            paths = [str(recordings)] if isinstance(recordings, str) else [str(p) for p in recordings]
            try:
                self.dataset = ClipDataset(paths, data_cfg.clip_len)
            except (DatasetError, ValueError, OSError) as e:
                raise TrainDataError(f"data.recordings: {e}") from None
        self.info = self._info()

    def _info(self) -> DataInfo:
        if self.dataset is not None:
            from worldmodel.envs import WORLDS

            sources = {e.meta.source for e in self.dataset.episodes}
            meta = self.dataset.episodes[0].meta
            source = meta.source if len(sources) == 1 and meta.source in WORLDS else "custom"
            return DataInfo(source, meta.action_spec, meta.controller, meta.height, meta.width, float(meta.fps))
        from worldmodel.envs import make_world

        try:
            world = make_world(self.cfg.world, batch=1, device="cpu", **dict(self.cfg.world_options))
        except (ValueError, TypeError) as e:
            raise TrainDataError(f"data.world {self.cfg.world!r}: {e}") from None
        try:
            return DataInfo(self.cfg.world, world.action_spec, world.controller, world.height, world.width, float(world.fps))
        finally:
            world.close()

    def clip_indices(self, steps):
        """Recordings: this rank's clip indices into ``self.dataset`` per step (as :meth:`loader` reads them)."""
        if self.dataset is None:
            raise TrainDataError("clip indices exist only for data.source=recordings")
        return _RecordingSteps(len(self.dataset), self.cfg.batch, self.rank, self.world_size, self.seed, steps)

    def loader(self, steps, workers: int | None = None, pin_memory: bool = False):
        """An iterator of this rank's batches: for steps ``steps, steps + 1, ...`` (an int, endless)
        or for the steps of a list."""
        workers = self.cfg.workers if workers is None else workers
        if self.dataset is not None:
            loader = DataLoader(self.dataset, batch_sampler=self.clip_indices(steps), num_workers=workers, collate_fn=_collate,
                                pin_memory=pin_memory, persistent_workers=workers > 0)
        else:
            stream = _WorldSteps(self.cfg, self.local_batch, self.rank, self.seed, steps)
            loader = DataLoader(stream, batch_size=None, num_workers=workers, pin_memory=pin_memory,
                                persistent_workers=workers > 0)
        return iter(loader)
