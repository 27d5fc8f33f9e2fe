"""The evaluation: every measure of one checkpoint under the protocol, and its batch-1 speed."""

from __future__ import annotations

from dataclasses import asdict

import torch

from train.evaluate.measures import (autoencoder_report, control_report, fidelity_report, stability_report,
                                     swap_report)
from train.evaluate.protocol import (EvalSettings, Run, SessionFactory, heldout_episodes, heldout_options, repeat_first,
                                     repeat_previous, replay, rollouts, seed_block)
from worldmodel.data.splits import heldout_seeds
from worldmodel.idm import InverseDynamics

GAZE_POLICY = "gazer"  # plays the long rollouts' worlds again, holding the view up or down (Doom's students break up)


def evaluate(make_session: SessionFactory, idm: InverseDynamics, settings: EvalSettings, block_size: int = 1,
             autoencoder=None) -> dict:
    """Run every measure; returns the report as a dict of plain numbers (see the module docstring). With
    ``autoencoder`` (float32, untouched by the sessions) the report also has its gate on the clips' frames."""
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
