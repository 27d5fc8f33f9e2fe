"""Scripted input files: the actions of a demo or a headless run, written by hand.

Format: one segment per line, ``FRAMES KEYS DX DY``; ``#`` starts a comment; blank lines are ignored.

    # frames  keys      dx   dy
    20        -         0    0     # stand still (``-`` = no key) for 20 frames
    40        W         4    0     # walk forward while turning right 4 mouse counts per frame
    15        W+SHIFT   0    -2    # sprint, looking up

KEYS are the model's action keys (e.g. W, A, S, D, SHIFT) joined by ``+``; DX, DY are mouse counts per
frame (right / down positive, at most MAX_MOUSE either way). A run longer than the script starts it
again from the top. Actions are produced as they are needed, so a segment may be any number of frames long.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import torch

from worldmodel.actions import ActionSpec, make_action


MAX_MOUSE = 10_000.0
"""The largest mouse motion (counts per frame) a script may ask for."""
MAX_SCRIPT_BYTES = 1 << 20


class ScriptError(ValueError):
    """A scripted input file that cannot be used."""


@dataclass(frozen=True)
class Segment:
    frames: int
    keys: tuple[str, ...]
    dx: float
    dy: float


def _number(text: str, where: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise ScriptError(f"{where}: {text!r} is not a number") from None
    if not math.isfinite(value):
        raise ScriptError(f"{where}: {text!r} is not a finite number")
    if abs(value) > MAX_MOUSE:
        raise ScriptError(f"{where}: mouse motion {text} is beyond ±{MAX_MOUSE:g} counts per frame")
    return value


def parse_script(text: str, spec: ActionSpec, name: str = "<script>") -> list[Segment]:
    """The segments of a script; errors name the line."""
    segments = []
    for number, line in enumerate(text.splitlines(), 1):
        fields = line.split("#", 1)[0].split()
        if not fields:
            continue
        where = f"{name}:{number}"
        if len(fields) != 4:
            raise ScriptError(f"{where}: expected 'FRAMES KEYS DX DY', got {len(fields)} fields")
        if not fields[0].isdigit() or int(fields[0]) < 1:
            raise ScriptError(f"{where}: frame count {fields[0]!r} must be a positive integer")
        keys = () if fields[1] == "-" else tuple(k.upper() for k in fields[1].split("+"))
        unknown = [k for k in keys if k not in spec.keys]
        if unknown:
            raise ScriptError(f"{where}: unknown key {unknown[0]!r}; the model's keys are {'+'.join(spec.keys)} (or - for none)")
        segments.append(Segment(int(fields[0]), keys, _number(fields[2], where), _number(fields[3], where)))
    if not segments:
        raise ScriptError(f"{name}: the script holds no segments")
    return segments


def load_script(path: str | Path, spec: ActionSpec) -> list[Segment]:
    path = Path(path)
    try:
        if path.stat().st_size > MAX_SCRIPT_BYTES:
            raise ScriptError(f"script {path} is larger than {MAX_SCRIPT_BYTES} bytes")
        text = path.read_text()
    except FileNotFoundError:
        raise ScriptError(f"script {path} does not exist") from None
    except (OSError, UnicodeDecodeError) as e:
        raise ScriptError(f"script {path} cannot be read: {e}") from None
    return parse_script(text, spec, str(path))


def script_cycle(segments: list[Segment], spec: ActionSpec) -> Iterator[torch.Tensor]:
    """The script's actions ``[A]``, one per frame, repeating without end (made lazily: one tensor per segment)."""
    actions = [(make_action(spec, s.keys, s.dx, s.dy), s.frames) for s in segments]
    while True:
        for action, frames in actions:
            for _ in range(frames):  # range, not itertools.repeat: counts beyond 2**63 stay lazy
                yield action
