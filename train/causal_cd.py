"""Stage 3a: causal consistency distillation (Causal Forcing++), the few-step AR initialisation.

Input: ``init.teacher`` (a stage ``ar_teacher`` checkpoint): the frozen teacher, and the start of
the student and of its EMA target network. Output: a WorldModel of stage ``causal_cd`` (the EMA
student) that samples with ``model.sampler.steps`` (e.g. 1.0, 0.5) and is stage 4's input.

Per step, all online, nothing stored: real clips are encoded; per block a pair of adjacent points
(s, s') of the teacher grid (``cd.grid_steps`` shifted steps, the student's sampling sigmas
merged in) is drawn; x_s is built from the real latents; the teacher takes one guided Euler step
to s'; the student's x0 at (x_s, s) regresses onto the EMA target's x0 at (x_s', s')
(:func:`train.algorithms.causal_cd_loss`). Teacher, target and student are all teacher-forced on
the same real history, noised per block to a level uniform in ``[0, cd.context_noise]`` (given to the
networks; 0: clean), as the AR teacher was trained. The target network is the trainer's EMA of the
student (``optim.ema_decay``).
"""

from __future__ import annotations

from train import algorithms as alg
from train.clips import clip_latents, to_clip
from train.networks import guided_velocity_fn, velocity_fn, x0_fn
from train.stages import ARTeacherStudentStage, noised_history
from worldmodel.transformer import block_ids


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
        history, level = noised_history(x0, float(self.cfg.cd.context_noise), blocks, rng)
        teacher_v = guided_velocity_fn(self.teacher, clip, "causal", float(self.cfg.cd.guidance), clean=history,
                                       clean_sigma=level)
        target_x0 = x0_fn(velocity_fn(self.student_ema, clip, "causal", clean=history, clean_sigma=level))
        student_x0 = x0_fn(velocity_fn(self.student, clip, "causal", clean=history, clean_sigma=level))
        loss = alg.causal_cd_loss(student_x0, teacher_v, target_x0, x0, eps, sigma, sigma_next)
        return {"loss": loss.detach(), **self.trainer.update("student", loss)}


STAGE = CausalCDStage
