"""The measures: per-frame fidelity (PSNR of the mean MSE, SSIM), the swap test, controllability by the
inverse-dynamics model, per-window stability, and the autoencoder gate."""

from __future__ import annotations

from typing import Callable

import torch
from tqdm import tqdm

from train.evaluate.protocol import EvalError, repeat_first
from worldmodel import metrics
from worldmodel.frames import to_model, to_uint8
from worldmodel.idm import InverseDynamics, controllability

PIXEL = 127.5
"""Frames in [-1, 1] times this are in 0..255 units, as reported."""


def per_frame(fn: Callable, *videos: torch.Tensor, device="cpu", chunk: int = 128) -> tuple[torch.Tensor, ...]:
    """Per-frame measures ``[B, T, ...]`` (on the CPU) of uint8 videos ``[B, T, H, W, 3]``: ``fn(*frames)`` on
    frames ``[N, 3, H, W]`` in [-1, 1] (about ``chunk`` of them at a time, on ``device``) -> a tuple of ``[N, ...]``."""
    b, t = videos[0].shape[:2]
    step = max(1, chunk // b)
    parts = []
    for start in range(0, t, step):
        frames = [metrics.uint8_to_frames(v[:, start : start + step].to(device).flatten(0, 1)) for v in videos]
        parts.append([m.unflatten(0, (b, -1)).cpu() for m in fn(*frames)])
    return tuple(torch.cat(p, 1) for p in zip(*parts))


def per_frame_fidelity(generated: torch.Tensor, truth: torch.Tensor, device="cpu") -> dict[str, torch.Tensor]:
    """MSE and SSIM ``[B, T]`` (on the CPU) of uint8 videos ``[B, T, H, W, 3]`` (frames in [-1, 1]), computed on ``device``."""
    if generated.shape != truth.shape:
        raise EvalError(f"generated frames {tuple(generated.shape)} and ground truth {tuple(truth.shape)} differ in shape")
    mse, ssim = per_frame(lambda g, r: (metrics.mean_squared_error(g, r), metrics.ssim(g, r).double()), generated, truth,
                          device=device)
    return {"mse": mse, "ssim": ssim}


def psnr_of_mean(mse: torch.Tensor) -> torch.Tensor:
    """PSNR (dB) of the mean over clips of ``mse [B, ...]``: finite unless every clip is exact."""
    return 10.0 * torch.log10(metrics.DATA_RANGE**2 / mse.mean(0))


def fidelity_report(runs: dict[str, tuple[torch.Tensor, torch.Tensor]], horizons: list[int], device="cpu") -> dict:
    """``runs``: name -> (generated, truth) uint8 videos. PSNR (of the mean MSE over clips) and mean SSIM
    at frame index h for each horizon, and the same as curves over all frames."""
    rows, curves = {}, {}
    for name, (generated, truth) in runs.items():
        scores = per_frame_fidelity(generated, truth, device)
        curve = {"psnr": psnr_of_mean(scores["mse"]), "ssim": scores["ssim"].mean(0)}
        rows[name] = {m: {str(h): float(v[h]) for h in horizons} for m, v in curve.items()}
        curves[name] = {m: v.tolist() for m, v in curve.items()}
    return {"horizons": horizons, "rows": rows, "curves": curves}


def frame_distances(generated: torch.Tensor, truth: torch.Tensor, device="cpu") -> torch.Tensor:
    """Per-frame MSE ``[B, T - 1]`` over frames 1.. of uint8 videos ``[B, T, ...]`` (the start frame is given)."""
    (mse,) = per_frame(lambda g, r: (metrics.mean_squared_error(g, r),), generated[:, 1:], truth[:, 1:], device=device)
    return mse


def clip_distance(generated: torch.Tensor, truth: torch.Tensor, device="cpu") -> torch.Tensor:
    """Mean per-frame MSE ``[B]`` over frames 1.. of uint8 videos ``[B, T, ...]``."""
    return frame_distances(generated, truth, device).mean(1)


def swap_report(truth: torch.Tensor, rows: dict[str, tuple], horizons=(), device="cpu") -> dict:
    """Swap test. ``rows``: name -> (video under own actions, video under swapped actions), scored against ``truth``
    over the whole clip, and over its first h frames for each horizon h that the clip holds (``by_horizon``): how
    far into a rollout the actions still decide which one is closer."""
    report = {}
    for name, (under_own, under_swapped) in rows.items():
        d_own, d_swapped = frame_distances(under_own, truth, device), frame_distances(under_swapped, truth, device)
        passed = metrics.swap_pass_fraction(d_own.mean(1), d_swapped.mean(1))
        report[name] = {
            "pass_fraction": passed,
            "pass_interval_95": metrics.wilson_interval(round(passed * len(d_own)), len(d_own)),
            "mse_own": float(d_own.mean()),
            "mse_swapped": float(d_swapped.mean()),
            "by_horizon": {str(h): metrics.swap_pass_fraction(d_own[:, :h].mean(1), d_swapped[:, :h].mean(1))
                           for h in horizons if h <= d_own.shape[1]},
        }
    return report


def slice_pairs(predictions: dict, start: int, end: int) -> dict:
    """IDM predictions of the pairs ``[start, end)`` (pair p joins frames p and p+1)."""
    return {k: v[:, start:end] for k, v in predictions.items()}


def control_report(idm: InverseDynamics, episodes: dict, videos: dict[str, torch.Tensor], pairs: dict | None = None) -> dict:
    """Controllability of each video ``[B, T, H, W, 3]`` (and of each ``pairs`` entry: (prev, cur) frames
    ``[B, T-1, ...]``) against the episodes' actions and poses."""
    k = len(idm.cfg.action_spec.keys)
    report = {}
    for name, video in videos.items():
        report[name] = controllability(idm.predict(video), episodes["actions"], episodes["poses"], k)
    for name, (prev, cur) in (pairs or {}).items():
        report[name] = controllability(idm.predict_pairs(prev, cur), episodes["actions"], episodes["poses"], k)
    return report


def window_stats(frames: torch.Tensor, device="cpu") -> dict:
    """Sharpness (Laplacian variance) and per-channel colour mean / std of uint8 ``[B, T, H, W, 3]``,
    averaged over its frames, in 0..255 units."""
    sharp, mean, std = per_frame(lambda x: (metrics.laplacian_variance(x), *metrics.colour_stats(x)), frames, device=device)
    return {
        "sharpness": float(sharp.mean()) * PIXEL**2,
        "colour_mean": (mean.flatten(0, 1).mean(0) * PIXEL + PIXEL).tolist(),
        "colour_std": (std.flatten(0, 1).mean(0) * PIXEL).tolist(),
    }


@torch.no_grad()
def reconstruct(autoencoder, frames: torch.Tensor, device="cpu", chunk: int = 64) -> torch.Tensor:
    """uint8 ``frames [N, H, W, 3]`` encoded and decoded by ``autoencoder`` in float32 on ``device``,
    ``chunk`` frames at a time: uint8 ``[N, H, W, 3]`` on the CPU."""
    autoencoder = autoencoder.to(device).float().eval()
    parts = []
    for i in range(0, len(frames), chunk):
        x = to_model(frames[None, i : i + chunk].to(device))  # [1, n, 3, H, W]: the autoencoder takes clips
        parts.append(to_uint8(autoencoder.decode(autoencoder.encode(x)))[0].cpu())
    return torch.cat(parts)


@torch.no_grad()
def autoencoder_report(autoencoder, frames: torch.Tensor, device="cpu", chunk: int = 64) -> dict:
    """The autoencoder gate: held-out uint8 ``frames [B, T, H, W, 3]`` through encode and decode, in
    float32 on ``device``. PSNR of the mean MSE over all frames, mean SSIM, and the reconstructions'
    sharpness against the frames' own (0..255 units; ``sharpness_ratio`` = reconstruction / truth)."""
    recon = reconstruct(autoencoder, frames.flatten(0, 1), device, chunk).view(frames.shape)
    scores = per_frame_fidelity(recon, frames, device)
    sharp, truth_sharp = window_stats(recon, device)["sharpness"], window_stats(frames, device)["sharpness"]
    return {"frames": recon.shape[0] * recon.shape[1], "psnr": float(psnr_of_mean(scores["mse"].flatten())),
            "ssim": float(scores["ssim"].mean()), "sharpness": sharp, "sharpness_truth": truth_sharp,
            "sharpness_ratio": sharp / truth_sharp}


def stability_report(idm: InverseDynamics, episodes: dict, generated: torch.Tensor, reference: torch.Tensor,
                     window: int, device="cpu") -> dict:
    """Per window of ``window`` frames of a long rollout ``generated [B, T, ...]`` vs ground truth
    ``episodes["frames"]``: Fréchet distance of IDM features (model, repeat-last-frame baseline, and an
    independent ground-truth set ``reference`` as the floor), sharpness, colour, controllability."""
    truth = episodes["frames"]
    videos = {"model": generated, "ground_truth": truth, "repeat_last_frame": repeat_first(truth)}
    predictions = {name: idm.predict(v) for name, v in videos.items()}
    reference_features = idm.predict(reference)["features"]
    k = len(idm.cfg.action_spec.keys)
    windows = []
    for start, end in tqdm(metrics.window_bounds(truth.shape[1] - 1, window), desc="windows", leave=False):
        flat = lambda f: f[:, start:end].flatten(0, 1)  # noqa: E731
        gt_features = flat(predictions["ground_truth"]["features"])
        row = {"frames": [start + 1, end + 1]}
        if gt_features.shape[0] >= 2:
            row["frechet"] = {
                "model": metrics.frechet_distance(flat(predictions["model"]["features"]), gt_features),
                "repeat_last_frame": metrics.frechet_distance(flat(predictions["repeat_last_frame"]["features"]), gt_features),
                "ground_truth_reference": metrics.frechet_distance(flat(reference_features), gt_features),
            }
        row["frames_stats"] = {name: window_stats(v[:, start + 1 : end + 1], device) for name, v in videos.items()}
        row["controllability"] = {
            name: controllability(slice_pairs(predictions[name], start, end), episodes["actions"][:, start : end + 1],
                                  episodes["poses"][:, start : end + 1], k)
            for name in ("model", "ground_truth")
        }
        windows.append(row)
    return {"window": window, "windows": windows}
