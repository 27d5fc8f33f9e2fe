"""What a stage takes and gives: input checkpoints (checked against the stage and the data), model
configs rebuilt from them with another sampler, and the exported WorldModel bundle."""

from __future__ import annotations

import copy
from typing import Sequence

import torch
from omegaconf import OmegaConf
from torch import nn

from worldmodel import checkpoint, flow
from worldmodel.actions import ActionSpec
from worldmodel.camera import ControllerSpec
from worldmodel.model import DEFAULT_SAMPLER, WorldModel
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
        return checkpoint.load(path, untrained_dit=key == "init.autoencoder")  # a stage takes its autoencoder alone
    except checkpoint.CheckpointError as e:
        raise StageInputError(f"{key}: {e}") from None



def check_same_autoencoder(a: WorldModel, b: WorldModel, what: str) -> None:
    """Two models must share one latent space: identical autoencoder config, encoder and latent statistics
    (their decoders may differ: a student keeps its own)."""
    if a.config.autoencoder != b.config.autoencoder:
        raise StageInputError(f"{what} have different autoencoder configs; they must share one latent space")
    sa, sb = a.autoencoder.state_dict(), b.autoencoder.state_dict()
    if any(not torch.equal(sa[k], sb[k]) for k in sa if not k.startswith("decoder.")):
        raise StageInputError(f"{what} have different encoder weights or latent statistics; they must share one latent space")



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



def check_block_fit(clip_len: int, block_size: int) -> None:
    """Causal stages train whole blocks: the start frame, then full blocks of ``block_size`` frames."""
    if clip_len < 2 or (clip_len - 1) % block_size:
        raise StageInputError(
            f"data.clip_len {clip_len} must be 1 + a multiple of the block size {block_size} (the start frame, then whole blocks)"
        )



def kept_blocks(source_depth: int, depth: int) -> list[int]:
    """The ``depth`` source blocks a shallower DiT starts from: evenly spaced, the first and last kept."""
    if not 1 <= depth <= source_depth:
        raise StageInputError(f"model.dit.depth {depth} must be between 1 and the input model's depth {source_depth}")
    if depth == 1:
        return [source_depth - 1]
    return [round(i * (source_depth - 1) / (depth - 1)) for i in range(depth)]


def rebuilt(model_cfg, source: WorldModel) -> WorldModel:
    """A WorldModel of ``model_cfg`` (e.g. a new block size, sampler, KV window or a smaller depth) with the
    weights of ``source``. A shallower DiT takes the source's :func:`kept_blocks`; every other weight is the same."""
    model = WorldModel(OmegaConf.create(OmegaConf.to_container(model_cfg, resolve=True)))
    new_index = {old: new for new, old in enumerate(kept_blocks(len(source.dit.blocks), len(model.dit.blocks)))}
    prefix, state = "dit.blocks.", {}
    for key, value in source.state_dict().items():
        if key.startswith(prefix):
            index, rest = key[len(prefix):].split(".", 1)
            if int(index) not in new_index:
                continue
            key = f"{prefix}{new_index[int(index)]}.{rest}"
        state[key] = value
    model.load_state_dict(state)
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
