import math

import numpy as np
import pytest
import torch

from worldmodel import metrics
from worldmodel.actions import ActionSpec
from worldmodel.camera import ControllerSpec, integrate, yaw_pitch_rotation


def reference_ssim(x: np.ndarray, y: np.ndarray, size=11, sigma=1.5, data_range=2.0) -> float:
    """Slow SSIM of two [C, H, W] images: an explicit loop over every valid window, float64."""
    g = np.exp(-((np.arange(size) - (size - 1) / 2) ** 2) / (2 * sigma**2))
    w2 = np.outer(g, g) / np.outer(g, g).sum()
    c1, c2 = (0.01 * data_range) ** 2, (0.03 * data_range) ** 2
    values = []
    for c in range(x.shape[0]):
        for i in range(x.shape[1] - size + 1):
            for j in range(x.shape[2] - size + 1):
                px, py = x[c, i : i + size, j : j + size], y[c, i : i + size, j : j + size]
                mx, my = (w2 * px).sum(), (w2 * py).sum()
                vx, vy = (w2 * (px - mx) ** 2).sum(), (w2 * (py - my) ** 2).sum()
                cxy = (w2 * (px - mx) * (py - my)).sum()
                values.append(((2 * mx * my + c1) * (2 * cxy + c2)) / ((mx**2 + my**2 + c1) * (vx + vy + c2)))
    return float(np.mean(values))


def test_identical_videos_have_infinite_psnr_and_unit_ssim():
    video = torch.rand(2, 3, 3, 16, 16) * 2 - 1
    assert torch.isinf(metrics.psnr(video, video)).all()
    assert metrics.psnr(video, video).shape == (2, 3)
    torch.testing.assert_close(metrics.ssim(video, video), torch.ones(2, 3), rtol=0, atol=1e-6)


def test_psnr_of_a_constant_offset_is_known():
    target = torch.rand(4, 3, 8, 8) * 1.5 - 0.75
    offsets = torch.tensor([0.5, 0.1, 0.02, 0.25])
    pred = target + offsets.view(4, 1, 1, 1)
    expected = 10 * torch.log10(4.0 / offsets.double() ** 2)
    torch.testing.assert_close(metrics.psnr(pred, target), expected, rtol=1e-5, atol=1e-5)


def test_ssim_matches_slow_reference_on_random_and_shifted_images():
    gen = torch.Generator().manual_seed(3)
    x = torch.rand(3, 18, 20, generator=gen, dtype=torch.float64) * 2 - 1
    cases = {
        "random": torch.rand(3, 18, 20, generator=gen, dtype=torch.float64) * 2 - 1,
        "noisy": (x + 0.2 * torch.randn(3, 18, 20, generator=gen, dtype=torch.float64)).clamp(-1, 1),
        "shifted": torch.roll(x, shifts=(1, 2), dims=(-2, -1)),
        "brighter": (x + 0.3).clamp(-1, 1),
    }
    for name, y in cases.items():
        expected = reference_ssim(x.numpy(), y.numpy())
        got64 = float(metrics.ssim(x, y))
        got32 = float(metrics.ssim(x.float(), y.float()))
        assert got64 == pytest.approx(expected, abs=1e-10), name
        assert got32 == pytest.approx(expected, abs=2e-5), name
    assert float(metrics.ssim(x, cases["shifted"])) < 0.2


def test_temporally_shifted_video_scores_like_its_frame_pairs():
    video = torch.rand(1, 6, 3, 12, 12) * 2 - 1
    shifted = torch.cat([video[:, :1], video[:, :-1]], 1)  # repeat of the previous frame
    scores = metrics.psnr(shifted, video)
    assert torch.isinf(scores[0, 0])
    for t in range(1, 6):
        assert float(scores[0, t]) == pytest.approx(float(metrics.psnr(video[0, t - 1], video[0, t])), rel=1e-12)


def test_ssim_rejects_tiny_frames_and_mismatched_shapes():
    with pytest.raises(metrics.MetricError, match="smaller than"):
        metrics.ssim(torch.zeros(3, 8, 8), torch.zeros(3, 8, 8))
    with pytest.raises(metrics.MetricError, match="shapes differ"):
        metrics.psnr(torch.zeros(3, 8, 8), torch.zeros(3, 8, 9))


def test_frechet_distance_of_identical_features_is_zero():
    feats = torch.randn(300, 16) * torch.rand(16) + torch.randn(16)
    assert metrics.frechet_distance(feats, feats) == pytest.approx(0.0, abs=1e-9)


def test_frechet_distance_matches_closed_forms():
    gen = torch.Generator().manual_seed(0)
    d = 6
    # diagonal covariances: |mu1 - mu2|^2 + sum (sqrt(a) - sqrt(b))^2
    mu1, mu2 = torch.randn(d, generator=gen, dtype=torch.float64), torch.randn(d, generator=gen, dtype=torch.float64)
    a, b = torch.rand(d, generator=gen, dtype=torch.float64) + 0.1, torch.rand(d, generator=gen, dtype=torch.float64) + 0.1
    expected = float((mu1 - mu2).pow(2).sum() + (a.sqrt() - b.sqrt()).pow(2).sum())
    assert metrics.frechet_distance_gaussians(mu1, torch.diag(a), mu2, torch.diag(b)) == pytest.approx(expected, rel=1e-12)
    # full covariances: tr sqrt(C1 C2) = sum of sqrt of the (real, positive) eigenvalues of C1 C2
    m1, m2 = torch.randn(d, d, generator=gen, dtype=torch.float64), torch.randn(d, d, generator=gen, dtype=torch.float64)
    c1, c2 = m1 @ m1.T + 0.1 * torch.eye(d, dtype=torch.float64), m2 @ m2.T + 0.1 * torch.eye(d, dtype=torch.float64)
    trace_root = torch.linalg.eigvals(c1 @ c2).real.sqrt().sum()
    expected = float((mu1 - mu2).pow(2).sum() + c1.trace() + c2.trace() - 2 * trace_root)
    assert metrics.frechet_distance_gaussians(mu1, c1, mu2, c2) == pytest.approx(expected, rel=1e-9)


def test_frechet_distance_of_features_uses_sample_mean_and_unbiased_covariance():
    gen = np.random.default_rng(1)
    fa, fb = gen.normal(size=(50, 4)), gen.normal(loc=0.5, size=(70, 4)) * 2
    expected = metrics.frechet_distance_gaussians(
        torch.from_numpy(fa.mean(0)), torch.from_numpy(np.cov(fa.T)), torch.from_numpy(fb.mean(0)), torch.from_numpy(np.cov(fb.T))
    )
    assert metrics.frechet_distance(torch.from_numpy(fa).float(), torch.from_numpy(fb).float()) == pytest.approx(expected, rel=1e-6)
    # one dimension: (m1 - m2)^2 + (s1 - s2)^2
    one_a, one_b = torch.from_numpy(fa[:, :1]), torch.from_numpy(fb[:, :1])
    closed = (fa[:, 0].mean() - fb[:, 0].mean()) ** 2 + (fa[:, 0].std(ddof=1) - fb[:, 0].std(ddof=1)) ** 2
    assert metrics.frechet_distance(one_a, one_b) == pytest.approx(closed, rel=1e-10)
    with pytest.raises(metrics.MetricError, match="N >= 2"):
        metrics.frechet_distance(torch.zeros(1, 4), torch.zeros(5, 4))


def test_laplacian_variance_known_values():
    assert torch.all(metrics.laplacian_variance(torch.full((2, 3, 9, 9), 0.3)) == 0)
    a = 0.4
    sign = (torch.arange(10)[:, None] + torch.arange(12)[None, :]) % 2 * 2 - 1
    board = (a * sign.double()).expand(3, 10, 12)  # grey: luma weights sum to 1
    assert float(metrics.laplacian_variance(board)) == pytest.approx(64 * a * a, rel=1e-12)
    img = torch.rand(3, 7, 8, dtype=torch.float64)
    grey = 0.299 * img[0] + 0.587 * img[1] + 0.114 * img[2]
    lap = np.zeros((5, 6))
    for i in range(1, 6):
        for j in range(1, 7):
            lap[i - 1, j - 1] = grey[i - 1, j] + grey[i + 1, j] + grey[i, j - 1] + grey[i, j + 1] - 4 * grey[i, j]
    assert float(metrics.laplacian_variance(img)) == pytest.approx(lap.var(), rel=1e-12)


def test_colour_stats_match_numpy():
    frames = torch.rand(2, 3, 5, 6)
    mean, std = metrics.colour_stats(frames)
    arr = frames.double().numpy()
    np.testing.assert_allclose(mean.numpy(), arr.mean(axis=(-2, -1)), rtol=1e-12)
    np.testing.assert_allclose(std.numpy(), arr.std(axis=(-2, -1)), rtol=1e-12)


def test_window_bounds_cover_the_range():
    assert metrics.window_bounds(10, 4) == [(0, 4), (4, 8), (8, 10)]
    assert metrics.window_bounds(3, 5) == [(0, 3)]


def test_yaw_pitch_round_trip():
    yaw = (torch.rand(50, dtype=torch.float64) * 2 - 1) * math.pi * 0.999
    pitch = (torch.rand(50, dtype=torch.float64) * 2 - 1) * math.radians(80)
    pose = torch.eye(4, dtype=torch.float64).repeat(50, 1, 1)
    pose[:, :3, :3] = yaw_pitch_rotation(yaw, pitch)
    got_yaw, got_pitch = metrics.yaw_pitch_from_pose(pose)
    torch.testing.assert_close(got_yaw, yaw, rtol=0, atol=1e-12)
    torch.testing.assert_close(got_pitch, pitch, rtol=0, atol=1e-12)


def test_motion_targets_match_the_controller():
    spec, ctrl = ActionSpec(), ControllerSpec()
    gen = torch.Generator().manual_seed(5)
    keys = (torch.rand(3, 20, len(spec.keys), generator=gen) < 0.4).float()
    mouse = torch.randn(3, 20, 2, generator=gen) * 20
    actions = torch.cat([keys, mouse], -1)
    poses, _ = integrate(actions, spec, ctrl)  # float32
    targets = metrics.motion_targets(poses)
    d_yaw = metrics.wrap_angle(actions[:, 1:, -2] * spec.mouse_scale)
    torch.testing.assert_close(targets["yaw_pitch"][..., 0], d_yaw, rtol=0, atol=1e-5)
    # pitch only clamps at 80 degrees, far away for these motions
    torch.testing.assert_close(targets["yaw_pitch"][..., 1], -actions[:, 1:, -1] * spec.mouse_scale, rtol=0, atol=1e-5)
    brute = torch.linalg.inv(poses[:, :-1].double()) @ poses[:, 1:].double()
    torch.testing.assert_close(targets["translation"].double(), brute[..., :3, 3], rtol=0, atol=1e-5)


def test_rotation_angles_and_rotation_error():
    axis = torch.nn.functional.normalize(torch.randn(20, 3, dtype=torch.float64), dim=-1)
    angle = torch.cat([torch.tensor([1e-6, 0.0, math.pi - 1e-6]), torch.rand(17) * math.pi]).double()
    k = torch.zeros(20, 3, 3, dtype=torch.float64)
    k[:, 0, 1], k[:, 0, 2], k[:, 1, 2] = -axis[:, 2], axis[:, 1], -axis[:, 0]
    k = k - k.transpose(1, 2)
    rot = torch.eye(3, dtype=torch.float64) + angle.sin()[:, None, None] * k + (1 - angle.cos())[:, None, None] * k @ k
    base = yaw_pitch_rotation(torch.rand(20, dtype=torch.float64), torch.rand(20, dtype=torch.float64) * 0.5)
    got = metrics.rotation_angle_degrees(base, base @ rot)
    torch.testing.assert_close(got, torch.rad2deg(angle), rtol=1e-9, atol=1e-9)

    prev = torch.eye(4, dtype=torch.float64).repeat(2, 1, 1)
    prev[:, :3, :3] = yaw_pitch_rotation(torch.tensor([0.3, -1.0], dtype=torch.float64), torch.tensor([0.0, 0.2], dtype=torch.float64))
    true = prev.clone()
    true[:, :3, :3] = yaw_pitch_rotation(torch.tensor([0.4, -1.0], dtype=torch.float64), torch.tensor([0.0, 0.1], dtype=torch.float64))
    exact = torch.tensor([[0.1, 0.0], [0.0, -0.1]], dtype=torch.float64)
    torch.testing.assert_close(metrics.rotation_error_degrees(prev, exact, true), torch.zeros(2).double(), rtol=0, atol=1e-6)
    off = exact + torch.tensor([[math.radians(10), 0.0], [0.0, math.radians(-7)]], dtype=torch.float64)
    torch.testing.assert_close(metrics.rotation_error_degrees(prev, off, true), torch.tensor([10.0, 7.0]).double(), rtol=0, atol=1e-9)


def test_key_accuracy_and_swap_fraction():
    keys = torch.tensor([[1, 0, 1], [0, 0, 0], [1, 1, 1], [0, 1, 0]]).float()
    logits = torch.tensor([[2, -1, 3], [-1, 1, -2], [1, 1, -1], [-3, 4, -1]]).float()
    acc = metrics.key_accuracy(logits, keys)
    assert acc["per_key"] == pytest.approx(10 / 12)
    assert acc["exact"] == pytest.approx(2 / 4)
    assert acc["by_key"] == pytest.approx([1.0, 0.75, 0.75])
    assert metrics.swap_pass_fraction(torch.tensor([1.0, 2.0, 3.0]), torch.tensor([2.0, 2.0, 1.0])) == pytest.approx(1 / 3)
    same = torch.rand(5)
    assert metrics.swap_pass_fraction(same, same.clone()) == 0.0


def _score_test_bound(passes: int, trials: int, z: float, upper: bool) -> float:
    """The Wilson bound by bisection on the score test |p_hat - p| <= z sqrt(p (1 - p) / n) (float64)."""
    p_hat = passes / trials
    inside = lambda p: abs(p_hat - p) <= z * math.sqrt(p * (1 - p) / trials)  # noqa: E731
    lo, hi = (p_hat, 1.0) if upper else (0.0, p_hat)
    if inside(hi if upper else lo):
        return hi if upper else lo
    for _ in range(200):
        mid = (lo + hi) / 2
        if inside(mid) == upper:
            lo = mid
        else:
            hi = mid
    return (lo + hi) / 2


def test_wilson_interval_matches_the_score_test_and_published_values():
    gen = torch.Generator().manual_seed(int(torch.randint(0, 2**31, ())))
    for _ in range(50):
        trials = int(torch.randint(1, 200, (), generator=gen))
        passes = int(torch.randint(0, trials + 1, (), generator=gen))
        z = float(torch.empty(()).uniform_(1.0, 3.0, generator=gen))
        low, high = metrics.wilson_interval(passes, trials, z)
        assert low == pytest.approx(_score_test_bound(passes, trials, z, upper=False), abs=1e-9)
        assert high == pytest.approx(_score_test_bound(passes, trials, z, upper=True), abs=1e-9)
    assert metrics.wilson_interval(5, 10) == pytest.approx((0.2366, 0.7634), abs=1e-4)
    assert metrics.wilson_interval(0, 10) == pytest.approx((0.0, 0.2775), abs=1e-4)
    for passes, trials in [(3, 2), (-1, 4), (0, 0)]:
        with pytest.raises(metrics.MetricError):
            metrics.wilson_interval(passes, trials)
