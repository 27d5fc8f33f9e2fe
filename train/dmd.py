"""Stage 4: distribution matching distillation with self-forcing rollouts (DMD / Self Forcing).

Inputs: ``init.student`` (a ``causal_cd``, ``causal_ode`` or ``causal_scm`` checkpoint: the generator and its EMA
start from it) and ``init.teacher`` (a stage ``teacher`` checkpoint: the real score, and the start
of the critic). Both must share one autoencoder. Output: a WorldModel of stage ``dmd``, the model
that ships.

Each step: the generator plays the clip from its real first frame block by block with its own KV
cache, as in play (:func:`train.algorithms.self_forcing_rollout`): per block a random exit step,
shared by all ranks, is the only denoising step with gradient; the clean block is then written
into the cache without gradient (by the next block's first forward, or by a t = 0 forward of its own
when that one carries gradient), so history is detached. The critic (fake
score) is trained by flow matching on the detached rollout every step; every
``dmd.critic_updates``-th step the generator is updated too, with the DMD direction
(:func:`train.algorithms.dmd_loss`) from the real score (the stage-1 teacher with guidance) and
the critic, on the rollout noised to one level per clip in ``dmd.sigma_low..dmd.sigma_high``
(shifted by ``dmd.shift``).

Long rollouts (Self-Forcing++): with ``dmd.score_frames`` = S > 0 the generator plays the whole clip of
``data.clip_len`` frames, its KV cache rolling as in play, and both losses see only its last S frames
(the score networks' clip length): the blocks before them are played with every step and no gradient.
So the generator learns from the frames it makes after a long history of its own, where play drifts.
"""

from __future__ import annotations

import torch

from train import algorithms as alg
from train.clips import Clip, encode, to_clip
from train.config import TrainConfigError
from train.inputs import check_same_autoencoder
from train.networks import frozen, guided_velocity_fn, trainable_copy, velocity_fn, x0_fn
from train.stages import StudentStage
from worldmodel.rollout import CachedRollout


class DMDStage(StudentStage):
    name = "dmd"
    inputs = {"student": ("causal_cd", "causal_ode", "causal_scm"), "teacher": ("teacher",)}

    @classmethod
    def model_config(cls, cfg, inputs, data_info):
        check_same_autoencoder(inputs["student"], inputs["teacher"], "init.student and init.teacher")
        return inputs["student"].config.copy()

    def __init__(self, trainer, inputs):
        super().__init__(trainer, inputs, inputs["student"])
        teacher = inputs["teacher"].dit.to(self.device)
        self.real_score = frozen(teacher)
        self.critic = trainable_copy(teacher)
        if int(self.cfg.dmd.critic_updates) < 1:
            raise TrainConfigError(f"dmd.critic_updates must be >= 1, got {self.cfg.dmd.critic_updates}")
        self.scored_from = scored_from(int(self.cfg.data.clip_len), int(self.cfg.dmd.score_frames),
                                       self.student.cfg.block_size)

    def modules(self):
        return {**super().modules(), "critic": self.critic}

    def networks(self):
        return [*super().networks(), self.real_score]

    def optimized(self):
        return {**super().optimized(), "critic": (self.critic, self.cfg.critic_optim)}

    def rollout(self, clip, first: torch.Tensor, rng) -> torch.Tensor:
        """The generator's clip ``[B, T, C, h, w]`` from the real first frame ``first [B, 1, C, h, w]``
        (the frames before ``scored_from`` without gradient)."""
        rollout = CachedRollout(self.student, clip, self.trainer.compute_dtype)
        exits = alg.sample_exit_steps(len(rollout.blocks) - 1, len(self.steps), rng.generator("exit_steps", "cpu"))
        b, t = clip.actions.shape[:2]
        noise = rng.randn("rollout_noise", (b, len(self.steps), t, *first.shape[2:]))
        return alg.self_forcing_rollout(rollout, first, noise, self.steps, exits, self.scored_from)

    def _clip_sigma(self, rng, b: int, t: int, tag: str, **distribution):
        """One noise level per clip ``[b, t]``: the score networks are bidirectional."""
        blocks = torch.zeros(t, dtype=torch.long)
        return rng.local(alg.sample_sigmas(rng.global_batch(b), blocks, rng.generator(tag), **distribution))

    def train_step(self, batch, rng):
        cfg = self.cfg.dmd
        clip = to_clip(batch, self.action_spec, self.device)
        first = clip.latents[:, :1] if clip.latents is not None else encode(self.ae, clip.frames[:, :1])
        generator_turn = rng.step % int(cfg.critic_updates) == 0  # the same on every rank
        scalars = {}
        with torch.set_grad_enabled(generator_turn):
            generated = self.rollout(clip, first, rng)[:, self.scored_from :]
        clip = Clip(clip.actions[:, self.scored_from :], clip.poses[:, self.scored_from :])  # what the scores see
        b, t = clip.actions.shape[:2]
        if generator_turn:
            sigma = self._clip_sigma(rng, b, t, "dmd_sigma", distribution="uniform", low=float(cfg.sigma_low),
                                     high=float(cfg.sigma_high), shift=float(cfg.shift))
            eps = rng.randn("dmd_noise", tuple(generated.shape))
            real_x0 = x0_fn(guided_velocity_fn(self.real_score, clip, "bidirectional", float(cfg.guidance)))
            fake_x0 = x0_fn(velocity_fn(self.critic, clip, "bidirectional"))
            loss, _ = alg.dmd_loss(generated, real_x0, fake_x0, eps, sigma)
            scalars = {"generator_loss": loss.detach(), **self.trainer.update("student", loss)}
        c = self.cfg.critic_flow
        sigma = self._clip_sigma(rng, b, t, "critic_sigma", distribution=str(c.distribution), loc=float(c.loc),
                                 scale=float(c.scale), shift=float(c.shift))
        eps = rng.randn("critic_noise", tuple(generated.shape))
        critic_loss = alg.critic_loss(velocity_fn(self.critic, clip, "bidirectional"), generated, eps, sigma)
        return {**scalars, "critic_loss": critic_loss.detach(), **self.trainer.update("critic", critic_loss)}


def scored_from(clip_len: int, score_frames: int, block_size: int) -> int:
    """First frame of the scored window: the last ``score_frames`` frames of the clip (0: all of it),
    starting at a block's start (the start frame, then whole blocks)."""
    if score_frames == 0:
        return 0
    start = clip_len - score_frames
    if not 2 <= score_frames <= clip_len or (start > 0 and (start - 1) % block_size):
        raise TrainConfigError(f"dmd.score_frames must be 0, or 2..data.clip_len ({clip_len}) frames that start a block "
                               f"of {block_size} frames, got {score_frames}")
    return start


STAGE = DMDStage
