"""WorldModel checkpoints: safetensors, the configuration in the metadata.

A checkpoint is one file ``NAME.safetensors``, or, when saved with ``max_shard_mib``, shards
``NAME-01-of-03.safetensors``... beside each other (each with the full metadata); ``load`` takes
``NAME.safetensors`` either way. Writes are atomic (temp file + rename).

A DiT-only checkpoint (``save(..., part="dit")``, metadata ``contents=dit``) holds the ``dit.*``
tensors alone, the full config, the :func:`weights_fingerprint` of the autoencoder the DiT was
trained against and the :func:`latent_space_fingerprint` of its encoder and latent statistics; it
loads only joined with an autoencoder of that config and latent space (``load(path,
autoencoder_from=...)``), whatever its decoder (a decoder trained on alone, ``autoencoder.train_encoder=false``,
keeps the latent space). A file without ``latent_fingerprint`` (written before it existed) needs the
whole autoencoder's fingerprint.

An autoencoder-only checkpoint (``part="autoencoder"``, metadata ``contents=autoencoder``) holds the
``autoencoder.*`` tensors alone with the full config: what a new latent space is carried as before any
DiT is trained on it. It loads only where the autoencoder alone is used (``load(path, untrained_dit=True)``:
a stage's ``init.autoencoder``, join's AUTOENCODER_CHECKPOINT, ``train.evaluate --autoencoder-only``),
with the DiT as its constructor initialises it. From bash::

    python -m worldmodel.checkpoint dit-only CHECKPOINT OUT [--dtype bfloat16]
    python -m worldmodel.checkpoint autoencoder-only CHECKPOINT OUT [--dtype ...]
    python -m worldmodel.checkpoint join DIT_FILE AUTOENCODER_CHECKPOINT OUT [--dtype ...]

Every checkpoint is untrusted input. Loading checks the files, the format, that all shards carry
the same metadata, the configuration (a mapping of the expected types and sane sizes, with no
omegaconf ``${...}`` interpolation, which would be resolved, e.g. ``${oc.env:HOME}``), then every
tensor's name, shape and dtype against the config's model (built on the meta device, so no
allocation before the check) and that floating weights are finite. Any problem raises
:class:`CheckpointError` with one line naming it.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import re
import sys
from dataclasses import MISSING, fields
from pathlib import Path

import torch
from omegaconf import OmegaConf
from safetensors import SafetensorError
from safetensors.torch import load_file, safe_open, save_file
from torch import nn

from worldmodel.actions import ActionSpec
from worldmodel.autoencoder import AutoencoderConfig
from worldmodel.camera import ControllerSpec
from worldmodel.cli_args import ArgumentParser, run_cli
from worldmodel.files import atomic_output
from worldmodel.model import DEFAULT_SAMPLER, WorldModel
from worldmodel.transformer import DiTConfig

FORMAT = "worldmodel"
VERSION = "1"
PARTS = {"dit": "dit.", "autoencoder": "autoencoder."}
"""The ``contents`` metadata of a partial checkpoint (a full one has no ``contents`` key), with the
prefix of the tensors it holds."""
FINGERPRINT = re.compile(r"[0-9a-f]{64}")
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


MAX_SIZE = 2**16
"""The largest integer setting a config may hold (channels, dim, frame size, window...)."""
MAX_COUNT = 256
"""The largest repeat count (depth, heads, blocks per level) and list length a config may hold."""
COUNTS = {"depth", "heads", "encoder_blocks", "decoder_blocks"}
MAY_BE_ZERO = {"sink_frames", "encoder_blocks", "decoder_blocks"}
"""The integer settings that may be 0; every other one must be at least 1."""


class CheckpointError(ValueError):
    """A checkpoint that cannot be loaded, with the reason."""


def defaults(cls) -> dict:
    """``{field: default}`` of a config dataclass: the types a stored section must have."""
    return {f.name: f.default if f.default_factory is MISSING else f.default_factory() for f in fields(cls)}


SCHEMA = {
    "world": "", "stage": "",
    "actions": defaults(ActionSpec), "controller": defaults(ControllerSpec),
    "autoencoder": defaults(AutoencoderConfig), "dit": defaults(DiTConfig), "sampler": DEFAULT_SAMPLER,
}
"""Each config key with a value of the type it must have (unknown keys are left to the model)."""


def atomic_save_file(tensors: dict, path: str | os.PathLike, metadata: dict[str, str]) -> None:
    """``safetensors`` save through a temp file in the same folder, then rename (worldmodel.files)."""
    with atomic_output(path) as tmp:
        save_file({k: v.detach().contiguous().cpu() for k, v in tensors.items()}, str(tmp), metadata=metadata)


def shard_paths(path: str | os.PathLike, count: int) -> list[Path]:
    path = Path(path)
    return [path.with_name(f"{path.stem}-{k:02d}-of-{count:02d}{path.suffix}") for k in range(1, count + 1)]


def weights_fingerprint(module: nn.Module, exclude: str | None = None) -> str:
    """sha256 over ``module``'s state_dict in name order (without names starting with ``exclude``): each
    name, shape and values (floating ones as float32, so that weights keep their fingerprint when a
    checkpoint loads them as float32)."""
    h = hashlib.sha256()
    for name, value in sorted(module.state_dict().items()):
        if exclude is not None and name.startswith(exclude):
            continue
        value = value.detach().cpu()
        value = value.float() if value.is_floating_point() else value
        h.update(f"{name} {list(value.shape)} {value.dtype}\n".encode())
        h.update(value.contiguous().numpy().tobytes())
    return h.hexdigest()


def latent_space_fingerprint(autoencoder: nn.Module) -> str:
    """:func:`weights_fingerprint` of an autoencoder's encoder and latent statistics (not its decoder):
    what the latents a DiT sees depend on."""
    return weights_fingerprint(autoencoder, exclude="decoder.")


def save(path: str | os.PathLike, model: WorldModel, dtype: torch.dtype | None = None, extra: dict | None = None,
         max_shard_mib: float | None = None, part: str | None = None) -> list[Path]:
    """Write ``model`` (weights cast to ``dtype`` if given, e.g. torch.float16 for shipping), as
    shards of at most ``max_shard_mib`` if given and needed; with ``part`` (a key of :data:`PARTS`), only
    that part (see the module docstring). Returns the files written."""
    if part is not None and part not in PARTS:
        raise ValueError(f"part must be one of {sorted(PARTS)}, got {part!r}")
    state = {k: (v.to(dtype) if dtype is not None and v.is_floating_point() else v) for k, v in model.state_dict().items()
             if part is None or k.startswith(PARTS[part])}
    config = json.dumps(OmegaConf.to_container(model.config, resolve=True))
    metadata = {"format": FORMAT, "version": VERSION, "config": config, "extra": json.dumps(extra or {})}
    if part is not None:
        metadata.update(contents=part)
    if part == "dit":
        metadata.update(autoencoder_fingerprint=weights_fingerprint(model.autoencoder),
                        latent_fingerprint=latent_space_fingerprint(model.autoencoder))
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


def file_metadata(file: Path) -> dict[str, str]:
    """The raw safetensors metadata of one file."""
    try:
        with safe_open(str(file), framework="pt") as f:
            return f.metadata() or {}
    except (SafetensorError, OSError, ValueError) as e:
        raise CheckpointError(f"{file} is not a valid safetensors checkpoint (corrupt or truncated): {e}") from None


def check_shards_agree(files: list[Path]) -> dict[str, str]:
    """The shared raw metadata of ``files``; a shard whose metadata differs is from another checkpoint."""
    meta = file_metadata(files[0])
    for file in files[1:]:
        other = file_metadata(file)
        if other != meta:
            differ = sorted(k for k in set(meta) | set(other) if meta.get(k) != other.get(k))
            raise CheckpointError(
                f"shard {file} belongs to another checkpoint than {files[0].name}: its metadata {differ} differs"
            )
    return meta


def interpolation_key(tree, prefix: str = "") -> str | None:
    """The dotted key of the first string in ``tree`` holding an omegaconf ``${...}`` interpolation."""
    if isinstance(tree, str):
        return prefix if "${" in tree else None
    items = tree.items() if isinstance(tree, dict) else enumerate(tree) if isinstance(tree, list) else ()
    for key, value in items:
        found = interpolation_key(value, f"{prefix}.{key}" if prefix else str(key))
        if found is not None:
            return found
    return None


def value_problem(key: str, value, like) -> str | None:
    """Why ``value`` cannot stand at ``key`` where the schema has ``like`` (None if it can)."""
    if isinstance(like, str):
        return None if isinstance(value, str) else f"{key} must be a string, got {value!r:.80}"
    if isinstance(like, int) and not isinstance(like, bool):
        if isinstance(value, bool) or not isinstance(value, int):
            return f"{key} must be an integer, got {value!r:.80}"
        name = key.split(".")[-1].split("[")[0]
        low, high = int(name not in MAY_BE_ZERO), MAX_COUNT if name in COUNTS else MAX_SIZE
        return None if low <= value <= high else f"{key} must be between {low} and {high}, got {value}"
    if isinstance(like, float):
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
            return f"{key} must be a finite number, got {value!r:.80}"
        return None
    if isinstance(like, (list, tuple)):
        if not isinstance(value, list) or len(value) > MAX_COUNT:
            return f"{key} must be a list of at most {MAX_COUNT} items, got {value!r:.80}"
        return next((p for i, v in enumerate(value) if like and (p := value_problem(f"{key}[{i}]", v, like[0]))), None)
    if isinstance(like, dict):
        if not isinstance(value, dict):
            return f"{key} must be a mapping, got {type(value).__name__}"
        inner = (value_problem(f"{key}.{k}" if key else k, v, like[k]) for k, v in value.items() if k in like)
        return next((p for p in inner if p), None)
    return None


def check_config(config, path) -> None:
    """Raise CheckpointError unless ``config`` is a mapping of the schema's types, sizes and no interpolation."""
    if not isinstance(config, dict):
        raise CheckpointError(f"{path}: the config must be a mapping, got {type(config).__name__}")
    key = interpolation_key(config)
    if key is not None:
        raise CheckpointError(f"{path}: config key {key} holds an omegaconf interpolation ${{...}}; refusing to resolve it")
    problem = value_problem("", config, SCHEMA)
    if problem:
        raise CheckpointError(f"{path}: bad model config: {problem}")


def read_metadata(path: str | os.PathLike) -> dict:
    """The checkpoint's metadata (format, version, config dict, extra dict; a partial one's contents, and
    a DiT-only one's autoencoder_fingerprint), validated."""
    files = checkpoint_files(path)
    meta, path = check_shards_agree(files), files[0]
    if meta.get("format") != FORMAT:
        raise CheckpointError(f"{path} is a safetensors file but not a worldmodel checkpoint (no format={FORMAT} metadata)")
    if meta.get("version") != VERSION:
        raise CheckpointError(f"{path} has checkpoint version {meta.get('version')!r}; this code reads version {VERSION}")
    try:
        meta = {**meta, "config": json.loads(meta["config"]), "extra": json.loads(meta.get("extra", "{}"))}
    except (KeyError, json.JSONDecodeError) as e:
        raise CheckpointError(f"{path} has unreadable config metadata: {e}") from None
    check_config(meta["config"], path)
    if "contents" in meta and meta["contents"] not in PARTS:
        raise CheckpointError(f"{path} has contents {meta['contents']!r:.40}; this code reads full checkpoints and "
                              f"the parts {sorted(PARTS)}")
    if meta.get("contents") == "dit":
        if not FINGERPRINT.fullmatch(meta.get("autoencoder_fingerprint", "")):
            raise CheckpointError(f"{path} is DiT-only but has no valid autoencoder_fingerprint (64 hex digits)")
        if not FINGERPRINT.fullmatch(meta.get("latent_fingerprint", "0" * 64)):
            raise CheckpointError(f"{path} has an invalid latent_fingerprint (not 64 hex digits)")
    return meta


def build(config: dict, path, device=None) -> WorldModel:
    """The model ``config`` describes, on ``device`` (e.g. "meta": shapes only, no allocation)."""
    try:
        with torch.device(device or "cpu"):
            return WorldModel(OmegaConf.create(config))
    except (ValueError, TypeError) as e:
        raise CheckpointError(f"{path}: bad model config: {e}") from None


def read_state(files: list[Path]) -> dict:
    """All tensors of ``files``; a name in two shards is refused."""
    state = {}
    for file in files:
        try:
            tensors = load_file(str(file))
        except (SafetensorError, OSError, ValueError) as e:
            raise CheckpointError(f"{file} is not a valid safetensors checkpoint (corrupt or truncated): {e}") from None
        twice = sorted(set(tensors) & set(state))
        if twice:
            raise CheckpointError(f"shard {file} repeats tensor(s) {twice[:3]} of an earlier shard")
        state.update(tensors)
    return state


def load(path: str | os.PathLike, device="cpu", dtype: torch.dtype = torch.float32,
         autoencoder_from: str | os.PathLike | WorldModel | None = None, untrained_dit: bool = False) -> WorldModel:
    """Build the model its config describes and load the weights, checking every tensor first. A DiT-only
    checkpoint needs ``autoencoder_from`` (a checkpoint path or a WorldModel), whose autoencoder must have
    the config and the fingerprint the file records; a full checkpoint takes none. An autoencoder-only
    checkpoint loads only with ``untrained_dit`` (for callers that use the autoencoder alone): its DiT is
    as the constructor initialises it."""
    meta = read_metadata(path)
    part = meta.get("contents")
    if part == "dit" and autoencoder_from is None:
        raise CheckpointError(f"{path} holds only the DiT and needs an autoencoder: join it with an autoencoder "
                              f"checkpoint (python -m worldmodel.checkpoint join)")
    if part != "dit" and autoencoder_from is not None:
        raise CheckpointError(f"{path} is {'a full' if part is None else 'an autoencoder-only'} checkpoint with its own "
                              f"autoencoder; only a DiT-only one takes another")
    if part == "autoencoder" and not untrained_dit:
        raise CheckpointError(f"{path} holds only an autoencoder, no trained DiT: give it as a stage's init.autoencoder, "
                              f"as join's AUTOENCODER_CHECKPOINT or to train.evaluate --autoencoder-only")
    state = read_state(checkpoint_files(path))
    expected = build(meta["config"], path, "meta").state_dict()
    check_state({k: v for k, v in expected.items() if k.startswith(PARTS.get(part, ""))}, state, path)
    if part == "dit":
        source = autoencoder_from if isinstance(autoencoder_from, WorldModel) else load(autoencoder_from, untrained_dit=True)
        check_autoencoder(meta, source, path, autoencoder_from)
        state.update({f"autoencoder.{k}": v for k, v in source.autoencoder.state_dict().items()})
    model = build(meta["config"], path)
    model.load_state_dict({k: v.to(dtype) if v.is_floating_point() else v for k, v in state.items()},
                          strict=part != "autoencoder")
    return model.to(device).eval()


def check_autoencoder(meta: dict, source: WorldModel, path, source_name) -> None:
    """Raise CheckpointError unless ``source``'s autoencoder has the config and the latent space (or, for an
    older file, the weights) that the DiT-only checkpoint ``path`` (metadata ``meta``) records."""
    name = "the given model" if isinstance(source_name, WorldModel) else str(source_name)
    wanted = AutoencoderConfig.from_dict(meta["config"]["autoencoder"]).to_dict()
    found = AutoencoderConfig.from_dict(OmegaConf.to_container(source.config.autoencoder)).to_dict()
    differ = sorted(k for k in wanted if wanted[k] != found[k])
    if differ:
        raise CheckpointError(f"{name}: its autoencoder config differs from the one {path}'s DiT was trained against "
                              f"(keys {differ})")
    if "latent_fingerprint" in meta:
        what, wanted_fp, fingerprint = "encoder and latent statistics", meta["latent_fingerprint"], \
            latent_space_fingerprint(source.autoencoder)
    else:  # an older file: the whole autoencoder
        what, wanted_fp, fingerprint = "weights", meta["autoencoder_fingerprint"], weights_fingerprint(source.autoencoder)
    if fingerprint != wanted_fp:
        raise CheckpointError(f"{name}: its autoencoder's {what} (fingerprint {fingerprint[:12]}) are not those {path}'s "
                              f"DiT was trained against ({wanted_fp[:12]})")


def check_tensor(name: str, expected: torch.Tensor, found: torch.Tensor, path) -> None:
    """Raise CheckpointError unless ``found`` has ``expected``'s shape, a compatible dtype and finite values."""
    if tuple(found.shape) != tuple(expected.shape):
        raise CheckpointError(
            f"{path}: tensor {name} has shape {tuple(found.shape)} in the file but the config gives {tuple(expected.shape)}"
        )
    if found.dtype != expected.dtype and not (found.is_floating_point() and expected.is_floating_point()):
        raise CheckpointError(f"{path}: tensor {name} has dtype {found.dtype} in the file but the model holds {expected.dtype}")
    values = found.float() if found.element_size() == 1 else found  # float8 has no isfinite
    if found.is_floating_point() and not torch.isfinite(values).all():
        raise CheckpointError(f"{path}: tensor {name} holds NaN or infinite values")


def check_state(expected: dict, found: dict, path) -> None:
    """Raise CheckpointError if ``found`` lacks, adds or reshapes any tensor of ``expected``, changes
    its dtype other than float to float, or holds a non-finite weight."""
    missing = sorted(set(expected) - set(found))
    unexpected = sorted(set(found) - set(expected))
    if missing or unexpected:
        raise CheckpointError(
            f"{path}: tensors do not match the config: missing {missing[:3]}{'...' if len(missing) > 3 else ''}, "
            f"unexpected {unexpected[:3]}{'...' if len(unexpected) > 3 else ''}"
        )
    for name, tensor in expected.items():
        check_tensor(name, tensor, found[name], path)


def build_parser() -> ArgumentParser:
    parser = ArgumentParser(prog="python -m worldmodel.checkpoint",
                            description="Split a checkpoint's DiT or autoencoder off, or join a DiT-only file with an "
                                        "autoencoder.")
    sub = parser.add_subparsers(dest="command", required=True)
    for command, what in (("dit-only", "DiT alone, with its autoencoder's fingerprint"),
                          ("autoencoder-only", "autoencoder alone (a latent space no DiT is trained on yet)")):
        p = sub.add_parser(command, help=f"write CHECKPOINT's {what}")
        p.add_argument("checkpoint")
        p.add_argument("out")
        p.add_argument("--dtype", choices=DTYPES, default="float32", help="of the weights written (default float32)")
    p = sub.add_parser("join", help="write a full checkpoint: DIT_FILE's DiT with AUTOENCODER_CHECKPOINT's autoencoder")
    p.add_argument("dit_file")
    p.add_argument("autoencoder_checkpoint")
    p.add_argument("out")
    p.add_argument("--dtype", choices=DTYPES, default="float32", help="of the weights written (default float32)")
    return parser


def run_command(argv: list[str] | None) -> int:
    args = build_parser().parse_args(argv)
    if Path(args.out).suffix != ".safetensors":
        raise CheckpointError(f"OUT {args.out} must be a .safetensors file")
    source = args.dit_file if args.command == "join" else args.checkpoint
    model = load(source, autoencoder_from=args.autoencoder_checkpoint if args.command == "join" else None,
                 untrained_dit=args.command == "autoencoder-only")
    part = {"dit-only": "dit", "autoencoder-only": "autoencoder"}.get(args.command)
    for file in save(args.out, model, DTYPES[args.dtype], read_metadata(source)["extra"], part=part):
        print(f"wrote {file} ({file.stat().st_size / 2**20:.1f} MiB)")
    return 0


def main(argv: list[str] | None = None) -> int:
    return run_cli(lambda: run_command(argv))


if __name__ == "__main__":
    sys.exit(main())
