"""The evaluation: every measure of one checkpoint under the protocol, and its batch-1 speed."""

from __future__ import annotations

from dataclasses import asdict
from pathlib import Path

import torch

from train.evaluate.measures import (autoencoder_report, control_report, fidelity_report, stability_report,
                                     swap_report)
from train.evaluate.plots import rollout_sheet
from train.evaluate.protocol import (EvalSettings, Run, SessionFactory, heldout_episodes, heldout_options, repeat_first,
                                     repeat_previous, replay, rollouts, seed_block)
from worldmodel.data.splits import heldout_seeds
from worldmodel.idm import InverseDynamics

GAZE_POLICY = "gazer"  # plays the long rollouts' worlds again, holding the view up or down (Doom's students break up)
SHEET_PICKS = (0, 25, 50, 100, 200, 400, 1000, 2000)  # frames of the long rollouts' contact sheets (those in range)


def evaluate(make_session: SessionFactory, idm: InverseDynamics, settings: EvalSettings, block_size: int = 1,
             autoencoder=None, sheets: Path | None = None) -> dict:
    """Run every measure; returns the report as a dict of plain numbers (see the module docstring). With
    ``autoencoder`` (float32, untouched by the sessions) the report also has its gate on the clips' frames; with
    ``sheets`` (a folder) the contact sheets of the long rollouts, ``long.jpg`` and ``gaze.jpg`` (truth above model
    at frames :data:`SHEET_PICKS`), are written there and named in the report."""
    notes = []
    horizons = settings.report_horizons
    clips = heldout_episodes(settings, "clips", settings.clips, settings.horizon + 1)
    truth, actions, start = clips["frames"], clips["actions"], clips["frames"][:, 0]
    if tuple(truth.shape[2:4]) != tuple(idm.cfg.frame_size):
        notes.append(f"the IDM was trained on {idm.cfg.frame_size[0]}x{idm.cfg.frame_size[1]} frames, these are "
                     f"{truth.shape[2]}x{truth.shape[3]}: controllability figures are not comparable to other reports")

    long = heldout_episodes(settings, "long", settings.long_clips, settings.long_frames + 1)
    reference = heldout_episodes(settings, "reference", settings.long_clips, settings.long_frames + 1)
    gaze = heldout_episodes(settings, "long", settings.long_clips, settings.long_frames + 1, policy=GAZE_POLICY)
    swapped_actions = torch.roll(actions, shifts=1, dims=0)
    generated = rollouts(make_session, {
        "autoregressive": Run(start, actions),
        "teacher-forced": Run(start, actions, forced=truth),
        "swapped": Run(start, swapped_actions),
        "long": Run(long["frames"][:, 0], long["actions"]),
        "gaze": Run(gaze["frames"][:, 0], gaze["actions"]),
    }, settings.seed, block_size)
    autoregressive, teacher_forced = generated["autoregressive"], generated["teacher-forced"]

    fidelity = fidelity_report({
        "model (autoregressive)": (autoregressive, truth),
        "model (teacher-forced)": (teacher_forced, truth),
        "repeat last frame (autoregressive)": (repeat_first(truth), truth),
        "repeat last frame (teacher-forced)": (repeat_previous(truth), truth),
        "ground truth": (truth, truth),
    }, horizons, settings.device)

    control = control_report(idm, clips, {"ground truth": truth, "model (autoregressive)": autoregressive,
                                          "repeat last frame": repeat_first(truth)},
                             {"model (teacher-forced)": (truth[:, :-1], teacher_forced[:, 1:])})

    swap = swap_report(truth, {
        "model": (autoregressive, generated["swapped"]),
        "ground truth": (truth, replay(settings, clips["seeds"], swapped_actions)),
        "ground truth in another world": other_world_swap(settings, actions, swapped_actions),
        "repeat last frame": (repeat_first(truth), repeat_first(truth)),
    }, horizons, settings.device)

    stability = stability_report(idm, long, generated["long"], reference["frames"], settings.window, settings.device)
    gaze_stability = stability_report(idm, gaze, generated["gaze"], reference["frames"], settings.window, settings.device)
    if sheets is not None:
        picks = [t for t in SHEET_PICKS if t <= settings.long_frames]
        sheets.mkdir(parents=True, exist_ok=True)
        for name, episodes in (("long", long), ("gaze", gaze)):
            rollout_sheet(episodes["frames"].numpy(), generated[name].numpy(), picks, sheets / f"{name}.jpg")

    return {
        "settings": {**asdict(settings), "horizons": horizons},
        "protocol": {
            "policy": "mix",
            "clip_seeds": clips["seeds"],
            "long_seeds": long["seeds"],
            "reference_seeds": reference["seeds"],
            "gaze_policy": GAZE_POLICY,
            "world_options": heldout_options(settings),
            "frame_size": list(truth.shape[2:4]),
            "block_size": block_size,
        },
        "idm": {"world": idm.cfg.world, "frame_size": list(idm.cfg.frame_size), **idm.cfg.extra},
        "fidelity": fidelity,
        "controllability": control,
        "swap_test": swap,
        "stability": stability,
        "gaze_stability": gaze_stability,
        **({"sheets": {"frames": picks, "long": "long.jpg", "gaze": "gaze.jpg"}} if sheets is not None else {}),
        **({"autoencoder": autoencoder_report(autoencoder, truth, settings.device)} if autoencoder is not None else {}),
        "notes": notes,
    }


def other_world_swap(settings: EvalSettings, actions: torch.Tensor, swapped_actions: torch.Tensor):
    """The swap test's reference of motion alone: the world replayed under the clips' ``actions [B, T, A]`` and
    under ``swapped_actions``, but in other held-out worlds (the reference set's seeds) than the clips': exact
    dynamics that know nothing of the clips' scenes. Returns (video under own, video under swapped actions)."""
    seeds = heldout_seeds(actions.shape[0], start=seed_block(settings, "reference"))
    return replay(settings, seeds, actions), replay(settings, seeds, swapped_actions)


def speed_report(model, settings: EvalSettings, dtype: torch.dtype, steps: list[float] | None = None) -> dict:
    """Batch-1 speed from :func:`worldmodel.bench.measure` (as the benchmark command reports it): median
    step latency, FPS of step + cache write, first-frame latency (reset with a start image + one step)."""
    from worldmodel.bench import measure
    from worldmodel.session import Session

    session = Session(model, batch=1, device=settings.device, steps=steps, seed=settings.seed, dtype=dtype)
    return {**measure(session, settings.speed_frames), "frames_timed": settings.speed_frames,
            "dtype": str(dtype).replace("torch.", "")}
