"""Run configuration: ``configs/base.yaml`` <- ``configs/model/<preset>.yaml`` <- ``configs/<stage>.yaml``
<- command-line ``key=value`` overrides. Presets may only set keys of the base; a stage file adds
its own sections; the command line may only set keys that exist (struct mode: a typo is an error).

The ``model`` subtree is the :class:`worldmodel.model.WorldModel` configuration. A stage that
creates a network builds it from the preset (:func:`worldmodel.model.model_config`, whose
architecture numbers live in ``worldmodel.model.PRESETS``) and the data (action spec, controller,
frame size); a stage that continues one takes it from its input checkpoint. ``model.*``
overrides are applied on top, limited to what the stage may change.
"""

from __future__ import annotations

from pathlib import Path

from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from worldmodel.autoencoder import AutoencoderConfig
from worldmodel.model import model_config
from worldmodel.transformer import DiTConfig

CONFIG_DIR = Path(__file__).parent / "configs"
STAGES = ("autoencoder", "teacher", "ar_teacher", "causal_cd", "causal_ode", "dmd")


class TrainConfigError(ValueError):
    """A configuration or override that cannot be used."""


def _load_yaml(path: Path) -> DictConfig:
    try:
        return OmegaConf.load(path)
    except (OSError, OmegaConfBaseException) as e:
        raise TrainConfigError(f"cannot read config {path}: {e}") from None


def parse_overrides(overrides: list[str]) -> DictConfig:
    """``["a.b=1", ...]`` -> a config tree; every item needs ``=``."""
    for item in overrides:
        if "=" not in item or item.startswith("="):
            raise TrainConfigError(f"override {item!r} is not key=value")
    try:
        return OmegaConf.from_dotlist(list(overrides))
    except OmegaConfBaseException as e:
        raise TrainConfigError(f"cannot parse overrides {overrides}: {str(e).splitlines()[0]}") from None


def merge_strict(base: DictConfig, update: DictConfig, what: str) -> DictConfig:
    """Merge ``update`` into a struct-mode copy of ``base``; unknown keys raise one clear line."""
    OmegaConf.set_struct(base, True)
    try:
        return OmegaConf.merge(base, update)
    except OmegaConfBaseException as e:
        key = getattr(e, "full_key", None)
        if key is not None and "not in struct" in str(e):
            raise TrainConfigError(f"unknown config key {key!r} in {what}") from None
        raise TrainConfigError(f"bad value in {what}: {str(e).splitlines()[0]} (key {key})") from None


def compose(stage: str, overrides: list[str]) -> tuple[DictConfig, DictConfig]:
    """The run configuration of ``stage`` (without ``model``) and the ``model.*`` overrides."""
    if stage not in STAGES:
        raise TrainConfigError(f"unknown stage {stage!r}; choose one of {list(STAGES)}")
    given = parse_overrides(overrides)
    model_overrides = given.pop("model", None) or OmegaConf.create({})
    base = _load_yaml(CONFIG_DIR / "base.yaml")
    stage_cfg = _load_yaml(CONFIG_DIR / f"{stage}.yaml")
    preset = str(given.get("preset", stage_cfg.get("preset", base.preset)))
    preset_path = CONFIG_DIR / "model" / f"{preset}.yaml"
    if not preset_path.is_file():
        known = sorted(p.stem for p in (CONFIG_DIR / "model").glob("*.yaml"))
        raise TrainConfigError(f"unknown model preset {preset!r}; choose one of {known}")
    cfg = merge_strict(base, _load_yaml(preset_path), f"preset {preset_path.name}")
    OmegaConf.set_struct(cfg, False)
    cfg = OmegaConf.merge(cfg, stage_cfg)  # a stage adds its own sections and init keys
    OmegaConf.set_struct(cfg.data.world_options, False)  # passed through to the world as keyword arguments
    cfg = merge_strict(cfg, given, "the command line")
    cfg.stage = stage
    return cfg, model_overrides


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


def fit_dit_to_autoencoder(cfg: DictConfig) -> DictConfig:
    """Set the DiT's latent size to what ``cfg.autoencoder`` produces (validating both)."""
    try:
        c, h, w = AutoencoderConfig.from_dict(OmegaConf.to_container(cfg.autoencoder)).latent_shape
        cfg.dit.latent_channels, cfg.dit.latent_height, cfg.dit.latent_width = c, h, w
        DiTConfig.from_dict(OmegaConf.to_container(cfg.dit))
    except (TypeError, ValueError) as e:
        raise TrainConfigError(f"model config: {e}") from None
    return cfg


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
    return fit_dit_to_autoencoder(merged)


def _flatten(d, prefix: str = "") -> list[str]:
    if not isinstance(d, dict):
        return [prefix]
    keys = []
    for k, v in d.items():
        keys += _flatten(v, f"{prefix}{k}.") if isinstance(v, dict) else [f"{prefix}{k}"]
    return keys
