"""``python -m worldmodel.data``: collect, sheet, video, info, and one-line errors."""

import os
import subprocess
import sys
from pathlib import Path

import imageio.v2 as imageio
import numpy as np
import pytest
import torch
from PIL import Image

from worldmodel.actions import ActionSpec
from worldmodel.camera import ControllerSpec, integrate
from worldmodel.data.__main__ import LABEL_HEIGHT, main
from worldmodel.data.episode import STEPS_NAME, EpisodeFile, EpisodeMeta, EpisodeWriter, read_episode
from worldmodel.data.splits import HELDOUT_SEED_START

REPO = Path(__file__).resolve().parents[1]
H, W, T = 10, 14, 9


@pytest.fixture
def episode(tmp_path) -> Path:
    rng = np.random.default_rng(0)
    meta = EpisodeMeta(ActionSpec(), ControllerSpec(), fps=10.0, height=H, width=W, source="test", seed=1)
    with EpisodeWriter(tmp_path / "ep", meta) as writer:
        for _ in range(T):
            writer.append(rng.integers(0, 256, (H, W, 3), dtype=np.uint8), np.zeros(7), np.eye(4))
    return tmp_path / "ep"


def test_sheet_tiles_every_kth_frame_with_labels(episode, tmp_path, capsys):
    assert main(["sheet", str(episode), "--out", str(tmp_path / "s.png"), "--every", "2", "--cols", "3",
                 "--scale", "2"]) == 0
    sheet = np.asarray(Image.open(tmp_path / "s.png"))
    tiles = list(range(0, T, 2))  # 5 tiles: 2 rows of 3 columns
    assert sheet.shape == (2 * (2 * H + LABEL_HEIGHT), 3 * 2 * W, 3)
    frames = read_episode(episode).frames.numpy()
    for n, t in enumerate(tiles):
        y, x = (n // 3) * (2 * H + LABEL_HEIGHT) + LABEL_HEIGHT, (n % 3) * 2 * W
        np.testing.assert_array_equal(sheet[y : y + 2 * H : 2, x : x + 2 * W : 2], frames[t])
        assert sheet[y - LABEL_HEIGHT : y, x : x + 2 * W].max() > 0  # the index label is drawn
    assert "5 of 9 frames" in capsys.readouterr().out


def test_video_has_every_frame(episode, tmp_path):
    assert main(["video", str(episode), "--out", str(tmp_path / "v.mp4"), "--scale", "3"]) == 0
    reader = imageio.get_reader(tmp_path / "v.mp4")
    frames = [f for f in reader]
    reader.close()
    assert len(frames) == T and frames[0].shape == (3 * H, 3 * W, 3)
    first = read_episode(episode).frames[0].numpy().repeat(3, 0).repeat(3, 1).astype(float)
    assert np.abs(frames[0].astype(float) - first).mean() < 40  # lossy, but the same picture


def test_info_reports_length_and_recovery(episode, capsys):
    assert main(["info", str(episode)]) == 0
    out = capsys.readouterr().out
    assert "steps: 9" in out and "status: complete" in out and '"source": "test"' in out
    data = (episode / STEPS_NAME).read_bytes()
    (episode / STEPS_NAME).write_bytes(data[: int(EpisodeFile(episode).offsets[4]) + 5])
    assert main(["info", str(episode)]) == 0
    captured = capsys.readouterr()
    assert "status: truncated: meta.json says 9 steps; 4 steps readable" in captured.out
    assert captured.err.startswith("warning: ") and "recovered 4 of 9 steps" in captured.err


@pytest.mark.parametrize("argv, message", [
    (["info", "{tmp}/missing"], "no episode at"),
    (["sheet", "{ep}", "--out", "{tmp}/s.jpg"], "must be a .png file"),
    (["video", "{ep}", "--out", "{tmp}/v.avi"], "must be an .mp4 file"),
    (["collect", "--world", "procedural", "--episodes", "1", "--frames", "2", "--out", "{tmp}/c",
      "--split", "train", "--seed", str(HELDOUT_SEED_START)], "training seeds are"),
])
def test_bad_inputs_print_one_error_line(episode, tmp_path, capsys, argv, message):
    argv = [a.format(tmp=tmp_path, ep=episode) for a in argv]
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and message in err and "\n" not in err


def test_module_entry_point_exits_2(tmp_path):
    env = {**os.environ, "PYTHONPATH": f"{REPO}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}
    result = subprocess.run([sys.executable, "-m", "worldmodel.data", "info", str(tmp_path / "nothing")],
                            capture_output=True, text=True, env=env)
    assert result.returncode == 2
    assert result.stderr.strip() == f"error: no episode at {tmp_path / 'nothing'}: not a directory"


def test_collect_from_the_procedural_world(tmp_path, capsys):
    pytest.importorskip("worldmodel.envs.procedural", reason="the procedural world (worldmodel.envs) is not written yet")
    argv = ["collect", "--world", "procedural", "--episodes", "3", "--frames", "6", "--batch", "2",
            "--size", "16x16", "--seed", "4", "--out", str(tmp_path / "c")]
    assert main(argv) == 0
    names = sorted(p.name for p in (tmp_path / "c").iterdir())
    assert names == ["procedural-0000004", "procedural-0000005", "procedural-0000006"]
    for seed, name in zip((4, 5, 6), names):
        ep = read_episode(tmp_path / "c" / name)
        assert len(ep) == 6 and ep.frames.shape == (6, 16, 16, 3) and ep.meta.seed == seed
        assert ep.meta.source == "procedural" and ep.meta.length == 6 and ep.meta.extra["split"] == "train"
        assert (ep.actions[0] == 0).all()  # the reset frame
        poses, _ = integrate(ep.actions[None], ep.meta.action_spec, ep.meta.controller)
        torch.testing.assert_close(ep.commanded_poses, poses[0], rtol=0, atol=1e-5)  # actions match poses
        np.testing.assert_allclose(ep.timestamps.numpy(), np.arange(6) / ep.meta.fps)
        assert not np.isnan(ep.true_poses.numpy()).any()
    first = read_episode(tmp_path / "c" / names[0]).frames
    assert not (first == read_episode(tmp_path / "c" / names[1]).frames).all()  # different seeds, different worlds
    assert main(argv) == 2  # refuses to overwrite
    assert "already holds 3 of these episodes" in capsys.readouterr().err


def test_bench_prints_speed_and_size(episode, capsys):
    assert main(["bench", str(episode)]) == 0
    out = capsys.readouterr().out
    assert f"{T} frames {H}x{W}: write" in out and "bytes/frame on disk" in out
