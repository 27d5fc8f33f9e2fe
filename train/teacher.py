"""Stage 1: the bidirectional camera/action-conditioned teacher, trained by flow matching.

Input: ``init.autoencoder`` (a checkpoint of any stage, e.g. the shipped model, whose autoencoder is
frozen; the DiT and the sampler are built fresh from the preset). Output: a WorldModel of stage
``teacher``: the initialisation of the AR teacher, the real score of DMD, and the source of the
Self-Forcing-style ODE baseline.

Loss: :func:`train.algorithms.flow_matching_loss` with full attention over the clip, one noise
level per clip (``flow.per_block=true`` draws one per block instead), and condition dropout
(``flow.cond_drop``: actions and camera dropped together) so that guidance can be used later.
Its base, :class:`train.stages.FlowMatchingStage`, is shared with the AR teacher, which differs only
in its attention.
"""

from __future__ import annotations

import torch

from train.config import STAGES, fresh_model_config
from train.data import derive_seed
from train.stages import FlowMatchingStage
from worldmodel.model import WorldModel


class TeacherStage(FlowMatchingStage):
    name = "teacher"
    inputs = {"autoencoder": STAGES}
    model_overrides = ("dit", "sampler")

    @classmethod
    def model_config(cls, cfg, inputs, data_info):
        model_cfg = fresh_model_config(str(cfg.preset), data_info)
        model_cfg.autoencoder = inputs["autoencoder"].config.autoencoder
        return model_cfg

    def __init__(self, trainer, inputs):
        torch.manual_seed(derive_seed(trainer.cfg.seed, "init"))
        model = WorldModel(trainer.cfg.model)
        model.autoencoder.load_state_dict(inputs["autoencoder"].autoencoder.state_dict())
        super().__init__(trainer, inputs, model)


STAGE = TeacherStage
