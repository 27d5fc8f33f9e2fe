"""Run configuration: ``configs/base.yaml`` <- ``configs/model/<preset>.yaml`` <- ``configs/<stage>.yaml``
<- command-line ``key=value`` overrides. Presets may only set keys of the base; a stage file adds
its own sections; the command line may only set keys that exist (struct mode: a typo is an error).

The ``model`` subtree is the :class:`worldmodel.model.WorldModel` configuration. A stage that
creates a network builds it from the preset (:func:`worldmodel.model.model_config`, whose
architecture numbers live in ``worldmodel.model.PRESETS``) and the data (action spec, controller,
frame size); a stage that continues one takes it from its input checkpoint. ``model.*``
overrides are applied on top, limited to what the stage may change.

Values are checked when the config is composed (so ``--print-config`` checks them too): a
command-line value must have the type of the value it replaces (``data.batch=abc`` is an error),
counts such as ``run.steps`` must be positive, and ``run.device`` must name a device. Config files
are untrusted YAML: an alias bomb or any other YAML error is one line.
"""

from __future__ import annotations

import importlib.util
import json
import math
import re
from pathlib import Path

import yaml
from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from worldmodel.cli_args import DEVICE
from worldmodel.model import PRESETS, dit_config, model_config

CONFIG_DIR = Path(__file__).parent / "configs"
STAGES = ("autoencoder", "teacher", "ar_teacher", "causal_cd", "causal_ode", "causal_scm", "dmd")
POSITIVE = ("run.steps", "run.checkpoint_every", "run.keep_checkpoints", "run.log_every", "data.batch", "data.clip_len")
NON_NEGATIVE = ("seed", "run.time_limit_s", "run.export_every_s", "run.sample_every", "data.workers", "data.max_warmup")


class TrainConfigError(ValueError):
    """A configuration or override that cannot be used."""


def first_line(error: Exception) -> str:
    return (str(error).strip().splitlines() or [type(error).__name__])[0]


def load_yaml(path: Path) -> DictConfig:
    """A YAML config file as a DictConfig; unreadable files, YAML errors (alias bombs included) and
    non-mappings raise one TrainConfigError line."""
    try:
        cfg = OmegaConf.load(path)
    except OSError as e:
        raise TrainConfigError(f"cannot read config {path}: {e.strerror or e}") from None
    except (OmegaConfBaseException, yaml.YAMLError) as e:
        raise TrainConfigError(f"cannot read config {path}: {first_line(e)}") from None
    if not isinstance(cfg, DictConfig):
        raise TrainConfigError(f"config {path} must be a mapping of keys, not a list")
    return cfg


def parse_overrides(overrides: list[str]) -> DictConfig:
    """``["a.b=1", ...]`` -> a config tree; every item needs ``=``."""
    for item in overrides:
        if "=" not in item or item.startswith("="):
            raise TrainConfigError(f"override {item!r} is not key=value")
    try:
        return OmegaConf.from_dotlist(list(overrides))
    except (OmegaConfBaseException, yaml.YAMLError) as e:
        raise TrainConfigError(f"cannot parse overrides {overrides}: {first_line(e)}") from None


def merge_strict(base: DictConfig, update: DictConfig, what: str) -> DictConfig:
    """Merge ``update`` into a struct-mode copy of ``base``; unknown keys raise one clear line."""
    OmegaConf.set_struct(base, True)
    try:
        return OmegaConf.merge(base, update)
    except OmegaConfBaseException as e:
        key = getattr(e, "full_key", None)
        if key is not None and "not in struct" in str(e):
            raise TrainConfigError(f"unknown config key {key!r} in {what}") from None
        raise TrainConfigError(f"bad value in {what}: {first_line(e)} (key {key})") from None


def compose(stage: str, overrides: list[str]) -> tuple[DictConfig, DictConfig]:
    """The run configuration of ``stage`` (without ``model``) and the ``model.*`` overrides."""
    if stage not in STAGES:
        raise TrainConfigError(f"unknown stage {stage!r}; choose one of {list(STAGES)}")
    given = parse_overrides(overrides)
    model_overrides = given.pop("model", None) or OmegaConf.create({})
    base = load_yaml(CONFIG_DIR / "base.yaml")
    stage_cfg = load_yaml(CONFIG_DIR / f"{stage}.yaml")
    preset = str(given.get("preset", stage_cfg.get("preset", base.preset)))
    if preset not in PRESETS:
        raise TrainConfigError(f"unknown model preset {preset!r}; choose one of {sorted(PRESETS)}")
    preset_path = CONFIG_DIR / "model" / f"{preset}.yaml"
    cfg = merge_strict(base, load_yaml(preset_path), f"preset {preset_path.name}")
    OmegaConf.set_struct(cfg, False)
    cfg = OmegaConf.merge(cfg, stage_cfg)  # a stage adds its own sections and init keys
    OmegaConf.set_struct(cfg.data.world_options, False)  # passed through to the world as keyword arguments
    check_override_types(cfg, given)
    cfg = merge_strict(cfg, given, "the command line")
    cfg.stage = stage
    check_values(cfg)
    return cfg, model_overrides


def type_problem(key: str, default, value) -> str | None:
    """Why ``value`` cannot replace ``default`` at ``key`` (None if it can): numbers stay (finite)
    numbers, integers integers, booleans booleans, lists lists and mappings mappings."""
    number = isinstance(value, (int, float)) and not isinstance(value, bool)
    if isinstance(default, bool):
        ok = isinstance(value, bool)
    elif isinstance(default, int):
        ok = number and isinstance(value, int)
    elif isinstance(default, float):
        ok = number and math.isfinite(value)
    elif isinstance(default, (list, dict)):
        ok = isinstance(value, type(default))
    else:
        return None
    return None if ok else f"{key} must be {type(default).__name__} like its default {default!r}, got {value!r:.80}"


def check_override_types(cfg: DictConfig, given: DictConfig) -> None:
    """Raise TrainConfigError if a command-line value has another type than the value it replaces."""
    defaults, values = OmegaConf.to_container(cfg, resolve=False), OmegaConf.to_container(given, resolve=False)
    for key in _flatten(values):
        problem = type_problem(key, _lookup(defaults, key), _lookup(values, key))
        if problem:
            raise TrainConfigError(problem)


def check_values(cfg: DictConfig) -> None:
    """Raise TrainConfigError for a count out of range or an unknown ``run.device``."""
    for key in POSITIVE + NON_NEGATIVE:
        value = OmegaConf.select(cfg, key)
        low = 1 if key in POSITIVE else 0
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not (math.isfinite(value) and value >= low):
            raise TrainConfigError(f"{key} must be a number of at least {low}, got {value!r:.80}")
    device = str(cfg.run.device)
    if device != "auto" and not DEVICE.fullmatch(device):
        raise TrainConfigError(f"run.device must be auto, cpu, cuda or cuda:N, got {device!r}")
    run_dir = Path(str(cfg.run.dir))
    if run_dir.exists() and not run_dir.is_dir():
        raise TrainConfigError(f"run.dir {run_dir} is a file, not a folder")
    if cfg.run.get("tensorboard") is True and importlib.util.find_spec("tensorboard") is None:
        raise TrainConfigError("run.tensorboard=true needs the tensorboard extra: pip install -e '.[tensorboard]'")


def yaml_comments(path: Path) -> dict[str, str]:
    """``{dotted key: its end-of-line comment}`` of a config file (for the stage help)."""
    comments, stack = {}, []
    for line in path.read_text().splitlines():
        m = re.match(r"( *)([A-Za-z_]\w*):([^#]*)(?:#\s*(.*))?$", line)
        if not m:
            continue
        depth = len(m.group(1)) // 2
        stack[depth:] = [m.group(2)]
        if m.group(4):
            comments[".".join(stack)] = m.group(4).strip()
    return comments


def stage_help(stage: str) -> str:
    """The keys of ``stage``'s config with their defaults and comments, one line each."""
    cfg, _ = compose(stage, [])
    comments = {**yaml_comments(CONFIG_DIR / "base.yaml"), **yaml_comments(CONFIG_DIR / f"{stage}.yaml")}
    tree = OmegaConf.to_container(cfg, resolve=False)  # ??? (required) and ${...} stay as written
    tree.pop("model", None)
    lines = []
    for key in _flatten(tree):
        value = _lookup(tree, key)
        shown = f"  {key}={'??? (required)' if value == '???' else json.dumps(value)}"
        lines.append(f"{shown:<44} {comments.get(key, '')}".rstrip())
    header = (CONFIG_DIR / f"{stage}.yaml").read_text().splitlines()[0].lstrip("# ")
    return "\n".join([f"usage: python -m train {stage} [key=value ...] [--print-config]", header, "",
                      "keys (default value, then what it does; model.* keys come from the preset or the input checkpoint):",
                      *lines])


def require(cfg: DictConfig, key: str, hint: str):
    """The value of ``key``, or a clear error if it is missing (``???``)."""
    value = OmegaConf.select(cfg, key, default=None)  # None for absent, null and ??? alike
    if value is None:
        raise TrainConfigError(f"{key} is required: {hint}")
    return value


def fresh_model_config(preset: str, data_info) -> DictConfig:
    """A new WorldModel configuration of ``preset`` for frames, actions and controller of ``data_info``."""
    try:
        return model_config(preset, data_info.source, data_info.action_spec, data_info.controller,
                            frame_size=(data_info.height, data_info.width))
    except (TypeError, ValueError) as e:
        raise TrainConfigError(f"model config: {e}") from None


def apply_model_overrides(model_cfg: DictConfig, overrides: DictConfig, allowed: tuple[str, ...], stage: str) -> DictConfig:
    """Merge ``model.*`` overrides, each of which must lie under one of the ``allowed`` prefixes."""
    flat = _flatten(OmegaConf.to_container(overrides))
    for key in flat:
        if not any(key == a or key.startswith(a + ".") for a in allowed):
            raise TrainConfigError(
                f"model.{key} cannot be changed in stage {stage} (it comes from the input checkpoint); "
                f"changeable here: {['model.' + a for a in allowed] or 'nothing'}"
            )
    merged = merge_strict(model_cfg, overrides, "the model overrides")
    try:
        dit_config(merged)  # the autoencoder and DiT settings are valid together
    except (TypeError, ValueError) as e:
        raise TrainConfigError(f"model config: {e}") from None
    return merged


def _lookup(tree, key: str):
    """The value at dotted ``key`` of a nested dict, None where it is absent."""
    for part in key.split("."):
        tree = tree.get(part) if isinstance(tree, dict) else None
    return tree


def _flatten(d, prefix: str = "") -> list[str]:
    if not isinstance(d, dict):
        return [prefix]
    keys = []
    for k, v in d.items():
        keys += _flatten(v, f"{prefix}{k}.") if isinstance(v, dict) else [f"{prefix}{k}"]
    return keys
