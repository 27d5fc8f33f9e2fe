"""FlexAttention alone on the training stages' teacher-forcing mask, forward and backward, under each set of Triton
kernel options: which tiles, warps and stages suit our shapes (GPU; compiled as in training).

    python3 train/scripts/flex_bench.py [--batch 256] [--frames 13] [--tokens 64] [--heads 4] [--head-dim 64]

q, k and v are laid out as the DiT makes them (``[B, L, 3, H, D]`` split and permuted to ``[B, H, L, D]``);
"contiguous" rows copy them first. A set of options that does not compile prints its error's first line.
"""

import argparse
import sys
import time
from pathlib import Path

import torch
from torch.nn.attention.flex_attention import flex_attention

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
from worldmodel.transformer import FLEX_KERNEL_OPTIONS, flex_block_mask, sequence_frames  # noqa: E402

OPTIONS = {  # name -> (kernel options, contiguous inputs): forward tiles (M x N), warps and stages
    "default": (None, False),
    "default, contiguous q/k/v": (None, True),
    "fwd 128x64, 4 warps": ({"fwd_BLOCK_M": 128, "fwd_BLOCK_N": 64, "fwd_num_warps": 4, "fwd_num_stages": 3}, False),
    "fwd 128x64, 8 warps": ({"fwd_BLOCK_M": 128, "fwd_BLOCK_N": 64, "fwd_num_warps": 8, "fwd_num_stages": 3}, False),
    "fwd 128x128, 8 warps": ({"fwd_BLOCK_M": 128, "fwd_BLOCK_N": 128, "fwd_num_warps": 8, "fwd_num_stages": 3}, False),
    "fwd 64x64, 4 warps": ({"fwd_BLOCK_M": 64, "fwd_BLOCK_N": 64, "fwd_num_warps": 4, "fwd_num_stages": 3}, False),
    "fwd 128x128, 8 warps, 2 stages": ({"fwd_BLOCK_M": 128, "fwd_BLOCK_N": 128, "fwd_num_warps": 8, "fwd_num_stages": 2}, False),
}
BACKWARD = {  # the shipped tiles (FLEX_KERNEL_OPTIONS) with these backward tiles (M1, N1, M2, N2), warps, stages
    "bwd 64/64/64/64, 4 warps": (64, 64, 64, 64, 4, 3),
    "bwd 64/128/128/64, 4 warps": (64, 128, 128, 64, 4, 3),
    "bwd 32/64/64/32, 4 warps": (32, 64, 64, 32, 4, 3),
    "bwd 32/128/128/32, 4 warps": (32, 128, 128, 32, 4, 3),
    "bwd 64/128/128/64, 8 warps, 2 stages": (64, 128, 128, 64, 8, 2),
}
for name, (m1, n1, m2, n2, warps, stages) in BACKWARD.items():
    OPTIONS[name] = ({**FLEX_KERNEL_OPTIONS, "bwd_BLOCK_M1": m1, "bwd_BLOCK_N1": n1, "bwd_BLOCK_M2": m2,
                      "bwd_BLOCK_N2": n2, "bwd_num_warps": warps, "bwd_num_stages": stages}, False)


def timed(fn, repeats: int, device: str) -> float:
    """Mean milliseconds of ``fn()`` over ``repeats`` calls, after three warm-up calls."""
    sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)
    for _ in range(3):
        fn()
    sync()
    start = time.perf_counter()
    for _ in range(repeats):
        fn()
    sync()
    return (time.perf_counter() - start) * 1000 / repeats


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--batch", type=int, default=256)
    p.add_argument("--frames", type=int, default=13, help="clip frames: the sequence is [clean | noisy], all but the last clean one")
    p.add_argument("--tokens", type=int, default=64, help="tokens per frame")
    p.add_argument("--heads", type=int, default=4)
    p.add_argument("--head-dim", type=int, default=64)
    p.add_argument("--repeats", type=int, default=20)
    p.add_argument("--device", default="cuda")
    args = p.parse_args()
    device = args.device
    frames = sequence_frames("teacher_forcing", args.frames, 1, device)[0]
    mask = flex_block_mask(frames, args.tokens)
    length = frames.shape[0] * args.tokens
    qkv = torch.randn(args.batch, length, 3, args.heads, args.head_dim, device=device, dtype=torch.bfloat16)
    grad = torch.randn(args.batch, args.heads, length, args.head_dim, device=device, dtype=torch.bfloat16)
    print(f"{torch.cuda.get_device_name() if device == 'cuda' else device}, torch {torch.__version__}: B {args.batch}, H {args.heads}, L {length}, "
          f"D {args.head_dim}, teacher forcing over {args.frames} frames of {args.tokens} tokens, bf16")
    print(f"{'options':34s} {'forward ms':>10s} {'fwd+bwd ms':>10s} {'backward ms':>11s}")
    for name, (options, contiguous) in OPTIONS.items():
        torch._dynamo.reset()
        attend = torch.compile(lambda q, k, v: flex_attention(q, k, v, block_mask=mask, kernel_options=options))
        leaf = qkv.clone().requires_grad_(True)

        def inputs():
            q, k, v = (t.permute(0, 2, 1, 3) for t in leaf.unbind(2))
            return tuple(t.contiguous() for t in (q, k, v)) if contiguous else (q, k, v)

        def forward():
            with torch.no_grad():
                attend(*inputs())

        def both():
            attend(*inputs()).backward(grad)

        try:
            fwd, total = timed(forward, args.repeats, device), timed(both, args.repeats, device)
        except Exception as e:  # a set of options Inductor cannot lower
            print(f"{name:34s} failed: {str(e).strip().splitlines()[0][:150]}")
            continue
        print(f"{name:34s} {fwd:10.3f} {total:10.3f} {total - fwd:11.3f}", flush=True)


if __name__ == "__main__":
    main()
