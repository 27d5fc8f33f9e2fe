"""Seeded exploration policies whose actions look like play, not per-frame noise.

A policy strings together segments of 1-90 frames, each holding a set of keys and a mouse
profile: walk (with a little wobble), walk while turning, sprint, stop, look around (turn out and
back again: the view is revisited), look up/down, strafe, circle-strafe, back up, and turn round
followed by walking back the way it came (a revisit). A gaze segment raises or lowers the view by 8-32
degrees and the next segment walks, turns or strafes while holding that pitch, as a player does who
looks at a ceiling or the floor. Players are rougher than that, and a model
must read the actions rather than extrapolate the motion it sees: flicks (a fast turn of 20-120
degrees in 2-6 frames), taps (random keys held for 1-4 frames, in bursts) and fidgets (a jittery
mouse in yaw and pitch, independent from frame to frame). Mouse motion follows each segment's
profile through a low-pass filter (per segment: flicks and fidgets follow the hand at once), in
integer counts like a real mouse; pitch is pulled back towards level. When the world blocks the
walk (the true pose barely moves while the commanded one walks on, e.g. against a wall), the
segment ends and the policy turns away, like a player would.

Each policy name weighs the segment kinds differently; ``mix`` gives every batch item one of the
MIX policies, chosen from its own seed. ``mix`` draws the evaluation's held-out clips, so it must not
change; ``all`` draws from every policy, ``gazer`` included, for training data with more pitch. Item i
of ``make_policy(name, spec, batch, seed)`` depends only on (name, seed, i) and on what its world
shows it, not on the batch size.
"""

from __future__ import annotations

import math

import numpy as np
import torch

from worldmodel.actions import ActionSpec

POLICIES = {
    "walker": {"walk": 5, "walk_turn": 3, "sprint": 1, "stop": 1, "look_around": 1, "turn_around": 1, "flick": 1,
               "tap": 3},
    "looker": {"look_around": 4, "look_vertical": 2, "walk": 2, "walk_turn": 1, "stop": 2, "turn_around": 1,
               "flick": 2, "fidget": 2, "tap": 1},
    "strafer": {"strafe": 4, "circle": 2, "walk": 2, "back": 1, "look_around": 1, "stop": 1, "tap": 3, "fidget": 1},
    "explorer": {"walk": 3, "walk_turn": 3, "sprint": 2, "back": 1, "turn_around": 2, "look_around": 2,
                 "look_vertical": 1, "strafe": 1, "circle": 1, "stop": 1, "flick": 1, "tap": 2, "fidget": 1},
    "player": {"tap": 6, "flick": 3, "fidget": 3, "walk_turn": 2, "strafe": 2, "walk": 1, "stop": 1,
               "look_vertical": 1},
    "gazer": {"gaze": 5, "look_vertical": 2, "walk": 2, "walk_turn": 2, "strafe": 1, "look_around": 1, "stop": 1,
              "tap": 1, "fidget": 1},
}
MIX = ("walker", "looker", "strafer", "explorer", "player")  # the policies of "mix", in this order: it draws the
# evaluation's clips
GAZE_FOLLOW_UPS = ("walk", "walk_turn", "strafe", "stop")  # what a gaze segment is followed by, pitch held
CONSTANT, OUT_AND_BACK, BUMP, JITTER = 0, 1, 2, 3  # mouse profiles: steady rate; sine (nets to zero); sin^2 bump to a
# target angle; the rate times fresh N(0, 1) noise every frame, per axis
SMOOTHING = 0.3  # low-pass factor of the mouse towards its target each frame (segments may set their own)
TAP_KEYS = ("W", "A", "S", "D")  # keys a tap may hold
TAP_PROBABILITY = 0.4  # each of TAP_KEYS is held in a tap with this probability
TAP_BURST = 0.8  # chance that a tap is followed by another (bursts of 5 taps on average)
LEVEL_PULL = 0.04  # fraction of the accumulated pitch (in counts) pulled back per frame (none while it is held)
STUCK_WINDOW = 8  # frames over which a blocked walk is detected
STUCK_RATIO = 0.25  # true displacement below this fraction of the commanded one means blocked


class PolicyError(ValueError):
    """An unknown policy name or a bad argument."""


def draw_segment(kind: str, rng: np.random.Generator, mouse_scale: float) -> dict:
    """Keys held, mouse profile (counts/frame) and length of one segment of ``kind``."""
    counts = lambda radians: radians / mouse_scale  # noqa: E731
    side = float(rng.choice([-1.0, 1.0]))
    turn = side * counts(rng.uniform(0.012, 0.06))  # radians per frame -> counts per frame
    seg = {"keys": (), "dx": 0.0, "dy": 0.0, "profile": CONSTANT, "length": 20, "smoothing": SMOOTHING,
           "level_pull": LEVEL_PULL}
    if kind == "walk":
        seg.update(keys=("W",), dx=0.15 * turn, length=rng.integers(20, 91))
    elif kind == "walk_turn":
        seg.update(keys=("W",), dx=turn, length=rng.integers(10, 41))
    elif kind == "sprint":
        seg.update(keys=("W", "SHIFT"), dx=0.3 * turn, length=rng.integers(15, 51))
    elif kind == "stop":
        seg.update(length=rng.integers(5, 31))
    elif kind == "look_around":  # turn out by up to ~100 degrees and back again
        length = int(rng.integers(16, 51))
        peak = counts(rng.uniform(0.5, 1.8)) * math.pi / length  # peak rate of a sine that turns out this far
        seg.update(dx=side * peak, profile=OUT_AND_BACK, length=length)
    elif kind == "look_vertical":
        length = int(rng.integers(16, 41))
        peak = counts(rng.uniform(0.3, 0.9)) * math.pi / length
        seg.update(dy=side * peak, dx=0.2 * turn, profile=OUT_AND_BACK, length=length)
    elif kind == "gaze":  # raise or lower the view by 8-32 degrees, then hold it (no pull back to level)
        length = int(rng.integers(8, 21))
        total = float(rng.choice([-1.0, 1.0])) * counts(math.radians(rng.uniform(8.0, 32.0)))
        seg.update(dy=total / length, profile=BUMP, length=length, level_pull=0.0)
    elif kind == "strafe":
        keys = (str(rng.choice(["A", "D"])),) + (("W",) if rng.random() < 0.35 else ())
        seg.update(keys=keys, dx=0.2 * turn, length=rng.integers(10, 41))
    elif kind == "circle":  # strafe round something while turning towards it
        key = str(rng.choice(["A", "D"]))
        seg.update(keys=(key,), dx=(1.0 if key == "A" else -1.0) * abs(turn), length=rng.integers(20, 61))
    elif kind == "back":
        seg.update(keys=("S",), length=rng.integers(5, 21))
    elif kind == "turn_around":
        length = int(rng.integers(12, 26))
        total = counts(math.pi + rng.uniform(-0.35, 0.35))
        seg.update(dx=side * total / length, profile=BUMP, length=length)  # the bump 2 sin^2 has mean 1
    elif kind == "flick":
        length = int(rng.integers(2, 7))
        total = counts(math.radians(rng.uniform(20.0, 120.0)))
        seg.update(dx=side * total / length, dy=0.1 * counts(rng.normal(0.0, 0.05)), length=length, smoothing=1.0)
    elif kind == "tap":
        keys = tuple(k for k in TAP_KEYS if rng.random() < TAP_PROBABILITY)
        seg.update(keys=keys, dx=rng.normal(0.0, 0.5) * turn, length=rng.integers(1, 5))
    elif kind == "fidget":  # about 1-4 degrees per frame of jitter, a third of it in pitch
        scale = counts(math.radians(rng.uniform(1.0, 4.0)))
        keys = ("W",) if rng.random() < 0.3 else ()
        seg.update(keys=keys, dx=scale, dy=scale / 3, profile=JITTER, length=rng.integers(8, 31), smoothing=0.8)
    else:
        raise PolicyError(f"unknown segment kind {kind!r}")
    seg["length"] = int(seg["length"])
    return seg


class Policy:
    """Actions ``[B, A]`` for each step: ``policy(step_index, world_step=None)``.

    The policy keeps its own clock (one call, one frame; ``step_index`` is part of the shared
    interface). ``world_step``, the world's last WorldStep, is optional; with it, blocked walks end
    early and the gaze is levelled from the world's actual (clamped) pitch.
    """

    def __init__(self, names: list[str], action_spec: ActionSpec, seeds: list[int]):
        b = len(names)
        self.spec, self.names = action_spec, names
        self.rngs = [np.random.default_rng(s) for s in seeds]
        self.weights = [(list(POLICIES[n]), np.array(list(POLICIES[n].values()), float)) for n in names]
        self.keys = np.zeros((b, len(action_spec.keys)), np.float32)
        self.rate = np.zeros((b, 2))  # the segment's mouse rate (dx, dy), counts/frame
        self.profile = np.zeros(b, np.int64)
        self.smoothing = np.full(b, SMOOTHING)
        self.level_pull = np.full(b, LEVEL_PULL)  # per item: the current segment's pull of the pitch to level
        self.length = np.ones(b, np.int64)
        self.age = np.ones(b, np.int64)  # frames into the current segment; >= length: draw a new one
        self.walked = np.zeros(b, np.int64)  # frames walked forward since the last turn round
        self.forced: list[str | None] = [None] * b  # the kind the next segment must have
        self.mouse = np.zeros((b, 2))  # low-passed mouse (counts/frame)
        self.pitch = np.zeros(b)  # dy counts away from a level gaze (pulled back towards 0)
        self.history: list[tuple[np.ndarray, np.ndarray]] = []  # (commanded, true) xz positions per step

    def _start_segment(self, i: int, kind: str | None = None):
        """Begin a new segment for item i: ``kind``, else a forced follow-up, else a weighted draw."""
        rng = self.rngs[i]
        # a follow-up forced by a gaze (whose level pull is 0) holds its pitch; one forced by a turn round walks back
        gaze_held = kind is None and self.forced[i] is not None and self.level_pull[i] == 0
        walk_back = kind is None and self.forced[i] == "walk" and not gaze_held
        if kind is None:
            kind, self.forced[i] = self.forced[i], None
        if kind is None:
            kinds, w = self.weights[i]
            kind = kinds[rng.choice(len(kinds), p=w / w.sum())]
        seg = draw_segment(kind, rng, self.spec.mouse_scale)
        if walk_back:  # after turning round, walk back about as far as it came
            seg["length"] = int(np.clip(self.walked[i], 10, 90))
            self.walked[i] = 0
        if gaze_held:  # the segment after a gaze keeps its pitch
            seg["level_pull"] = 0.0
        if kind == "turn_around":
            self.forced[i] = "walk"
        elif kind == "gaze":
            self.forced[i] = str(rng.choice(GAZE_FOLLOW_UPS))
        elif kind == "tap" and rng.random() < TAP_BURST:
            self.forced[i] = "tap"
        self.keys[i] = [1.0 if k in seg["keys"] else 0.0 for k in self.spec.keys]
        self.rate[i] = seg["dx"], seg["dy"]
        self.profile[i], self.length[i], self.age[i] = seg["profile"], seg["length"], 0
        self.smoothing[i], self.level_pull[i] = seg["smoothing"], seg["level_pull"]

    def _blocked(self, world_step) -> np.ndarray:
        """Items whose walk has been blocked for the last STUCK_WINDOW frames."""
        b = len(self.names)
        if world_step is None:
            return np.zeros(b, bool)
        commanded = world_step.commanded_pose[:, [0, 2], 3].double().cpu().numpy()
        true = world_step.true_pose[:, [0, 2], 3].double().cpu().numpy()
        self.history = (self.history + [(commanded, true)])[-(STUCK_WINDOW + 1):]
        if len(self.history) <= STUCK_WINDOW:
            return np.zeros(b, bool)
        (c0, t0), (c1, t1) = self.history[0], self.history[-1]
        wanted, got = np.linalg.norm(c1 - c0, axis=1), np.linalg.norm(t1 - t0, axis=1)
        return (wanted > 1e-6) & (got < STUCK_RATIO * wanted) & (self.age >= STUCK_WINDOW)

    def __call__(self, step_index: int, world_step=None) -> torch.Tensor:
        blocked = self._blocked(world_step)
        if world_step is not None:  # level the gaze from the real (clamped) pitch: forward y = -sin(pitch)
            forward_y = world_step.commanded_pose[:, 1, 2].double().cpu().numpy()
            self.pitch = np.arcsin(np.clip(forward_y, -1, 1)) / self.spec.mouse_scale
        for i in np.flatnonzero((self.age >= self.length) | blocked):
            if blocked[i]:  # turn away from what blocks the walk, then walk a little
                self.walked[i] = 0
            self._start_segment(i, "turn_around" if blocked[i] else None)
        phase = (self.age + 0.5) / self.length
        shape = np.select([self.profile == OUT_AND_BACK, self.profile == BUMP],
                          [np.sin(2 * np.pi * phase), 2 * np.sin(np.pi * phase) ** 2], 1.0)
        target = self.rate * shape[:, None]
        for i in np.flatnonzero(self.profile == JITTER):
            target[i] *= self.rngs[i].normal(size=2)
        target[:, 1] -= self.level_pull * self.pitch
        self.mouse += self.smoothing[:, None] * (target - self.mouse)
        mouse = np.round(self.mouse)
        self.pitch += mouse[:, 1]
        if "W" in self.spec.keys:
            self.walked += self.keys[:, self.spec.key_index("W")].astype(np.int64)
        self.age += 1
        return torch.from_numpy(np.concatenate([self.keys, mouse.astype(np.float32)], 1))


def make_policy(name: str, action_spec: ActionSpec, batch: int = 1, seed: int = 0) -> Policy:
    """``name``: one of POLICIES, "mix" (each batch item draws one of MIX from its own seed) or "all" (one of
    POLICIES)."""
    if isinstance(batch, bool) or not isinstance(batch, int) or batch < 1:
        raise PolicyError(f"batch must be a positive integer, got {batch!r}")
    if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)) or seed < 0:
        raise PolicyError(f"seed must be a non-negative integer, got {seed!r}")
    seeds = [[int(seed), i] for i in range(batch)]  # SeedSequence entropy: independent streams per item
    if name in ("mix", "all"):
        pool = MIX if name == "mix" else tuple(POLICIES)
        names = [pool[np.random.default_rng([int(seed), i, 1]).integers(len(pool))] for i in range(batch)]
    elif name in POLICIES:
        names = [name] * batch
    else:
        raise PolicyError(f"unknown policy {name!r}; choose one of {['mix', 'all', *POLICIES]}")
    return Policy(names, action_spec, seeds)
