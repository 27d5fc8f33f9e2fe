"""Motion statistics of recordings (worldmodel.data.stats) and ``python -m worldmodel.data stats``."""

import json
import math
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from worldmodel.actions import ActionSpec, make_action
from worldmodel.camera import CameraState, ControllerSpec, integrate
from worldmodel.data.__main__ import main
from worldmodel.data.episode import STEPS_NAME, EpisodeFile, EpisodeMeta, EpisodeWriter
from worldmodel.data.stats import Motion, StatsError, join, motion, predictability, recording_stats, summarize

REPO = Path(__file__).resolve().parents[1]
SPEC = ActionSpec()
TURN = 40  # mouse counts: 40 * 0.004 rad = 9.17 degrees
SMALL_TURN = 10  # 2.29 degrees
TURN_DEG, SMALL_TURN_DEG = math.degrees(TURN * SPEC.mouse_scale), math.degrees(SMALL_TURN * SPEC.mouse_scale)
# ten transitions: 2 turning only, 2 walking only (the second one blocked), 2 both, 1 looking up, 3 idle
SCRIPT = [make_action(SPEC, dx=TURN)] * 2 + [make_action(SPEC, ["W"])] * 2 + [make_action(SPEC, ["W"], dx=SMALL_TURN)] * 2 \
    + [make_action(SPEC, dy=-TURN)] + [make_action(SPEC)] * 3


def known_recording(path: Path, script=SCRIPT, blocked=(4,)) -> Path:
    """An episode whose frame t is reached by ``script[t-1]`` from the reset; at the transitions in
    ``blocked`` the true camera stays where it was."""
    actions = torch.stack([make_action(SPEC)] + list(script))[None]
    poses, _ = integrate(actions, SPEC, start=CameraState.start(1, ControllerSpec(), dtype=torch.float64))
    poses = poses[0].float()
    true = poses.clone()
    for t in blocked:
        true[t:, :3, 3] -= poses[t, :3, 3] - poses[t - 1, :3, 3]
    meta = EpisodeMeta(SPEC, ControllerSpec(), fps=20.0, height=4, width=4, source="test")
    with EpisodeWriter(path, meta) as writer:
        for t in range(len(poses)):
            writer.append(np.zeros((4, 4, 3), np.uint8), actions[0, t], poses[t], true[t])
    return path


def test_a_recording_with_known_motion_gives_known_shares(tmp_path):
    stats = recording_stats(known_recording(tmp_path / "ep"))
    s = stats["total"]
    assert s["transitions"] == 10
    shares = {k: s[k] for k in ("turn_only", "move_only", "both", "idle", "turning", "moving")}
    assert shares == pytest.approx({"turn_only": 0.3, "move_only": 0.2, "both": 0.2, "idle": 0.3, "turning": 0.5, "moving": 0.4})
    assert s["blocked"] == pytest.approx(0.25)  # one of the four walking transitions
    assert s["yaw"]["max"] == pytest.approx(TURN_DEG, abs=1e-4) and s["yaw"]["p50"] == pytest.approx(0.0, abs=1e-4)
    assert s["yaw"]["p90"] == pytest.approx(TURN_DEG, abs=1e-4)  # 2 of 10 at the large turn
    assert (s["yaw"]["above_1"], s["yaw"]["above_3"], s["yaw"]["above_10"]) == pytest.approx((0.4, 0.2, 0.0))
    assert s["pitch"]["max"] == pytest.approx(TURN_DEG, abs=1e-4) and s["pitch"]["above_3"] == pytest.approx(0.1)
    # the gaze: level for transitions 1-6, then looking up by the large turn from the look-up on (4 of 10)
    assert s["gaze"]["max"] == pytest.approx(TURN_DEG, abs=1e-4) and s["gaze"]["p50"] == pytest.approx(0.0, abs=1e-4)
    assert (s["gaze"]["above_5"], s["gaze"]["above_15"], s["gaze"]["above_30"]) == pytest.approx((0.4, 0.0, 0.0))
    assert s["keys"] == pytest.approx({"W": 0.4, "A": 0.0, "S": 0.0, "D": 0.0, "SHIFT": 0.0})
    assert s["no_keys"] == pytest.approx(0.6)
    assert stats["episodes"][0]["episode"] == str(tmp_path / "ep") and stats["episodes"][0]["idle"] == pytest.approx(0.3)
    # keys: none, none, W, W, W, W, none, none, none, none -> 2 changes in 9 consecutive pairs
    assert s["key_changes"] == pytest.approx(2 / 9)


def test_predictability_pairs_only_transitions_of_one_recording():
    g = torch.Generator().manual_seed(0)
    yaw = torch.randn(50, generator=g, dtype=torch.float64).cumsum(0)  # a random walk: strongly lag-1 correlated
    keys = (torch.rand(50, 2, generator=g) < 0.5).double()
    one = Motion(yaw, yaw * 0, yaw * 0, yaw * 0, yaw * 0, keys, ("W", "A"), torch.arange(50) == 0)
    a, b = yaw[:-1].numpy(), yaw[1:].numpy()
    want = np.corrcoef(a, b)[0, 1] ** 2
    got = predictability(one)
    assert got["yaw_lag1_r2"] == pytest.approx(want, rel=1e-12)
    assert got["key_changes"] == pytest.approx(float((keys[1:] != keys[:-1]).any(-1).double().mean()))
    # two recordings joined: the pair across the seam does not count
    two = join([one, one])
    seamless = np.concatenate([a, a]), np.concatenate([b, b])
    assert predictability(two)["yaw_lag1_r2"] == pytest.approx(np.corrcoef(*seamless)[0, 1] ** 2, rel=1e-12)
    single = Motion(yaw[:1], yaw[:1], yaw[:1], yaw[:1], yaw[:1], keys[:1], ("W", "A"), torch.tensor([True]))
    assert predictability(single) == {"yaw_lag1_r2": None, "key_changes": None}


def test_totals_weigh_every_transition_and_episodes_keep_their_own(tmp_path):
    known_recording(tmp_path / "all" / "a")
    known_recording(tmp_path / "all" / "b", script=[make_action(SPEC, ["D"])] * 5, blocked=())
    known_recording(tmp_path / "all" / "c", script=[], blocked=())  # the reset frame only: no transition
    with pytest.warns(UserWarning, match="skipped 1 episodes with fewer than 2 readable steps"):
        stats = recording_stats(tmp_path / "all")
    a, b = stats["episodes"]
    assert (a["transitions"], b["transitions"]) == (10, 5)
    assert b["move_only"] == 1.0 and b["keys"]["D"] == 1.0 and b["blocked"] == 0.0
    assert stats["total"]["move_only"] == pytest.approx((2 + 5) / 15)
    assert stats["total"]["blocked"] == pytest.approx(1 / 9)


def test_yaw_rates_wrap_round_the_back():
    actions = torch.zeros(1, 3, SPEC.width)
    actions[0, 1:, -2] = math.radians(120) / SPEC.mouse_scale  # 0 -> 120 -> 240 = -120 degrees
    poses, _ = integrate(actions, SPEC)
    m = motion(actions[0], poses[0], poses[0], SPEC.keys)
    assert m.yaw.tolist() == pytest.approx([120.0, 120.0], abs=1e-3)


def test_unknown_true_poses_leave_the_blocked_share_open():
    actions = torch.stack([make_action(SPEC), make_action(SPEC, ["W"]), make_action(SPEC, ["W"])])
    poses, _ = integrate(actions[None], SPEC)
    m = motion(actions, poses[0], torch.full_like(poses[0], math.nan), SPEC.keys)
    assert summarize(m)["blocked"] is None and summarize(m)["moving"] == 1.0


def test_recordings_with_other_keys_and_no_transitions_are_refused():
    actions = torch.zeros(2, SPEC.width)
    poses = torch.eye(4).expand(2, 4, 4)
    m = motion(actions, poses, poses, SPEC.keys)
    other = motion(torch.zeros(2, 4), poses, poses, ("W", "S"))
    with pytest.raises(StatsError, match="different action keys"):
        join([m, other])
    empty = Motion(*(torch.zeros(0, dtype=torch.float64) for _ in range(5)), torch.zeros(0, 5), SPEC.keys,
                   torch.zeros(0, dtype=torch.bool))
    with pytest.raises(StatsError, match="no transitions"):
        summarize(empty)


def test_cli_prints_the_tables_and_writes_json(tmp_path, capsys):
    known_recording(tmp_path / "eps" / "ep")
    assert main(["stats", str(tmp_path / "eps"), "--json", str(tmp_path / "out" / "stats.json")]) == 0
    out = capsys.readouterr().out
    assert "1 episodes, 10 transitions" in out and "turn_only" in out and "yaw" in out and "pitch" in out
    assert "up/down" in out and "40.0%" in out  # the gaze row: 4 of 10 transitions look up more than 5 degrees
    assert "20.0%" in out and "30.0%" in out  # both, idle
    assert out.splitlines()[-2].startswith("ep ") and out.splitlines()[-1].startswith("wrote ")  # one row per episode
    written = json.loads((tmp_path / "out" / "stats.json").read_text())
    assert written["total"]["idle"] == pytest.approx(0.3) and len(written["episodes"]) == 1


def test_cli_reads_a_truncated_recording_up_to_its_last_good_step(tmp_path, capsys):
    path = known_recording(tmp_path / "ep")
    data = (path / STEPS_NAME).read_bytes()
    (path / STEPS_NAME).write_bytes(data[: int(EpisodeFile(path).offsets[6]) + 5])
    assert main(["stats", str(path)]) == 0
    captured = capsys.readouterr()
    assert "5 transitions" in captured.out and captured.err.startswith("warning: ") and "recovered 6 of 11" in captured.err


def corrupt_meta(ep: Path):
    (ep / "meta.json").write_text("{not json")


def corrupt_magic(ep: Path):
    (ep / STEPS_NAME).write_bytes(b"NOTSTEPS" + (ep / STEPS_NAME).read_bytes()[8:])


def single_step(ep: Path):
    data = (ep / STEPS_NAME).read_bytes()
    (ep / STEPS_NAME).write_bytes(data[: int(EpisodeFile(ep).offsets[1])])
    meta = json.loads((ep / "meta.json").read_text())
    (ep / "meta.json").write_text(json.dumps({**meta, "length": 1}))


@pytest.mark.parametrize("argv, damage, message", [
    (["stats", "{tmp}/missing"], None, "is neither an episode nor a directory"),
    (["stats", "{tmp}/empty"], None, "no episodes"),
    (["stats", "{ep}"], corrupt_meta, "is not valid JSON"),
    (["stats", "{ep}"], corrupt_magic, "wrong magic"),
    (["stats", "{ep}"], single_step, "no episode has 2 or more readable steps"),
    (["stats", "{ep}", "--turn-threshold", "-1"], None, "turn threshold must be a positive number"),
    (["stats", "{ep}", "--move-threshold", "nan"], None, "move threshold must be a positive number"),
])
def test_bad_inputs_print_one_error_line(tmp_path, capsys, argv, damage, message):
    ep = known_recording(tmp_path / "ep")
    (tmp_path / "empty").mkdir()
    if damage is not None:
        damage(ep)
    assert main([a.format(tmp=tmp_path, ep=ep) for a in argv]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and message in err and len(err.splitlines()) == 1


def test_cli_error_has_no_traceback(tmp_path):
    ep = known_recording(tmp_path / "ep")
    corrupt_magic(ep)
    r = subprocess.run([sys.executable, "-m", "worldmodel.data", "stats", str(ep)], cwd=REPO, capture_output=True, text=True)
    assert r.returncode == 2 and r.stderr.strip().startswith("error: ") and "Traceback" not in r.stderr
    assert len(r.stderr.strip().splitlines()) == 1
