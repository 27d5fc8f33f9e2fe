"""Seeded exploration policies whose actions look like play, not per-frame noise.

A policy is a sequence of segments (hold some keys and turn at some rate for 5-80 frames): walk,
turn while walking, stop and look around, strafe, sprint, back up, turn round and walk back (a
revisit). Mouse motion follows each segment's target rate through a low-pass filter, so turns
start and end smoothly. Each policy name is a different mix of segment kinds; ``mix`` gives every
batch item one of them, chosen by its seed.
"""

from __future__ import annotations

import numpy as np
import torch

from worldmodel.actions import ActionSpec

SEGMENTS = ("walk", "walk_turn", "look", "strafe", "sprint", "back", "turn_around", "stop")
POLICIES = {
    "walker": {"walk": 4, "walk_turn": 3, "sprint": 1, "stop": 1, "turn_around": 1},
    "looker": {"look": 4, "walk": 2, "walk_turn": 1, "stop": 1},
    "strafer": {"strafe": 4, "walk": 2, "look": 1, "back": 1},
    "explorer": {"walk": 3, "walk_turn": 3, "sprint": 2, "back": 1, "turn_around": 2, "look": 1, "strafe": 1},
}


class PolicyError(ValueError):
    """An unknown policy name."""


def _segment(kind: str, rng: np.random.Generator) -> dict:
    """Keys held, target mouse rates (counts/frame) and length of one segment."""
    turn = rng.choice([-1, 1]) * rng.uniform(3, 25)
    seg = {
        "walk": ({"W"}, 0.0, 0.0, (20, 80)),
        "walk_turn": ({"W"}, turn, 0.0, (10, 40)),
        "look": (set(), turn * 1.5, rng.normal(0, 6), (10, 40)),
        "strafe": ({rng.choice(["A", "D"])} | ({"W"} if rng.random() < 0.4 else set()), turn * 0.3, 0.0, (10, 40)),
        "sprint": ({"W", "SHIFT"}, turn * 0.3, 0.0, (15, 50)),
        "back": ({"S"}, 0.0, 0.0, (5, 20)),
        "turn_around": (set(), 0.0, 0.0, (18, 22)),  # rate set below: half a turn, then walking back
        "stop": (set(), 0.0, 0.0, (5, 30)),
    }[kind]
    keys, dx, dy, (lo, hi) = seg
    return {"kind": kind, "keys": keys, "dx": dx, "dy": dy, "left": int(rng.integers(lo, hi + 1))}


class Policy:
    """Actions ``[B, A]`` for each step; ``policy(step_index, world_step=None)``."""

    def __init__(self, names: list[str], action_spec: ActionSpec, seeds: list[int]):
        self.spec = action_spec
        self.names = names
        self.rngs = [np.random.default_rng(s) for s in seeds]
        self.segments = [None] * len(seeds)
        self.mouse = np.zeros((len(seeds), 2))
        self.pitch_counts = np.zeros(len(seeds))  # mouse dy integrated, to keep the gaze near level

    def _next_segment(self, i: int) -> dict:
        weights = POLICIES[self.names[i]]
        kinds = list(weights)
        p = np.array([weights[k] for k in kinds], dtype=float)
        seg = _segment(kinds[self.rngs[i].choice(len(kinds), p=p / p.sum())], self.rngs[i])
        if seg["kind"] == "turn_around":
            seg["dx"] = np.pi / (self.spec.mouse_scale * seg["left"]) * self.rngs[i].choice([-1, 1])
        return seg

    def __call__(self, step_index: int, world_step=None) -> torch.Tensor:
        actions = torch.zeros(len(self.rngs), self.spec.width)
        for i, rng in enumerate(self.rngs):
            seg = self.segments[i]
            if seg is None or seg["left"] <= 0:
                seg = self.segments[i] = self._next_segment(i)
            seg["left"] -= 1
            level = -0.05 * self.pitch_counts[i]  # drift back towards a level gaze
            target = np.array([seg["dx"], seg["dy"] + level]) + rng.normal(0, 0.8, 2)
            smooth = 1.0 if seg["kind"] == "turn_around" else 0.25
            self.mouse[i] += smooth * (target - self.mouse[i])
            dx, dy = np.round(self.mouse[i])
            self.pitch_counts[i] += dy
            for key in seg["keys"]:
                if key in self.spec.keys:
                    actions[i, self.spec.key_index(key)] = 1.0
            actions[i, -2], actions[i, -1] = float(dx), float(dy)
        return actions


def make_policy(name: str, action_spec: ActionSpec, batch: int = 1, seed: int = 0) -> Policy:
    """``name``: one of POLICIES, or "mix" (each batch item draws one from its own seed)."""
    seeds = [seed * 1_000_003 + i for i in range(batch)]
    if name == "mix":
        names = [list(POLICIES)[np.random.default_rng(s).integers(len(POLICIES))] for s in seeds]
    elif name in POLICIES:
        names = [name] * batch
    else:
        raise PolicyError(f"unknown policy {name!r}; choose one of {['mix', *POLICIES]}")
    return Policy(names, action_spec, seeds)
