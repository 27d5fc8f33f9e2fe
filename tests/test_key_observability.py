"""train/scripts/key_observability.py: forward motion in the camera's frame, and the report on real clips."""

import math

import torch

from worldmodel.camera import yaw_pitch_rotation


def test_forward_motion_is_the_step_along_the_earlier_cameras_view(train_script):
    g = torch.Generator().manual_seed(0)
    b, t = 3, 6
    yaw = torch.rand(b, t, generator=g, dtype=torch.float64) * 2 * math.pi
    pitch = torch.rand(b, t, generator=g, dtype=torch.float64) - 0.5
    position = torch.randn(b, t, 3, generator=g, dtype=torch.float64)
    poses = torch.zeros(b, t, 4, 4, dtype=torch.float64)
    poses[..., :3, :3] = yaw_pitch_rotation(yaw, pitch)
    poses[..., :3, 3] = position
    poses[..., 3, 3] = 1.0
    got = train_script("key_observability").forward_motion(poses)
    for i in range(b):
        for s in range(1, t):  # the step's component along the view axis (the rotation's third column) at s-1
            view = poses[i, s - 1, :3, 2]
            expected = float(torch.dot(position[i, s] - position[i, s - 1], view))
            assert abs(float(got[i, s - 1]) - expected) < 1e-12


def test_the_report_prints_every_keys_accuracy_and_the_w_disagreements(capsys, train_script):
    assert train_script("key_observability").main(["--world", "procedural", "--clips", "2"]) == 0
    out = capsys.readouterr().out
    assert "procedural: 2 held-out clips of 129 frames, seed 0" in out
    assert all(f"{key} 0." in out or f"{key} 1.000" in out for key in ("W", "A", "S", "D", "SHIFT"))
    assert out.count("W released but moving more") == 3
