"""Stage 3b: causal ODE distillation (Causal Forcing), the baseline initialisation of stage 3a.

Input: ``init.teacher``, which starts the student and generates the trajectories; its stage
depends on ``ode.trajectories``:

- ``ar`` (Causal Forcing): a stage ``ar_teacher`` checkpoint. Its PF-ODE is integrated for every
  block in parallel, teacher-forced on the real clip (block b sees the real blocks before it);
  the student is teacher-forced on the same real history.
- ``bidirectional`` (the Self-Forcing-style initialisation, for comparison): a stage ``teacher``
  checkpoint. It generates whole clips with full attention from noise; the student, causal,
  is teacher-forced on the generated clip (the trajectory endpoints) as its history. Causal
  Forcing shows a frame-wise AR student cannot recover this flow map; this variant measures it.

Before training, ``ode.num_batches`` global batches of trajectories are generated and stored
(``run.dir/trajectories/batch_NNNNNN.safetensors``: the states at the student's sampling sigmas
``model.sampler.steps``, the endpoint, the real latents, actions and poses), split over ranks,
each file written atomically and skipped when present, so generation resumes too. Training then
regresses the student's x0 at a random stored state per block onto the endpoint
(:func:`train.algorithms.ode_regression_loss`). Output: a WorldModel of stage ``causal_ode``.
"""

from __future__ import annotations

import json

import numpy as np
import torch
import torch.distributed as dist
from safetensors import safe_open
from safetensors.torch import load_file
from tqdm import tqdm

from train import algorithms as alg
from train.clips import encode, to_clip
from train.config import TrainConfigError
from train.data import StepBatches, derive_seed
from train.inputs import StageInputError
from train.networks import guided_velocity_fn, velocity_fn, x0_fn
from train.stages import ARTeacherStudentStage
from worldmodel import checkpoint
from worldmodel.transformer import block_ids

TRAJECTORY_SOURCES = {"ar": ("ar_teacher",), "bidirectional": ("teacher",)}
STORAGE_DTYPES = {"float16": torch.float16, "bfloat16": torch.bfloat16, "float32": torch.float32}


class CausalODEStage(ARTeacherStudentStage):
    name = "causal_ode"
    model_overrides = ("dit.block_size", "dit.depth", "dit.window_frames", "dit.sink_frames", "sampler")

    @classmethod
    def accepted_inputs(cls, cfg):
        kind = str(cfg.ode.trajectories)
        if kind not in TRAJECTORY_SOURCES:
            raise TrainConfigError(f"ode.trajectories must be one of {list(TRAJECTORY_SOURCES)}, got {kind!r}")
        return {**super().accepted_inputs(cfg), "teacher": TRAJECTORY_SOURCES[kind]}

    def __init__(self, trainer, inputs):
        super().__init__(trainer, inputs)
        ode = self.cfg.ode
        self.bidirectional = str(ode.trajectories) == "bidirectional"
        self.grid = alg.distillation_grid(int(ode.grid_steps), float(ode.shift), include=self.steps)
        if str(ode.storage_dtype) not in STORAGE_DTYPES:
            raise TrainConfigError(f"ode.storage_dtype must be one of {list(STORAGE_DTYPES)}, got {ode.storage_dtype!r}")
        if int(ode.num_batches) < 1:
            raise TrainConfigError(f"ode.num_batches must be >= 1, got {ode.num_batches}")
        self.storage_dtype = STORAGE_DTYPES[str(ode.storage_dtype)]
        self.dir = trainer.run_dir / "trajectories"
        self.recipe = json.dumps({"teacher": trainer.input_fingerprints["teacher"], "ode": dict(ode),
                                  "data": {k: str(v) for k, v in self.cfg.data.items() if k != "workers"},
                                  "steps": self.steps, "seed": int(self.cfg.seed)}, sort_keys=True)

    latent_batches = False  # trains on its stored trajectories

    def shard_path(self, i: int):
        return self.dir / f"batch_{i:06d}.safetensors"

    def _shard_ready(self, i: int) -> bool:
        path = self.shard_path(i)
        if not path.exists():
            return False
        with safe_open(str(path), framework="pt") as f:
            if (f.metadata() or {}).get("recipe") != self.recipe:
                raise StageInputError(f"{path} was generated with other settings (teacher, ode.*, data.* or seed); "
                                      f"move {self.dir} away or choose another run.dir")
        return True

    @torch.no_grad()
    def _trajectories(self, batch: dict, i: int) -> dict[str, torch.Tensor]:
        """One global batch of trajectories: states ``[B, K, T, C, h, w]``, endpoint, real latents."""
        clip = to_clip(batch, self.action_spec, self.device)
        x0 = encode(self.ae, clip.frames)
        noise = torch.randn(x0.shape, generator=torch.Generator(self.device).manual_seed(
            derive_seed(self.cfg.seed, "trajectory", i)), device=self.device)
        guidance = float(self.cfg.ode.guidance)
        if self.bidirectional:
            velocity = guided_velocity_fn(self.teacher, clip, "bidirectional", guidance)
        else:
            velocity = guided_velocity_fn(self.teacher, clip, "causal", guidance, clean=x0)
        states, endpoint = alg.ode_trajectory(velocity, noise, self.grid, keep=self.steps)
        store = lambda x: x.to(self.storage_dtype)  # noqa: E731
        return {"states": store(states.movedim(0, 1)), "endpoint": store(endpoint), "latents": store(x0),
                "actions": batch["actions"].float(), "poses": batch["poses"].float()}

    def prepare(self):
        """Generate the missing trajectory files of this rank (batch i goes to rank i mod W)."""
        trainer = self.trainer
        todo = [i for i in range(trainer.rank, int(self.cfg.ode.num_batches), trainer.world_size) if not self._shard_ready(i)]
        if todo:
            data = StepBatches(self.cfg.data, int(self.cfg.seed), salt="trajectories")  # whole global batches
            batches = data.loader(todo)
            for i in tqdm(todo, desc="trajectories", disable=not trainer.is_main, dynamic_ncols=True):
                with trainer.autocast():
                    tensors = self._trajectories(next(batches), i)
                checkpoint.atomic_save_file(tensors, self.shard_path(i), {"recipe": self.recipe})
        if trainer.world_size > 1:
            dist.barrier()

    def batches(self, start_step):
        """Step k reads one stored global batch (each epoch in a shuffled order) and keeps this rank's rows."""
        n, trainer = int(self.cfg.ode.num_batches), self.trainer
        step, order, epoch = start_step, None, -1
        while True:
            if step // n != epoch:
                epoch = step // n
                order = np.random.default_rng(derive_seed(self.cfg.seed, "trajectory_epoch", epoch)).permutation(n)
            tensors = load_file(str(self.shard_path(int(order[step % n]))))
            b = tensors["actions"].shape[0] // trainer.world_size
            yield {k: v[trainer.rank * b : (trainer.rank + 1) * b] for k, v in tensors.items()}
            step += 1

    def train_step(self, batch, rng):
        clip = to_clip(batch, self.action_spec, self.device)
        states = batch["states"].to(self.device).float().movedim(1, 0)  # [K, b, T, C, h, w]
        endpoint = batch["endpoint"].to(self.device).float()
        history = endpoint if self.bidirectional else batch["latents"].to(self.device).float()
        b, t = endpoint.shape[:2]
        blocks = block_ids(t, self.student.cfg.block_size)
        points = rng.local(alg.sample_trajectory_points(len(self.steps), rng.global_batch(b), blocks, rng.generator("points")))
        student_x0 = x0_fn(velocity_fn(self.student, clip, "causal", clean=history))
        loss = alg.ode_regression_loss(student_x0, states, self.steps, endpoint, points)
        return {"loss": loss.detach(), **self.trainer.update("student", loss)}

    def sample_latents(self, batch, clip):
        return batch["latents"][:1].to(self.device).float()


STAGE = CausalODEStage
