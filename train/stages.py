"""The base stages the training stages build on: flow matching of a DiT (stages 1 and 2) and a
few-step causal student with its EMA (stages 3a, 3b, 3c and 4), the latter also started from a
frozen AR teacher that it keeps (3a, 3c). Each stage module subclasses one and sets ``STAGE``."""

from __future__ import annotations

import torch
from omegaconf import OmegaConf

from train import algorithms as alg
from train.clips import clip_latents, first_clip, real_frames, to_clip
from train.inputs import StageInputError, bundle, check_block_fit, check_same_autoencoder, rebuilt, student_config
from train.networks import ema_copy, frozen, guided_velocity_fn, latent_shape, velocity_fn
from train.samples import ar_sample_video, few_step_block_sampler, side_by_side
from train.trainer import Stage
from worldmodel import flow
from worldmodel.model import WorldModel
from worldmodel.transformer import block_ids


def noised_history(x0: torch.Tensor, level: float, blocks: torch.Tensor, rng) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The teacher-forced history: ``x0 [B, T, C, h, w]`` noised per block to a level uniform in ``[0, level]``,
    and those levels ``[B, T]`` (given to the network); ``(x0, None)``, the clean history, at level 0."""
    if level == 0:
        return x0, None
    sigma = rng.local(alg.sample_sigmas(rng.global_batch(x0.shape[0]), blocks, rng.generator("context_sigma"),
                                        distribution="uniform", low=0.0, high=level))
    return flow.add_noise(x0, rng.randn("context_noise", tuple(x0.shape)), sigma), sigma


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


class StudentStage(Stage):
    """A causal few-step student started from an input model, with an EMA; shared by 3a, 3b and 4."""

    latent_batches = True

    def __init__(self, trainer, inputs, start):
        super().__init__(trainer, inputs)
        model = rebuilt(self.cfg.model, start)
        check_block_fit(int(self.cfg.data.clip_len), model.dit.cfg.block_size)
        self.action_spec = model.action_spec
        self.ae = frozen(model.autoencoder.to(self.device))
        self.student = model.dit.to(self.device).train().requires_grad_(True)
        self.student_ema = ema_copy(self.student)
        self.steps = [float(s) for s in self.cfg.model.sampler.steps]

    def modules(self):
        return {"student": self.student, "student_ema": self.student_ema}

    def optimized(self):
        return {"student": (self.student, self.cfg.optim)}

    def ema(self):
        return {"student": (self.student_ema, float(self.cfg.optim.ema_decay))}

    def sample_latents(self, batch, clip):
        """Real latents ``[1, T, C, h, w]`` of the sample clip."""
        return clip_latents(self.ae, clip)

    def sample(self, batch, generator):
        """Real clip | the EMA student playing it with its few-step sampler from the real first frame."""
        clip = first_clip(batch, self.action_spec, self.device)
        sampler = few_step_block_sampler(self.steps, generator)
        return ar_sample_video(self.ae, self.student_ema, clip, self.sample_latents(batch, clip), sampler,
                               self.trainer.compute_dtype)

    def export(self):
        return bundle(self.cfg.model, self.name, self.ae, self.student_ema)


STUDENT_STAGES = ("causal_cd", "causal_ode", "causal_scm", "dmd")
"""The stages whose checkpoints are few-step students (``init.student`` of 3a, 3b and 3c)."""


class ARTeacherStudentStage(StudentStage):
    """A student started from a frozen teacher (``init.teacher``, an AR teacher unless the stage accepts
    others), which it keeps, or from an earlier student of that teacher's latent space (``init.student``,
    e.g. the shipped model: distillation goes on from it towards a newer teacher); shared by 3a, 3b and 3c."""

    inputs = {"teacher": ("ar_teacher",)}
    model_overrides = ("dit.depth", "dit.window_frames", "dit.sink_frames", "sampler")  # a smaller tier's student

    @classmethod
    def accepted_inputs(cls, cfg):
        if OmegaConf.select(cfg, "init.student", default=None):
            return {**cls.inputs, "student": STUDENT_STAGES}
        return cls.inputs

    @classmethod
    def model_config(cls, cfg, inputs, data_info):
        if "student" not in inputs:
            return student_config(inputs["teacher"].config)
        student, teacher = inputs["student"], inputs["teacher"]
        check_same_autoencoder(student, teacher, "init.student and init.teacher")
        free = [k.removeprefix("dit.") for k in cls.model_overrides if k.startswith("dit.")]  # what model.* may change
        differ = sorted(k for k, v in OmegaConf.to_container(teacher.config.dit).items()
                        if k not in free and student.config.dit[k] != v)
        if differ:
            raise StageInputError(f"init.student's DiT differs from init.teacher's in {differ}; only {free} may")
        return student_config(student.config)

    def __init__(self, trainer, inputs):
        super().__init__(trainer, inputs, inputs.get("student", inputs["teacher"]))
        # the student starts as init.student or as the teacher (or a shallower copy: model.dit.depth); the teacher stays frozen
        teacher_cfg = OmegaConf.merge(self.cfg.model, {"dit": {"depth": len(inputs["teacher"].dit.blocks)}})
        self.teacher = frozen(rebuilt(teacher_cfg, inputs["teacher"]).dit.to(self.device))

    def networks(self):
        return [*super().networks(), self.teacher]
