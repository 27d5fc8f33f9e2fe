"""Motion statistics of recordings: how often the camera turns, walks, does both, or stands still.

Everything is per transition: transition t takes frame t-1 to frame t (t >= 1; the reset frame has
no predecessor), and action t is the one that made it. From the commanded poses (what the models
are conditioned on) come the yaw and pitch rates (degrees per frame, yaw wrapped) and the
translation (world units per frame); from the true poses, where known, whether the world blocked a
walk; from the actions, which keys were held; and the gaze, how far the camera looks up or down after the
transition (|pitch|, degrees). A transition is *turning* when its |yaw rate| or
|pitch rate| is above ``turn_deg`` and *moving* when its translation is above ``move_units``; idle
is neither, so turning only, moving only, both and idle add up to all transitions.

For scale: a person looking around with a mouse commonly turns several degrees per frame at 20
frames/s (100 degrees per second is 5 degrees per frame), and a flick far more.
"""

from __future__ import annotations

import math
import warnings
from dataclasses import dataclass
from pathlib import Path

import torch

from worldmodel.data.dataset import find_episodes
from worldmodel.data.episode import Episode, EpisodeFile
from worldmodel.metrics import motion_targets

TURN_DEG = 0.5  # deg/frame above which the camera turns: about 0.7 pixel at 128 pixels over a 90-degree view
MOVE_UNITS = 0.01  # translation above this is moving (the procedural walk is 0.12 units per frame)
BLOCKED_RATIO = 0.25  # a moving transition whose true translation is below this fraction of the commanded is blocked
PERCENTILES = (50, 90, 99)
RATE_LEVELS = (1, 3, 10)  # degrees per frame
GAZE_LEVELS = (5, 15, 30)  # degrees up or down


class StatsError(ValueError):
    """Recordings whose motion cannot be summarised, or thresholds that make no sense."""


@dataclass
class Motion:
    """The motion of N transitions: ``yaw, pitch [N]`` float64 degrees per frame (commanded; yaw
    wrapped to [-180, 180)), ``move [N]`` commanded translation and ``true_move [N]`` true translation
    (world units per frame; NaN where the true pose is unknown), ``gaze [N]`` |pitch| of the commanded camera
    after the transition (degrees), ``keys [N, K]`` 0/1 held, named ``key_names``; ``first [N]`` bool marks each
    recording's first transition (it has no predecessor)."""

    yaw: torch.Tensor
    pitch: torch.Tensor
    move: torch.Tensor
    true_move: torch.Tensor
    gaze: torch.Tensor
    keys: torch.Tensor
    key_names: tuple[str, ...]
    first: torch.Tensor

    def __len__(self) -> int:
        return self.yaw.shape[0]


def motion(actions: torch.Tensor, poses: torch.Tensor, true_poses: torch.Tensor, key_names) -> Motion:
    """The T-1 transitions of one recording: ``actions [T, A]`` (raw, keys first), ``poses,
    true_poses [T, 4, 4]`` (commanded, true), T >= 2."""
    commanded = motion_targets(poses[None].double())
    true = motion_targets(true_poses[None].double())
    yaw_pitch = torch.rad2deg(commanded["yaw_pitch"][0])
    keys = actions[1:, : len(key_names)].double()
    first = torch.arange(keys.shape[0]) == 0
    view_y = poses[1:, 1, 2].double()  # the view axis's y (OpenCV: down) is -sin(pitch)
    gaze = torch.rad2deg(torch.asin(view_y.abs().clamp(max=1.0)))
    return Motion(yaw_pitch[:, 0], yaw_pitch[:, 1], commanded["translation"][0].norm(dim=-1),
                  true["translation"][0].norm(dim=-1), gaze, keys, tuple(key_names), first)


def join(motions: list[Motion]) -> Motion:
    """The transitions of several recordings as one Motion (they must share their action keys)."""
    names = {m.key_names for m in motions}
    if len(names) != 1:
        raise StatsError(f"recordings with different action keys cannot be summarised together: {sorted(names)}")
    cat = lambda f: torch.cat([getattr(m, f) for m in motions])  # noqa: E731
    return Motion(*(cat(f) for f in ("yaw", "pitch", "move", "true_move", "gaze", "keys")), motions[0].key_names,
                  cat("first"))


def predictability(m: Motion) -> dict[str, float | None]:
    """How much of the next action the motion so far gives away, over consecutive transitions of one
    recording: ``yaw_lag1_r2``, the squared correlation of the yaw rate with the previous one (1: a model
    can extrapolate turns without reading the mouse; None without variance), and ``key_changes``, the
    share of transitions whose held keys differ from the previous one's (None without pairs)."""
    pair = ~m.first[1:]
    if not pair.any():
        return {"yaw_lag1_r2": None, "key_changes": None}
    before, after = m.yaw[:-1][pair], m.yaw[1:][pair]
    r2 = None
    if len(before) > 1 and before.std() > 0 and after.std() > 0:
        r2 = float(torch.corrcoef(torch.stack([before, after]))[0, 1] ** 2)
    changed = (m.keys[1:] != m.keys[:-1]).any(-1)[pair]
    return {"yaw_lag1_r2": r2, "key_changes": float(changed.double().mean())}


def angle_summary(angles: torch.Tensor, levels: tuple[int, ...] = RATE_LEVELS) -> dict[str, float]:
    """Percentiles and maximum of ``|angles| [N]`` (degrees, or degrees per frame) and the shares above ``levels``."""
    size = angles.abs()
    q = torch.quantile(size, torch.tensor(PERCENTILES, dtype=size.dtype) / 100)
    out = {f"p{p}": float(v) for p, v in zip(PERCENTILES, q)}
    out["max"] = float(size.max())
    out.update({f"above_{level}": float((size > level).double().mean()) for level in levels})
    return out


def summarize(m: Motion, turn_deg: float = TURN_DEG, move_units: float = MOVE_UNITS) -> dict:
    """Shares of turning / moving / both / idle transitions, the blocked share of moving ones (None
    without true poses), yaw and pitch rate summaries and key shares of ``m`` (at least one transition)."""
    if len(m) == 0:
        raise StatsError("no transitions to summarise (recordings need at least 2 frames)")
    turning, moving = (m.yaw.abs() > turn_deg) | (m.pitch.abs() > turn_deg), m.move > move_units
    share = lambda mask: float(mask.double().mean())  # noqa: E731
    known = moving & ~m.true_move.isnan()
    blocked = (m.true_move < BLOCKED_RATIO * m.move) & known
    return {
        "transitions": len(m),
        "turning": share(turning), "moving": share(moving),
        "turn_only": share(turning & ~moving), "move_only": share(moving & ~turning),
        "both": share(turning & moving), "idle": share(~turning & ~moving),
        "blocked": float(blocked.sum() / known.sum()) if known.any() else None,
        "yaw": angle_summary(m.yaw), "pitch": angle_summary(m.pitch), "gaze": angle_summary(m.gaze, GAZE_LEVELS),
        "keys": {name: share(m.keys[:, i] > 0) for i, name in enumerate(m.key_names)},
        "no_keys": share(m.keys.sum(-1) == 0),
        **predictability(m),
    }


def episode_motion(episode: Episode) -> Motion:
    """The transitions of an episode of at least 2 steps."""
    return motion(episode.actions, episode.commanded_poses, episode.true_poses, episode.meta.action_spec.keys)


def recording_stats(paths, turn_deg: float = TURN_DEG, move_units: float = MOVE_UNITS) -> dict:
    """Statistics of the episodes found in ``paths`` (episodes or folders): ``thresholds``, ``total``
    (:func:`summarize` over all transitions) and ``episodes`` (one summary each, with its name)."""
    for name, value in (("turn threshold", turn_deg), ("move threshold", move_units)):
        if not (math.isfinite(value) and value > 0):
            raise StatsError(f"the {name} must be a positive number, got {value}")
    motions, episodes, short = [], [], []
    for path in find_episodes(paths):
        episode = EpisodeFile(path)  # a truncated one: its readable prefix, with a warning
        if len(episode) < 2:
            short.append(path)
            continue
        m = episode_motion(episode.read())
        motions.append(m)
        episodes.append({"episode": str(path), **summarize(m, turn_deg, move_units)})
    if not motions:
        raise StatsError(f"no episode has 2 or more readable steps (e.g. {short[0]})")
    if short:
        warnings.warn(f"skipped {len(short)} episodes with fewer than 2 readable steps (e.g. {short[0]})")
    return {"thresholds": {"turn_deg": turn_deg, "move_units": move_units},
            "total": summarize(join(motions), turn_deg, move_units), "episodes": episodes}


def percent(share: float | None) -> str:
    """A share as a percentage, "-" when unknown."""
    return "-" if share is None else f"{100 * share:.1f}%"


def table(header: list[str], rows: list[list[str]]) -> str:
    """Columns right-aligned to their widest cell, the first column left-aligned."""
    widths = [max(len(r[i]) for r in [header, *rows]) for i in range(len(header))]
    line = lambda r: "  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(r, widths)))  # noqa: E731
    return "\n".join(line(r) for r in [header, *rows])


SHARES = ("turning", "moving", "turn_only", "move_only", "both", "idle", "blocked")


def angle_row(name: str, angles: dict, levels: tuple[int, ...] = RATE_LEVELS) -> list[str]:
    """One row of an angle table: percentiles and maximum, then the shares above ``levels``."""
    return ([name] + [f"{angles[f'p{p}']:.2f}" for p in PERCENTILES] + [f"{angles['max']:.2f}"]
            + [percent(angles[f"above_{v}"]) for v in levels])


def episode_row(e: dict, keys: list[str]) -> list[str]:
    """One row of the per-episode table."""
    return ([Path(e["episode"]).name, str(e["transitions"])] + [percent(e[s]) for s in ("turn_only", "move_only", "both", "idle")]
            + [f"{e['yaw'][f'p{p}']:.2f}" for p in PERCENTILES] + [percent(e["yaw"]["above_3"])]
            + [percent(e["keys"][k]) for k in keys])


def format_stats(stats: dict) -> str:
    """The summary of :func:`recording_stats` as small text tables: totals, rates, keys, then per episode."""
    total, th = stats["total"], stats["thresholds"]
    keys = list(total["keys"])
    return "\n\n".join([
        f"{len(stats['episodes'])} episodes, {total['transitions']} transitions (frame t-1 -> t) of the commanded camera; "
        f"turning: |yaw or pitch rate| > {th['turn_deg']:g} deg/frame, moving: > {th['move_units']:g} units/frame, "
        f"blocked: true motion < {BLOCKED_RATIO:g} of the commanded (share of moving)",
        table(["motion", *SHARES], [["share"] + [percent(total[s]) for s in SHARES]]),
        table(["deg/frame", *(f"p{p}" for p in PERCENTILES), "max", *(f">{v}" for v in RATE_LEVELS)],
              [angle_row("yaw", total["yaw"]), angle_row("pitch", total["pitch"])]),
        table(["gaze deg", *(f"p{p}" for p in PERCENTILES), "max", *(f">{v}" for v in GAZE_LEVELS)],
              [angle_row("up/down", total["gaze"], GAZE_LEVELS)]),
        table(["keys", *keys, "none"], [["held"] + [percent(total["keys"][k]) for k in keys] + [percent(total["no_keys"])]]),
        f"predictability: yaw rate from the previous one R^2 "
        f"{'-' if total['yaw_lag1_r2'] is None else format(total['yaw_lag1_r2'], '.3f')}; "
        f"held keys change on {percent(total['key_changes'])} of transitions",
        table(["episode", "n", "turn only", "move only", "both", "idle", "yaw p50", "p90", "p99", ">3", *keys],
              [episode_row(e, keys) for e in stats["episodes"]]),
    ])
