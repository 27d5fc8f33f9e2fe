"""Stage 1: the bidirectional camera/action-conditioned teacher, trained by flow matching.

Input: ``init.autoencoder`` (a stage ``autoencoder`` checkpoint; its autoencoder is frozen, the
DiT is built fresh from the preset). Output: a WorldModel of stage ``teacher``: the initialisation
of the AR teacher, the real score of DMD, and the source of the Self-Forcing-style ODE baseline.

Loss: :func:`train.algorithms.flow_matching_loss` with full attention over the clip, one noise
level per clip (``flow.per_block=true`` draws one per block instead), and condition dropout
(``flow.cond_drop``: actions and camera dropped together) so that guidance can be used later.
:class:`FlowMatchingStage` is shared with the AR teacher, which differs only in its attention.
"""

from __future__ import annotations

import torch

from train import algorithms as alg
from train.common import (
    bundle,
    clip_latents,
    ema_copy,
    first_clip,
    frozen,
    guided_velocity_fn,
    latent_shape,
    real_frames,
    side_by_side,
    to_clip,
    velocity_fn,
)
from train.config import fresh_model_config, fit_dit_to_autoencoder
from train.data import derive_seed
from train.trainer import Stage
from worldmodel import flow
from worldmodel.model import WorldModel
from worldmodel.transformer import block_ids


class FlowMatchingStage(Stage):
    """A DiT trained by flow matching on encoded clips with condition dropout; EMA exported."""

    mode = "bidirectional"
    latent_batches = True

    def __init__(self, trainer, inputs, start: WorldModel):
        super().__init__(trainer, inputs)
        self.action_spec = start.action_spec
        self.ae = frozen(start.autoencoder.to(self.device))
        self.dit = start.dit.to(self.device).train().requires_grad_(True)
        self.dit_ema = ema_copy(self.dit)

    def modules(self):
        return {"dit": self.dit, "dit_ema": self.dit_ema}

    def optimized(self):
        return {"dit": (self.dit, self.cfg.optim)}

    def ema(self):
        return {"dit": (self.dit_ema, float(self.cfg.optim.ema_decay))}

    def noise_blocks(self, frames: int) -> torch.Tensor:
        """Block id per frame for the noise levels: one level per clip, or per attention block."""
        if self.cfg.flow.per_block:
            return block_ids(frames, self.dit.cfg.block_size)
        return torch.zeros(frames, dtype=torch.long)

    def velocity(self, clip, x0, keep, rng):
        return velocity_fn(self.dit, clip, self.mode, cond_keep=keep)

    def train_step(self, batch, rng):
        clip = to_clip(batch, self.action_spec, self.device)
        x0 = clip_latents(self.ae, clip)
        b, t = x0.shape[:2]
        f = self.cfg.flow
        sigma = rng.local(alg.sample_sigmas(
            rng.global_batch(b), self.noise_blocks(t), rng.generator("sigma"), distribution=str(f.distribution),
            loc=float(f.loc), scale=float(f.scale), shift=float(f.shift)))
        keep = rng.local(alg.keep_conditions(rng.global_batch(b), float(f.cond_drop), rng.generator("cond_drop")))
        eps = rng.randn("noise", tuple(x0.shape))
        loss = alg.flow_matching_loss(self.velocity(clip, x0, keep, rng), x0, eps, sigma)
        return {"loss": loss.detach(), **self.trainer.update("dit", loss)}

    def sample_grid(self) -> list[float]:
        return flow.sigma_grid(int(self.cfg.sample.steps), float(self.cfg.sample.shift)).tolist()

    def sample(self, batch, generator):
        """Real clip | the EMA teacher's clip for the same actions and camera (guided Euler)."""
        clip = first_clip(batch, self.action_spec, self.device)
        noise = torch.randn(latent_shape(self.dit, 1, clip.actions.shape[1]), generator=generator, device=self.device)
        velocity = guided_velocity_fn(self.dit_ema, clip, "bidirectional", float(self.cfg.sample.guidance))
        latents = flow.sample_euler(velocity, noise, self.sample_grid())
        return side_by_side(real_frames(self.ae, clip), self.ae.decode(latents))

    def export(self):
        return bundle(self.cfg.model, self.name, self.ae, self.dit_ema)


class TeacherStage(FlowMatchingStage):
    name = "teacher"
    inputs = {"autoencoder": ("autoencoder",)}
    model_overrides = ("dit", "sampler")

    @classmethod
    def model_config(cls, cfg, inputs, data_info):
        model_cfg = inputs["autoencoder"].config.copy()
        model_cfg.dit = fresh_model_config(str(cfg.preset), data_info).dit
        return fit_dit_to_autoencoder(model_cfg)

    def __init__(self, trainer, inputs):
        torch.manual_seed(derive_seed(trainer.cfg.seed, "init"))
        model = WorldModel(trainer.cfg.model)
        model.autoencoder.load_state_dict(inputs["autoencoder"].autoencoder.state_dict())
        super().__init__(trainer, inputs, model)


STAGE = TeacherStage
