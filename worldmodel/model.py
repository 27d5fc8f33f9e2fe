"""The world model bundle: autoencoder + DiT + the action/camera specs + sampler settings.

Its configuration is one omegaconf tree (stored in every checkpoint)::

    world: procedural            # which ground-truth world it was trained on (or "custom")
    stage: untrained             # the training stage that produced the weights
    actions: {keys, mouse_scale}
    controller: {walk_speed, sprint_factor, max_pitch, eye_height}
    autoencoder: {... AutoencoderConfig}
    dit: {... DiTConfig without DERIVED_DIT_FIELDS}
    sampler: {solver, steps, first_frame_steps, guidance, context_noise}

The DiT's latent shape and action width follow from the autoencoder and the actions: they are
derived on load (:func:`dit_config`), not saved. Presets (``tiny`` for tests, ``default``, the
shipped size, and ``large``) live here only; ``train/configs/model/<preset>.yaml`` adds training settings.
"""

from __future__ import annotations

import copy

import torch
from omegaconf import DictConfig, OmegaConf
from torch import nn

from worldmodel.actions import ActionSpec
from worldmodel.autoencoder import AutoencoderConfig, FrameAutoencoder
from worldmodel.camera import ControllerSpec
from worldmodel.transformer import ConfigError, DiTConfig, WorldDiT

WORLD_FRAME_SIZE = {"procedural": (128, 128), "doom": (120, 160)}
"""(height, width) of each built-in world's frames."""

DEFAULT_SAMPLER = {"solver": "renoise", "steps": [1.0, 0.5], "first_frame_steps": [1.0, 0.95, 0.9, 0.83, 0.7, 0.5, 0.3, 0.1],
                   "guidance": 1.0, "context_noise": 0.0}
"""The students' sampler (worldmodel.session.SOLVERS); the AR teacher stage exports a guided Euler one."""

PRESETS = {
    "tiny": {
        "autoencoder": {"encoder_channels": [8, 8, 16, 16], "encoder_blocks": 1, "decoder_channels": [16, 8, 8], "decoder_blocks": [1, 1, 1], "latent_channels": 4},
        "dit": {"dim": 32, "depth": 2, "heads": 2, "window_frames": 6, "sink_frames": 1},
        "frame": (32, 32),
    },
    "default": {  # sized for >= 20 FPS (2 steps, frame-wise) on a 2-core CPU: see worldmodel.bench
        "autoencoder": {"encoder_blocks": 1},
        "dit": {"dim": 256, "depth": 6, "heads": 4, "mlp_ratio": 3.0, "window_frames": 12, "sink_frames": 1},
    },
    "large": {
        "autoencoder": {"encoder_blocks": 1},
        "dit": {"dim": 512, "depth": 12, "heads": 8, "window_frames": 16, "sink_frames": 1},
    },
}


DERIVED_DIT_FIELDS = ("latent_channels", "latent_height", "latent_width", "action_dim")
"""The DiT settings the autoencoder's latent shape and the action width determine."""


def dit_config(config: DictConfig) -> DiTConfig:
    """The DiT's configuration: ``config.dit`` with :data:`DERIVED_DIT_FIELDS` from ``config.autoencoder``
    and ``config.actions``. A derived field still stored (older checkpoints hold them) must agree."""
    channels, height, width = AutoencoderConfig.from_dict(OmegaConf.to_container(config.autoencoder)).latent_shape
    derived = {"latent_channels": channels, "latent_height": height, "latent_width": width,
               "action_dim": ActionSpec.from_dict(OmegaConf.to_container(config.actions)).width}
    stored = OmegaConf.to_container(config.dit)
    for key, value in derived.items():
        if stored.get(key, value) != value:
            raise ConfigError(f"dit.{key} is {stored[key]} but the autoencoder and the actions give {value}")
    return DiTConfig.from_dict({**stored, **derived})


def model_config(preset: str = "default", world: str = "procedural", action_spec: ActionSpec | None = None,
                 controller: ControllerSpec | None = None, block_size: int = 1,
                 frame_size: tuple[int, int] | None = None) -> DictConfig:
    """The full configuration tree of a preset for a world (see the module docstring).

    ``frame_size`` (height, width) defaults to the preset's (tiny) or the world's.
    """
    if preset not in PRESETS:
        raise ConfigError(f"unknown model preset {preset!r}; choose one of {sorted(PRESETS)}")
    p = copy.deepcopy(PRESETS[preset])
    height, width = frame_size or p.pop("frame", None) or WORLD_FRAME_SIZE.get(world, (128, 128))
    ae = AutoencoderConfig(**{**p["autoencoder"], "frame_height": height, "frame_width": width})
    dit = DiTConfig(**p["dit"], block_size=block_size).to_dict()
    return OmegaConf.create({
        "world": world,
        "stage": "untrained",
        "actions": (action_spec or ActionSpec()).to_dict(),
        "controller": (controller or ControllerSpec()).to_dict(),
        "autoencoder": ae.to_dict(),
        "dit": {k: v for k, v in dit.items() if k not in DERIVED_DIT_FIELDS},
        "sampler": copy.deepcopy(DEFAULT_SAMPLER),
    })


class WorldModel(nn.Module):
    """Autoencoder + DiT with the specs that make play and training agree."""

    def __init__(self, config: DictConfig):
        super().__init__()
        known = {"world", "stage", "actions", "controller", "autoencoder", "dit", "sampler"}
        unknown = set(config) - known
        if unknown:
            raise ConfigError(f"unknown model config keys {sorted(unknown)}; known: {sorted(known)}")
        missing = known - set(config)
        if missing:
            raise ConfigError(f"model config lacks keys {sorted(missing)}")
        self.action_spec = ActionSpec.from_dict(OmegaConf.to_container(config.actions))
        self.controller = ControllerSpec.from_dict(OmegaConf.to_container(config.controller))
        self.autoencoder = FrameAutoencoder(AutoencoderConfig.from_dict(OmegaConf.to_container(config.autoencoder)))
        self.dit = WorldDiT(dit_config(config))
        self.config = config.copy()  # what a checkpoint saves: without the derived fields
        self.config.dit = {k: v for k, v in config.dit.items() if k not in DERIVED_DIT_FIELDS}

    @property
    def frame_size(self) -> tuple[int, int]:
        return int(self.config.autoencoder.frame_height), int(self.config.autoencoder.frame_width)

    def num_parameters(self) -> dict:
        count = lambda m: sum(p.numel() for p in m.parameters())  # noqa: E731
        return {"autoencoder": count(self.autoencoder), "dit": count(self.dit)}


def with_kv_cache(model: WorldModel, sink_frames: int, window_frames: int) -> WorldModel:
    """``model``'s weights playing with another KV cache: its ``sink_frames`` first frames kept, then a rolling
    window of the last ``window_frames`` (the weights do not depend on either). A new model on the same device."""
    config = model.config.copy()
    config.dit.sink_frames, config.dit.window_frames = sink_frames, window_frames
    other = WorldModel(config)
    other.load_state_dict(model.state_dict())
    return other.to(next(model.parameters()).device)


def build_model(preset: str = "default", world: str = "procedural", seed: int = 0, **kw) -> WorldModel:
    """A freshly initialised model of a preset (weights from ``seed``)."""
    torch.manual_seed(seed)
    return WorldModel(model_config(preset, world, **kw))
