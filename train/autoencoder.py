"""Stage 0: the per-frame autoencoder, trained on frames of the run's data.

Input: none, or ``init.autoencoder`` (a checkpoint of any stage) to go on training its autoencoder,
so that a later session adds to what an earlier one trained. Output: a WorldModel whose autoencoder
is trained (EMA weights, latent statistics set from data so that latents are zero-mean,
unit-variance per channel) and whose DiT is freshly initialised; stage ``teacher`` takes it as
``init.autoencoder``.
Loss: :func:`worldmodel.autoencoder.reconstruction_loss` (L1 + SSIM + a light KL) on
``autoencoder.frames_per_clip`` random frames of each clip.
"""

from __future__ import annotations

import torch
from einops import repeat
from omegaconf import OmegaConf

from train.config import STAGES, fresh_model_config
from train.data import StepBatches, derive_seed
from train.inputs import StageInputError, bundle
from train.networks import ema_copy
from train.samples import side_by_side
from train.trainer import Stage
from worldmodel.autoencoder import reconstruction_loss
from worldmodel.frames import to_model
from worldmodel.model import WorldModel


class AutoencoderStage(Stage):
    name = "autoencoder"
    inputs = {}
    model_overrides = ("autoencoder", "dit", "sampler")

    @classmethod
    def accepted_inputs(cls, cfg):
        return {"autoencoder": STAGES} if OmegaConf.select(cfg, "init.autoencoder", default=None) else {}

    @classmethod
    def model_config(cls, cfg, inputs, data_info):
        model_cfg = fresh_model_config(str(cfg.preset), data_info)
        if "autoencoder" in inputs:
            model_cfg.autoencoder = inputs["autoencoder"].config.autoencoder
        return model_cfg

    def __init__(self, trainer, inputs):
        super().__init__(trainer, inputs)
        ae_cfg = self.cfg.autoencoder
        if not 1 <= int(ae_cfg.frames_per_clip) <= int(self.cfg.data.clip_len):
            raise StageInputError(f"autoencoder.frames_per_clip must be in 1..data.clip_len, got {ae_cfg.frames_per_clip}")
        torch.manual_seed(derive_seed(self.cfg.seed, "init"))
        self.model = WorldModel(self.cfg.model)  # the DiT stays as initialised: stage 1 trains it
        if "autoencoder" in inputs:
            try:
                self.model.autoencoder.load_state_dict(inputs["autoencoder"].autoencoder.state_dict())
            except RuntimeError:
                raise StageInputError("init.autoencoder: its autoencoder does not fit model.autoencoder as "
                                      "overridden on the command line") from None
        self.ae = self.model.autoencoder.to(self.device).train()
        self.ae_ema = ema_copy(self.ae)

    def modules(self):
        return {"autoencoder": self.ae, "autoencoder_ema": self.ae_ema}

    def optimized(self):
        return {"autoencoder": (self.ae, self.cfg.optim)}

    def ema(self):
        return {"autoencoder": (self.ae_ema, float(self.cfg.optim.ema_decay))}

    def _pick_frames(self, frames_u8: torch.Tensor, rng) -> torch.Tensor:
        """``frames_per_clip`` distinct random frames of each clip: uint8 ``[B, k, H, W, 3]``."""
        b, t = frames_u8.shape[:2]
        k = int(self.cfg.autoencoder.frames_per_clip)
        order = torch.rand(rng.global_batch(b), t, generator=rng.generator("frames", "cpu")).argsort(1)
        index = rng.local(order[:, :k])
        return frames_u8.gather(1, repeat(index, "b k -> b k h w c", h=frames_u8.shape[2], w=frames_u8.shape[3], c=3))

    def frames_per_batch(self, batch):
        return batch["frames"].shape[0] * int(self.cfg.autoencoder.frames_per_clip) * self.trainer.world_size

    def train_step(self, batch, rng):
        frames = to_model(self._pick_frames(batch["frames"], rng).to(self.device, non_blocking=True))
        ae_cfg = self.cfg.autoencoder
        loss, stats = reconstruction_loss(self.ae, frames, ssim_mix=float(ae_cfg.ssim_mix), kl_weight=float(ae_cfg.kl_weight),
                                           edge_weight=float(ae_cfg.edge_weight))
        return {**stats, **self.trainer.update("autoencoder", loss)}

    def sample(self, batch, generator):
        frames = to_model(batch["frames"][:1].to(self.device))
        return side_by_side(frames, self.ae_ema.decode(self.ae_ema.encode(frames)))

    @torch.no_grad()
    def export(self):
        """The EMA autoencoder with latent statistics from ``autoencoder.stats_batches`` batches."""
        model = bundle(self.cfg.model, self.name, self.ae_ema, self.model.dit)
        ae = model.autoencoder.to(self.device)
        batches = StepBatches(self.cfg.data, int(self.cfg.seed), salt="latent_stats").loader(0, workers=0)
        latents = []
        for _ in range(int(self.cfg.autoencoder.stats_batches)):
            frames = to_model(next(batches)["frames"].to(self.device))
            with self.trainer.autocast():
                latents.append(ae.encode(frames).float())
        ae.set_latent_stats(torch.cat(latents))
        return model.cpu()


STAGE = AutoencoderStage
