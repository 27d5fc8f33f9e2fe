"""GPU benchmark of the attention JVP kernel against ``torch.func.jvp`` over math attention.

    python -m kernels.bench_attention_jvp [--out bench.json] [--batch 64] [--sweep]

Shapes: the default preset's sCM pass (``B`` clips, 4 heads of 64, teacher forcing over
``2 x 13`` frames (``data.clip_len``) of 64 tokens = 1664 tokens) and the same at 4x the tokens
(256 a frame, 6656 tokens). Per shape and dtype: (a) the Triton kernel, (b) ``torch.func.jvp``
over math attention (matmul + masked softmax), (c) the plain SDPA forward alone (token mask), for
scale. Median of CUDA-event timings after warm-up; peak memory above the inputs. A markdown table
goes to stdout, the rows (and the machine) to ``--out`` as JSON. ``--sweep`` also times the
kernel's alternative tile configurations. Needs a CUDA GPU.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys

import torch
import torch.nn.functional as F

from kernels import attention_jvp as aj

# the default preset: worldmodel.model.PRESETS["default"] (dim 256, 4 heads), train/configs/model/default.yaml
# (clip_len 13), 8x16x16 latents in patches of 2 (64 tokens a frame)
HEADS, HEAD_DIM, CLIP_LEN, TOKENS = 4, 64, 13, 64
SWEEP = {  # (block_m, block_n, num_warps, num_stages)
    torch.bfloat16: [(64, 64, 8, 2), (64, 64, 4, 2), (64, 64, 4, 3), (64, 32, 4, 2), (64, 32, 8, 3),
                     (128, 32, 8, 3), (128, 64, 8, 2), (128, 64, 8, 3)],
    torch.float32: [(64, 32, 8, 2), (64, 32, 4, 2), (64, 16, 4, 2), (128, 32, 8, 2)],
}


def frame_mask_teacher_forcing(t: int, device) -> torch.Tensor:
    """``[2T, 2T]``: worldmodel.transformer.frame_mask("teacher_forcing", t, 1), rebuilt here
    (kernels imports nothing of ours): clean f sees clean <= f; noisy f sees clean < f and itself."""
    f = torch.arange(t, device=device)
    q, k = f[:, None], f[None, :]
    top = torch.cat([k <= q, torch.zeros_like(k <= q)], 1)
    return torch.cat([top, torch.cat([k < q, k == q], 1)], 0)


def timed(fn, warmup: int = 3, reps: int = 10, budget_ms: float = 4000.0) -> tuple[float, float]:
    """``(median ms, peak MiB above what was allocated before)`` of ``fn()`` (CUDA events)."""
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    out = fn()
    torch.cuda.synchronize()
    peak = (torch.cuda.max_memory_allocated() - base) / 2 ** 20
    del out
    for _ in range(warmup):
        fn()
    times = []
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    while len(times) < reps and (len(times) < 3 or sum(times) < budget_ms):
        start.record()
        fn()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end))
    return statistics.median(times), peak


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.float() - b.float()).norm() / b.float().norm())


def bench_shape(batch: int, tokens: int, dtypes, sweep: bool, device="cuda") -> list[dict]:
    """The rows of one shape: ``batch`` clips of ``2 x CLIP_LEN`` frames of ``tokens`` tokens."""
    length = 2 * CLIP_LEN * tokens
    frames = frame_mask_teacher_forcing(CLIP_LEN, device)
    mask = frames.repeat_interleave(tokens, 0).repeat_interleave(tokens, 1)
    shape = f"B{batch} H{HEADS} L{length} hd{HEAD_DIM} (2x{CLIP_LEN} frames x {tokens})"
    g = torch.Generator(device=device).manual_seed(0)
    base = [torch.randn(batch, HEADS, length, HEAD_DIM, generator=g, device=device) for _ in range(6)]
    rows = []
    try:  # the accuracy yardstick: float32 math attention under torch.func.jvp, or the float32 kernel
        with torch.no_grad():
            reference, ref_name = aj.attention_jvp_reference(*base, frames, tokens), "fp32 math"
    except torch.cuda.OutOfMemoryError:
        torch.cuda.empty_cache()
        with torch.no_grad():
            reference, ref_name = aj.attention_jvp_triton(*base, frames, tokens), "fp32 kernel"

    def row(impl, dtype, fn, **extra):
        r = {"shape": shape, "batch": batch, "tokens": length, "impl": impl, "dtype": str(dtype).replace("torch.", ""),
             **extra}
        try:
            with torch.no_grad():
                r["ms"], r["peak_mib"] = timed(fn)
        except torch.cuda.OutOfMemoryError:
            r["ms"], r["peak_mib"], r["note"] = None, None, "out of memory"
        except Exception as e:  # a config that does not compile or launch (sweep)
            r["ms"], r["peak_mib"], r["note"] = None, None, f"{type(e).__name__}: {str(e).splitlines()[0][:120]}"
        torch.cuda.empty_cache()
        rows.append(r)
        print(f"  {impl:34} {r['dtype']:8} {r['ms'] if r['ms'] is None else round(r['ms'], 3)} ms"
              f"  {r.get('note', '')}", file=sys.stderr, flush=True)
        return r

    for dtype in dtypes:
        q, k, v, tq, tk, tv = (t.to(dtype) for t in base)
        args = (q, k, v, tq, tk, tv)
        math = row("torch.func.jvp (math attention)", dtype,
                   lambda: aj.attention_jvp_reference(*args, frames, tokens))
        kern = row("triton attention_jvp (o + to)", dtype,
                   lambda: aj.attention_jvp_triton(*args, frames, tokens))
        if kern["ms"] is not None:
            with torch.no_grad():
                o, to = aj.attention_jvp_triton(*args, frames, tokens)
            kern["err_o"], kern["err_to"], kern["err_reference"] = rel(o, reference[0]), rel(to, reference[1]), ref_name
            del o, to
        if math["ms"] is not None and kern["ms"] is not None:
            kern["speedup_vs_jvp"] = math["ms"] / kern["ms"]
        row("sdpa forward only (token mask)", dtype,
            lambda: F.scaled_dot_product_attention(q, k, v, attn_mask=mask))
        if sweep:
            for bm, bn, warps, stages in SWEEP.get(dtype, []):
                r = row(f"  sweep bm{bm} bn{bn} w{warps} s{stages}", dtype,
                        lambda: aj.attention_jvp_triton(*args, frames, tokens, block_m=bm, block_n=bn,
                                                        num_warps=warps, num_stages=stages))
                if math["ms"] is not None and r["ms"] is not None:
                    r["speedup_vs_jvp"] = math["ms"] / r["ms"]
        del q, k, v, tq, tk, tv, args
        torch.cuda.empty_cache()
    del reference, base
    torch.cuda.empty_cache()
    return rows


def table(rows: list[dict]) -> str:
    lines = ["| shape | implementation | dtype | ms (median) | speed-up vs jvp | peak MiB | rel. err of to |",
             "|---|---|---|---:|---:|---:|---:|"]
    for r in rows:
        ms = r.get("note", "") if r["ms"] is None else f"{r['ms']:.3f}"
        sp = f"{r['speedup_vs_jvp']:.1f}x" if "speedup_vs_jvp" in r else ""
        mem = "" if r["peak_mib"] is None else f"{r['peak_mib']:.0f}"
        err = f"{r['err_to']:.1e} (vs {r['err_reference']})" if "err_to" in r else ""
        lines.append(f"| {r['shape']} | {r['impl'].strip()} | {r['dtype']} | {ms} | {sp} | {mem} | {err} |")
    return "\n".join(lines)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", help="write the rows as JSON here")
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--scales", type=int, nargs="+", default=[1, 4], help="token multipliers (1 = 64 tokens a frame)")
    p.add_argument("--dtypes", nargs="+", default=["bfloat16", "float32"], choices=["bfloat16", "float16", "float32"])
    p.add_argument("--sweep", action="store_true", help="also time alternative kernel tile configurations")
    a = p.parse_args(argv)
    if not torch.cuda.is_available():
        raise SystemExit("bench_attention_jvp needs a CUDA GPU: torch.cuda.is_available() is False")
    if aj.triton is None:
        raise SystemExit("bench_attention_jvp needs triton (pip install triton)")
    if os.environ.get("TRITON_INTERPRET", "0") not in ("", "0"):
        raise SystemExit("unset TRITON_INTERPRET: the benchmark times compiled kernels")
    dtypes = [getattr(torch, d) for d in a.dtypes]
    rows = []
    for scale in a.scales:
        print(f"B={a.batch}, {TOKENS * scale} tokens a frame:", file=sys.stderr, flush=True)
        rows += bench_shape(a.batch, TOKENS * scale, dtypes, a.sweep)
    print(table(rows))
    if a.out:
        meta = {"gpu": torch.cuda.get_device_name(), "torch": torch.__version__, "triton": aj.triton.__version__,
                "fp32_matmul_precision": torch.get_float32_matmul_precision(),
                "mask": "teacher_forcing, frame-wise blocks", "heads": HEADS, "head_dim": HEAD_DIM}
        with open(a.out, "w") as f:
            json.dump({"meta": meta, "rows": rows}, f, indent=1)
        print(f"wrote {a.out}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
