"""Model plumbing shared by the stages: input checkpoints, batches to model inputs, network
closures for :mod:`train.algorithms`, and sample videos generated block by block with the KV cache
(:mod:`worldmodel.rollout`)."""

from __future__ import annotations

import copy
from dataclasses import dataclass
from typing import Callable, Sequence

import torch
from omegaconf import OmegaConf
from torch import nn

from worldmodel import checkpoint, flow
from worldmodel.actions import ActionSpec, normalize_actions
from worldmodel.camera import ControllerSpec
from worldmodel.frames import to_model, to_uint8
from worldmodel.model import DEFAULT_SAMPLER, WorldModel
from worldmodel.rollout import CachedRollout, block_ranges  # noqa: F401  (the stages' names for them)
from worldmodel.transformer import WorldDiT

Tensor = torch.Tensor


class StageInputError(ValueError):
    """An input checkpoint that does not fit the stage."""


def load_input(path, key: str, accepted: Sequence[str], stage: str) -> WorldModel:
    """The WorldModel at ``path`` (config key ``key``), which must come from one of the ``accepted`` stages."""
    try:
        meta = checkpoint.read_metadata(path)
    except checkpoint.CheckpointError as e:
        raise StageInputError(f"{key}: {e}") from None
    produced = meta["config"].get("stage", "untrained")
    if produced not in accepted:
        raise StageInputError(
            f"{key}: {path} was produced by stage {produced!r}; stage {stage} needs a checkpoint from "
            f"{' or '.join(repr(a) for a in accepted)}"
        )
    try:
        return checkpoint.load(path)
    except checkpoint.CheckpointError as e:
        raise StageInputError(f"{key}: {e}") from None


def check_same_autoencoder(a: WorldModel, b: WorldModel, what: str) -> None:
    """Two models must share one latent space: identical autoencoder config and weights."""
    if a.config.autoencoder != b.config.autoencoder:
        raise StageInputError(f"{what} have different autoencoder configs; they must share one latent space")
    sa, sb = a.autoencoder.state_dict(), b.autoencoder.state_dict()
    if any(not torch.equal(sa[k], sb[k]) for k in sa):
        raise StageInputError(f"{what} have different autoencoder weights; they must share one latent space")


def check_data_fits(model_cfg, data_info, what: str) -> None:
    """The data's action spec, controller and frame size must be the model's."""
    actions = ActionSpec.from_dict(OmegaConf.to_container(model_cfg.actions))
    if actions != data_info.action_spec:
        raise StageInputError(f"{what} uses actions {actions.to_dict()} but the data has {data_info.action_spec.to_dict()}")
    controller = ControllerSpec.from_dict(OmegaConf.to_container(model_cfg.controller))
    if controller != data_info.controller:
        raise StageInputError(f"{what} uses controller {controller.to_dict()} but the data has {data_info.controller.to_dict()}")
    size = (int(model_cfg.autoencoder.frame_height), int(model_cfg.autoencoder.frame_width))
    if size != (data_info.height, data_info.width):
        raise StageInputError(
            f"{what} works on {size[1]}x{size[0]} frames but the data has {data_info.width}x{data_info.height}"
        )


def frozen(module: nn.Module) -> nn.Module:
    """``module`` in eval mode without gradients (teachers, score networks)."""
    return module.eval().requires_grad_(False)


def trainable_copy(module: nn.Module) -> nn.Module:
    return copy.deepcopy(module).train().requires_grad_(True)


def ema_copy(module: nn.Module) -> nn.Module:
    return frozen(copy.deepcopy(module))


@dataclass
class Clip:
    """A batch on the device, as the networks take it: ``actions [B, T, A]`` normalised,
    ``poses [B, T, 4, 4]``, ``frames [B, T, 3, H, W]`` in [-1, 1] when the batch has frames, and
    ``latents [B, T, C, h, w]`` when it comes from the latent cache (:mod:`train.latents`)."""

    actions: Tensor
    poses: Tensor
    frames: Tensor | None = None
    latents: Tensor | None = None


def to_clip(batch: dict, action_spec: ActionSpec, device) -> Clip:
    """A data batch (uint8 frames or cached latents, raw actions) on ``device``."""
    actions = normalize_actions(batch["actions"].to(device, non_blocking=True).float(), action_spec)
    frames = to_model(batch["frames"].to(device, non_blocking=True)) if "frames" in batch else None
    latents = batch["latents"].to(device, non_blocking=True).float() if "latents" in batch else None
    return Clip(actions, batch["poses"].to(device, non_blocking=True).float(), frames, latents)


def clip_latents(autoencoder: nn.Module, clip: Clip) -> Tensor:
    """The clip's latents ``[B, T, C, h, w]`` float32: cached, or encoded from its frames now."""
    return clip.latents if clip.latents is not None else encode(autoencoder, clip.frames)


def real_frames(autoencoder: nn.Module, clip: Clip) -> Tensor:
    """The clip's frames ``[B, T, 3, H, W]``: as loaded, or decoded from its cached latents."""
    return clip.frames if clip.frames is not None else autoencoder.decode(clip.latents)


def rebuilt(model_cfg, source: WorldModel) -> WorldModel:
    """A WorldModel of ``model_cfg`` (e.g. a new block size or sampler) with the weights of ``source``."""
    model = WorldModel(OmegaConf.create(OmegaConf.to_container(model_cfg, resolve=True)))
    model.load_state_dict(source.state_dict())
    return model


def teacher_sampler(sample_cfg) -> dict:
    """The sampler a teacher checkpoint plays with: guided Euler over ``sample.steps`` shifted steps."""
    sigmas = flow.step_list(int(sample_cfg.steps), shift=float(sample_cfg.shift))
    return {"solver": "euler", "steps": sigmas, "first_frame_steps": sigmas, "guidance": float(sample_cfg.guidance)}


def with_sampler(model_cfg, sampler: dict):
    """A copy of ``model_cfg`` with ``sampler`` (e.g. a student's :data:`DEFAULT_SAMPLER` after a teacher's)."""
    model_cfg = model_cfg.copy()
    model_cfg.sampler = copy.deepcopy(sampler)
    return model_cfg


def student_config(teacher_cfg):
    """A student's model config: the teacher's, with the few-step student sampler."""
    return with_sampler(teacher_cfg, DEFAULT_SAMPLER)


def bundle(model_cfg, stage: str, autoencoder: nn.Module, dit: WorldDiT) -> WorldModel:
    """A WorldModel on the CPU holding copies of ``autoencoder`` and ``dit``, marked as made by ``stage``."""
    cfg = OmegaConf.create(OmegaConf.to_container(model_cfg, resolve=True))
    cfg.stage = stage
    model = WorldModel(cfg)
    model.autoencoder.load_state_dict(autoencoder.state_dict())
    model.dit.load_state_dict(dit.state_dict())
    return model.eval()


@torch.no_grad()
def encode(autoencoder: nn.Module, frames: Tensor) -> Tensor:
    """Latents ``[B, T, C, h, w]`` in float32 (the autoencoder may run under autocast)."""
    return autoencoder.encode(frames).float()


def velocity_fn(dit: WorldDiT, clip: Clip, mode: str, clean: Tensor | None = None, cond_keep: Tensor | None = None,
                clean_sigma: Tensor | None = None) -> Callable:
    """``(x, sigma [B, T]) -> v`` of ``dit`` on this clip's conditioning (``clean_sigma``: the history's noise level)."""
    return lambda x, sigma: dit(x, sigma, clip.actions, clip.poses, mode=mode, clean=clean, cond_keep=cond_keep,
                                clean_sigma=clean_sigma).float()


def guided_velocity_fn(dit: WorldDiT, clip: Clip, mode: str, guidance: float, clean: Tensor | None = None) -> Callable:
    """``(x, sigma [B, T]) -> v`` with classifier-free guidance on actions and camera
    (:func:`worldmodel.flow.apply_cfg`), the conditional and unconditional halves in one forward of
    twice the batch (one launch instead of two for the small networks)."""
    if guidance == 1.0:
        return velocity_fn(dit, clip, mode, clean)
    b = clip.actions.shape[0]
    twice = lambda t: None if t is None else torch.cat([t, t])  # noqa: E731
    keep = torch.arange(2 * b, device=clip.actions.device) < b
    actions, poses, clean2 = twice(clip.actions), twice(clip.poses), twice(clean)

    def guided(x, sigma):
        v = dit(twice(x), twice(sigma), actions, poses, mode=mode, clean=clean2, cond_keep=keep).float()
        return flow.apply_cfg(*v.chunk(2), guidance)

    return guided


x0_fn = flow.x0_denoiser
"""``(x, sigma) -> x0`` from a velocity closure."""


@dataclass(frozen=True)
class BlockSampler:
    """A ``sample_block`` for :func:`generate_ar`: noise from ``generator``, then ``flow.SAMPLERS[solver]``
    through ``sigmas`` (ending at 0), in a rollout guided with ``guidance``."""

    solver: str
    sigmas: tuple[float, ...]
    generator: torch.Generator
    guidance: float = 1.0

    def __call__(self, velocity: Callable, b: int, shape: tuple[int, ...]) -> Tensor:
        noise = torch.randn(shape, generator=self.generator, device=self.generator.device)
        return flow.SAMPLERS[self.solver](velocity, noise, self.sigmas, generator=self.generator)


@torch.no_grad()
def generate_ar(dit: WorldDiT, clip: Clip, first: Tensor, sample_block: BlockSampler, dtype=torch.float32) -> Tensor:
    """Latents ``[B, T, C, h, w]``: the given first frame ``first [B, 1, C, h, w]``, then each block
    sampled by ``sample_block`` against the KV cache (:meth:`CachedRollout.generate`)."""
    return CachedRollout(dit, clip, dtype, sample_block.guidance).generate(first, sample_block)


def latent_shape(dit: WorldDiT, batch: int, frames: int) -> tuple[int, ...]:
    cfg = dit.cfg
    return (batch, frames, cfg.latent_channels, cfg.latent_height, cfg.latent_width)


def first_clip(batch: dict, action_spec: ActionSpec, device) -> Clip:
    """The first clip of a batch, on the device (for sample videos)."""
    return to_clip({k: v[:1] for k, v in batch.items()}, action_spec, device)


def ar_sample_video(autoencoder: nn.Module, dit: WorldDiT, clip: Clip, real_latents: Tensor, sample_block: BlockSampler,
                    dtype=torch.float32) -> Tensor:
    """Video: the real clip | ``dit`` generating it block by block from its real first frame, with
    the same actions and camera. ``real_latents [1, T, C, h, w]``."""
    latents = generate_ar(dit, clip, real_latents[:, :1], sample_block, dtype)
    return side_by_side(autoencoder.decode(real_latents), autoencoder.decode(latents))


def euler_block_sampler(sigmas: Sequence[float], guidance: float, generator: torch.Generator) -> BlockSampler:
    """A ``sample_block`` for :func:`generate_ar`: many-step guided Euler through ``sigmas`` (ending at 0; teachers)."""
    return BlockSampler("euler", tuple(sigmas), generator, float(guidance))


def few_step_block_sampler(sigmas: Sequence[float], generator: torch.Generator) -> BlockSampler:
    """A ``sample_block`` for :func:`generate_ar`: the student's few-step sampler at ``sigmas`` (as in play)."""
    return BlockSampler("renoise", (*sigmas, 0.0), generator)


def check_block_fit(clip_len: int, block_size: int) -> None:
    """Causal stages train whole blocks: the start frame, then full blocks of ``block_size`` frames."""
    if clip_len < 2 or (clip_len - 1) % block_size:
        raise StageInputError(
            f"data.clip_len {clip_len} must be 1 + a multiple of the block size {block_size} (the start frame, then whole blocks)"
        )


def side_by_side(*frames: Tensor) -> Tensor:
    """Video uint8 ``[T, H, W * n, 3]``: the first clip of each ``frames [B, T, 3, H, W]``, left to right."""
    return torch.cat([to_uint8(f[0].float()) for f in frames], dim=2).cpu()
