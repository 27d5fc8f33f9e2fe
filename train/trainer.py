"""The trainer shared by every stage: config, devices, data, optimisers, EMA, mixed precision,
data parallelism, checkpoints and exact resume, logs, progress and sample videos.

A stage (one module per stage, a :class:`Stage` subclass) says which checkpoints it takes, which
networks it trains and how one step computes its losses; it calls :meth:`Trainer.update` once per
optimiser update. Everything else lives here, once.

Determinism and resume. All randomness of step k comes from generators seeded by (seed, k, tag)
(:class:`StepRandom`), and the global torch generators are re-seeded from (seed, k, rank) before
every step; the batch of step k is a pure function of k (:mod:`train.data`). So the RNG state and
the data position of a run are its step number, and a checkpoint (weights, EMA, optimiser state,
update counts, step) restores a run exactly: a run killed at any moment and resumed computes the
same numbers as one that never stopped. Checkpoints are written atomically (temp file + rename).

Data parallelism. ``torchrun --nproc_per_node=N -m train STAGE ...`` runs N ranks; the global
batch ``data.batch`` is split across them and gradients are averaged with one all-reduce per
update (:func:`all_reduce_gradients`) rather than a DistributedDataParallel wrapper, because the
self-forcing stage runs the network many times per update, mostly without gradient and through
the KV-cached ``forward_cached`` (which DDP's forward hooks do not see), and a second network is
updated from the same step. Noise is drawn for the global batch and sliced per rank, and shared
decisions (exit steps, generator/critic schedule) use rank-independent generators, so N GPUs
compute the same update as one GPU at the same global batch. FSDP is not needed: the largest
preset (``large``, 58 M DiT parameters) in the largest stage (DMD: generator + EMA + AdamW
moments, critic + AdamW moments, frozen teacher, all fp32) holds about 2.5 GB of weights and
optimiser state per GPU; sharding would only add communication.
"""

from __future__ import annotations

import hashlib
import importlib
import json
import math
import os
import re
import time
from contextlib import nullcontext
from pathlib import Path

import torch
import torch.distributed as dist
from omegaconf import DictConfig, OmegaConf
from torch import nn
from tqdm import tqdm

from train import algorithms as alg
from train.config import TrainConfigError, apply_model_overrides, compose, load_yaml, require
from train.data import DataInfo, StepBatches, derive_seed
from train.inputs import check_data_fits, load_input
from train.latents import LatentStore
from worldmodel import checkpoint
from worldmodel.files import remove_stale_temps, write_text_atomic
from worldmodel.model import WorldModel
from worldmodel.transformer import WorldDiT

CHECKPOINT_FORMAT = "worldmodel-train"
CHECKPOINT_VERSION = "1"
CHECKPOINT_PATTERN = re.compile(r"step_(\d{9})\.safetensors")
COMPILE_MODES = ("default", "max-autotune-no-cudagraphs")
"""``run.compile_mode`` values: ``torch.compile`` modes without CUDA graphs (the rollouts' KV caches stay eager)."""
RESUMABLE_CHANGES = ("run.dir", "run.steps", "run.checkpoint_every", "run.keep_checkpoints", "run.log_every",
                     "run.sample_every", "run.tensorboard", "run.profile",
                     "run.time_limit_s", "run.export_every_s", "run.compile", "run.compile_mode", "data.workers", "data.latents", "data.latent_cache",
                     "autoencoder.adversarial_weight")
"""Keys a resumed run may change; any other difference to the run's saved config is an error
(``init.*`` paths may move: the inputs' content is checked by fingerprint). ``run.dir``: a run copied to
another folder resumes there (a fork). ``autoencoder.adversarial_weight``: a schedule set by hand, e.g. a
fork of a run whose discriminator has learned, with a stronger term (the rewritten ``config.yaml`` holds
the new weight; the log, the step it changed at)."""


class TrainError(ValueError):
    """A run that cannot start or continue, with the reason."""


# ----------------------------------------------------------------------------- randomness


class StepRandom:
    """The random streams of one step. ``generator(tag)`` is identical on every rank; draw
    per-sample values for the global batch and keep this rank's rows with :meth:`local`."""

    def __init__(self, seed: int, step: int, rank: int, world_size: int, device: torch.device):
        self.seed, self.step, self.rank, self.world_size, self.device = seed, step, rank, world_size, device

    def generator(self, tag: str, device=None) -> torch.Generator:
        g = torch.Generator(device=device or self.device)
        return g.manual_seed(derive_seed(self.seed, self.step, tag))

    def global_batch(self, local_batch: int) -> int:
        return local_batch * self.world_size

    def local(self, x: torch.Tensor) -> torch.Tensor:
        """This rank's rows of a global-batch tensor ``[W * b, ...]``."""
        b = x.shape[0] // self.world_size
        return x[self.rank * b : (self.rank + 1) * b]

    def randn(self, tag: str, local_shape) -> torch.Tensor:
        """Standard normal noise ``local_shape`` (batch first): this rank's slice of the global draw."""
        shape = (self.global_batch(local_shape[0]), *local_shape[1:])
        return self.local(torch.randn(shape, generator=self.generator(tag), device=self.device))


# ----------------------------------------------------------------------------- stages


class Stage:
    """One training stage. Subclasses set the class attributes and implement the methods.

    ``inputs``: ``init.<key>`` -> stages whose checkpoints that key accepts (refine per config in
    :meth:`accepted_inputs`). ``model_overrides``: ``model.*`` prefixes the command line may change.
    """

    name: str = ""
    inputs: dict[str, tuple[str, ...]] = {}
    model_overrides: tuple[str, ...] = ("sampler",)
    latent_batches: bool = False  # trains on the latent cache (train.latents) of its frozen ``self.ae``

    @classmethod
    def accepted_inputs(cls, cfg: DictConfig) -> dict[str, tuple[str, ...]]:
        return cls.inputs

    @classmethod
    def model_config(cls, cfg: DictConfig, inputs: dict[str, WorldModel], data_info: DataInfo) -> DictConfig:
        """The WorldModel config this stage trains, before ``model.*`` overrides."""
        raise NotImplementedError

    def __init__(self, trainer: "Trainer", inputs: dict[str, WorldModel]):
        self.trainer, self.cfg, self.device = trainer, trainer.cfg, trainer.device

    def modules(self) -> dict[str, nn.Module]:
        """Every module whose state a checkpoint holds (trained networks, their EMAs, critics)."""
        raise NotImplementedError

    def optimized(self) -> dict[str, tuple[nn.Module, DictConfig]]:
        """Name -> (module, optimiser config with lr, betas, weight_decay, warmup_steps, grad_clip)."""
        raise NotImplementedError

    def networks(self) -> list[nn.Module]:
        """Every network the step runs (trained, EMA and frozen ones): compiled under ``run.compile``."""
        return list(self.modules().values())

    def ema(self) -> dict[str, tuple[nn.Module, float]]:
        """Optimised name -> (its EMA module, decay), updated after each of its optimiser steps."""
        return {}

    def prepare(self) -> None:
        """Work before the first step (e.g. generating ODE trajectories); must be resumable."""

    def batches(self, start_step: int):
        """This rank's batches from ``start_step`` on (default: the run's data; cached latents when the
        trainer holds a latent store)."""
        trainer = self.trainer
        if trainer.latents is not None:
            return trainer.latents.batches(trainer.data.clip_indices(start_step))
        return trainer.data.loader(start_step, pin_memory=self.device.type == "cuda")

    def frames_per_batch(self, batch: dict) -> int:
        """Frames one step trains on across all ranks (for throughput)."""
        return int(batch["actions"].shape[0] * batch["actions"].shape[1]) * self.trainer.world_size

    def train_step(self, batch: dict, rng: StepRandom) -> dict[str, torch.Tensor]:
        """Compute losses, call ``self.trainer.update(name, loss)``; return 0-d scalars to log."""
        raise NotImplementedError

    def sample(self, batch: dict, generator: torch.Generator) -> torch.Tensor:
        """A video uint8 ``[T, H, W, 3]`` showing what the current (EMA) model does."""
        raise NotImplementedError

    def export(self) -> WorldModel:
        """The WorldModel to ship from the current state (its ``config.stage`` is this stage)."""
        raise NotImplementedError


def stage_class(name: str) -> type[Stage]:
    return importlib.import_module(f"train.{name}").STAGE


# ----------------------------------------------------------------------------- distributed


def init_distributed(device_setting: str) -> tuple[int, int, torch.device]:
    """(rank, world size, device); initialises the process group when launched by torchrun."""
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    if device_setting == "auto":
        device_setting = "cuda" if torch.cuda.is_available() else "cpu"
    if device_setting.startswith("cuda") and not torch.cuda.is_available():
        raise TrainError(f"run.device={device_setting} but CUDA is not available")
    if world_size > 1:
        if device_setting.startswith("cuda"):
            local = int(os.environ.get("LOCAL_RANK", "0"))
            torch.cuda.set_device(local)
            device = torch.device("cuda", local)
        else:
            device = torch.device(device_setting)
        if not dist.is_initialized():
            dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
        return rank, world_size, device
    return 0, 1, torch.device(device_setting)


@torch.no_grad()
def all_reduce_gradients(params: list[nn.Parameter], world_size: int, bucket_elements: int = 1 << 25) -> None:
    """Average gradients (all present) over ranks in flat buckets."""
    bucket: list[torch.Tensor] = []
    size = 0
    for i, p in enumerate(params):
        bucket.append(p.grad)
        size += p.numel()
        if size >= bucket_elements or i == len(params) - 1:
            flat = torch.cat([g.reshape(-1) for g in bucket])
            dist.all_reduce(flat)
            flat /= world_size
            offset = 0
            for g in bucket:
                g.copy_(flat[offset : offset + g.numel()].view_as(g))
                offset += g.numel()
            bucket, size = [], 0


# ----------------------------------------------------------------------------- checkpoints


def optimizer_to_tensors(name: str, opt: torch.optim.Optimizer) -> tuple[dict, dict]:
    """Flatten an optimiser state into tensors ``optim/<name>/<param id>/<key>`` plus JSON metadata."""
    sd = opt.state_dict()
    tensors, scalars = {}, {}
    for pid, state in sd["state"].items():
        for key, value in state.items():
            if torch.is_tensor(value):
                tensors[f"optim/{name}/{pid}/{key}"] = value
            else:
                scalars.setdefault(str(pid), {})[key] = value
    return tensors, {"param_groups": sd["param_groups"], "scalars": scalars}


def optimizer_from_tensors(name: str, opt: torch.optim.Optimizer, tensors: dict, meta: dict) -> None:
    state: dict[int, dict] = {}
    prefix = f"optim/{name}/"
    for key, value in tensors.items():
        if key.startswith(prefix):
            pid, field = key[len(prefix) :].split("/", 1)
            state.setdefault(int(pid), {})[field] = value
    for pid, values in meta["scalars"].items():
        state.setdefault(int(pid), {}).update(values)
    opt.load_state_dict({"state": state, "param_groups": meta["param_groups"]})


def file_fingerprint(path) -> str:
    """Size and a hash of a checkpoint's content (every shard of a set), to notice an input replaced
    during a run."""
    h, size = hashlib.blake2b(digest_size=16), 0
    for file in checkpoint.checkpoint_files(path):
        size += os.path.getsize(file)
        with open(file, "rb") as f:
            for chunk in iter(lambda: f.read(1 << 24), b""):
                h.update(chunk)
    return f"{size}:{h.hexdigest()}"


def list_checkpoints(run_dir: Path) -> list[tuple[int, Path]]:
    """Training checkpoints of a run, oldest first."""
    found = []
    for p in (run_dir / "checkpoints").glob("step_*.safetensors"):
        m = CHECKPOINT_PATTERN.fullmatch(p.name)
        if m:
            found.append((int(m.group(1)), p))
    return sorted(found)


def _config_differences(a, b, prefix: str = "") -> list[str]:
    if isinstance(a, dict) and isinstance(b, dict):
        out = []
        for k in sorted(set(a) | set(b)):
            out += _config_differences(a.get(k), b.get(k), f"{prefix}{k}.")
        return out
    return [] if a == b else [prefix[:-1]]


# ----------------------------------------------------------------------------- the trainer


class Trainer:
    """Runs one stage: ``Trainer(stage, overrides).train()``."""

    def __init__(self, stage: str, overrides: list[str]):
        cfg, model_overrides = compose(stage, overrides)
        self.rank, self.world_size, self.device = init_distributed(str(cfg.run.device))
        self.is_main = self.rank == 0
        self.data = StepBatches(cfg.data, int(cfg.seed), self.rank, self.world_size)
        cls = stage_class(stage)
        inputs, self.input_fingerprints = {}, {}
        for key, accepted in cls.accepted_inputs(cfg).items():
            path = require(cfg, f"init.{key}", f"stage {stage} starts from a checkpoint of stage {' or '.join(accepted)}")
            inputs[key] = load_input(path, f"init.{key}", accepted, stage)
            self.input_fingerprints[key] = file_fingerprint(path)
        model_cfg = apply_model_overrides(cls.model_config(cfg, inputs, self.data.info), model_overrides,
                                          cls.model_overrides, stage)
        check_data_fits(model_cfg, self.data.info, f"the {stage} model")
        model_cfg.stage = stage
        cfg.model = model_cfg
        self.cfg = cfg
        self.run_dir = Path(str(cfg.run.dir))
        self.precision = str(cfg.run.precision)
        if self.precision not in ("bf16", "fp32"):
            raise TrainConfigError(f"run.precision must be bf16 or fp32, got {self.precision!r}")
        self.step = 0
        self._tensorboard = None
        self.stage = cls(self, inputs)
        self.latents = self._latent_store()
        if self._switch("run.compile", self.device.type == "cuda"):
            self._compile_networks()
        self.optimizers = {name: self._make_optimizer(module, ocfg) for name, (module, ocfg) in self.stage.optimized().items()}
        self.updates = {name: 0 for name in self.optimizers}
        self._resume_or_start()

    # -- setup

    def _switch(self, key: str, auto: bool) -> bool:
        """A true | false | auto setting; ``auto`` takes the given default."""
        value = OmegaConf.select(self.cfg, key)
        if value == "auto":
            return auto
        if isinstance(value, bool):
            return value
        raise TrainConfigError(f"{key} must be true, false or auto, got {value!r}")

    def _latent_store(self) -> LatentStore | None:
        """The latent cache of this run's recordings (``data.latents``), or None (frames every step)."""
        recordings = self.data.dataset is not None
        if not self._switch("data.latents", recordings and self.stage.latent_batches):
            return None
        if not recordings or not self.stage.latent_batches:
            raise TrainConfigError(f"data.latents=true needs data.source=recordings and a stage after the autoencoder "
                                   f"that trains on clips (not {self.cfg.stage})")
        cache = self.cfg.data.latent_cache
        started = time.perf_counter()
        store = LatentStore.build(self.data.dataset, self.stage.ae, self.device, self.compute_dtype, self.autocast,
                                  int(self.cfg.data.workers), None if cache is None else str(cache), self.is_main)
        if self.is_main:
            tqdm.write(f"latent cache: {len(store)} clips of {store.clip_len} frames from "
                       f"{store.tensors['latents'].shape[0]} frames in {time.perf_counter() - started:.1f} s")
        return store

    def _compile_networks(self) -> None:
        """``torch.compile`` every DiT's full-sequence forward, masked attention through FlexAttention
        block masks, and the work around the attention of its KV-cached forwards (rollouts; the attention and
        the cache stay eager)."""
        mode = str(self.cfg.run.compile_mode)
        if mode not in COMPILE_MODES:
            raise TrainConfigError(f"run.compile_mode must be one of {list(COMPILE_MODES)}, got {mode!r}")
        torch._dynamo.config.cache_size_limit = max(64, torch._dynamo.config.cache_size_limit)
        for net in self.stage.networks():
            if isinstance(net, WorldDiT):
                net.attention = "flex" if self.device.type == "cuda" else "sdpa"  # no flex backward on CPU
                net.compile(dynamic=False, mode=mode)
                net.compile_cached_stages()

    def _make_optimizer(self, module: nn.Module, ocfg: DictConfig) -> torch.optim.Optimizer:
        params = [p for p in module.parameters() if p.requires_grad]
        if self.world_size > 1:
            for p in params:  # every rank starts from rank 0's weights
                dist.broadcast(p.data, 0)
        return torch.optim.AdamW(params, lr=float(ocfg.lr), betas=tuple(ocfg.betas), weight_decay=float(ocfg.weight_decay),
                                 fused=self.device.type == "cuda")

    def _resume_or_start(self) -> None:
        found = list_checkpoints(self.run_dir)
        saved_cfg_path = self.run_dir / "config.yaml"
        if found and not self.cfg.run.resume:
            raise TrainError(f"{self.run_dir} already holds checkpoints; pass run.resume=true to continue it or choose another run.dir")
        if found:
            saved = OmegaConf.to_container(load_yaml(saved_cfg_path), resolve=False)  # written resolved: never resolve it again
            now = OmegaConf.to_container(self.cfg, resolve=True)
            changed = [k for k in _config_differences(saved, now)
                       if k not in RESUMABLE_CHANGES and k != "run.resume" and not k.startswith("init.")]
            if changed:
                raise TrainError(f"cannot resume {self.run_dir}: config differs from the saved run in {changed}")
            for step, path in reversed(found):
                try:
                    self._load_checkpoint(path)
                    break
                except TrainError as e:
                    if self.is_main:
                        tqdm.write(f"warning: skipping {path.name}: {e}")
            else:
                raise TrainError(f"no readable checkpoint in {self.run_dir / 'checkpoints'}")
        if self.is_main:
            self.run_dir.mkdir(parents=True, exist_ok=True)
            for folder in (self.run_dir, self.run_dir / "checkpoints"):  # left by writes a kill interrupted
                remove_stale_temps(folder)
            write_text_atomic(saved_cfg_path, OmegaConf.to_yaml(self.cfg, resolve=True))
            self._truncate_log()

    def _checkpoint_tensors(self) -> tuple[dict, dict]:
        tensors = {}
        for name, module in self.stage.modules().items():
            for key, value in module.state_dict().items():
                tensors[f"module/{name}/{key}"] = value
        optim_meta = {}
        for name, opt in self.optimizers.items():
            t, m = optimizer_to_tensors(name, opt)
            tensors.update(t)
            optim_meta[name] = m
        meta = {
            "format": CHECKPOINT_FORMAT,
            "version": CHECKPOINT_VERSION,
            "stage": self.cfg.stage,
            "step": str(self.step),
            "updates": json.dumps(self.updates),
            "optimizers": json.dumps(optim_meta),
            "inputs": json.dumps(self.input_fingerprints),
            "config": OmegaConf.to_yaml(self.cfg, resolve=True),
        }
        return tensors, meta

    def save_checkpoint(self) -> None:
        """Atomically write the training state and the exported model; keep the newest few."""
        if not self.is_main:
            return
        tensors, meta = self._checkpoint_tensors()
        path = self.run_dir / "checkpoints" / f"step_{self.step:09d}.safetensors"
        checkpoint.atomic_save_file(tensors, path, meta)
        for _, old in list_checkpoints(self.run_dir)[: -max(1, int(self.cfg.run.keep_checkpoints))]:
            old.unlink(missing_ok=True)
        self.export()

    def export(self, name: str = "model.safetensors") -> Path:
        """Write ``name`` (a WorldModel the client can load) into the run dir."""
        path = self.run_dir / name
        path.parent.mkdir(parents=True, exist_ok=True)
        model = self.stage.export()
        checkpoint.save(path, model, extra={"step": self.step, "stage": self.cfg.stage})
        return path

    def _profile_window(self, profiler):
        """Start torch.profiler at step ``2 * run.log_every`` (``run.profile``); at ``3 *`` stop it and
        write the top kernels by device time to ``run.dir/profile.txt``. Returns the running profiler."""
        every = int(self.cfg.run.log_every)
        if not (self.cfg.run.profile is True and self.is_main) or self.step not in (2 * every, 3 * every):
            return profiler
        if profiler is None:
            activities = [torch.profiler.ProfilerActivity.CPU]
            if self.device.type == "cuda":
                activities.append(torch.profiler.ProfilerActivity.CUDA)
            profiler = torch.profiler.profile(activities=activities)
            profiler.start()
            return profiler
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        profiler.stop()
        sort = "self_device_time_total" if self.device.type == "cuda" else "self_cpu_time_total"
        text = profiler.key_averages().table(sort_by=sort, row_limit=30, max_name_column_width=70)
        write_text_atomic(self.run_dir / "profile.txt", f"steps {2 * every}..{3 * every} of {self.cfg.stage}\n{text}\n")
        return None

    def _export_due(self, started: float, exported: int) -> int:
        """Export ``exports/model_<seconds>s.safetensors`` once per ``run.export_every_s`` of the run
        clock (checked at log steps, like the time limit); returns how many intervals are done."""
        every = float(self.cfg.run.export_every_s)
        if every <= 0 or not self.is_main:
            return exported
        due = int((time.perf_counter() - started) // every)
        if due > exported:
            path = self.export(f"exports/model_{due * every:06.0f}s.safetensors")
            self.log({"step": self.step, "export": str(path), "run_seconds": time.perf_counter() - started})
        return max(due, exported)

    def _load_checkpoint(self, path: Path) -> None:
        try:
            meta, tensors = checkpoint.file_metadata(path), checkpoint.read_state([path])
        except checkpoint.CheckpointError as e:
            raise TrainError(str(e)) from None
        if meta.get("format") != CHECKPOINT_FORMAT or meta.get("version") != CHECKPOINT_VERSION:
            raise TrainError(f"{path} is not a version {CHECKPOINT_VERSION} training checkpoint")
        if meta.get("stage") != self.cfg.stage:
            raise TrainError(f"{path} belongs to stage {meta.get('stage')!r}, not {self.cfg.stage!r}")
        saved_inputs = json.loads(meta["inputs"])
        for key, fp in self.input_fingerprints.items():
            if saved_inputs.get(key) != fp:
                raise TrainError(f"init.{key} is not the file this run started from (its content changed)")
        for name, module in self.stage.modules().items():
            prefix = f"module/{name}/"
            state = {k[len(prefix) :]: v for k, v in tensors.items() if k.startswith(prefix)}
            try:
                checkpoint.check_state(module.state_dict(), state, path)
            except checkpoint.CheckpointError as e:
                raise TrainError(str(e)) from None
            module.load_state_dict(state)
        optim_meta = json.loads(meta["optimizers"])
        for name, opt in self.optimizers.items():
            optimizer_from_tensors(name, opt, tensors, optim_meta[name])
        self.updates = json.loads(meta["updates"])
        self.step = int(meta["step"])

    # -- logging

    @property
    def log_path(self) -> Path:
        return self.run_dir / "log.jsonl"

    def _truncate_log(self) -> None:
        """Drop log lines of steps after the resumed step (they will be recomputed)."""
        if not self.log_path.exists():
            return
        keep = []
        for line in self.log_path.read_text().splitlines():
            try:
                if json.loads(line).get("step", 0) <= self.step:
                    keep.append(line)
            except json.JSONDecodeError:  # a line cut short by a kill
                continue
        write_text_atomic(self.log_path, "".join(line + "\n" for line in keep))

    def log(self, record: dict) -> None:
        if not self.is_main:
            return
        with open(self.log_path, "a") as f:
            f.write(json.dumps(record) + "\n")
        if self._tensorboard is not None:
            for key, value in record.items():
                if isinstance(value, (int, float)) and key != "step":
                    self._tensorboard.add_scalar(key, value, record.get("step", self.step))

    def _open_tensorboard(self):
        """A SummaryWriter into ``run.dir/tensorboard`` when ``run.tensorboard`` asks for one (the optional
        extra; composing the config checked that it is installed)."""
        if not self.is_main or not self._switch("run.tensorboard", False):
            return None
        from torch.utils.tensorboard import SummaryWriter

        return SummaryWriter(str(self.run_dir / "tensorboard"))

    # -- one update (called by stages)

    def autocast(self):
        """bf16 autocast on CUDA with ``run.precision=bf16``; fp32 otherwise."""
        if self.device.type == "cuda" and self.precision == "bf16":
            return torch.autocast("cuda", dtype=torch.bfloat16)
        return nullcontext()

    @property
    def compute_dtype(self) -> torch.dtype:
        """The dtype activations are computed in (bf16 under autocast, else float32): KV caches use it."""
        return torch.bfloat16 if self.device.type == "cuda" and self.precision == "bf16" else torch.float32

    def update(self, name: str, loss: torch.Tensor) -> dict[str, torch.Tensor]:
        """Backward, average gradients over ranks, clip, set the warm-up learning rate, AdamW step, EMA."""
        opt = self.optimizers[name]
        module, ocfg = self.stage.optimized()[name]
        with torch.autocast(self.device.type, enabled=False):
            loss.backward()
        params = [p for group in opt.param_groups for p in group["params"]]
        for p in params:  # a parameter without gradient counts as zero, on any number of ranks alike
            if p.grad is None:
                p.grad = torch.zeros_like(p)
        if self.world_size > 1:
            all_reduce_gradients(params, self.world_size)
        clip = float(ocfg.grad_clip)
        norm = torch.nn.utils.clip_grad_norm_(params, clip if clip > 0 else math.inf)
        lr = float(ocfg.lr) * min(1.0, (self.updates[name] + 1) / max(1, int(ocfg.warmup_steps)))
        for group in opt.param_groups:
            group["lr"] = lr
        opt.step()
        opt.zero_grad(set_to_none=True)
        self.updates[name] += 1
        if name in self.stage.ema():
            ema_module, decay = self.stage.ema()[name]
            # warm-up: the EMA averages over at most the updates made so far (short runs stay usable)
            decay = min(decay, (1 + self.updates[name]) / (10 + self.updates[name]))
            alg.ema_update(list(ema_module.parameters()) + list(ema_module.buffers()),
                           list(module.parameters()) + list(module.buffers()), decay)
        return {f"{name}/grad_norm": norm.detach(), f"{name}/lr": torch.tensor(lr)}

    # -- the loop

    def _reduce_scalars(self, sums: dict[str, torch.Tensor], counts: dict[str, int]) -> dict[str, float]:
        keys = sorted(sums)
        if not keys:
            return {}
        values = torch.stack([sums[k].float().to(self.device) / counts[k] for k in keys])
        if self.world_size > 1:
            dist.all_reduce(values)
            values /= self.world_size
        out = dict(zip(keys, values.tolist()))
        bad = [k for k, v in out.items() if not math.isfinite(v)]
        if bad:
            raise TrainError(f"{bad} became non-finite at step {self.step}; the last checkpoint in {self.run_dir} is intact")
        return out

    def _time_is_up(self, started: float) -> bool:
        """Whether ``run.time_limit_s`` has passed. One rank asks its clock after every step (no device sync), so a
        slow step (a long DMD rollout: 0.9 s on an H100) overshoots the budget by one step, not by ``run.log_every``;
        several ranks ask every ``run.log_every`` steps, rank 0 deciding for all."""
        up = 0 < float(self.cfg.run.time_limit_s) < time.perf_counter() - started
        if self.world_size == 1:
            return up
        if self.step % int(self.cfg.run.log_every):
            return False
        flag = torch.tensor([up], device=self.device)
        dist.broadcast(flag, 0)
        return bool(flag.item())

    def write_sample(self, batch: dict) -> Path | None:
        if not self.is_main:
            return None
        import imageio

        generator = torch.Generator(self.device).manual_seed(derive_seed(self.cfg.seed, "sample", self.step))
        with torch.no_grad(), self.autocast():
            video = self.stage.sample(batch, generator)
        path = self.run_dir / "samples" / f"step_{self.step:09d}.mp4"
        path.parent.mkdir(parents=True, exist_ok=True)
        imageio.mimwrite(path, video.numpy(), fps=self.data.info.fps, macro_block_size=2)
        return path

    def train(self) -> Path:
        """Run (or continue) the stage to ``run.steps`` (or until ``run.time_limit_s``, checkpointed
        so that running again continues); returns the exported model's path."""
        cfg, run = self.cfg, self.cfg.run
        total = int(run.steps)
        started = time.perf_counter()
        self._tensorboard = self._open_tensorboard()
        prepare_start = time.perf_counter()
        self.stage.prepare()
        self.log({"step": self.step, "prepare_seconds": time.perf_counter() - prepare_start})
        batches = self.stage.batches(self.step)
        bar = tqdm(total=total, initial=self.step, disable=not self.is_main, desc=cfg.stage, dynamic_ncols=True)
        sums: dict[str, torch.Tensor] = {}
        counts: dict[str, int] = {}
        window_start, window_frames, window_steps = time.perf_counter(), 0, 0
        exported, profiler = 0, None
        if self.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(self.device)
        try:
            while self.step < total:
                batch = next(batches)
                torch.manual_seed(derive_seed(cfg.seed, "global", self.step, self.rank))
                rng = StepRandom(int(cfg.seed), self.step, self.rank, self.world_size, self.device)
                with self.autocast():
                    scalars = self.stage.train_step(batch, rng)
                for k, v in scalars.items():
                    sums[k] = sums.get(k, 0) + v.detach().float()
                    counts[k] = counts.get(k, 0) + 1
                self.step += 1
                window_frames += self.stage.frames_per_batch(batch)
                window_steps += 1
                bar.update(1)
                out_of_time = self._time_is_up(started)
                last = self.step == total or out_of_time
                logged = self.step % int(run.log_every) == 0 or last
                if logged:
                    if self.device.type == "cuda":
                        torch.cuda.synchronize(self.device)
                    elapsed = time.perf_counter() - window_start
                    record = {"step": self.step, **self._reduce_scalars(sums, counts),
                              "step_seconds": elapsed / window_steps, "frames_per_second": window_frames / elapsed}
                    if self.device.type == "cuda":
                        record["peak_memory_gb"] = torch.cuda.max_memory_allocated(self.device) / 2**30
                    self.log(record)
                    loss_keys = [k for k in record if k.endswith("loss")]
                    bar.set_postfix({**{k: f"{record[k]:.4g}" for k in loss_keys}, "frames/s": f"{record['frames_per_second']:.0f}"})
                if int(run.sample_every) > 0 and (self.step % int(run.sample_every) == 0 or last):
                    path = self.write_sample(batch)
                    if path is not None:
                        self.log({"step": self.step, "sample": str(path)})
                if self.step % int(run.checkpoint_every) == 0 or last:
                    self.save_checkpoint()
                if logged and not last:
                    exported = self._export_due(started, exported)
                if out_of_time:
                    break
                if logged:  # the next window times training steps only, not samples and checkpoints
                    profiler = self._profile_window(profiler)
                    sums, counts = {}, {}
                    window_start, window_frames, window_steps = time.perf_counter(), 0, 0
        finally:
            bar.close()
            if self._tensorboard is not None:
                self._tensorboard.close()
        if self.is_main and not (self.run_dir / "model.safetensors").exists():
            self.save_checkpoint()  # a run resumed at (or configured for) no further steps still leaves its outputs
        self.log({"step": self.step, "wall_seconds": time.perf_counter() - started})
        return self.run_dir / "model.safetensors"


def run(stage: str, overrides: list[str]) -> Path:
    """Train ``stage`` with ``overrides``; returns the exported model path."""
    trainer = Trainer(stage, overrides)
    try:
        return trainer.train()
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()

