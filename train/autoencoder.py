"""Stage 0: the per-frame autoencoder, trained on frames of the run's data.

Input: none, or ``init.autoencoder`` (a checkpoint of any stage) to go on training its autoencoder,
so that a later session adds to what an earlier one trained. Output: a WorldModel whose autoencoder
is trained (EMA weights, latent statistics set from data so that latents are zero-mean,
unit-variance per channel) and whose DiT is freshly initialised; stage ``teacher`` takes it as
``init.autoencoder``.
Loss: :func:`worldmodel.autoencoder.reconstruction_loss` (L1 + SSIM + a light KL) on
``autoencoder.frames_per_clip`` random frames of each clip. With ``autoencoder.adversarial_weight`` > 0
a patch discriminator (:mod:`train.adversarial`, optimiser ``discriminator_optim``) trains from the
first step, and its term joins the decoder's loss from step ``autoencoder.adversarial_start`` on (an
untrained discriminator's gradient is noise: 120 steps of it from step 0 took a decoder from 34 to 27 dB train PSNR).
The adaptive balance makes the weight the ratio of the adversarial term's gradient norm to the reconstruction's at
the decoder's last layer, whatever the discriminator's strength: on the shipped procedural decoder 0.1-0.3 trained,
0.6 and more lost several dB of PSNR within 30 steps.

With ``model.autoencoder.latent_channels`` above the input's (and every other size the same), the input's
autoencoder is widened: it starts coding exactly as the input does, and trains its new channels in.

``autoencoder.train_encoder=false`` (needs ``init.autoencoder``) trains the decoder alone: the
encoder and the latent statistics stay bit for bit those of the input, so the latent space does not
move, and a DiT trained on the input's latents (a shipped student, an AR teacher) plays with the new
decoder (``python -m worldmodel.checkpoint join``).
"""

from __future__ import annotations

from dataclasses import replace

import torch
from einops import rearrange, repeat
from omegaconf import OmegaConf

from train.adversarial import PatchDiscriminator, adaptive_weight, discriminator_loss, generator_loss
from train.config import STAGES, fresh_model_config
from train.data import StepBatches, derive_seed
from train.inputs import StageInputError, bundle
from train.networks import ema_copy
from train.samples import side_by_side
from train.trainer import Stage
from worldmodel.autoencoder import reconstruction_loss, widen_latent
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
        self.train_encoder = bool(ae_cfg.train_encoder)
        if "autoencoder" in inputs:
            self._start_from(inputs["autoencoder"].autoencoder)
        if not self.train_encoder and "autoencoder" not in inputs:
            raise StageInputError("autoencoder.train_encoder=false trains the decoder of a given autoencoder: set init.autoencoder")
        self.ae = self.model.autoencoder.to(self.device).train()
        self.ae.encoder.requires_grad_(self.train_encoder)
        self.ae_ema = ema_copy(self.ae)
        self.adversarial_weight = float(ae_cfg.adversarial_weight)
        if self.adversarial_weight < 0 or int(ae_cfg.adversarial_start) < 0:
            raise StageInputError("autoencoder.adversarial_weight and autoencoder.adversarial_start must be >= 0")
        self.discriminator = None
        if self.adversarial_weight > 0:
            try:
                channels = tuple(int(c) for c in ae_cfg.discriminator_channels)
                self.discriminator = PatchDiscriminator(self.ae.config.in_channels, channels).to(self.device).train()
            except (TypeError, ValueError) as e:
                raise StageInputError(f"autoencoder.discriminator_channels: {e}") from None

    def _start_from(self, source) -> None:
        """Load the input's autoencoder; one with fewer latent channels than ``model.autoencoder`` and
        otherwise the same is widened (:func:`worldmodel.autoencoder.widen_latent`)."""
        target = self.model.autoencoder.config
        if target.latent_channels > source.config.latent_channels and \
                replace(source.config, latent_channels=target.latent_channels) == target:
            if not self.train_encoder:
                raise StageInputError("a wider latent than init.autoencoder's needs its encoder trained "
                                      "(autoencoder.train_encoder=true)")
            self.model.autoencoder = widen_latent(source, target.latent_channels)
            return
        try:
            self.model.autoencoder.load_state_dict(source.state_dict())
        except RuntimeError:
            raise StageInputError("init.autoencoder: its autoencoder does not fit model.autoencoder as "
                                  "overridden on the command line") from None

    @property
    def trained(self):
        """The part of the autoencoder the optimiser moves: all of it, or the decoder alone."""
        return self.ae if self.train_encoder else self.ae.decoder

    def modules(self):
        found = {"autoencoder": self.ae, "autoencoder_ema": self.ae_ema}
        return {**found, "discriminator": self.discriminator} if self.discriminator is not None else found

    def optimized(self):
        found = {"autoencoder": (self.trained, self.cfg.optim)}
        if self.discriminator is not None:
            found["discriminator"] = (self.discriminator, self.cfg.discriminator_optim)
        return found

    def ema(self):
        ema = self.ae_ema if self.train_encoder else self.ae_ema.decoder
        return {"autoencoder": (ema, float(self.cfg.optim.ema_decay))}

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
        loss, stats, recon = reconstruction_loss(self.ae, frames, ssim_mix=float(ae_cfg.ssim_mix),
                                                 kl_weight=float(ae_cfg.kl_weight), edge_weight=float(ae_cfg.edge_weight))
        if self.discriminator is None:
            return {**stats, **self.trainer.update("autoencoder", loss)}
        real, fake = (rearrange(v, "b t c h w -> (b t) c h w") for v in (frames, recon))
        if self.trainer.step < int(ae_cfg.adversarial_start):  # the discriminator learns alone first
            logged = {**stats, **self.trainer.update("autoencoder", loss)}
        else:
            adversarial = generator_loss(self.discriminator(fake))
            weight = self.adversarial_weight * adaptive_weight(loss, adversarial, self.ae.decoder.output_weight)
            logged = {**stats, "adversarial": adversarial.detach(), "adversarial_weight": weight,
                      **self.trainer.update("autoencoder", loss + weight * adversarial)}
            self.discriminator.zero_grad(set_to_none=True)  # the decoder's backward reached it too
        d_loss = discriminator_loss(self.discriminator(real), self.discriminator(fake.detach()))
        return {**logged, "discriminator_loss": d_loss.detach(), **self.trainer.update("discriminator", d_loss)}

    def sample(self, batch, generator):
        frames = to_model(batch["frames"][:1].to(self.device))
        return side_by_side(frames, self.ae_ema.decode(self.ae_ema.encode(frames)))

    @torch.no_grad()
    def export(self):
        """The EMA autoencoder with latent statistics from ``autoencoder.stats_batches`` batches (the
        input's, unchanged, when the encoder was not trained)."""
        model = bundle(self.cfg.model, self.name, self.ae_ema, self.model.dit)
        if not self.train_encoder:
            return model.cpu()
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
