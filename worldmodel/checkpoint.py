"""WorldModel checkpoints: one safetensors file, the configuration in its metadata.

Writes are atomic (temp file + rename). Loading checks the file, the format, the configuration
and every tensor's shape, and raises :class:`CheckpointError` with one line naming the problem.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch
from omegaconf import OmegaConf
from safetensors import SafetensorError
from safetensors.torch import load_file, safe_open, save_file

from worldmodel.model import WorldModel

FORMAT = "worldmodel"
VERSION = "1"


class CheckpointError(ValueError):
    """A checkpoint that cannot be loaded, with the reason."""


def atomic_save_file(tensors: dict, path: str | os.PathLike, metadata: dict[str, str]) -> None:
    """``safetensors`` save through a temp file in the same folder, then rename."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    try:
        save_file({k: v.detach().contiguous().cpu() for k, v in tensors.items()}, str(tmp), metadata=metadata)
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def save(path: str | os.PathLike, model: WorldModel, dtype: torch.dtype | None = None, extra: dict | None = None) -> None:
    """Write ``model`` (weights cast to ``dtype`` if given, e.g. torch.float16 for shipping)."""
    state = {k: (v.to(dtype) if dtype is not None and v.is_floating_point() else v) for k, v in model.state_dict().items()}
    metadata = {
        "format": FORMAT,
        "version": VERSION,
        "config": json.dumps(OmegaConf.to_container(model.config, resolve=True)),
        "extra": json.dumps(extra or {}),
    }
    atomic_save_file(state, path, metadata)


def read_metadata(path: str | os.PathLike) -> dict:
    """The checkpoint's metadata (format, version, config dict, extra dict), validated."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint {path} does not exist")
    try:
        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata() or {}
    except (SafetensorError, OSError, ValueError) as e:
        raise CheckpointError(f"{path} is not a valid safetensors checkpoint (corrupt or truncated): {e}") from None
    if meta.get("format") != FORMAT:
        raise CheckpointError(f"{path} is a safetensors file but not a worldmodel checkpoint (no format={FORMAT} metadata)")
    if meta.get("version") != VERSION:
        raise CheckpointError(f"{path} has checkpoint version {meta.get('version')!r}; this code reads version {VERSION}")
    try:
        return {**meta, "config": json.loads(meta["config"]), "extra": json.loads(meta.get("extra", "{}"))}
    except (KeyError, json.JSONDecodeError) as e:
        raise CheckpointError(f"{path} has unreadable config metadata: {e}") from None


def load(path: str | os.PathLike, device="cpu", dtype: torch.dtype = torch.float32) -> WorldModel:
    """Build the model its config describes and load the weights, checking every tensor."""
    meta = read_metadata(path)
    try:
        model = WorldModel(OmegaConf.create(meta["config"]))
    except ValueError as e:
        raise CheckpointError(f"{path}: bad model config: {e}") from None
    try:
        state = load_file(str(path))
    except (SafetensorError, OSError, ValueError) as e:
        raise CheckpointError(f"{path} is not a valid safetensors checkpoint (corrupt or truncated): {e}") from None
    check_state(model.state_dict(), state, path)
    model.load_state_dict({k: v.to(dtype) if v.is_floating_point() else v for k, v in state.items()})
    return model.to(device).eval()


def check_state(expected: dict, found: dict, path) -> None:
    """Raise CheckpointError if ``found`` lacks, adds or reshapes any tensor of ``expected``."""
    missing = sorted(set(expected) - set(found))
    unexpected = sorted(set(found) - set(expected))
    if missing or unexpected:
        raise CheckpointError(
            f"{path}: tensors do not match the config: missing {missing[:3]}{'...' if len(missing) > 3 else ''}, "
            f"unexpected {unexpected[:3]}{'...' if len(unexpected) > 3 else ''}"
        )
    for name, tensor in expected.items():
        if tuple(found[name].shape) != tuple(tensor.shape):
            raise CheckpointError(
                f"{path}: tensor {name} has shape {tuple(found[name].shape)} in the file but the config gives {tuple(tensor.shape)}"
            )
