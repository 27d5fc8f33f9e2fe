"""The fixed train / held-out split. Never train on held-out worlds; evaluate generalisation on them.

Procedural world: a seed is a whole world. Seeds ``0 .. 999_999`` are for training, seeds
``>= 1_000_000`` (``HELDOUT_SEED_START``) are held out.

Doom (freedoom2.wad): maps ``MAP01 .. MAP08`` are for training, ``MAP09`` and ``MAP10`` are held out.
Seeds in Doom only vary the start and the exploration, so the map decides the split.
"""

from __future__ import annotations

HELDOUT_SEED_START = 1_000_000
DOOM_TRAIN_MAPS = tuple(f"MAP{i:02d}" for i in range(1, 9))
DOOM_HELDOUT_MAPS = ("MAP09", "MAP10")
SPLITS = ("train", "heldout")


class SplitError(ValueError):
    """A seed range or map name outside the split it was asked for."""


def train_seeds(n: int, start: int = 0) -> list[int]:
    """``n`` consecutive training seeds from ``start`` (all below HELDOUT_SEED_START)."""
    if n < 0 or start < 0 or start + n > HELDOUT_SEED_START:
        raise SplitError(f"training seeds are 0..{HELDOUT_SEED_START - 1}; {n} seeds from {start} do not fit")
    return list(range(start, start + n))


def heldout_seeds(n: int, start: int = 0) -> list[int]:
    """``n`` consecutive held-out seeds, the ``start``-th held-out seed first."""
    if n < 0 or start < 0:
        raise SplitError(f"held-out seed count and start must be non-negative, got n={n}, start={start}")
    return list(range(HELDOUT_SEED_START + start, HELDOUT_SEED_START + start + n))


def split_seeds(split: str, n: int, start: int = 0) -> list[int]:
    """``train_seeds`` or ``heldout_seeds`` by name."""
    if split not in SPLITS:
        raise SplitError(f"unknown split {split!r}; choose one of {list(SPLITS)}")
    return train_seeds(n, start) if split == "train" else heldout_seeds(n, start)


def split_options(world: str, split: str, options: dict | None = None) -> dict:
    """A copy of the world ``options`` that plays ``split``: Doom gets the split's maps unless they are named."""
    if split not in SPLITS:
        raise SplitError(f"unknown split {split!r}; choose one of {list(SPLITS)}")
    options = dict(options or {})
    if world == "doom":
        options.setdefault("maps", list(DOOM_TRAIN_MAPS if split == "train" else DOOM_HELDOUT_MAPS))
    return options
