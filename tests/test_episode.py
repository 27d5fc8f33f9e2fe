"""The episode format: round trip, crash/truncation recovery, and every bad input."""

import json
import os
import signal
import subprocess
import sys
import textwrap
import time
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch

from worldmodel.actions import ActionSpec
from worldmodel.camera import ControllerSpec
from worldmodel.data.episode import (
    META_NAME,
    STEPS_NAME,
    Episode,
    EpisodeError,
    EpisodeFile,
    EpisodeMeta,
    EpisodeRecoveryWarning,
    EpisodeWriter,
    read_episode,
)

H, W = 12, 20
REPO = Path(__file__).resolve().parents[1]


def make_meta(**overrides) -> EpisodeMeta:
    fields = dict(action_spec=ActionSpec(), controller=ControllerSpec(), fps=20.0, height=H, width=W,
                  source="test", seed=7, extra={"note": "unit test", "nested": [1, 2]})
    fields.update(overrides)
    return EpisodeMeta(**fields)


def random_steps(rng: np.random.Generator, t: int, spec: ActionSpec = ActionSpec()) -> dict:
    k = len(spec.keys)
    actions = np.concatenate([rng.integers(0, 2, (t, k)), rng.normal(0, 30, (t, 2))], 1).astype(np.float32)
    true = rng.normal(size=(t, 4, 4)).astype(np.float32)
    true[rng.random(t) < 0.3] = np.nan  # unknown true poses are written as None
    return {
        "frames": rng.integers(0, 256, (t, H, W, 3), dtype=np.uint8),
        "actions": actions,
        "commanded": rng.normal(size=(t, 4, 4)).astype(np.float32),
        "true": true,
        "timestamps": np.cumsum(rng.uniform(0.01, 0.1, t)),
    }


def write_steps(path, steps: dict, meta: EpisodeMeta | None = None) -> None:
    with EpisodeWriter(path, meta or make_meta()) as writer:
        for i in range(len(steps["frames"])):
            true = None if np.isnan(steps["true"][i]).all() else torch.from_numpy(steps["true"][i])
            writer.append(torch.from_numpy(steps["frames"][i]), steps["actions"][i], steps["commanded"][i],
                          true, float(steps["timestamps"][i]))


def assert_matches(episode: Episode, steps: dict, stop: int) -> None:
    assert len(episode) == stop
    np.testing.assert_array_equal(episode.frames.numpy(), steps["frames"][:stop])
    np.testing.assert_array_equal(episode.actions.numpy(), steps["actions"][:stop])
    np.testing.assert_array_equal(episode.commanded_poses.numpy(), steps["commanded"][:stop])
    np.testing.assert_array_equal(episode.true_poses.numpy(), steps["true"][:stop])  # NaN == NaN here
    np.testing.assert_array_equal(episode.timestamps.numpy(), steps["timestamps"][:stop])


def test_round_trip_is_exact(tmp_path):
    rng = np.random.default_rng(1)
    steps = random_steps(rng, 23)
    meta = make_meta()
    write_steps(tmp_path / "ep", steps, meta)
    episode = read_episode(tmp_path / "ep")
    assert_matches(episode, steps, 23)
    assert episode.frames.dtype == torch.uint8 and episode.actions.dtype == torch.float32
    assert episode.timestamps.dtype == torch.float64
    assert not episode.recovered
    assert episode.meta.to_dict() == {**meta.to_dict(), "length": 23}
    assert episode.meta.action_spec == meta.action_spec and episode.meta.controller == meta.controller


def test_partial_reads_and_slices_match(tmp_path):
    rng = np.random.default_rng(2)
    steps = random_steps(rng, 15)
    write_steps(tmp_path / "ep", steps)
    file = EpisodeFile(tmp_path / "ep")
    full = file.read()
    for start, stop in [(0, 0), (0, 1), (3, 9), (14, 15), (0, 15)]:
        part = file.read(start, stop)
        clip = full[start:stop]
        for name in ("frames", "actions", "commanded_poses", "timestamps"):
            torch.testing.assert_close(getattr(part, name), getattr(clip, name), rtol=0, atol=0)
        np.testing.assert_array_equal(part.frames.numpy(), steps["frames"][start:stop])
    with pytest.raises(EpisodeError, match="out of range"):
        file.read(10, 16)


def test_default_timestamps_follow_fps(tmp_path):
    meta = make_meta(fps=10.0)
    with EpisodeWriter(tmp_path / "ep", meta) as writer:
        for _ in range(4):
            writer.append(np.zeros((H, W, 3), np.uint8), np.zeros(7), np.eye(4))
    np.testing.assert_array_equal(read_episode(tmp_path / "ep").timestamps.numpy(), [0.0, 0.1, 0.2, 0.3])


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_truncated_log_reads_the_complete_prefix(tmp_path, seed):
    rng = np.random.default_rng(seed)
    steps = random_steps(rng, 12)
    write_steps(tmp_path / "ep", steps)
    offsets = EpisodeFile(tmp_path / "ep").offsets
    data = (tmp_path / "ep" / STEPS_NAME).read_bytes()
    cuts = rng.integers(int(offsets[0]), len(data), 6).tolist() + [int(offsets[5]), int(offsets[5]) + 3]
    for cut in cuts:
        (tmp_path / "ep" / STEPS_NAME).write_bytes(data[:cut])
        complete = int((offsets[1:] <= cut).sum())
        with pytest.warns(EpisodeRecoveryWarning, match=f"recovered {complete} of 12 steps"):
            episode = read_episode(tmp_path / "ep")
        assert episode.recovered
        assert_matches(episode, steps, complete)


def test_corrupt_record_in_the_middle_stops_reading_there(tmp_path):
    steps = random_steps(np.random.default_rng(3), 10)
    write_steps(tmp_path / "ep", steps)
    offsets = EpisodeFile(tmp_path / "ep").offsets
    data = bytearray((tmp_path / "ep" / STEPS_NAME).read_bytes())
    data[int(offsets[4]) + 40] ^= 0xFF  # a flipped payload byte: CRC fails
    (tmp_path / "ep" / STEPS_NAME).write_bytes(bytes(data))
    with pytest.warns(EpisodeRecoveryWarning, match="record 4 .* CRC32"):
        assert_matches(read_episode(tmp_path / "ep"), steps, 4)
    data[int(offsets[2])] = ord("X")  # record magic
    (tmp_path / "ep" / STEPS_NAME).write_bytes(bytes(data))
    with pytest.warns(EpisodeRecoveryWarning, match="record 2 .* wrong magic"):
        assert_matches(read_episode(tmp_path / "ep"), steps, 2)


CRASH_WRITER = textwrap.dedent("""
    import sys, numpy as np
    from worldmodel.actions import ActionSpec
    from worldmodel.camera import ControllerSpec
    from worldmodel.data.episode import EpisodeMeta, EpisodeWriter
    meta = EpisodeMeta(ActionSpec(), ControllerSpec(), fps=20.0, height=64, width=64, source="test")
    writer = EpisodeWriter(sys.argv[1], meta)
    rng = np.random.default_rng(0)
    t = 0
    while True:
        frame = rng.integers(0, 256, (64, 64, 3), dtype=np.uint8)
        frame[0, 0, 0] = t % 256
        writer.append(frame, np.zeros(7), np.eye(4) * (t + 1), None, t * 0.05)
        t += 1
        if t % 50 == 0:
            print(t, flush=True)
""")


def test_killed_writer_leaves_a_readable_prefix(tmp_path):
    env = {**os.environ, "PYTHONPATH": f"{REPO}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}
    proc = subprocess.Popen([sys.executable, "-c", CRASH_WRITER, str(tmp_path / "ep")], stdout=subprocess.PIPE,
                            text=True, env=env)
    try:
        for _ in range(4):  # at least 200 steps written and flushed
            written = int(proc.stdout.readline())
        time.sleep(0.05)
    finally:
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait()
        proc.stdout.close()
    assert proc.returncode == -signal.SIGKILL
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", EpisodeRecoveryWarning)  # only a cut-short last record warns
        file = EpisodeFile(tmp_path / "ep")
        episode = file.read()
    assert file.meta.length is None and "not closed" in file.status
    assert len(episode) >= written
    rng = np.random.default_rng(0)
    for t in range(len(episode)):
        frame = rng.integers(0, 256, (64, 64, 3), dtype=np.uint8)
        frame[0, 0, 0] = t % 256
        np.testing.assert_array_equal(episode.frames[t].numpy(), frame)
    np.testing.assert_array_equal(episode.commanded_poses[:, 0, 0].numpy(), np.arange(1, len(episode) + 1))
    assert torch.isnan(episode.true_poses).all()


def test_exception_inside_writer_keeps_the_steps(tmp_path):
    steps = random_steps(np.random.default_rng(4), 5)
    with pytest.raises(RuntimeError, match="boom"):
        with EpisodeWriter(tmp_path / "ep", make_meta()) as writer:
            for i in range(5):
                writer.append(steps["frames"][i], steps["actions"][i], steps["commanded"][i], None, 0.1 * i)
            raise RuntimeError("boom")
    episode = read_episode(tmp_path / "ep")
    assert len(episode) == 5 and episode.meta.length == 5
    np.testing.assert_array_equal(episode.frames.numpy(), steps["frames"])


def test_refuses_to_overwrite(tmp_path):
    write_steps(tmp_path / "ep", random_steps(np.random.default_rng(5), 2))
    before = (tmp_path / "ep" / STEPS_NAME).read_bytes()
    with pytest.raises(EpisodeError, match="already exists"):
        EpisodeWriter(tmp_path / "ep", make_meta())
    assert (tmp_path / "ep" / STEPS_NAME).read_bytes() == before
    (tmp_path / "file").write_text("x")
    with pytest.raises(EpisodeError, match="not a directory"):
        EpisodeWriter(tmp_path / "file", make_meta())


def test_writer_rejects_bad_steps(tmp_path):
    with EpisodeWriter(tmp_path / "ep", make_meta()) as writer:
        frame, action, pose = np.zeros((H, W, 3), np.uint8), np.zeros(7), np.eye(4)
        with pytest.raises(EpisodeError, match=r"frame has shape \(12, 21, 3\)"):
            writer.append(np.zeros((H, W + 1, 3), np.uint8), action, pose)
        with pytest.raises(EpisodeError, match="uint8"):
            writer.append(np.zeros((H, W, 3), np.float32), action, pose)
        with pytest.raises(EpisodeError, match="width"):
            writer.append(frame, np.zeros(6), pose)
        with pytest.raises(EpisodeError, match="NaN"):
            writer.append(frame, np.full(7, np.nan), pose)
        with pytest.raises(EpisodeError, match="commanded_pose must have shape"):
            writer.append(frame, action, np.eye(3))
        writer.append(frame, action, pose, None, 1.0)
        with pytest.raises(EpisodeError, match="timestamp"):
            writer.append(frame, action, pose, None, 0.5)
    assert len(read_episode(tmp_path / "ep")) == 1
    with pytest.raises(EpisodeError, match="closed"):
        writer.append(frame, action, pose)


def test_bad_meta_values_are_rejected():
    with pytest.raises(EpisodeError, match="fps"):
        make_meta(fps=0)
    with pytest.raises(EpisodeError, match="height"):
        make_meta(height=0)
    with pytest.raises(EpisodeError, match="JSON"):
        make_meta(extra={"x": object()})


def edit_meta(path: Path, **changes) -> None:
    meta = json.loads((path / META_NAME).read_text())
    meta.update(changes)
    (path / META_NAME).write_text(json.dumps(meta))


@pytest.fixture
def episode_dir(tmp_path) -> Path:
    write_steps(tmp_path / "ep", random_steps(np.random.default_rng(6), 6))
    return tmp_path / "ep"


def test_missing_meta(episode_dir):
    (episode_dir / META_NAME).unlink()
    with pytest.raises(EpisodeError, match="meta.json is missing"):
        read_episode(episode_dir)
    with pytest.raises(EpisodeError, match="not a directory"):
        read_episode(episode_dir / "nothing")


def test_missing_steps(episode_dir):
    (episode_dir / STEPS_NAME).unlink()
    with pytest.raises(EpisodeError, match="no steps.rec"):
        read_episode(episode_dir)


@pytest.mark.parametrize("version, message", [(2, "version 2 is not supported"), ("1", "no integer format version")])
def test_wrong_version(episode_dir, version, message):
    edit_meta(episode_dir, version=version)
    with pytest.raises(EpisodeError, match=message):
        read_episode(episode_dir)


def test_unreadable_meta(episode_dir):
    (episode_dir / META_NAME).write_text("{not json")
    with pytest.raises(EpisodeError, match="not valid JSON"):
        read_episode(episode_dir)
    edit_meta_text = json.dumps({**make_meta().to_dict(), "colour": "red"})
    (episode_dir / META_NAME).write_text(edit_meta_text)
    with pytest.raises(EpisodeError, match="unknown fields"):
        read_episode(episode_dir)


def test_wrong_file_magic(episode_dir):
    data = bytearray((episode_dir / STEPS_NAME).read_bytes())
    data[:4] = b"JUNK"
    (episode_dir / STEPS_NAME).write_bytes(bytes(data))
    with pytest.raises(EpisodeError, match="wrong magic"):
        read_episode(episode_dir)
    (episode_dir / STEPS_NAME).write_bytes(b"WM")
    with pytest.raises(EpisodeError, match="too short"):
        read_episode(episode_dir)


def test_frame_shape_not_matching_meta(episode_dir):
    edit_meta(episode_dir, height=H + 1)
    with pytest.raises(EpisodeError, match=r"12x20 frame, meta.json says 13x20"):
        read_episode(episode_dir)


def test_action_width_not_matching_spec(episode_dir):
    edit_meta(episode_dir, action_spec={"keys": ["W", "A", "S", "D"], "mouse_scale": 0.004})
    with pytest.raises(EpisodeError, match="action width 7, the action spec has 6"):
        read_episode(episode_dir)


def test_more_records_than_meta_says(episode_dir):
    edit_meta(episode_dir, length=4)
    with pytest.raises(EpisodeError, match="says 4 steps but the record log holds 6"):
        read_episode(episode_dir)


def test_fewer_records_than_meta_says_is_a_truncation(episode_dir):
    edit_meta(episode_dir, length=9)
    with pytest.warns(EpisodeRecoveryWarning, match="recovered 6 of 9"):
        file = EpisodeFile(episode_dir)
    assert file.recovered and file.status.startswith("truncated")


def test_episode_with_mismatched_lengths_is_rejected():
    meta = make_meta()
    with pytest.raises(EpisodeError, match=r"actions has shape \(4, 7\), expected \(5, 7\)"):
        Episode(frames=torch.zeros(5, H, W, 3, dtype=torch.uint8), actions=torch.zeros(4, 7),
                commanded_poses=torch.zeros(5, 4, 4), true_poses=torch.zeros(5, 4, 4),
                timestamps=torch.zeros(5, dtype=torch.float64), meta=meta)
