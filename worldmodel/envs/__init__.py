"""Ground-truth worlds: ``make_world("procedural" | "doom", batch=B, device=..., **options)``."""

from __future__ import annotations

from worldmodel.envs.base import World, WorldError, WorldStep

WORLDS = ("procedural", "doom")


def make_world(name: str, batch: int = 1, device="cpu", **options) -> World:
    """A world of ``batch`` parallel episodes; see each world's class for its options."""
    if name == "procedural":
        from worldmodel.envs.procedural import ProceduralWorld

        return ProceduralWorld(batch=batch, device=device, **options)
    if name == "doom":
        from worldmodel.envs.doom import DoomWorld

        return DoomWorld(batch=batch, **options)
    raise WorldError(f"unknown world {name!r}; choose one of {list(WORLDS)}")


__all__ = ["World", "WorldError", "WorldStep", "make_world", "WORLDS"]
