"""Evaluate a world-model checkpoint against a ground-truth world: how faithful, how controllable,
how stable over long sessions, how fast. Writes ``report.json``, ``report.md`` and PNG plots.

    python -m train.evaluate CHECKPOINT --world procedural|doom --out DIR
        [--clips 16 --horizon 128 --long-frames 2000 --long-clips 4 --window 200
         --speed-frames 100 --seed 0 --device cpu|cuda --world-device DEV --dtype float32|bfloat16 --idm PATH
         --steps 1.0]

Protocol. Ground truth is played in held-out worlds of the fixed split (:mod:`worldmodel.data.splits`:
procedural seeds >= HELDOUT_SEED_START, Doom's held-out maps) by the "mix" exploration policy; every
episode starts at a world reset (all-zero first action). The model starts from the episode's first
frame and is driven by the episode's recorded actions. Seeds of worlds, policies and sampler all
derive from ``--seed``, so a report is reproducible (except its speed figures). All rollouts (the
clips autoregressive, teacher-forced and under swapped actions, and the long ones) play side by side
in one batched session, each run drawing the noise a session of its own would (``rollouts``).

Measures (each also for the baselines "repeat the last frame" and, where it has a meaning, ground truth):
- fidelity: PSNR / SSIM at the horizons, autoregressive (the model's own history) and teacher-forced
  (ground-truth history written into the cache, one step predicted);
- controllability: the inverse-dynamics model (assets/idm/<world>.safetensors) on ground truth
  (its ceiling), on rollouts and on the baseline; and the swap test (a rollout under its own actions
  must be closer to ground truth than one under another clip's actions);
- stability: a ``--long-frames`` rollout scored per window (Fréchet distance of IDM features,
  sharpness, colour statistics, controllability);
- speed: first-frame latency, per-frame latency and FPS at batch 1 (worldmodel.bench.measure).
"""

from __future__ import annotations

import copy
import json
import math
import sys
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable

import torch
from omegaconf import OmegaConf
from tqdm import tqdm

from worldmodel import metrics
from worldmodel.frames import to_model, to_uint8
from worldmodel.cli_args import ArgumentParser, run_cli
from worldmodel.files import write_text_atomic
from worldmodel.idm import InverseDynamics, controllability, default_idm_path, load_idm, observed_poses

HORIZONS = (1, 8, 32, 128)
PIXEL = 127.5
"""Frames in [-1, 1] times this are in 0..255 units, as reported."""


class EvalError(ValueError):
    """Settings or inputs an evaluation cannot run with."""


@dataclass(frozen=True)
class EvalSettings:
    world: str
    clips: int = 16
    horizon: int = 128
    horizons: tuple[int, ...] = HORIZONS
    long_frames: int = 2000
    long_clips: int = 4
    window: int = 200
    speed_frames: int = 100
    seed: int = 0
    device: str = "cpu"
    world_device: str | None = None  # where the procedural world renders (default: ``device``)
    world_options: dict = field(default_factory=dict)

    def __post_init__(self):
        if self.clips < 2:
            raise EvalError(f"--clips must be >= 2 (the swap test pairs clips), got {self.clips}")
        if self.horizon < 1 or self.long_frames < 2 or self.long_clips < 1 or self.speed_frames < 1:
            raise EvalError(
                f"need horizon >= 1, long frames >= 2, long clips >= 1, speed frames >= 1; got {self.horizon}, "
                f"{self.long_frames}, {self.long_clips}, {self.speed_frames}"
            )
        if self.window < 1 or self.window * self.long_clips < 2 or self.window > self.long_frames:
            raise EvalError(
                f"--window must be in 1..long frames ({self.long_frames}) and give >= 2 samples over "
                f"{self.long_clips} long clips, got {self.window}"
            )
        if any(h < 1 for h in self.horizons):
            raise EvalError(f"horizons must be positive, got {self.horizons}")

    @property
    def report_horizons(self) -> list[int]:
        """The horizons that fit into ``horizon``, and ``horizon`` itself."""
        return sorted({h for h in self.horizons if h <= self.horizon} | {self.horizon})


SessionFactory = Callable[[int, object], object]
"""``make_session(batch, seed)`` -> an object with ``reset(start)``, ``step(actions [B, Tb, A], force_frame=None,
force_rows=None)`` (both returning a record with ``frames``) and ``narrow(batch)`` like
:class:`worldmodel.session.Session`; ``seed`` is an int or (rows, seed) per noise group
(:data:`worldmodel.session.Seed`)."""


# ---------------------------------------------------------------- ground truth


SEED_BLOCKS = {"clips": 0, "long": 1, "reference": 2}
"""Each set of held-out episodes draws from its own block of seeds (per ``--seed``)."""


def heldout_episodes(settings: EvalSettings, which: str, count: int, length: int) -> dict:
    """``count`` held-out ground-truth episodes of ``length`` frames: frames uint8 ``[B, T, H, W, 3]``,
    actions ``[B, T, A]``, poses ``[B, T, 4, 4]`` (what the frames show), and the world seeds."""
    from worldmodel.data.dataset import play_clip
    from worldmodel.data.splits import heldout_seeds
    from worldmodel.envs import make_world
    from worldmodel.envs.policies import make_policy

    block = (settings.seed * len(SEED_BLOCKS) + SEED_BLOCKS[which]) * 10_000
    seeds = heldout_seeds(count, start=block)
    world = make_world(settings.world, batch=count, device=settings.world_device or settings.device,
                       **heldout_options(settings))
    try:
        policy = make_policy("mix", world.action_spec, batch=count, seed=block)
        clip = play_clip(world, policy, seeds, 0, length)
    finally:
        world.close()
    return {
        "frames": clip["frames"],
        "actions": clip["actions"],
        "poses": observed_poses(clip["true_poses"], clip["poses"]),
        "seeds": seeds,
    }


def heldout_options(settings: EvalSettings) -> dict:
    """World options for held-out play: Doom plays its held-out maps."""
    from worldmodel.data.splits import split_options

    return split_options(settings.world, "heldout", settings.world_options)


def replay(settings: EvalSettings, seeds: list[int], actions: torch.Tensor) -> torch.Tensor:
    """Frames uint8 ``[B, T, H, W, 3]`` the world shows for ``seeds`` under ``actions [B, T, A]`` (open loop)."""
    from worldmodel.envs import make_world

    world = make_world(settings.world, batch=len(seeds), device=settings.world_device or settings.device,
                       **heldout_options(settings))
    try:
        frames = [world.reset(seeds).frames]
        frames += [world.step(actions[:, t]).frames for t in range(1, actions.shape[1])]
    finally:
        world.close()
    return torch.stack(frames, 1)


# ---------------------------------------------------------------- rollouts


@dataclass(frozen=True)
class Run:
    """A batch of rollouts: start frames uint8 ``start [B, H, W, 3]``, then one step per action of
    ``actions [B, T, A]`` from t = 1; with ``forced [B, T, H, W, 3]`` each step writes those frames into
    the cache (teacher forcing) and returns its one-step prediction."""

    start: torch.Tensor
    actions: torch.Tensor
    forced: torch.Tensor | None = None

    @property
    def rows(self) -> int:
        return self.actions.shape[0]

    @property
    def length(self) -> int:
        return self.actions.shape[1]


def block_at(x: torch.Tensor, t: int, size: int, repeat_last: bool = False) -> torch.Tensor:
    """``x[:, t : t + size]`` of ``x [B, T, ...]``; a block that overhangs the end is padded to ``size``
    with zeros, or with copies of the last entry."""
    block = x[:, t : t + size]
    pad = size - block.shape[1]
    if not pad:
        return block
    shape = (block.shape[0], pad, *block.shape[2:])
    return torch.cat([block, block[:, -1:].expand(shape) if repeat_last else block.new_zeros(shape)], 1)


def play_runs(session, runs: list[Run], block_size: int = 1, desc: str = "rollout") -> list[torch.Tensor]:
    """Frames uint8 ``[B_i, T_i, H, W, 3]`` of each run, played side by side in ``session`` (its batch:
    the runs' rows in order), ``block_size`` frames a step. Runs come longest first: once a run has
    ended its rows leave the session (``narrow``). A last block that overhangs a run is padded (zero
    actions, its last forced frame) and cut off."""
    lengths = [r.length for r in runs]
    if lengths != sorted(lengths, reverse=True):
        raise EvalError(f"runs must come longest first, got lengths {lengths}")
    offsets = [sum(r.rows for r in runs[:i]) for i in range(len(runs) + 1)]
    first = session.reset(torch.cat([r.start for r in runs])).frames
    frames = [[f[:, None]] for f in first.split([r.rows for r in runs])]
    live = len(runs)
    for t in tqdm(range(1, lengths[0], block_size), desc=desc, leave=False, disable=lengths[0] < 64):
        if lengths[live - 1] <= t:
            live = sum(length > t for length in lengths)
            session.narrow(offsets[live])
        actions = torch.cat([block_at(r.actions, t, block_size) for r in runs[:live]])
        forcing = [i for i in range(live) if runs[i].forced is not None]
        force = rows = None
        if forcing:
            force = torch.cat([block_at(runs[i].forced, t, block_size, repeat_last=True) for i in forcing])
            if len(force) < offsets[live]:  # some rows play freely: name the forced ones
                rows = torch.cat([torch.arange(offsets[i], offsets[i + 1]) for i in forcing])
        out = session.step(actions, force_frame=force, force_rows=rows).frames
        for i, part in enumerate(out.split([r.rows for r in runs[:live]])):
            frames[i].append(part[:, : lengths[i] - t])
    return [torch.cat(f, 1) for f in frames]


def rollout(session, start: torch.Tensor, actions: torch.Tensor, block_size: int = 1,
            forced: torch.Tensor | None = None, desc: str = "rollout") -> torch.Tensor:
    """Frames uint8 ``[B, T, H, W, 3]`` of one :class:`Run` in ``session`` (see :func:`play_runs`)."""
    return play_runs(session, [Run(start, actions, forced)], block_size, desc)[0]


def rollouts(make_session: SessionFactory, runs: dict[str, Run], seed: int, block_size: int = 1) -> dict[str, torch.Tensor]:
    """Frames of each named run, all played in one session: the rows of each run are a noise group
    seeded by ``seed``, so each run draws the noise that ``rollout(make_session(run.rows, seed), ...)``
    would, and gives its frames (up to the rounding of a larger batch)."""
    names = sorted(runs, key=lambda n: -runs[n].length)
    session = make_session(sum(r.rows for r in runs.values()), [(runs[n].rows, seed) for n in names])
    return dict(zip(names, play_runs(session, [runs[n] for n in names], block_size, desc="rollouts")))


def repeat_first(frames: torch.Tensor) -> torch.Tensor:
    """The autoregressive "repeat the last frame" baseline: the start frame forever ``[B, T, ...]``."""
    return frames[:, :1].expand_as(frames)


def repeat_previous(frames: torch.Tensor) -> torch.Tensor:
    """The teacher-forced "repeat the last frame" baseline: frame t-1 of ground truth predicts frame t."""
    return torch.cat([frames[:, :1], frames[:, :-1]], 1)


# ---------------------------------------------------------------- measures


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


def clip_distance(generated: torch.Tensor, truth: torch.Tensor, device="cpu") -> torch.Tensor:
    """Mean per-frame MSE ``[B]`` over frames 1.. of uint8 videos ``[B, T, ...]`` (the start frame is given)."""
    (mse,) = per_frame(lambda g, r: (metrics.mean_squared_error(g, r),), generated[:, 1:], truth[:, 1:], device=device)
    return mse.mean(1)


def swap_report(truth: torch.Tensor, rows: dict[str, tuple], device="cpu") -> dict:
    """Swap test. ``rows``: name -> (video under own actions, video under swapped actions), scored against ``truth``."""
    report = {}
    for name, (under_own, under_swapped) in rows.items():
        d_own, d_swapped = clip_distance(under_own, truth, device), clip_distance(under_swapped, truth, device)
        report[name] = {
            "pass_fraction": metrics.swap_pass_fraction(d_own, d_swapped),
            "mse_own": float(d_own.mean()),
            "mse_swapped": float(d_swapped.mean()),
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
def autoencoder_report(autoencoder, frames: torch.Tensor, device="cpu", chunk: int = 64) -> dict:
    """The autoencoder gate: held-out uint8 ``frames [B, T, H, W, 3]`` through encode and decode, in
    float32 on ``device``. PSNR of the mean MSE over all frames, mean SSIM, and the reconstructions'
    sharpness against the frames' own (0..255 units; ``sharpness_ratio`` = reconstruction / truth)."""
    autoencoder = autoencoder.to(device).float().eval()
    flat = frames.flatten(0, 1)
    parts = []
    for i in range(0, len(flat), chunk):
        x = to_model(flat[None, i : i + chunk].to(device))  # [1, n, 3, H, W]: the autoencoder takes clips
        parts.append(to_uint8(autoencoder.decode(autoencoder.encode(x)))[0].cpu())
    recon = torch.cat(parts).view(frames.shape)
    scores = per_frame_fidelity(recon, frames, device)
    sharp, truth_sharp = window_stats(recon, device)["sharpness"], window_stats(frames, device)["sharpness"]
    return {"frames": len(flat), "psnr": float(psnr_of_mean(scores["mse"].flatten())),
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


def speed_report(model, settings: EvalSettings, dtype: torch.dtype, steps: list[float] | None = None) -> dict:
    """Batch-1 speed from :func:`worldmodel.bench.measure` (as the benchmark command reports it): median
    step latency, FPS of step + cache write, first-frame latency (reset with a start image + one step)."""
    from worldmodel.bench import measure
    from worldmodel.session import Session

    session = Session(model, batch=1, device=settings.device, steps=steps, seed=settings.seed, dtype=dtype)
    return {**measure(session, settings.speed_frames), "frames_timed": settings.speed_frames,
            "dtype": str(dtype).replace("torch.", "")}


# ---------------------------------------------------------------- the evaluation


def evaluate(make_session: SessionFactory, idm: InverseDynamics, settings: EvalSettings, block_size: int = 1,
             autoencoder=None) -> dict:
    """Run every measure; returns the report as a dict of plain numbers (see the module docstring). With
    ``autoencoder`` (float32, untouched by the sessions) the report also has its gate on the clips' frames."""
    notes = []
    horizons = settings.report_horizons
    clips = heldout_episodes(settings, "clips", settings.clips, settings.horizon + 1)
    truth, actions, start = clips["frames"], clips["actions"], clips["frames"][:, 0]
    if tuple(truth.shape[2:4]) != tuple(idm.cfg.frame_size):
        notes.append(
            f"the IDM was trained on {idm.cfg.frame_size[0]}x{idm.cfg.frame_size[1]} frames, these are "
            f"{truth.shape[2]}x{truth.shape[3]}: controllability figures are not comparable to other reports"
        )

    long = heldout_episodes(settings, "long", settings.long_clips, settings.long_frames + 1)
    reference = heldout_episodes(settings, "reference", settings.long_clips, settings.long_frames + 1)
    swapped_actions = torch.roll(actions, shifts=1, dims=0)
    generated = rollouts(make_session, {
        "autoregressive": Run(start, actions),
        "teacher-forced": Run(start, actions, forced=truth),
        "swapped": Run(start, swapped_actions),
        "long": Run(long["frames"][:, 0], long["actions"]),
    }, settings.seed, block_size)
    autoregressive, teacher_forced = generated["autoregressive"], generated["teacher-forced"]

    fidelity = fidelity_report(
        {
            "model (autoregressive)": (autoregressive, truth),
            "model (teacher-forced)": (teacher_forced, truth),
            "repeat last frame (autoregressive)": (repeat_first(truth), truth),
            "repeat last frame (teacher-forced)": (repeat_previous(truth), truth),
            "ground truth": (truth, truth),
        },
        horizons,
        settings.device,
    )

    control = control_report(
        idm,
        clips,
        {"ground truth": truth, "model (autoregressive)": autoregressive, "repeat last frame": repeat_first(truth)},
        {"model (teacher-forced)": (truth[:, :-1], teacher_forced[:, 1:])},
    )

    swap = swap_report(
        truth,
        {
            "model": (autoregressive, generated["swapped"]),
            "ground truth": (truth, replay(settings, clips["seeds"], swapped_actions)),
            "repeat last frame": (repeat_first(truth), repeat_first(truth)),
        },
        settings.device,
    )

    stability = stability_report(idm, long, generated["long"], reference["frames"], settings.window, settings.device)

    return {
        "settings": {**asdict(settings), "horizons": horizons},
        "protocol": {
            "policy": "mix",
            "clip_seeds": clips["seeds"],
            "long_seeds": long["seeds"],
            "reference_seeds": reference["seeds"],
            "world_options": heldout_options(settings),
            "frame_size": list(truth.shape[2:4]),
            "block_size": block_size,
        },
        "idm": {"world": idm.cfg.world, "frame_size": list(idm.cfg.frame_size), **idm.cfg.extra},
        "fidelity": fidelity,
        "controllability": control,
        "swap_test": swap,
        "stability": stability,
        **({"autoencoder": autoencoder_report(autoencoder, truth, settings.device)} if autoencoder is not None else {}),
        "notes": notes,
    }


# ---------------------------------------------------------------- output


def plain(value):
    """JSON-safe copy: non-finite floats become the strings "inf", "-inf", "nan"."""
    if isinstance(value, float) and not math.isfinite(value):
        return "nan" if math.isnan(value) else ("inf" if value > 0 else "-inf")
    if isinstance(value, dict):
        return {str(k): plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [plain(v) for v in value]
    return value


def fmt(value, digits: int = 3) -> str:
    if isinstance(value, str):
        return value
    if isinstance(value, (list, tuple)):
        return "/".join(fmt(v, 1) for v in value)
    if not math.isfinite(value):
        return "inf" if value > 0 else ("-inf" if value < 0 else "nan")
    return f"{value:.{digits}f}" if abs(value) < 1e4 else f"{value:.3g}"


def table(header: list[str], rows: list[list]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(fmt(c) if not isinstance(c, str) else c for c in row) + " |" for row in rows]
    return "\n".join(lines)


CONTROL_COLUMNS = ("key_accuracy", "key_exact", "mouse_error", "yaw_error_deg", "pitch_error_deg",
                   "rotation_error_deg", "translation_error")


def markdown(report: dict, title: str) -> str:
    """The readable report: one table per measure."""
    fid, horizons = report["fidelity"], report["fidelity"]["horizons"]
    out = [f"# Evaluation: {title}", ""]
    s = report["settings"]
    out += [
        f"World `{s['world']}`, {s['clips']} held-out clips of {s['horizon']} steps, {s['long_clips']} long "
        f"rollouts of {s['long_frames']} frames, seed {s['seed']}, device `{s['device']}`.",
        "",
    ]
    if "checkpoint" in report:
        ck, sampler = report["checkpoint"], report["checkpoint"]["sampler"]
        out += [f"Checkpoint of stage `{ck['stage']}`, sampled with {sampler.get('solver', 'renoise')} over "
                f"{len(sampler['steps'])} noise levels, guidance {sampler.get('guidance', 1.0)}.", ""]
    out += ["## Fidelity at frame h (PSNR in dB of the mean MSE over clips; mean SSIM)", ""]
    header = ["run"] + [f"PSNR@{h}" for h in horizons] + [f"SSIM@{h}" for h in horizons]
    rows = [[name] + [r["psnr"][str(h)] for h in horizons] + [r["ssim"][str(h)] for h in horizons]
            for name, r in fid["rows"].items()]
    out += [table(header, rows), "", "![fidelity](fidelity.png)", ""]
    out += ["## Controllability (inverse-dynamics model; errors are mean absolute, translation in world units)", ""]
    idm_heldout = report["idm"].get("accuracy", {}).get("heldout")
    if idm_heldout:
        out += [f"The IDM ({report['idm']['world']}, {report['idm']['frame_size'][0]}x{report['idm']['frame_size'][1]}) "
                f"scored key accuracy {fmt(idm_heldout['key_accuracy'])}, yaw error {fmt(idm_heldout['yaw_error_deg'])} deg, "
                f"translation error {fmt(idm_heldout['translation_error'])} on its own held-out episodes.", ""]
    out += [table(["frames"] + list(CONTROL_COLUMNS),
                  [[name] + [r[c] for c in CONTROL_COLUMNS] for name, r in report["controllability"].items()]), ""]
    out += ["## Swap test (rollout under own actions closer to ground truth than under another clip's)", ""]
    out += [table(["run", "pass fraction", "MSE own", "MSE swapped"],
                  [[n, r["pass_fraction"], r["mse_own"], r["mse_swapped"]] for n, r in report["swap_test"].items()]), ""]
    st = report["stability"]
    out += [f"## Stability (windows of {st['window']} frames; sharpness and colour in 0..255 units)", ""]
    rows = []
    for w in st["windows"]:
        fr, fs, c = w.get("frechet", {}), w["frames_stats"], w["controllability"]
        rows.append([f"{w['frames'][0]}-{w['frames'][1] - 1}", fr.get("model", "n/a"), fr.get("repeat_last_frame", "n/a"),
                     fr.get("ground_truth_reference", "n/a"), fs["model"]["sharpness"], fs["ground_truth"]["sharpness"],
                     fs["model"]["colour_mean"], fs["ground_truth"]["colour_mean"], c["model"]["key_accuracy"],
                     c["ground_truth"]["key_accuracy"], c["model"]["yaw_error_deg"], c["ground_truth"]["yaw_error_deg"]])
    out += [table(["frames", "FD model", "FD repeat", "FD GT ref", "sharp model", "sharp GT", "RGB mean model",
                   "RGB mean GT", "keys model", "keys GT", "yaw err model", "yaw err GT"], rows), "",
            "![stability](stability.png)", ""]
    if "autoencoder" in report:
        ae = report["autoencoder"]
        out += ["## Autoencoder (the held-out clips' frames, encoded and decoded)", ""]
        row = [ae[k] for k in ("frames", "psnr", "ssim", "sharpness", "sharpness_truth", "sharpness_ratio")]
        out += [table(["frames", "PSNR", "SSIM", "sharpness", "sharpness GT", "ratio"], [row]), ""]
    if "speed" in report:
        sp = report["speed"]
        out += [f"## Speed (batch 1, {sp['dtype']}, worldmodel.bench)", ""]
        out += [table(["first frame ms", "step latency ms (median)", "FPS (step + cache write)"],
                      [[sp["first_frame_ms"], sp["latency_ms"], sp["fps"]]]), ""]
    if report["notes"]:
        out += ["## Notes", ""] + [f"- {n}" for n in report["notes"]] + [""]
    return "\n".join(out) + "\n"


def plots(report: dict, out_dir: Path) -> list[str]:
    """fidelity.png (PSNR / SSIM over frames) and stability.png (per-window measures)."""
    curves = report["fidelity"]["curves"]
    frames = lambda ys: list(range(len(ys)))  # noqa: E731
    shown = [n for n in curves if n != "ground truth"]
    fidelity = [
        Panel(f"{m.upper()} vs ground truth", "frame", m.upper(), {n: (frames(curves[n][m])[1:], curves[n][m][1:]) for n in shown})
        for m in ("psnr", "ssim")
    ]
    save_panels(out_dir / "fidelity.png", fidelity)
    windows = report["stability"]["windows"]
    mid = [sum(w["frames"]) / 2 for w in windows]
    series = lambda get, names: {n: (mid, [get(w, n) for w in windows]) for n in names}  # noqa: E731
    runs = ("model", "ground_truth", "repeat_last_frame")
    stability = [
        Panel("Frechet distance of IDM features", "frame", "FD",
              series(lambda w, n: w.get("frechet", {}).get(n, math.nan), ("model", "repeat_last_frame", "ground_truth_reference"))),
        Panel("sharpness (Laplacian variance)", "frame", "variance", series(lambda w, n: w["frames_stats"][n]["sharpness"], runs)),
        Panel("mean brightness", "frame", "0..255", series(lambda w, n: sum(w["frames_stats"][n]["colour_mean"]) / 3, runs)),
        Panel("colour std (mean of channels)", "frame", "0..255", series(lambda w, n: sum(w["frames_stats"][n]["colour_std"]) / 3, runs)),
        Panel("key accuracy (IDM)", "frame", "fraction", series(lambda w, n: w["controllability"][n]["key_accuracy"], runs[:2])),
        Panel("yaw error (IDM)", "frame", "degrees", series(lambda w, n: w["controllability"][n]["yaw_error_deg"], runs[:2])),
    ]
    save_panels(out_dir / "stability.png", stability)
    return ["fidelity.png", "stability.png"]


def write_report(report: dict, out_dir: Path, title: str) -> None:
    out_dir.mkdir(parents=True, exist_ok=True)
    report = {**report, "plots": plots(report, out_dir)}
    (out_dir / "report.json").write_text(json.dumps(plain(report), indent=1) + "\n")
    (out_dir / "report.md").write_text(markdown(report, title))


# ---------------------------------------------------------------- charts (pillow; no plotting library needed)


PALETTE = ((31, 119, 180), (255, 127, 14), (44, 160, 44), (214, 39, 40), (148, 103, 189), (140, 86, 75))


@dataclass
class Panel:
    """One line chart: ``series`` maps a name to (xs, ys); non-finite points are skipped."""

    title: str
    xlabel: str
    ylabel: str
    series: dict[str, tuple[list[float], list[float]]]


def nice_ticks(low: float, high: float, count: int = 5) -> list[float]:
    """About ``count`` round tick values covering [low, high]."""
    if high <= low:
        return [low]
    raw = (high - low) / max(count - 1, 1)
    magnitude = 10 ** math.floor(math.log10(raw))
    step = next(m * magnitude for m in (1, 2, 2.5, 5, 10) if m * magnitude >= raw)
    first = math.ceil(low / step - 1e-9) * step
    return [first + i * step for i in range(int((high - first) / step + 1e-9) + 1)]


def draw_panel(panel: Panel, size=(560, 360)):
    from PIL import Image, ImageDraw, ImageFont

    image = Image.new("RGB", size, "white")
    draw = ImageDraw.Draw(image)
    font = ImageFont.load_default(size=13)
    left, right, top, bottom = 72, size[0] - 16, 28, size[1] - 40 - 16 * ((len(panel.series) + 1) // 2)
    draw.text((left, 6), panel.title, fill="black", font=font)
    points = {n: [(x, y) for x, y in zip(*xy) if math.isfinite(x) and math.isfinite(y)] for n, xy in panel.series.items()}
    everything = [p for ps in points.values() for p in ps]
    if not everything:
        draw.text((left, (top + bottom) // 2), "no finite values", fill="gray", font=font)
        return image
    x0, x1 = min(p[0] for p in everything), max(p[0] for p in everything)
    y0, y1 = min(p[1] for p in everything), max(p[1] for p in everything)
    if x1 == x0:
        x0, x1 = x0 - 1, x1 + 1
    if y1 - y0 <= 1e-9 * max(abs(y0), abs(y1), 1.0):
        y0, y1 = y0 - (abs(y0) or 1) * 0.1, y1 + (abs(y1) or 1) * 0.1
    pad = (y1 - y0) * 0.05
    y0, y1 = y0 - pad, y1 + pad
    to_px = lambda x, y: (left + (x - x0) / (x1 - x0) * (right - left), bottom - (y - y0) / (y1 - y0) * (bottom - top))  # noqa: E731
    for y in nice_ticks(y0, y1):
        _, py = to_px(x0, y)
        draw.line([(left, py), (right, py)], fill=(225, 225, 225))
        draw.text((4, py - 7), f"{y:.4g}", fill="black", font=font)
    for x in nice_ticks(x0, x1):
        px, _ = to_px(x, y0)
        draw.line([(px, bottom), (px, bottom + 4)], fill="black")
        draw.text((px - 10, bottom + 6), f"{x:.4g}", fill="black", font=font)
    draw.rectangle([left, top, right, bottom], outline="black")
    draw.text((right - 8 * len(panel.xlabel), bottom + 20), panel.xlabel, fill="gray", font=font)
    draw.text((left + 4, top + 2), panel.ylabel, fill="gray", font=font)
    for i, (name, pts) in enumerate(points.items()):
        colour = PALETTE[i % len(PALETTE)]
        pixels = [to_px(x, y) for x, y in pts]
        if len(pixels) > 1:
            draw.line(pixels, fill=colour, width=2)
        if len(pixels) <= 40:
            for px, py in pixels:
                draw.ellipse([px - 3, py - 3, px + 3, py + 3], fill=colour)
        lx, ly = left + (i % 2) * (right - left) // 2, bottom + 38 + 16 * (i // 2)
        draw.rectangle([lx, ly + 4, lx + 14, ly + 10], fill=colour)
        draw.text((lx + 20, ly), name, fill="black", font=font)
    return image


def save_panels(path: Path, panels: list[Panel], columns: int = 2) -> None:
    """Draw ``panels`` in a grid into one PNG."""
    from PIL import Image

    images = [draw_panel(p) for p in panels]
    w, h = images[0].size
    rows = (len(images) + columns - 1) // columns
    sheet = Image.new("RGB", (w * min(columns, len(images)), h * rows), "white")
    for i, im in enumerate(images):
        sheet.paste(im, ((i % columns) * w, (i // columns) * h))
    sheet.save(path)


# ---------------------------------------------------------------- CLI


def parse_args(argv):
    p = ArgumentParser(prog="python -m train.evaluate", description=__doc__.split("\n\n")[0])
    p.add_argument("checkpoint")
    p.add_argument("--world", required=True, choices=["procedural", "doom"])
    p.add_argument("--out", required=True, type=Path)
    p.add_argument("--clips", type=int, default=16)
    p.add_argument("--horizon", type=int, default=128, help="longest fidelity horizon (frames)")
    p.add_argument("--horizons", default=",".join(map(str, HORIZONS)), help="comma-separated horizons to report")
    p.add_argument("--long-frames", type=int, default=2000)
    p.add_argument("--long-clips", type=int, default=4)
    p.add_argument("--window", type=int, default=200, help="stability window (frames)")
    p.add_argument("--speed-frames", type=int, default=100, help="timed frames of the speed measurement")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default="cpu")
    p.add_argument("--world-device", default=None, help="where the procedural world renders (default: --device)")
    p.add_argument("--dtype", default=None, choices=["float32", "bfloat16", "float16"],
                   help="model precision (default bfloat16 on CUDA, float32 on CPU)")
    p.add_argument("--idm", type=Path, default=None, help="IDM weights (default assets/idm/<world>.safetensors)")
    p.add_argument("--autoencoder-only", action="store_true",
                   help="measure only the autoencoder on the held-out clips (no rollouts); writes autoencoder.json")
    p.add_argument("--steps", default=None,
                   help="comma-separated noise levels of the sampler, e.g. 1.0 for one step (default: the checkpoint's)")
    return p.parse_args(argv)


def parse_floats(text: str, what: str) -> list[float]:
    try:
        return [float(v) for v in text.split(",")]
    except ValueError:
        raise EvalError(f"{what} must be comma-separated numbers, got {text!r}") from None


def main(argv=None) -> int:
    return run_cli(lambda: evaluate_cli(argv))


def evaluate_cli(argv) -> int:
    """The CLI body: parse, evaluate, write the report (errors propagate to :func:`run_cli`)."""
    args = parse_args(argv)
    from worldmodel.checkpoint import load
    from worldmodel.session import Session

    try:
        horizons = tuple(int(h) for h in args.horizons.split(","))
    except ValueError:
        raise EvalError(f"--horizons must be comma-separated integers, got {args.horizons!r}") from None
    steps = None if args.steps is None else parse_floats(args.steps, "--steps")
    model = load(args.checkpoint, device=args.device)
    height, width = model.frame_size
    settings = EvalSettings(
        world=args.world, clips=args.clips, horizon=args.horizon, horizons=horizons, long_frames=args.long_frames,
        long_clips=args.long_clips, window=args.window, speed_frames=args.speed_frames, seed=args.seed,
        device=args.device, world_device=args.world_device, world_options={"height": height, "width": width},
    )
    if model.config.world not in (args.world, "custom"):
        raise EvalError(f"checkpoint was trained on world {model.config.world!r}, not {args.world!r}")
    if args.autoencoder_only:
        clips = heldout_episodes(settings, "clips", settings.clips, settings.horizon + 1)
        autoencoder = autoencoder_report(model.autoencoder, clips["frames"], args.device)
        write_text_atomic(args.out / "autoencoder.json", json.dumps(autoencoder, indent=1) + "\n")
        print(f"autoencoder on {autoencoder['frames']} held-out frames: PSNR {autoencoder['psnr']:.2f} dB, "
              f"SSIM {autoencoder['ssim']:.3f}, sharpness {autoencoder['sharpness']:.1f} against "
              f"{autoencoder['sharpness_truth']:.1f} ({autoencoder['sharpness_ratio']:.3f})")
        return 0
    idm = load_idm(args.idm or default_idm_path(args.world), device=args.device)
    if (model.action_spec, model.controller) != (idm.cfg.action_spec, idm.cfg.controller):
        raise EvalError(
            f"the checkpoint's actions/controller ({model.action_spec}, {model.controller}) differ from those of "
            f"the {args.world} world the IDM was trained in ({idm.cfg.action_spec}, {idm.cfg.controller})"
        )
    block_size = model.dit.cfg.block_size
    dtype = getattr(torch, args.dtype or ("bfloat16" if torch.device(args.device).type == "cuda" else "float32"))
    autoencoder = copy.deepcopy(model.autoencoder)  # float32: the sessions cast the model to their dtype
    Session(model, batch=1, device=args.device, steps=steps, dtype=dtype)  # a bad --steps or sampler fails here
    report = evaluate(lambda b, s: Session(model, batch=b, device=args.device, steps=steps, seed=s, dtype=dtype),
                      idm, settings, block_size, autoencoder)
    report["speed"] = speed_report(model, settings, dtype, steps)
    sampler = {**OmegaConf.to_container(model.config.sampler), **({"steps": steps} if steps else {})}
    report["checkpoint"] = {"path": str(args.checkpoint), "stage": str(model.config.stage),
                            "parameters": model.num_parameters(), "sampler": sampler}
    write_report(report, args.out, f"{Path(args.checkpoint).name} on {args.world}")
    print(f"wrote {args.out / 'report.md'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
