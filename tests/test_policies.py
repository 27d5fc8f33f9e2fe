"""Exploration policies: seeded, valid, play-like (held keys, smooth mouse, turn-rounds), reacting to walls."""

from __future__ import annotations

import hashlib
import math
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from worldmodel.actions import ActionSpec, validate_actions
from worldmodel.camera import CameraState, ControllerSpec, integrate, state_to_pose, step_state
from worldmodel.envs.policies import MIX, POLICIES, PolicyError, draw_segment, make_policy

SPEC = ActionSpec()


def roll(policy, steps, world_steps=None):
    """Actions ``[B, T, A]`` of ``steps`` calls (no world feedback unless ``world_steps`` gives one per call)."""
    return torch.stack([policy(t, None if world_steps is None else world_steps[t]) for t in range(steps)], 1)


def runs(values: np.ndarray) -> list[int]:
    """Lengths of the runs of equal consecutive rows of ``values [T, ...]``."""
    change = np.any(values[1:] != values[:-1], axis=tuple(range(1, values.ndim)))
    edges = np.flatnonzero(change) + 1
    return np.diff(np.concatenate([[0], edges, [len(values)]])).tolist()


def test_policies_are_seeded_and_items_do_not_depend_on_the_batch():
    a = roll(make_policy("mix", SPEC, batch=6, seed=3), 200)
    b = roll(make_policy("mix", SPEC, batch=6, seed=3), 200)
    assert torch.equal(a, b)
    assert not torch.equal(a, roll(make_policy("mix", SPEC, batch=6, seed=4), 200))
    bigger = roll(make_policy("mix", SPEC, batch=9, seed=3), 200)
    assert torch.equal(a, bigger[:6])
    assert not torch.equal(a[0], a[1])


@pytest.mark.parametrize("name", ["mix", "all", *POLICIES])
def test_actions_are_valid_play_like_and_move_the_camera(name):
    actions = roll(make_policy(name, SPEC, batch=8, seed=1), 400)
    validate_actions(actions, SPEC)
    keys = actions[..., :-2]
    assert set(keys.unique().tolist()) <= {0.0, 1.0} and actions.dtype == torch.float32
    assert torch.equal(actions[..., -2:], actions[..., -2:].round())  # integer mouse counts, like a real mouse
    lengths = [runs(item)[:-1] for item in keys.numpy()]  # the last run of each item is cut off by the end
    held = np.concatenate([r for r in lengths if len(r)])
    assert held[held >= 5].sum() > 0.7 * held.sum()  # keys are held for whole segments, short taps aside
    assert 16 <= len(held) <= 8 * 400 / 3  # and they change, but never flicker frame by frame
    dx = actions[..., -2]
    assert (dx.abs().sum(1) > 0).all()  # everyone turns
    lag1 = [np.corrcoef(row[:-1], row[1:])[0, 1] for row in dx.numpy() if row.std() > 0]
    assert np.mean(lag1) > 0.8  # smooth: this frame's mouse is much like the last one (noise would give ~0)
    poses, _ = integrate(actions, SPEC, ControllerSpec())
    assert poses[..., :3, 3].norm(dim=-1).amax(1).min() > 1.0 or name == "looker"  # they go places
    assert poses[..., 1, 3].eq(-1.0).all()


def key_changes(actions: torch.Tensor) -> float:
    """Share of frames whose held keys differ from the previous frame's: ``actions [B, T, A]``."""
    keys = actions[..., :-2]
    return float((keys[:, 1:] != keys[:, :-1]).any(-1).double().mean())


def test_players_tap_keys_and_flick_the_mouse_more_than_walkers():
    player, walker = (roll(make_policy(n, SPEC, batch=32, seed=2), 300) for n in ("player", "walker"))
    assert key_changes(player) > 1.5 * key_changes(walker) > 0
    taps = np.concatenate([runs(item)[:-1] for item in player[..., :-2].numpy()])
    assert (taps < 5).mean() > 0.5  # mostly taps of 1-4 frames
    rng = np.random.default_rng(0)
    for _ in range(50):
        flick = draw_segment("flick", rng, SPEC.mouse_scale)
        turned = np.degrees(abs(flick["dx"]) * flick["length"] * SPEC.mouse_scale)
        assert 2 <= flick["length"] <= 6 and 20 <= turned <= 120 and flick["smoothing"] == 1.0


def test_fidgets_jitter_independently_from_frame_to_frame():
    policy = make_policy("player", SPEC, batch=1, seed=0)
    policy._start_segment(0, "fidget")
    policy.length[0] = 10_000  # one long fidget
    dx = torch.stack([policy(t)[0, -2] for t in range(400)]).numpy()
    assert dx.std() > 0 and abs(np.corrcoef(dx[:-1], dx[1:])[0, 1]) < 0.5


def test_mix_spreads_policies_over_items():
    assert set(make_policy("mix", SPEC, batch=32, seed=0).names) == set(MIX)
    assert set(make_policy("all", SPEC, batch=64, seed=0).names) == set(POLICIES)


def test_mix_stays_what_drew_the_evaluation_clips():
    """``mix`` draws the held-out clips of every report: new policies must not change it."""
    policy = make_policy("mix", SPEC, batch=8, seed=0)
    assert policy.names == ["player", "explorer", "player", "player", "explorer", "strafer", "player", "player"]
    actions = roll(policy, 300)
    assert hashlib.sha256(actions.numpy().tobytes()).hexdigest()[:16] == "e9c0fa4b5226eecf"


def gaze_degrees(name: str, steps: int = 120, batch: int = 64) -> torch.Tensor:
    """|pitch| in degrees ``[steps, batch]`` of policy ``name`` in a world that clamps pitch at 32 degrees."""
    ctrl = ControllerSpec(max_pitch=math.radians(32))
    policy = make_policy(name, SPEC, batch=batch, seed=1)
    state = CameraState.start(batch, ctrl)
    pitches = []
    for t in range(steps):
        pose = state_to_pose(state)
        state = step_state(state, policy(t, SimpleNamespace(commanded_pose=pose, true_pose=pose)), SPEC, ctrl)
        pitches.append(state.pitch.abs())
    return torch.rad2deg(torch.stack(pitches))


def longest_true_run(flags: list[bool]) -> int:
    """The length of the longest run of consecutive True values in ``flags``."""
    best = run = 0
    for flag in flags:
        run = run + 1 if flag else 0
        best = max(best, run)
    return best


def test_gazers_hold_a_raised_or_lowered_view():
    gazer, mix, every = (gaze_degrees(name) for name in ("gazer", "mix", "all"))
    assert (gazer > 15).float().mean() > 0.2 and (mix > 15).float().mean() < 0.03
    assert (every > 15).float().mean() > 3 * (mix > 15).float().mean()
    held = max(longest_true_run(item) for item in (gazer > 12).T.tolist())
    assert held >= 25  # a view kept above 12 degrees for over a second at 20 frames/s


def test_explorers_turn_round_and_walk_back_over_their_path():
    actions = roll(make_policy("walker", SPEC, batch=6, seed=2), 600)
    poses, _ = integrate(actions, SPEC, ControllerSpec())
    yaw = np.unwrap(torch.atan2(poses[..., 0, 2], poses[..., 2, 2]).numpy(), axis=1)
    turned = [np.max(np.abs(y[25:] - y[:-25])) for y in yaw]  # the largest turn within 25 frames
    assert max(turned) > math.radians(150)
    # revisit: the camera walks over 3 units away from a spot and later comes back within 0.6 of it
    came_back = False
    for path in poses[..., [0, 2], 3]:
        d = torch.cdist(path, path)
        for i, j in torch.triu(d < 0.6, diagonal=60).nonzero().tolist():
            came_back |= bool(d[i, i:j].max() > 3.0)
    assert came_back


def test_turn_round_segment_turns_about_half_a_circle():
    rng = np.random.default_rng(0)
    for _ in range(20):
        seg = draw_segment("turn_around", rng, SPEC.mouse_scale)
        phase = (np.arange(seg["length"]) + 0.5) / seg["length"]
        total = np.sum(seg["dx"] * 2 * np.sin(np.pi * phase) ** 2) * SPEC.mouse_scale
        assert abs(abs(total) - math.pi) <= 0.36


def test_a_blocked_walk_makes_the_policy_turn_away():
    policy = make_policy("walker", SPEC, batch=1, seed=5)
    w = SPEC.key_index("W")
    pose = torch.eye(4)[None]
    for t in range(200):  # find a walk, fed a world that follows the commanded pose
        a = policy(t, SimpleNamespace(commanded_pose=pose, true_pose=pose))
        if a[0, w] == 1 and policy.age[0] == 1 and policy.length[0] > 20:
            break
    walked = policy.length[0]
    stuck = torch.eye(4)[None]  # the true pose never moves while the commanded one walks on
    turned = False
    for t in range(12):
        moved = torch.eye(4)[None].clone()
        moved[0, 2, 3] = 0.12 * (t + 1)
        a = policy(t, SimpleNamespace(commanded_pose=moved, true_pose=stuck))
        turned |= bool(a[0, -2].abs() > 10)
    assert turned and policy.length[0] != walked  # gave up the walk and turned


def test_the_gaze_returns_to_level_even_when_the_world_clamps_pitch():
    ctrl = ControllerSpec(max_pitch=0.3)  # a world that clamps pitch harder than the policy knows
    policy = make_policy("looker", SPEC, batch=8, seed=0)
    state = CameraState.start(8, ctrl)
    pitches = []
    for t in range(400):
        pose = state_to_pose(state)
        a = policy(t, SimpleNamespace(commanded_pose=pose, true_pose=pose))
        state = step_state(state, a, SPEC, ctrl)
        pitches.append(state.pitch.abs())
    pitches = torch.stack(pitches)
    assert pitches.max() > 0.25  # it does look up or down to the clamp
    assert pitches.mean() < 0.075  # but comes back to level (counting its own mouse instead: 0.10, it overshoots)


def test_bad_arguments_are_rejected():
    with pytest.raises(PolicyError, match="unknown policy"):
        make_policy("wander", SPEC)
    with pytest.raises(PolicyError, match="batch"):
        make_policy("mix", SPEC, batch=0)
    with pytest.raises(PolicyError, match="seed"):
        make_policy("mix", SPEC, seed=-1)
