"""WorldModel checkpoints: safetensors, the configuration in the metadata.

A checkpoint is one file ``NAME.safetensors``, or, when saved with ``max_shard_mib``, shards
``NAME-01-of-03.safetensors``... beside each other (each with the full metadata); ``load`` takes
``NAME.safetensors`` either way. Writes are atomic (temp file + rename). Loading checks the
files, the format, the configuration and every tensor's shape, and raises
:class:`CheckpointError` with one line naming the problem.
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


def shard_paths(path: str | os.PathLike, count: int) -> list[Path]:
    path = Path(path)
    return [path.with_name(f"{path.stem}-{k:02d}-of-{count:02d}{path.suffix}") for k in range(1, count + 1)]


def save(path: str | os.PathLike, model: WorldModel, dtype: torch.dtype | None = None, extra: dict | None = None,
         max_shard_mib: float | None = None) -> list[Path]:
    """Write ``model`` (weights cast to ``dtype`` if given, e.g. torch.float16 for shipping), as
    shards of at most ``max_shard_mib`` if given and needed. Returns the files written."""
    state = {k: (v.to(dtype) if dtype is not None and v.is_floating_point() else v) for k, v in model.state_dict().items()}
    metadata = {
        "format": FORMAT,
        "version": VERSION,
        "config": json.dumps(OmegaConf.to_container(model.config, resolve=True)),
        "extra": json.dumps(extra or {}),
    }
    limit = None if max_shard_mib is None else max_shard_mib * 2**20
    shards, size = [{}], 0
    for name, tensor in state.items():
        nbytes = tensor.numel() * tensor.element_size()
        if limit is not None and size + nbytes > limit and shards[-1]:
            shards.append({})
            size = 0
        shards[-1][name] = tensor
        size += nbytes
    if len(shards) == 1:
        atomic_save_file(state, path, metadata)
        return [Path(path)]
    paths = shard_paths(path, len(shards))
    for shard_path, shard in zip(paths, shards):
        atomic_save_file(shard, shard_path, metadata)
    return paths


def checkpoint_files(path: str | os.PathLike) -> list[Path]:
    """The file(s) of the checkpoint ``path``: itself, or its complete set of shards."""
    path = Path(path)
    if path.is_file():
        return [path]
    found = sorted(path.parent.glob(f"{path.stem}-*-of-*{path.suffix}"))
    if not found:
        raise CheckpointError(f"checkpoint {path} does not exist")
    count = int(found[0].stem.rsplit("-of-", 1)[1])
    missing = [p.name for p in shard_paths(path, count) if not p.is_file()]
    if missing:
        raise CheckpointError(f"checkpoint {path} is missing shard(s) {missing}")
    return shard_paths(path, count)


def read_metadata(path: str | os.PathLike) -> dict:
    """The checkpoint's metadata (format, version, config dict, extra dict), validated."""
    path = checkpoint_files(path)[0]
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
    state = {}
    for file in checkpoint_files(path):
        try:
            state.update(load_file(str(file)))
        except (SafetensorError, OSError, ValueError) as e:
            raise CheckpointError(f"{file} is not a valid safetensors checkpoint (corrupt or truncated): {e}") from None
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
