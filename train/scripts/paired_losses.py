"""Two runs of one stage with the same seed see the same batches at the same steps: compare their logged training
loss and PSNR step for step, averaged over windows of steps (a paired comparison, far less noisy than either curve).

    python3 train/scripts/paired_losses.py A/log.jsonl B/log.jsonl [--every 100]     (.jsonl or .jsonl.gz)
"""

from __future__ import annotations

import argparse
import gzip
import json


def logged_steps(path: str) -> dict[int, dict]:
    """Step -> the log row of that step, for the rows that carry a loss and a PSNR."""
    with (gzip.open if path.endswith(".gz") else open)(path, "rt") as f:
        rows = (json.loads(line) for line in f)
        return {r["step"]: r for r in rows if "loss" in r and "psnr" in r}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("a")
    parser.add_argument("b")
    parser.add_argument("--every", type=int, default=100, help="steps per window (default 100)")
    args = parser.parse_args()
    a, b = logged_steps(args.a), logged_steps(args.b)
    shared = sorted(set(a) & set(b))
    print("| steps | logged | loss A | loss B | train PSNR A | train PSNR B | B - A dB |\n|---|---|---|---|---|---|---|")
    for start in range(0, shared[-1] if shared else 0, args.every):
        window = [s for s in shared if start < s <= start + args.every]
        if not window:
            continue
        mean = lambda rows, key: sum(rows[s][key] for s in window) / len(window)  # noqa: E731
        pa, pb = mean(a, "psnr"), mean(b, "psnr")
        print(f"| {start + 1}-{start + args.every} | {len(window)} | {mean(a, 'loss'):.4f} | {mean(b, 'loss'):.4f} | "
              f"{pa:.2f} | {pb:.2f} | {pb - pa:+.2f} |")


if __name__ == "__main__":
    main()
