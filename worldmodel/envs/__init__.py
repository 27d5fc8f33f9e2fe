"""Ground-truth worlds: ``make_world("procedural" | "doom", batch=B, device=..., **options)``.

``procedural``: the built-in ray-cast 3D world (worldmodel.envs.procedural), torch only.
``doom``: ViZDoom on the Freedoom 2 maps (worldmodel.envs.doom), needs the ``vizdoom`` package.
"""

from __future__ import annotations

import importlib
import inspect

from worldmodel.envs.base import World, WorldError, WorldStep

WORLD_CLASSES = {"procedural": ("worldmodel.envs.procedural", "ProceduralWorld"),
                 "doom": ("worldmodel.envs.doom", "DoomWorld")}
WORLDS = tuple(WORLD_CLASSES)


def world_class(name: str) -> type[World]:
    """The class of world ``name`` (imported on demand, so vizdoom is only needed for doom)."""
    if name not in WORLD_CLASSES:
        raise WorldError(f"unknown world {name!r}; choose one of {list(WORLDS)}")
    module, cls = WORLD_CLASSES[name]
    return getattr(importlib.import_module(module), cls)


def make_world(name: str, batch: int = 1, device="cpu", **options) -> World:
    """A world of ``batch`` parallel episodes; see each world's class for its options."""
    cls = world_class(name)
    try:
        inspect.signature(cls).bind(batch=batch, device=device, **options)
    except TypeError as e:
        raise WorldError(f"bad options for the {name} world: {e}") from None
    return cls(batch=batch, device=device, **options)


__all__ = ["World", "WorldError", "WorldStep", "make_world", "world_class", "WORLDS"]
