import math

import pytest
import torch

from worldmodel.actions import ActionError, ActionSpec, make_action, normalize_actions, validate_actions
from worldmodel.camera import ControllerSpec, integrate, relative_motion, rigid_inverse

SPEC = ActionSpec()


def random_rigid(batch=1, generator=None):
    q = torch.randn(batch, 4, generator=generator, dtype=torch.float64)
    q = q / q.norm(dim=-1, keepdim=True)
    w, x, y, z = q.unbind(-1)
    rot = torch.stack([
        1 - 2 * (y * y + z * z), 2 * (x * y - z * w), 2 * (x * z + y * w),
        2 * (x * y + z * w), 1 - 2 * (x * x + z * z), 2 * (y * z - x * w),
        2 * (x * z - y * w), 2 * (y * z + x * w), 1 - 2 * (x * x + y * y)], -1).view(batch, 3, 3)
    g = torch.eye(4, dtype=torch.float64).repeat(batch, 1, 1)
    g[:, :3, :3] = rot
    g[:, :3, 3] = torch.randn(batch, 3, generator=generator, dtype=torch.float64) * 10
    return g


def test_full_turn_returns_to_start():
    steps = 40
    dx = 2 * math.pi / SPEC.mouse_scale / steps
    actions = torch.stack([make_action(SPEC, dx=dx) for _ in range(steps)])[None]
    poses, state = integrate(actions, SPEC)
    start, _ = integrate(torch.zeros(1, 1, SPEC.width), SPEC)
    assert torch.allclose(poses[0, -1], start[0, 0], atol=1e-5)
    assert not torch.allclose(poses[0, steps // 2], start[0, 0], atol=1e-2)


def test_forward_then_back_returns():
    g = torch.Generator().manual_seed(1)
    n = int(torch.randint(3, 20, (1,), generator=g))
    turn = make_action(SPEC, dx=float(torch.randn(1, generator=g) * 30))
    fwd = [make_action(SPEC, keys=["W", "D"]) for _ in range(n)]
    back = [make_action(SPEC, keys=["S", "A"]) for _ in range(n)]
    poses, _ = integrate(torch.stack([turn] + fwd + back)[None], SPEC)
    assert torch.allclose(poses[0, -1], poses[0, 0], atol=1e-5)
    assert (poses[0, n, :3, 3] - poses[0, 0, :3, 3]).norm() > 0.1 * n


def test_pitch_is_clamped_and_yaw_turns_right():
    ctrl = ControllerSpec()
    up = make_action(SPEC, dy=-1e4)
    poses, state = integrate(up[None, None], SPEC, ctrl)
    assert math.isclose(float(state.pitch), ctrl.max_pitch, rel_tol=1e-6)
    assert poses[0, 0, 1, 2] < 0  # camera z (forward) points up (-y)
    poses, state = integrate(make_action(SPEC, keys=["W"], dx=10)[None, None], SPEC, ctrl)
    assert float(state.yaw) > 0 and poses[0, 0, 0, 3] > 0  # turned and walked towards +x


def test_relative_poses_invariant_to_rigid_transform():
    g = torch.Generator().manual_seed(2)
    actions = torch.cat([(torch.rand(2, 30, len(SPEC.keys), generator=g) > 0.5).float(),
                         torch.randn(2, 30, 2, generator=g) * 20], -1)
    poses, _ = integrate(actions, SPEC)
    poses = poses.double()
    world = random_rigid(2, g)
    moved = world[:, None] @ poses
    assert torch.allclose(relative_motion(moved), relative_motion(poses), atol=1e-5)
    assert torch.allclose(rigid_inverse(poses) @ poses, torch.eye(4, dtype=torch.float64).expand_as(poses), atol=1e-6)


@pytest.mark.parametrize("bad, message", [
    (torch.full((1, 2, SPEC.width), float("nan")), "NaN"),
    (torch.zeros(1, 2, SPEC.width + 1), "width"),
    (torch.full((1, 2, SPEC.width), 0.5), "exactly 0 or 1"),
])
def test_bad_actions_rejected(bad, message):
    with pytest.raises(ActionError, match=message):
        integrate(bad, SPEC)


def test_action_spec_round_trip_and_errors():
    spec = ActionSpec(keys=("w", "a", "s", "d"), mouse_scale=0.01)
    assert ActionSpec.from_dict(spec.to_dict()) == spec and spec.keys == ("W", "A", "S", "D")
    with pytest.raises(ActionError, match="unknown key"):
        make_action(spec, keys=["Q"])
    with pytest.raises(ActionError, match="unknown action-spec fields"):
        ActionSpec.from_dict({"keys": ["W"], "speed": 1})
    with pytest.raises(ActionError, match="unique"):
        ActionSpec(keys=("W", "W"))
    a = validate_actions(make_action(spec, ["W"], dx=15)[None], spec)
    assert torch.allclose(normalize_actions(a, spec)[0, -2], torch.tensor(15 * 0.01 / 0.15))
