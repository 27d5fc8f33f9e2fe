"""Action/frame alignment, end to end: the action of frame t moves the camera from frame t-1 to frame t.

Checked where it must hold: the controller (actions -> commanded poses); the worlds' frames and poses
(procedural, Doom when vizdoom is installed) as play_clip (train.data's world source) and ``collect``
record them; and what the networks get, in training (to_clip, Plücker rays, the per-frame action in a
causal forward, CachedRollout) and in play (Session). Most tests drive a *pulse*: an action that is
non-zero at one frame only, so a shift by one frame either way fails them.
"""

import math

import pytest
import torch

from train.clips import Clip, to_clip
from worldmodel.rollout import CachedRollout, block_ranges
from worldmodel.actions import ActionSpec, make_action, normalize_actions
from worldmodel.camera import CameraState, ControllerSpec, integrate, relative_motion, state_to_pose, step_state
from worldmodel.data.__main__ import main as data_main
from worldmodel.data.dataset import find_episodes, play_clip
from worldmodel.data.episode import EpisodeFile
from worldmodel.envs import make_world
from worldmodel.envs.policies import make_policy
from worldmodel.frames import to_model
from worldmodel.metrics import yaw_pitch_from_pose
from worldmodel.model import build_model
from worldmodel.session import Session
from worldmodel.transformer import block_ids, plucker_rays
from tests.test_transformer import random_inputs, tiny_dit

SPEC = ActionSpec()
SIZE = 24  # procedural frames of SIZE x SIZE: every pixel change is still there, rendering is cheap
PULSES = {  # one action each, as a player would give it for a single frame
    "turn right": make_action(SPEC, dx=40),
    "turn left": make_action(SPEC, dx=-25),
    "look up": make_action(SPEC, dy=-30),
    "walk": make_action(SPEC, ["W"]),
    "strafe": make_action(SPEC, ["D"]),
    "back": make_action(SPEC, ["S"]),
    "sprint": make_action(SPEC, ["W", "SHIFT"]),
}


pytestmark = pytest.mark.usefixtures("one_thread")


class PulsePolicy:
    """Zero actions except ``pulses[step_index]`` (a policy's interface: ``policy(step_index, world_step)``)."""

    def __init__(self, batch: int, pulses: dict[int, torch.Tensor]):
        self.batch, self.pulses = batch, pulses

    def __call__(self, step_index, world_step=None):
        return self.pulses.get(step_index, torch.zeros(SPEC.width)).expand(self.batch, -1).clone()


def pulse_actions(frames: int, pulses: dict[int, torch.Tensor], batch: int = 1) -> torch.Tensor:
    """``[batch, frames, A]``: zero except the pulses (frame 0 stays zero, as after a reset)."""
    actions = torch.zeros(batch, frames, SPEC.width)
    for t, a in pulses.items():
        actions[:, t] = a
    return actions


def changed(frames: torch.Tensor, threshold: float = 0.0) -> torch.Tensor:
    """Bool ``[B, T-1]``: the image of frames uint8 ``[B, T, H, W, 3]`` changed from t-1 to t (mean |diff| > threshold)."""
    diff = (frames[:, 1:].float() - frames[:, :-1].float()).abs().flatten(2).mean(-1)
    return diff > threshold


def moved(poses: torch.Tensor, atol: float = 1e-6) -> torch.Tensor:
    """Bool ``[B, T-1]``: pose t differs from pose t-1 (``poses [B, T, 4, 4]``)."""
    return ((poses[:, 1:] - poses[:, :-1]).abs().flatten(2).amax(-1) > atol)


def state_of(poses: torch.Tensor) -> CameraState:
    """The controller state of roll-free poses ``[B, 4, 4]`` (float64)."""
    yaw, pitch = yaw_pitch_from_pose(poses.double())
    return CameraState(poses[:, :3, 3].double(), yaw, pitch)


def next_poses(poses: torch.Tensor, actions: torch.Tensor, ctrl: ControllerSpec) -> torch.Tensor:
    """``[B, T-1, 4, 4]``: each pose t-1 of ``poses [B, T, 4, 4]`` moved by action t of ``actions [B, T, A]``."""
    return torch.stack([state_to_pose(step_state(state_of(poses[:, t - 1]), actions[:, t], SPEC, ctrl))
                        for t in range(1, poses.shape[1])], 1).float()


def assert_actions_move_each_pose(poses, actions, ctrl):
    """Recorded action t takes recorded pose t-1 to pose t, and action t+1 (a shift by one) does not."""
    torch.testing.assert_close(next_poses(poses, actions, ctrl), poses[:, 1:], rtol=0, atol=2e-5)
    shifted = torch.cat([actions[:, :1], actions[:, 2:], actions[:, -1:]], 1)
    assert (next_poses(poses, shifted, ctrl) - poses[:, 1:]).abs().max() > 1e-3


# ---------------------------------------------------------------- (a) the controller


@pytest.mark.parametrize("kind", list(PULSES))
def test_the_controller_moves_only_the_frame_of_the_action(kind):
    poses, _ = integrate(pulse_actions(7, {4: PULSES[kind]}), SPEC)
    steps = relative_motion(poses)
    identity = torch.eye(4).expand_as(steps)
    still = [t for t in range(7) if t != 4]
    torch.testing.assert_close(steps[:, still], identity[:, still], rtol=0, atol=1e-6)
    assert (steps[:, 4] - identity[:, 4]).abs().max() > 1e-3
    torch.testing.assert_close(poses[:, :4], poses[:, :1].expand(-1, 4, -1, -1), rtol=0, atol=0)


def test_one_action_turns_first_then_walks_along_the_new_heading():
    ctrl = ControllerSpec()
    dx = 100.0
    poses, _ = integrate(pulse_actions(3, {1: make_action(SPEC, ["W"], dx=dx)}), SPEC, ctrl)
    yaw = dx * SPEC.mouse_scale
    step = poses[0, 1, :3, 3] - poses[0, 0, :3, 3]
    torch.testing.assert_close(step, ctrl.walk_speed * torch.tensor([math.sin(yaw), 0.0, math.cos(yaw)]))


# ---------------------------------------------------------------- (b) the worlds and their recordings


@pytest.mark.parametrize("warmup", [0, 2])
@pytest.mark.parametrize("kind", list(PULSES))
def test_procedural_clip_shows_the_action_at_its_frame(kind, warmup):
    world = make_world("procedural", batch=2, height=SIZE, width=SIZE)
    pulse = 5  # the policy's step index; the clip starts ``warmup`` steps later
    clip = play_clip(world, PulsePolicy(2, {pulse: PULSES[kind]}), [3, 11], warmup, clip_len=8)
    t = pulse - warmup
    expected = torch.zeros(2, 7, dtype=torch.bool)
    expected[:, t - 1] = True  # transition t-1 -> t
    assert (clip["actions"][:, t] == PULSES[kind]).all() and clip["actions"].abs().sum() == clip["actions"][:, t].abs().sum()
    assert torch.equal(changed(clip["frames"]), expected), "the image must change from frame t-1 to frame t only"
    assert torch.equal(moved(clip["poses"]), expected) and torch.equal(moved(clip["true_poses"]), expected)
    torch.testing.assert_close(clip["true_poses"], clip["poses"], rtol=0, atol=1e-6)  # nothing in the way at the start


def test_procedural_true_and_commanded_poses_agree_in_timing():
    world = make_world("procedural", batch=4, height=SIZE, width=SIZE)
    clip = play_clip(world, make_policy("mix", SPEC, batch=4, seed=2), [0, 1, 2, 3], 0, clip_len=150)
    commanded, true = clip["poses"], clip["true_poses"]
    torch.testing.assert_close(true[..., :3, :3], commanded[..., :3, :3], rtol=0, atol=1e-6)  # turning is never blocked
    walked = (commanded[:, 1:, :3, 3] - commanded[:, :-1, :3, 3]).norm(dim=-1)
    went = (true[:, 1:, :3, 3] - true[:, :-1, :3, 3]).norm(dim=-1)
    assert not ((went > 1e-6) & (walked < 1e-6)).any(), "the true camera moved on a frame whose action did not walk"
    free = (went - walked).abs() < 1e-5
    assert free.double().mean() > 0.8  # where nothing blocks it, the true step is the commanded step, same frame
    assert torch.equal(changed(clip["frames"]), moved(true)), "the image changes exactly when the true camera moves"
    assert_actions_move_each_pose(commanded, clip["actions"], world.controller)


def collect(tmp_path, frames: int) -> list:
    argv = ["collect", "--world", "procedural", "--episodes", "3", "--frames", str(frames), "--batch", "2",
            "--size", f"{SIZE}x{SIZE}", "--out", str(tmp_path / "eps")]
    assert data_main(argv) == 0
    return [EpisodeFile(p).read() for p in find_episodes(tmp_path / "eps")]


def test_collected_recordings_store_action_t_with_frame_t(tmp_path, monkeypatch):
    pulses = {3: PULSES["turn right"], 7: PULSES["walk"], 8: PULSES["look up"]}
    monkeypatch.setattr("worldmodel.envs.policies.make_policy", lambda *a, batch, **kw: PulsePolicy(batch, pulses))
    episodes = collect(tmp_path, frames=11)
    expected = torch.tensor([t in pulses for t in range(1, 11)])
    for ep in episodes:
        assert len(ep) == 11 and torch.equal(ep.actions, pulse_actions(11, pulses)[0])
        assert torch.equal(changed(ep.frames[None])[0], expected)
        assert torch.equal(moved(ep.commanded_poses[None])[0], expected)
        assert torch.equal(moved(ep.true_poses[None])[0], expected)
        torch.testing.assert_close(ep.timestamps, torch.arange(11, dtype=torch.float64) / ep.meta.fps)


def test_collected_recordings_integrate_from_the_reset(tmp_path):
    for ep in collect(tmp_path, frames=30):
        start = CameraState.start(1, ep.meta.controller, dtype=torch.float64)
        poses, _ = integrate(ep.actions[None], ep.meta.action_spec, ep.meta.controller, start=start)
        torch.testing.assert_close(ep.commanded_poses[None], poses.float(), rtol=0, atol=1e-5)
        assert (ep.actions[0] == 0).all()  # the reset frame: nothing moved the camera into it
        assert_actions_move_each_pose(ep.commanded_poses[None], ep.actions[None], ep.meta.controller)


@pytest.fixture(scope="module")
def doom():
    pytest.importorskip("vizdoom")
    world = make_world("doom", batch=2, maps=["MAP01"])
    yield world
    world.close()


DOOM_CHANGE = 1.0  # mean |diff| of an image: a turn or a step is 5-15, Doom's animated textures at rest < 0.01


def test_doom_shows_a_turn_at_its_frame(doom):
    clip = play_clip(doom, PulsePolicy(2, {5: PULSES["turn right"], 9: PULSES["look up"]}), [3, 4], 0, clip_len=12)
    expected = torch.zeros(2, 11, dtype=torch.bool)
    expected[:, [4, 8]] = True
    assert torch.equal(changed(clip["frames"], DOOM_CHANGE), expected)
    assert torch.equal(moved(clip["poses"]), expected)
    turned = (clip["true_poses"][:, 1:, :3, :3] - clip["true_poses"][:, :-1, :3, :3]).abs().flatten(2).amax(-1) > 1e-3
    assert torch.equal(turned, expected)


def test_doom_starts_walking_at_the_frame_of_the_key(doom):
    clip = play_clip(doom, PulsePolicy(2, {5: PULSES["walk"]}), [3, 4], 0, clip_len=9)
    went = (clip["true_poses"][:, 1:, :3, 3] - clip["true_poses"][:, :-1, :3, 3]).norm(dim=-1)
    assert (went[:, :4] < 1e-6).all() and (went[:, 4] > 0.02).all()
    assert changed(clip["frames"], DOOM_CHANGE)[:, 4].all() and not changed(clip["frames"], DOOM_CHANGE)[:, :4].any()


@pytest.mark.xfail(strict=True, reason="Doom momentum: a one-frame key press moves the true camera ~11% of the "
                                       "commanded step on its frame and glides on for ~10 frames (worldmodel/envs/doom.py)")
def test_doom_true_steps_follow_the_commanded_steps_frame_by_frame(doom):
    clip = play_clip(doom, PulsePolicy(2, {5: PULSES["walk"]}), [3, 4], 0, clip_len=9)
    went = (clip["true_poses"][:, 1:, :3, 3] - clip["true_poses"][:, :-1, :3, 3]).norm(dim=-1)
    walked = (clip["poses"][:, 1:, :3, 3] - clip["poses"][:, :-1, :3, 3]).norm(dim=-1)
    torch.testing.assert_close(went, walked, rtol=0.2, atol=0.02)


# ---------------------------------------------------------------- (c) what the networks get


def test_to_clip_keeps_actions_poses_and_frames_of_a_step_together():
    b, t = 2, 5
    actions = pulse_actions(t, {1: PULSES["walk"], 3: PULSES["turn right"]}, batch=b)
    poses, _ = integrate(actions, SPEC)
    frames = torch.arange(t, dtype=torch.uint8).view(1, t, 1, 1, 1).expand(b, t, 4, 4, 3).contiguous()
    clip = to_clip({"frames": frames, "actions": actions, "poses": poses}, SPEC, "cpu")
    torch.testing.assert_close(clip.actions, normalize_actions(actions, SPEC))
    torch.testing.assert_close(clip.poses, poses)
    assert torch.equal(clip.frames, to_model(frames))


@pytest.mark.parametrize("kind", ["turn right", "look up", "walk", "strafe"])
def test_plucker_rays_of_frame_t_hold_the_motion_of_action_t(kind):
    cfg = tiny_dit(0).cfg
    poses, _ = integrate(pulse_actions(6, {3: PULSES[kind]}), SPEC)
    rays = plucker_rays(poses.double(), cfg)  # [B, T, 6, y, x]: direction change, moment
    size = rays.abs().flatten(3).amax(-1)  # [B, T, 6]
    assert (size[:, [0, 1, 2, 4, 5]] < 1e-6).all() and (size[:, 3] > 1e-3).any()
    turning = kind in ("turn right", "look up")
    assert (size[0, 3, :3].max() > 1e-3) == turning and (size[0, 3, 3:].max() > 1e-3) == (not turning)


def perturbed_output(model, x, sigma, actions, poses, which: str, t: int, clean=None):
    """Causal forwards with the action (or the pose) of frame ``t`` changed: both outputs ``[B, T, C, h, w]``."""
    actions2, poses2 = actions.clone(), poses.clone()
    if which == "action":
        actions2[:, t] += torch.tensor([1.0, 0, 0, 0, 1.0, 2.0, -1.0], dtype=actions.dtype)
    else:
        poses2[:, t:] = integrate(pulse_actions(2, {1: make_action(SPEC, ["D"], dx=30)}), SPEC)[0][0, 1].double() @ poses[:, t:]
    return [model(x, sigma, a, p, mode="causal", clean=clean) for a, p in ((actions, poses), (actions2, poses2))]


@pytest.mark.parametrize("teacher_forcing", [False, True])
@pytest.mark.parametrize("which", ["action", "pose"])
@pytest.mark.parametrize("block_size", [1, 2])
def test_a_causal_forward_reads_the_action_and_pose_of_frame_t_at_frame_t(block_size, which, teacher_forcing):
    frames = 7
    model = tiny_dit(5, block_size=block_size, window_frames=frames)
    x, sigma, actions, poses = random_inputs(2, frames, 5, model.cfg)
    clean = torch.randn_like(x) if teacher_forcing else None
    blocks = block_ids(frames, block_size)
    for t in range(1, frames):
        before, after = perturbed_output(model, x, sigma, actions, poses, which, t, clean)
        earlier = blocks < blocks[t]
        torch.testing.assert_close(after[:, earlier], before[:, earlier], rtol=0, atol=1e-12)
        assert (after[:, t] - before[:, t]).abs().max() > 1e-6, f"frame {t} ignores its own {which}"


@pytest.mark.parametrize("block_size", [1, 2])
def test_cached_rollout_gives_each_block_its_own_actions_and_poses(block_size):
    frames = 7
    model = tiny_dit(7, block_size=block_size, window_frames=frames)
    x, sigma, actions, poses = random_inputs(2, frames, 7, model.cfg)
    clean = torch.randn_like(x)
    clip = Clip(actions, poses)
    rollout = CachedRollout(model, clip, dtype=torch.float64)
    reference = model(x, torch.full_like(sigma, 0.7), actions, poses, mode="causal", clean=clean)
    for b, (start, end) in enumerate(block_ranges(frames, block_size)):
        block_actions, block_poses = rollout.block_inputs(b)
        assert torch.equal(block_actions, actions[:, start:end])
        assert torch.equal(block_poses[:, 1:], poses[:, start:end])
        assert torch.equal(block_poses[:, 0], poses[:, max(start - 1, 0)])  # the frame before (the first: itself)
        if b > 0:  # against the teacher-forced training forward: the same inputs give the same velocity
            v = rollout.block_denoiser(b)(x[:, start:end], 0.7)
            assert (v - reference[:, start:end]).norm() / reference[:, start:end].norm() < 1e-4
        rollout.commit(clean[:, start:end], b)


@pytest.mark.parametrize("block_size", [1, 3])
def test_session_gives_the_block_of_frame_t_the_action_and_motion_of_frame_t(block_size, monkeypatch):
    model = build_model("tiny", seed=2, block_size=block_size)
    calls = []
    forward = model.dit.forward_cached

    def spy(x, sigma, actions, poses, cache, write=False, cond_keep=None, commit=None, commit_sigma=0.0):
        if commit is not None:  # the previous block, written by this forward
            calls.append((commit[1].clone(), relative_motion(commit[2].double())[:, 1:], True))
        calls.append((actions.clone(), relative_motion(poses.double())[:, 1:], write))
        return forward(x, sigma, actions, poses, cache, write=write, cond_keep=cond_keep, commit=commit,
                       commit_sigma=commit_sigma)

    monkeypatch.setattr(model.dit, "forward_cached", spy)
    session = Session(model, seed=0)
    steps = 3
    pulses = {1 + i: list(PULSES.values())[i % len(PULSES)] for i in range(steps * block_size)}
    actions = pulse_actions(1 + steps * block_size, pulses)
    truth = relative_motion(integrate(actions, SPEC)[0].double())
    h, w = model.frame_size
    session.reset(torch.zeros(h, w, 3, dtype=torch.uint8))
    assert not calls  # the start frame waits for the first step's first forward
    written = slice(0, 1)
    for k in range(steps):
        frames = slice(1 + k * block_size, 1 + (k + 1) * block_size)
        calls.clear()
        session.step(actions[:, frames] if block_size > 1 else actions[:, frames.start])
        assert [write for _, _, write in calls] == [True] + [False] * len(session.steps)
        for i, (given, motion, _) in enumerate(calls):  # writing the previous frames, then sampling this step's
            block = written if i == 0 else frames
            torch.testing.assert_close(given, normalize_actions(actions[:, block], SPEC))
            torch.testing.assert_close(motion, truth[:, block], rtol=0, atol=1e-5)
        written = frames
