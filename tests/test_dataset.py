"""ClipDataset (clips of recorded episodes) and world clip streams."""

import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
import torch
from torch.utils.data import DataLoader

from worldmodel.actions import ActionSpec
from worldmodel.camera import CameraState, ControllerSpec, integrate, state_to_pose, step_state
from worldmodel.data.dataset import (
    ClipDataset,
    DatasetError,
    find_episodes,
    play_clip,
    world_seeds,
)
from worldmodel.data.episode import EpisodeMeta, EpisodeWriter, read_episode
from worldmodel.data.splits import (
    DOOM_HELDOUT_MAPS,
    DOOM_TRAIN_MAPS,
    HELDOUT_SEED_START,
    SplitError,
    heldout_seeds,
    split_options,
    split_seeds,
    train_seeds,
)

H, W = 8, 10


def write_episode(path: Path, length: int, seed: int, height: int = H, width: int = W,
                  spec: ActionSpec = ActionSpec()) -> None:
    rng = np.random.default_rng(seed)
    meta = EpisodeMeta(spec, ControllerSpec(), fps=20.0, height=height, width=width, source="test", seed=seed)
    with EpisodeWriter(path, meta) as writer:
        for t in range(length):
            action = np.concatenate([rng.integers(0, 2, len(spec.keys)), rng.normal(0, 9, 2)]).astype(np.float32)
            writer.append(rng.integers(0, 256, (height, width, 3), dtype=np.uint8), action,
                          rng.normal(size=(4, 4)), rng.normal(size=(4, 4)) if t % 2 else None)


@pytest.fixture
def recordings(tmp_path) -> Path:
    for name, length, seed in [("a", 10, 0), ("b", 7, 1), ("c/short", 3, 2), ("c/d", 4, 3)]:
        write_episode(tmp_path / name, length, seed)
    return tmp_path


def test_index_covers_every_clip_once_and_matches_episode_slices(recordings):
    with pytest.warns(UserWarning, match="fewer than clip_len=4; skipped"):
        dataset = ClipDataset(recordings, clip_len=4, stride=2)
    expected = [(p, s) for p, n in [("a", 10), ("b", 7), ("c/d", 4)] for s in range(0, n - 4 + 1, 2)]
    sources = [(dataset.episodes[o].path, int(s)) for o, s in zip(dataset.owners, dataset.starts)]
    assert [(str(p.relative_to(recordings)), s) for p, s in sources] == expected
    for i, (name, start) in enumerate(expected):
        episode = read_episode(recordings / name)[start : start + 4]
        item = dataset[i]
        assert set(item) == {"frames", "actions", "poses", "true_poses"}
        assert item["frames"].shape == (4, H, W, 3) and item["frames"].dtype == torch.uint8
        assert item["actions"].dtype == torch.float32 and item["poses"].shape == (4, 4, 4)
        torch.testing.assert_close(item["frames"], episode.frames, rtol=0, atol=0)
        torch.testing.assert_close(item["actions"], episode.actions, rtol=0, atol=0)
        torch.testing.assert_close(item["poses"], episode.commanded_poses, rtol=0, atol=0)
        torch.testing.assert_close(item["true_poses"], episode.true_poses, rtol=0, atol=0, equal_nan=True)
    with pytest.raises(IndexError):
        dataset[len(dataset)]


def test_stride_one_and_explicit_paths(recordings):
    dataset = ClipDataset([recordings / "a", recordings / "b"], clip_len=3)
    assert len(dataset) == (10 - 3 + 1) + (7 - 3 + 1)
    assert [p.name for p in find_episodes(recordings / "c")] == ["d", "short"]


def test_dataloader_with_two_workers_returns_the_same_clips(recordings):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        dataset = ClipDataset(recordings, clip_len=3)
    loader = DataLoader(dataset, batch_size=4, num_workers=2, shuffle=False)
    batches = list(loader)
    frames = torch.cat([b["frames"] for b in batches])
    assert frames.shape == (len(dataset), 3, H, W, 3)
    torch.testing.assert_close(frames, torch.stack([dataset[i]["frames"] for i in range(len(dataset))]), rtol=0, atol=0)
    assert torch.cat([b["actions"] for b in batches]).shape == (len(dataset), 3, 7)


def test_incompatible_episodes_are_rejected(tmp_path):
    write_episode(tmp_path / "a", 5, 0)
    write_episode(tmp_path / "b", 5, 1, height=H + 2)
    with pytest.raises(DatasetError, match=r"has 10x10 frames, but .* has 8x10"):
        ClipDataset(tmp_path, clip_len=2)
    write_episode(tmp_path / "c", 5, 1, spec=ActionSpec(keys=("W", "A", "S", "D")))
    with pytest.raises(DatasetError, match="action spec"):
        ClipDataset([tmp_path / "a", tmp_path / "c"], clip_len=2)


def test_bad_dataset_arguments(tmp_path):
    with pytest.raises(DatasetError, match="no episodes"):
        ClipDataset(tmp_path, clip_len=2)
    with pytest.raises(DatasetError, match="neither an episode nor a directory"):
        ClipDataset(tmp_path / "missing", clip_len=2)
    write_episode(tmp_path / "a", 3, 0)
    with pytest.raises(DatasetError, match="clip_len"):
        ClipDataset(tmp_path, clip_len=0)
    with pytest.warns(UserWarning, match="skipped"), pytest.raises(DatasetError, match="no episode has at least"):
        ClipDataset(tmp_path, clip_len=4)


@dataclass
class FakeStep:
    frames: torch.Tensor
    commanded_pose: torch.Tensor
    true_pose: torch.Tensor


class FakeWorld:
    """Follows the World interface; frame pixels encode (seed, step) so clips can be checked."""

    name, fps, height, width = "fake", 20, 4, 6

    def __init__(self, batch: int):
        self.batch, self.action_spec, self.controller = batch, ActionSpec(), ControllerSpec()

    def _result(self) -> FakeStep:
        value = (torch.tensor(self.seeds) * 10 + self.t) % 256
        frames = value.to(torch.uint8)[:, None, None, None].expand(-1, self.height, self.width, 3).clone()
        pose = state_to_pose(self.state)
        return FakeStep(frames, pose, pose + 1.0)

    def reset(self, seeds):
        self.seeds, self.t = list(seeds), 0
        self.state = CameraState.start(self.batch, self.controller)
        return self._result()

    def step(self, actions):
        self.state = step_state(self.state, actions, self.action_spec, self.controller)
        self.t += 1
        return self._result()


class FakePolicy:
    """Walks forward and turns by ``step_index`` mouse counts."""

    def __init__(self, spec: ActionSpec, batch: int):
        self.spec, self.batch = spec, batch

    def __call__(self, step_index, world_step=None):
        action = torch.zeros(self.batch, self.spec.width)
        action[:, self.spec.key_index("W")] = 1.0
        action[:, -2] = float(step_index)
        return action


@pytest.mark.parametrize("warmup", [0, 3])
def test_play_clip_records_the_steps_after_the_warmup(warmup):
    world = FakeWorld(batch=2)
    clip = play_clip(world, FakePolicy(world.action_spec, 2), [1, 2], warmup, clip_len=5)
    assert clip["frames"].shape == (2, 5, 4, 6, 3) and clip["actions"].shape == (2, 5, 7)
    steps = torch.arange(warmup, warmup + 5)
    torch.testing.assert_close(clip["frames"][:, :, 0, 0, 0].long(), torch.tensor([[10], [20]]) + steps)
    assert (clip["actions"][:, :, -2] == steps.float()).all()  # action t produced frame t
    if warmup == 0:
        assert (clip["actions"][:, 0] == 0).all()
    # the stored commanded poses are what integrating all actions from the reset gives
    all_actions = FakePolicy(world.action_spec, 2)
    history = torch.stack([torch.zeros(2, 7)] + [all_actions(t) for t in range(1, warmup + 5)], 1)
    poses, _ = integrate(history, world.action_spec, world.controller)
    torch.testing.assert_close(clip["poses"], poses[:, warmup:], rtol=0, atol=1e-6)
    torch.testing.assert_close(clip["true_poses"], clip["poses"] + 1.0)


def test_world_seeds_come_from_the_split():
    rng = np.random.default_rng(0)
    train, heldout = world_seeds(rng, "train", 500), world_seeds(rng, "heldout", 500)
    assert all(0 <= s < HELDOUT_SEED_START for s in train) and len(set(train)) > 490
    assert all(s >= HELDOUT_SEED_START for s in heldout)
    with pytest.raises(ValueError, match="unknown split"):
        world_seeds(rng, "test", 1)


def test_split_functions():
    assert train_seeds(3, start=5) == [5, 6, 7] and heldout_seeds(2) == [HELDOUT_SEED_START, HELDOUT_SEED_START + 1]
    assert split_seeds("heldout", 1, start=4) == [HELDOUT_SEED_START + 4]
    assert set(DOOM_TRAIN_MAPS).isdisjoint(DOOM_HELDOUT_MAPS)
    assert split_options("doom", "heldout", {"pitch": True}) == {"pitch": True, "maps": list(DOOM_HELDOUT_MAPS)}
    assert split_options("doom", "train", {"maps": ["MAP02"]}) == {"maps": ["MAP02"]}  # named maps win
    assert split_options("procedural", "heldout") == {}
    with pytest.raises(SplitError, match="do not fit"):
        train_seeds(2, start=HELDOUT_SEED_START - 1)
    with pytest.raises(SplitError, match="unknown split"):
        split_options("doom", "test")
