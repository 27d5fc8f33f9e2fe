"""Stage 2: the autoregressive teacher, by teacher forcing (Causal Forcing).

Input: ``init.teacher`` (a stage ``teacher`` checkpoint, or an ``ar_teacher`` one to change its block
size), whose weights it starts from. Output: a WorldModel of stage ``ar_teacher``, the frozen teacher
of causal CD (3a) and causal ODE (3b); it plays with the guided Euler sampler of ``sample.*``.

The same network runs block-causally on the sequence ``[clean | noisy]`` (the clean copy without its
last block, which nothing sees): noisy block b sees the real clean blocks before it and itself, with one noise level per block. The loss is
flow matching with condition dropout, as in stage 1. ``model.dit.block_size`` (1 = frame-wise)
sets the blocks; ``data.clip_len`` must be the start frame plus whole blocks.
"""

from __future__ import annotations

from train.clips import clip_latents, first_clip
from train.inputs import check_block_fit, rebuilt, teacher_sampler, with_sampler
from train.networks import velocity_fn
from train.samples import ar_sample_video, euler_block_sampler
from train.stages import FlowMatchingStage, noised_history
from worldmodel.transformer import block_ids


class ARTeacherStage(FlowMatchingStage):
    name = "ar_teacher"
    mode = "causal"
    inputs = {"teacher": ("teacher", "ar_teacher")}
    model_overrides = ("dit.block_size", "dit.window_frames", "dit.sink_frames", "sampler")

    @classmethod
    def model_config(cls, cfg, inputs, data_info):
        """The teacher's config; the export plays with the guided Euler sampler of ``sample.*``."""
        return with_sampler(inputs["teacher"].config, teacher_sampler(cfg.sample))

    def __init__(self, trainer, inputs):
        check_block_fit(int(trainer.cfg.data.clip_len), int(trainer.cfg.model.dit.block_size))
        super().__init__(trainer, inputs, rebuilt(trainer.cfg.model, inputs["teacher"]))

    def noise_blocks(self, frames):
        return block_ids(frames, self.dit.cfg.block_size)

    def velocity(self, clip, x0, keep, rng):
        """Teacher-forced on the real history, noised per block to a level uniform in
        ``[0, flow.context_noise]`` (given to the network; 0 = the clean history)."""
        context, context_sigma = noised_history(x0, float(self.cfg.flow.context_noise), self.noise_blocks(x0.shape[1]), rng)
        return velocity_fn(self.dit, clip, "causal", clean=context, cond_keep=keep, clean_sigma=context_sigma)

    def sample(self, batch, generator):
        """Real clip | the EMA AR teacher generating block by block (guided Euler per block)."""
        clip = first_clip(batch, self.action_spec, self.device)
        sampler = euler_block_sampler(self.sample_grid(), float(self.cfg.sample.guidance), generator)
        return ar_sample_video(self.ae, self.dit_ema, clip, clip_latents(self.ae, clip), sampler,
                               self.trainer.compute_dtype)


STAGE = ARTeacherStage
