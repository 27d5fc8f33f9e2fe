"""Stage 3c: continuous-time consistency (sCM) by teacher forcing (Causal-rCM), a few-step AR
initialisation beside causal CD (3a).

Input: ``init.teacher`` (a stage ``ar_teacher`` checkpoint): the frozen teacher and the start of
the student. Output: a WorldModel of stage ``causal_scm`` (the EMA student) that samples with
``model.sampler.steps`` (e.g. 1.0, 0.5) and is stage 4's input.

Per step, all online: real clips are encoded; per block a noise level s is drawn
(:func:`train.algorithms.sample_scm_sigmas`: logit-normal, plus s = 1 exactly with probability
``scm.sigma_one``, the student's first sampling step); x_s is built from the real latents; the
frozen teacher gives its guided velocity v_T at (x_s, s); the student's x0 predictor
f = x - s v and its JVP along the teacher's PF-ODE, (dx, ds) = (v_T, 1), come from one
forward-mode pass through the current student without gradient (:func:`student_x0_tangent`); the
tangent is warmed up (``scm.tangent_warmup``) and normalised per block, and the student's x0 at
(x_s, s), with gradient, takes the sCM loss (:func:`train.algorithms.scm_loss`) with weight
w = 1/s: the gradient reaching the network's velocity output is then the unit-norm tangent at
every noise level, as sCM's loss in its network's output space. Teacher and student are
teacher-forced on the same real history. There is no target network: the target is the online
student under stop-gradient; the trainer's EMA (``optim.ema_decay``) is the exported model.
"""

from __future__ import annotations

import torch
import torch.autograd.forward_ad as fwAD

from train import algorithms as alg
from train.clips import Clip, clip_latents, to_clip
from train.networks import guided_velocity_fn, velocity_fn, x0_fn
from train.stages import ARTeacherStudentStage
from worldmodel import flow
from worldmodel.transformer import WorldDiT, block_ids

Tensor = torch.Tensor


def student_x0_tangent(dit: WorldDiT, clip: Clip, x: Tensor, sigma: Tensor, dx: Tensor, mode: str = "causal",
                       clean: Tensor | None = None) -> tuple[Tensor, Tensor]:
    """``(v, df)``, both ``[B, T, C, h, w]``: the velocity ``v(x, s)`` of ``dit`` and the tangent of its
    x0 predictor ``f = x - s v`` along ``(dx, ds = 1)``; ``x, dx [B, T, C, h, w]``, ``sigma [B, T]``.
    The teacher-forced history ``clean`` (``mode="causal"``) has zero tangent.

    One forward-mode pass (``torch.autograd.forward_ad`` dual tensors) through ``dit.forward``, not
    the compiled call, with the ``jvp`` attention backend (attention and its tangent in one kernel),
    without gradient, in float32 or better with autocast off (the tangent is fragile in bf16).
    """
    dtype = torch.promote_types(x.dtype, torch.float32)
    backend, dit.attention = dit.attention, "jvp"
    try:
        with torch.no_grad(), torch.autocast(x.device.type, enabled=False), fwAD.dual_level():
            x_dual = fwAD.make_dual(x.to(dtype), dx.to(dtype))
            s_dual = fwAD.make_dual(sigma.to(dtype), torch.ones_like(sigma, dtype=dtype))
            v = dit.forward(x_dual, s_dual, clip.actions, clip.poses, mode=mode,
                            clean=None if clean is None else clean.to(dtype)).to(dtype)
            f = flow.x0_from_v(x_dual, v, s_dual)
            return fwAD.unpack_dual(v).primal, fwAD.unpack_dual(f).tangent
    finally:
        dit.attention = backend


class CausalSCMStage(ARTeacherStudentStage):
    name = "causal_scm"

    def train_step(self, batch, rng):
        cfg = self.cfg.scm
        clip = to_clip(batch, self.action_spec, self.device)
        x0 = clip_latents(self.ae, clip)
        b, t = x0.shape[:2]
        blocks = block_ids(t, self.student.cfg.block_size)
        sigma = rng.local(alg.sample_scm_sigmas(rng.global_batch(b), blocks, rng.generator("sigma"),
                                                loc=float(cfg.sigma_loc), scale=float(cfg.sigma_scale),
                                                p_one=float(cfg.sigma_one), low=float(cfg.sigma_min)))
        x = flow.add_noise(x0, rng.randn("noise", tuple(x0.shape)), sigma)
        with torch.no_grad():
            teacher_v = guided_velocity_fn(self.teacher, clip, "causal", float(cfg.guidance), clean=x0)(x, sigma)
        v, df = student_x0_tangent(self.student, clip, x, sigma, teacher_v, clean=x0)
        warmup = alg.tangent_warmup(self.trainer.updates["student"], int(cfg.tangent_warmup))
        tangent = alg.scm_tangent(df, teacher_v - v, warmup)
        student_x0 = x0_fn(velocity_fn(self.student, clip, "causal", clean=x0))(x, sigma)
        loss, tangent_norm = alg.scm_loss(student_x0, tangent, 1.0 / sigma, blocks, float(cfg.norm_const))
        return {"loss": loss.detach(), "tangent_norm": tangent_norm, "tangent_warmup": torch.tensor(warmup),
                **self.trainer.update("student", loss)}


STAGE = CausalSCMStage
