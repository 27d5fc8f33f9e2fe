"""Stage 3a: causal consistency distillation (Causal Forcing++), the few-step AR initialisation.

Input: ``init.teacher`` (a stage ``ar_teacher`` checkpoint): the frozen teacher, and the start of
the student and of its EMA target network. Output: a WorldModel of stage ``causal_cd`` (the EMA
student) that samples with ``model.sampler.steps`` (e.g. 1.0, 0.5) and is stage 4's input.

Per step, all online, nothing stored: real clips are encoded; per block a pair of adjacent points
(s, s') of the teacher grid (``cd.grid_steps`` shifted steps, the student's sampling sigmas
merged in) is drawn; x_s is built from the real latents; the teacher takes one guided Euler step
to s'; the student's x0 at (x_s, s) regresses onto the EMA target's x0 at (x_s', s')
(:func:`train.algorithms.causal_cd_loss`). Teacher, target and student are all teacher-forced on
the same real history. The target network is the trainer's EMA of the student (``optim.ema_decay``).
"""

from __future__ import annotations

from train import algorithms as alg
from train.common import (
    ar_sample_video,
    bundle,
    check_block_fit,
    clip_latents,
    ema_copy,
    few_step_block_sampler,
    first_clip,
    frozen,
    guided_velocity_fn,
    rebuilt,
    student_config,
    to_clip,
    velocity_fn,
    x0_fn,
)
from train.trainer import Stage
from worldmodel.transformer import block_ids


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


class ARTeacherStudentStage(StudentStage):
    """A student started from a frozen AR teacher (``init.teacher``), which it keeps; shared by 3a and 3c."""

    inputs = {"teacher": ("ar_teacher",)}

    @classmethod
    def model_config(cls, cfg, inputs, data_info):
        return student_config(inputs["teacher"].config)

    def __init__(self, trainer, inputs):
        super().__init__(trainer, inputs, inputs["teacher"])
        self.teacher = ema_copy(self.student)  # the student starts as the AR teacher; this copy stays frozen

    def networks(self):
        return [*super().networks(), self.teacher]


class CausalCDStage(ARTeacherStudentStage):
    name = "causal_cd"

    def __init__(self, trainer, inputs):
        super().__init__(trainer, inputs)
        cd = self.cfg.cd
        self.grid = alg.distillation_grid(int(cd.grid_steps), float(cd.shift), include=self.steps)

    def train_step(self, batch, rng):
        clip = to_clip(batch, self.action_spec, self.device)
        x0 = clip_latents(self.ae, clip)
        b, t = x0.shape[:2]
        blocks = block_ids(t, self.student.cfg.block_size)
        sigma, sigma_next = alg.sample_grid_pairs(self.grid, rng.global_batch(b), blocks, rng.generator("grid"))
        sigma, sigma_next = rng.local(sigma), rng.local(sigma_next)
        eps = rng.randn("noise", tuple(x0.shape))
        teacher_v = guided_velocity_fn(self.teacher, clip, "causal", float(self.cfg.cd.guidance), clean=x0)
        target_x0 = x0_fn(velocity_fn(self.student_ema, clip, "causal", clean=x0))
        student_x0 = x0_fn(velocity_fn(self.student, clip, "causal", clean=x0))
        loss = alg.causal_cd_loss(student_x0, teacher_v, target_x0, x0, eps, sigma, sigma_next)
        return {"loss": loss.detach(), **self.trainer.update("student", loss)}


STAGE = CausalCDStage
