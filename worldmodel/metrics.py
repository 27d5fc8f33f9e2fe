"""Fidelity, controllability and stability measures as pure tensor functions.

Frames are float ``[..., C, H, W]`` in [-1, 1] (data range 2) unless a function says otherwise; the
leading dimensions are kept, so one call scores a whole batch of videos frame by frame.
Poses are world-from-camera ``[..., 4, 4]`` as in :mod:`worldmodel.camera` (no roll).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from einops import rearrange

from worldmodel.camera import relative_motion, yaw_pitch_rotation

DATA_RANGE = 2.0
"""Peak-to-peak range of frames in [-1, 1]."""

LUMA = (0.299, 0.587, 0.114)
"""RGB weights of the grey image that sharpness is measured on (ITU-R BT.601)."""


class MetricError(ValueError):
    """Inputs a measure cannot be computed on (mismatched shapes, too few samples, tiny frames)."""


def _same_shape(a: torch.Tensor, b: torch.Tensor, what: str) -> None:
    if a.shape != b.shape:
        raise MetricError(f"{what}: shapes differ, {tuple(a.shape)} vs {tuple(b.shape)}")


def _frames(x: torch.Tensor, what: str) -> None:
    if x.ndim < 3:
        raise MetricError(f"{what}: frames must be [..., C, H, W], got shape {tuple(x.shape)}")


def uint8_to_frames(frames: torch.Tensor) -> torch.Tensor:
    """uint8 ``[..., H, W, 3]`` -> float ``[..., 3, H, W]`` in [-1, 1]."""
    if frames.dtype != torch.uint8 or frames.ndim < 3 or frames.shape[-1] != 3:
        raise MetricError(f"expected uint8 frames [..., H, W, 3], got {frames.dtype} {tuple(frames.shape)}")
    return rearrange(frames, "... h w c -> ... c h w").float() / 127.5 - 1.0


# ---------------------------------------------------------------- fidelity


def mean_squared_error(pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Per-frame MSE ``[...]`` of frames ``[..., C, H, W]`` (float64)."""
    _same_shape(pred, target, "mean_squared_error")
    _frames(pred, "mean_squared_error")
    return (pred.double() - target.double()).pow(2).flatten(-3).mean(-1)


def psnr(pred: torch.Tensor, target: torch.Tensor, data_range: float = DATA_RANGE) -> torch.Tensor:
    """Per-frame PSNR in dB ``[...]`` (float64); +inf for identical frames."""
    mse = mean_squared_error(pred, target)
    return 10.0 * torch.log10(data_range**2 / mse)


def gaussian_window(size: int = 11, sigma: float = 1.5, dtype=torch.float64, device=None) -> torch.Tensor:
    """Normalised 1-D Gaussian ``[size]`` centred on the middle tap (computed in float64, then cast)."""
    if size < 1 or size % 2 == 0 or sigma <= 0:
        raise MetricError(f"window size must be odd and positive and sigma > 0, got size={size} sigma={sigma}")
    x = torch.arange(size, dtype=torch.float64) - (size - 1) / 2
    w = torch.exp(-(x**2) / (2 * sigma**2))
    return (w / w.sum()).to(dtype=dtype, device=device)


def ssim_map(x: torch.Tensor, y: torch.Tensor, data_range: float = DATA_RANGE, window_size: int = 11,
             sigma: float = 1.5, k1: float = 0.01, k2: float = 0.03) -> torch.Tensor:
    """SSIM per window position of images ``[N, C, H, W]``: ``[N, C, H - k + 1, W - k + 1]`` (valid windows).

    Computed in the inputs' dtype (the autoencoder's training loss calls it with images in [0, 1],
    ``data_range=1``, in float32 outside autocast).
    """
    if min(x.shape[-2:]) < window_size:
        raise MetricError(f"ssim: frames {x.shape[-2]}x{x.shape[-1]} are smaller than the {window_size}-pixel window")
    channels = 5 * x.shape[1]
    g = gaussian_window(window_size, sigma, x.dtype, x.device)
    stacked = torch.cat([x, y, x * x, y * y, x * y], dim=1)
    rows = F.conv2d(stacked, g.view(1, 1, 1, -1).expand(channels, 1, 1, -1), groups=channels)
    blurred = F.conv2d(rows, g.view(1, 1, -1, 1).expand(channels, 1, -1, 1), groups=channels)
    mu_x, mu_y, xx, yy, xy = blurred.chunk(5, dim=1)
    var_x, var_y, cov = xx - mu_x**2, yy - mu_y**2, xy - mu_x * mu_y
    c1, c2 = (k1 * data_range) ** 2, (k2 * data_range) ** 2
    luminance = (2 * mu_x * mu_y + c1) / (mu_x**2 + mu_y**2 + c1)
    structure = (2 * cov + c2) / (var_x + var_y + c2)
    return luminance * structure


def ssim(pred: torch.Tensor, target: torch.Tensor, data_range: float = DATA_RANGE, window_size: int = 11,
         sigma: float = 1.5, k1: float = 0.01, k2: float = 0.03) -> torch.Tensor:
    """Per-frame SSIM ``[...]`` (Wang et al. 2004): Gaussian window, valid positions, mean over channels.

    Computed in float32 (float64 if the inputs are float64); 1 for identical frames.
    """
    _same_shape(pred, target, "ssim")
    _frames(pred, "ssim")
    dtype = torch.float64 if pred.dtype == torch.float64 else torch.float32
    x = rearrange(pred.to(dtype), "... c h w -> (...) c h w")
    y = rearrange(target.to(dtype), "... c h w -> (...) c h w")
    return ssim_map(x, y, data_range, window_size, sigma, k1, k2).mean(dim=(-3, -2, -1)).reshape(pred.shape[:-3])


# ---------------------------------------------------------------- stability


def laplacian(images: torch.Tensor) -> torch.Tensor:
    """The 4-neighbour Laplacian of ``images [..., H, W]`` at the valid positions ``[..., H - 2, W - 2]``."""
    return (images[..., :-2, 1:-1] + images[..., 2:, 1:-1] + images[..., 1:-1, :-2] + images[..., 1:-1, 2:]
            - 4 * images[..., 1:-1, 1:-1])


def laplacian_variance(frames: torch.Tensor) -> torch.Tensor:
    """Sharpness ``[...]``: variance of the 4-neighbour Laplacian of the grey image (valid positions)."""
    _frames(frames, "laplacian_variance")
    if frames.shape[-3] != 3 or min(frames.shape[-2:]) < 3:
        raise MetricError(f"laplacian_variance: frames must be RGB and at least 3x3, got {tuple(frames.shape)}")
    luma = torch.tensor(LUMA, dtype=torch.float64, device=frames.device)
    grey = torch.einsum("...chw,c->...hw", frames.double(), luma)
    return laplacian(grey).flatten(-2).var(-1, unbiased=False)


def colour_stats(frames: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-channel mean and standard deviation over pixels: two ``[..., C]`` tensors (float64)."""
    _frames(frames, "colour_stats")
    flat = frames.double().flatten(-2)
    return flat.mean(-1), flat.std(-1, unbiased=False)


def gaussian_stats(features: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Mean ``[D]`` and unbiased covariance ``[D, D]`` (float64) of ``features [N, D]``, N >= 2."""
    if features.ndim != 2 or features.shape[0] < 2:
        raise MetricError(f"features must be [N, D] with N >= 2, got shape {tuple(features.shape)}")
    x = features.double()
    mean = x.mean(0)
    centred = x - mean
    return mean, centred.T @ centred / (x.shape[0] - 1)


def _psd_sqrt(matrix: torch.Tensor) -> torch.Tensor:
    """Square root of a symmetric positive semi-definite ``[D, D]`` (negative eigenvalues from rounding -> 0)."""
    eigvals, eigvecs = torch.linalg.eigh((matrix + matrix.T) / 2)
    return (eigvecs * eigvals.clamp(min=0).sqrt()) @ eigvecs.T


def frechet_distance_gaussians(mu1, cov1, mu2, cov2) -> float:
    """Squared 2-Wasserstein (Fréchet) distance of two Gaussians, in float64.

    ``|mu1 - mu2|^2 + tr(cov1 + cov2 - 2 (cov1 cov2)^(1/2))``; the trace of the matrix root is the
    sum of root eigenvalues of the symmetric ``cov1^(1/2) cov2 cov1^(1/2)``, which has the same spectrum.
    """
    mu1, mu2, cov1, cov2 = (torch.as_tensor(t).double() for t in (mu1, mu2, cov1, cov2))
    if mu1.shape != mu2.shape or cov1.shape != cov2.shape or cov1.shape != (mu1.numel(), mu1.numel()):
        raise MetricError(f"frechet_distance: means {tuple(mu1.shape)}, {tuple(mu2.shape)} and covariances "
                          f"{tuple(cov1.shape)}, {tuple(cov2.shape)} do not match")
    root1 = _psd_sqrt(cov1)
    middle = root1 @ cov2 @ root1
    trace_root = torch.linalg.eigvalsh((middle + middle.T) / 2).clamp(min=0).sqrt().sum()
    distance = (mu1 - mu2).pow(2).sum() + cov1.trace() + cov2.trace() - 2 * trace_root
    return max(float(distance), 0.0)


def frechet_distance(features_a: torch.Tensor, features_b: torch.Tensor) -> float:
    """Fréchet distance between Gaussians fitted to ``features_a [N, D]`` and ``features_b [M, D]``."""
    if features_a.ndim != 2 or features_b.ndim != 2 or features_a.shape[1] != features_b.shape[1]:
        raise MetricError(f"frechet_distance: features must be [N, D] and [M, D], got {tuple(features_a.shape)} "
                          f"and {tuple(features_b.shape)}")
    return frechet_distance_gaussians(*gaussian_stats(features_a), *gaussian_stats(features_b))


def window_bounds(length: int, window: int) -> list[tuple[int, int]]:
    """Consecutive ``[start, end)`` windows covering ``range(length)``; the last one may be shorter."""
    if window < 1 or length < 1:
        raise MetricError(f"window ({window}) and length ({length}) must be positive")
    return [(s, min(s + window, length)) for s in range(0, length, window)]


# ---------------------------------------------------------------- controllability


def wrap_angle(angle: torch.Tensor) -> torch.Tensor:
    """Angles in radians wrapped to [-pi, pi)."""
    return torch.remainder(angle + math.pi, 2 * math.pi) - math.pi


def yaw_pitch_from_pose(poses: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Yaw and pitch ``[...]`` (radians) of roll-free world-from-camera poses ``[..., 4, 4]``.

    The camera's forward axis (third column) is ``(cos p sin y, -sin p, cos p cos y)``.
    """
    forward = poses[..., :3, 2]
    yaw = torch.atan2(forward[..., 0], forward[..., 2])
    pitch = torch.atan2(-forward[..., 1], forward[..., [0, 2]].norm(dim=-1))
    return yaw, pitch


def motion_targets(poses: torch.Tensor) -> dict[str, torch.Tensor]:
    """What moved between consecutive frames of ``poses [B, T, 4, 4]``, for the pairs (t-1, t), t >= 1.

    Returns ``yaw_pitch [B, T-1, 2]`` (radians, yaw wrapped) and ``translation [B, T-1, 3]`` (world
    units, in the camera frame of t-1: the translation of pose_{t-1}^-1 @ pose_t).
    """
    if poses.ndim != 4 or poses.shape[-2:] != (4, 4) or poses.shape[1] < 2:
        raise MetricError(f"poses must be [B, T, 4, 4] with T >= 2, got shape {tuple(poses.shape)}")
    yaw, pitch = yaw_pitch_from_pose(poses)
    d_yaw = wrap_angle(yaw[:, 1:] - yaw[:, :-1])
    d_pitch = pitch[:, 1:] - pitch[:, :-1]
    translation = relative_motion(poses)[:, 1:, :3, 3]
    return {"yaw_pitch": torch.stack([d_yaw, d_pitch], -1), "translation": translation}


def rotation_angle_degrees(rot_a: torch.Tensor, rot_b: torch.Tensor) -> torch.Tensor:
    """Geodesic angle ``[...]`` in degrees between rotations ``[..., 3, 3]`` (accurate near 0 and 180)."""
    rel = rot_a.transpose(-1, -2) @ rot_b
    cos = (rel.diagonal(dim1=-2, dim2=-1).sum(-1) - 1) / 2
    skew = torch.stack([rel[..., 2, 1] - rel[..., 1, 2], rel[..., 0, 2] - rel[..., 2, 0], rel[..., 1, 0] - rel[..., 0, 1]], -1)
    return torch.rad2deg(torch.atan2(skew.norm(dim=-1) / 2, cos))


def rotation_error_degrees(prev_poses: torch.Tensor, pred_yaw_pitch: torch.Tensor, true_poses: torch.Tensor) -> torch.Tensor:
    """Relative rotation error ``[...]`` in degrees.

    The predicted orientation at t is the true orientation at t-1 (``prev_poses [..., 4, 4]``) turned by
    the predicted ``pred_yaw_pitch [..., 2]``; the error is its geodesic angle to ``true_poses [..., 4, 4]``.
    As both share the t-1 anchor, this is the angle between predicted and true relative rotations.
    """
    yaw, pitch = yaw_pitch_from_pose(prev_poses)
    pred_rot = yaw_pitch_rotation(yaw + pred_yaw_pitch[..., 0], pitch + pred_yaw_pitch[..., 1])
    return rotation_angle_degrees(pred_rot, true_poses[..., :3, :3].to(pred_rot.dtype))


def key_accuracy(key_logits: torch.Tensor, keys: torch.Tensor) -> dict[str, float]:
    """Key prediction quality: ``key_logits [..., K]`` (pressed where > 0) vs multi-hot ``keys [..., K]``.

    Returns the fraction of correct key entries (``per_key``), of frames with every key right
    (``exact``), and the accuracy of each key (``by_key``, a list of K fractions).
    """
    _same_shape(key_logits, keys, "key_accuracy")
    if key_logits.numel() == 0:
        raise MetricError("key_accuracy: no frames to score")
    correct = ((key_logits > 0) == (keys > 0.5)).flatten(0, -2).double()
    return {
        "per_key": float(correct.mean()),
        "exact": float(correct.all(-1).double().mean()),
        "by_key": correct.mean(0).tolist(),
    }


def swap_pass_fraction(distance_own: torch.Tensor, distance_swapped: torch.Tensor) -> float:
    """Fraction of clips whose rollout under its own actions is strictly closer to ground truth
    (``distance_own [N]``) than its rollout under another clip's actions (``distance_swapped [N]``)."""
    _same_shape(distance_own, distance_swapped, "swap_pass_fraction")
    if distance_own.numel() == 0:
        raise MetricError("swap_pass_fraction: no clips")
    return float((distance_own < distance_swapped).double().mean())


def wilson_interval(passes: int, trials: int, z: float = 1.96) -> tuple[float, float]:
    """Wilson score interval ``(low, high)`` of a pass fraction ``passes / trials`` (z = 1.96: 95%): how far a
    gate's figure over a few clips can move from one evaluation to the next by the draw of the clips alone."""
    if trials <= 0 or not 0 <= passes <= trials:
        raise MetricError(f"wilson_interval: {passes} passes of {trials} trials")
    p, n = passes / trials, trials
    centre = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z / (1 + z * z / n) * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n))
    return max(0.0, centre - half), min(1.0, centre + half)
