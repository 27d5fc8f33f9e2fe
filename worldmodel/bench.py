"""Generation speed: ``python -m worldmodel.bench [--device cuda] [--preset default] [--world procedural]``.

For frame-wise and chunk-wise models and 1, 2 and 4 denoising steps it prints, decode included:
- latency: time of one ``step`` (input in -> frame(s) out; its first forward also writes the previous
  block into the KV cache, a folded commit);
- FPS: frames per second of a loop of steps;
- first frame: from ``reset`` with a start image to the first generated frame;
- the autoencoder alone: decode (once per displayed frame) and encode (the start image) of one frame.
Weights are random: speed does not depend on them. ``--set SECTION.KEY=JSON`` (repeatable) changes the
preset's autoencoder or DiT, e.g. ``--set 'autoencoder.encoder_channels=[32,64,128]' --set dit.patch_size=4``.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time

import torch
from omegaconf import DictConfig

from worldmodel.actions import make_action
from worldmodel.cli_args import run_cli
from worldmodel.flow import step_list
from worldmodel.model import WorldModel, model_config
from worldmodel.session import Session

STEP_COUNTS = (1, 2, 4)  # each a flow.step_list of the model's own sampler


def _now(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return time.perf_counter()


def measure(session: Session, frames: int, warmup: int = 5) -> dict:
    """Median step latency, FPS of a loop of steps, and first-frame latency of ``session``."""
    device, tb = session.device, session.model.dit.cfg.block_size
    h, w = session.model.frame_size
    start = torch.randint(0, 256, (session.batch, h, w, 3), dtype=torch.uint8)
    action = make_action(session.model.action_spec, ["W"], dx=4.0).to(device).expand(session.batch, -1)
    action = action if tb == 1 else action[:, None].expand(-1, tb, -1)
    first = []
    for _ in range(3):
        t0 = _now(device)
        session.reset(start)
        session.step(action)
        first.append(_now(device) - t0)
    for _ in range(warmup + session.cache.capacity):  # fill the cache: steady state, all graphs captured
        session.step(action)
    steps = []
    for _ in range(max(1, frames // tb)):
        t0 = _now(device)
        session.step(action)
        steps.append(_now(device) - t0)
    return {
        "latency_ms": 1000 * statistics.median(steps),
        "fps": session.batch * tb / statistics.median(steps),
        "first_frame_ms": 1000 * statistics.median(first),
    }


def autoencoder_ms(model, batch: int, repeats: int = 20, warmup: int = 5) -> dict:
    """Median decode and encode latency (ms) of ``batch`` single frames by ``model``'s autoencoder."""
    ae, h, w = model.autoencoder, *model.frame_size
    weight = next(ae.parameters())
    frames = torch.rand(batch, 1, 3, h, w, device=weight.device, dtype=weight.dtype) * 2 - 1
    out = {}
    with torch.inference_mode():
        for name, fn, arg in (("decode_ms", ae.decode, ae.encode(frames)), ("encode_ms", ae.encode, frames)):
            times = []
            for _ in range(warmup + repeats):
                t0 = _now(weight.device)
                fn(arg)
                times.append(_now(weight.device) - t0)
            out[name] = 1000 * statistics.median(times[warmup:])
    return out


SETTABLE = ("autoencoder", "dit")
"""The model config sections that ``--set`` may change."""


def with_settings(config: DictConfig, settings: list[str]) -> DictConfig:
    """A copy of ``config`` with each ``SECTION.KEY=VALUE`` of ``settings`` set: SECTION one of :data:`SETTABLE`,
    KEY one it already has, VALUE JSON (a number, a list...). Anything else raises ValueError in one line."""
    config = config.copy()
    for setting in settings:
        name, sep, text = setting.partition("=")
        section, _, key = name.partition(".")
        if not sep or section not in SETTABLE or key not in config[section]:
            raise ValueError(f"--set {setting!r}: expected SECTION.KEY=VALUE with SECTION one of {list(SETTABLE)} and "
                             f"a key it has ({', '.join(config[section]) if section in SETTABLE else '...'})")
        try:
            config[section][key] = json.loads(text)
        except json.JSONDecodeError:
            raise ValueError(f"--set {setting!r}: the value is not JSON (e.g. 4, 2.5, [32,64,128])") from None
    return config


def run(preset: str, world: str, device: str, batch: int, frames: int, chunk: int, dtype: torch.dtype, cuda_graphs,
        settings: list[str] = ()):
    rows = []
    for block_size in (1, chunk):
        torch.manual_seed(0)
        model = WorldModel(with_settings(model_config(preset, world, block_size=block_size), list(settings)))
        for n_steps in STEP_COUNTS:
            sigmas = step_list(n_steps, model.config.sampler.steps)
            session = Session(model, batch=batch, device=device, steps=sigmas, dtype=dtype, cuda_graphs=cuda_graphs)
            r = measure(session, frames)
            rows.append({"granularity": "frame" if block_size == 1 else f"chunk{block_size}", "steps": n_steps, **r})
    return model, rows


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", default="default")
    p.add_argument("--world", default="procedural", choices=["procedural", "doom"])
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--frames", type=int, default=60, help="timed frames per row")
    p.add_argument("--chunk", type=int, default=3, help="latent frames per block of the chunk-wise rows")
    p.add_argument("--threads", type=int, default=None, help="CPU threads (default: torch's)")
    p.add_argument("--dtype", default=None, choices=["float32", "bfloat16", "float16"], help="default bf16 on CUDA")
    p.add_argument("--no-cuda-graphs", action="store_true")
    p.add_argument("--set", action="append", default=[], metavar="SECTION.KEY=JSON",
                   help="change the preset's autoencoder or dit config (repeatable)")
    args = p.parse_args(argv)
    return run_cli(lambda: report(args))  # a bad --set, or a model it makes impossible: one line, status 2


def report(args: argparse.Namespace) -> int:
    """Time the rows ``args`` asks for and print them."""
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    dtype = getattr(torch, args.dtype or ("bfloat16" if device.type == "cuda" else "float32"))
    graphs = False if (args.no_cuda_graphs or device.type != "cuda") else True
    model, rows = run(args.preset, args.world, args.device, args.batch, args.frames, args.chunk, dtype, graphs, args.set)
    params = model.num_parameters()
    cfg = model.dit.cfg
    where = torch.cuda.get_device_name(device) if device.type == "cuda" else f"CPU, {torch.get_num_threads()} threads"
    print(f"# {args.preset} model, {args.world} {model.frame_size[1]}x{model.frame_size[0]}: DiT {params['dit'] / 1e6:.1f}M params, "
          f"autoencoder {params['autoencoder'] / 1e6:.1f}M, {cfg.tokens_per_frame} tokens/frame, window {cfg.window_frames}+{cfg.sink_frames} sink")
    print(f"# {where}, batch {args.batch}, {str(dtype).replace('torch.', '')}, cuda graphs {'on' if graphs else 'off'}")
    ae = autoencoder_ms(model, args.batch)
    print(f"# autoencoder alone: decode {ae['decode_ms']:.2f} ms, encode {ae['encode_ms']:.2f} ms")
    print(f"{'granularity':>11} {'steps':>5} {'latency ms':>11} {'FPS':>8} {'first frame ms':>15}")
    for r in rows:
        print(f"{r['granularity']:>11} {r['steps']:>5} {r['latency_ms']:>11.2f} {r['fps']:>8.1f} {r['first_frame_ms']:>15.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
