"""``python -m train STAGE [key=value ...]``: train one stage (see train/configs/*.yaml for the keys).

Multi-GPU: ``torchrun --nproc_per_node=N -m train STAGE ...`` (``data.batch`` is the global batch).
"""

from __future__ import annotations

import argparse
import sys

from omegaconf import OmegaConf

from train import __doc__ as package_doc
from train.config import STAGES, compose


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m train", description=package_doc.splitlines()[0],
        epilog="Example: python -m train teacher init.autoencoder=runs/autoencoder/model.safetensors preset=default "
               "run.steps=50000 data.batch=64. Killed runs continue from their newest checkpoint when started again.")
    parser.add_argument("stage", choices=STAGES)
    parser.add_argument("overrides", nargs="*", metavar="key=value", help="config overrides (unknown keys are an error)")
    parser.add_argument("--print-config", action="store_true",
                        help="print the composed config (the model section is filled in when a run starts) and exit")
    args = parser.parse_intermixed_args(argv)
    try:
        if args.print_config:
            cfg, _ = compose(args.stage, args.overrides)
            print(OmegaConf.to_yaml(cfg))
            return 0
        from train.trainer import run

        path = run(args.stage, args.overrides)
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted; run the same command again to continue from the newest checkpoint", file=sys.stderr)
        return 130
    print(f"{args.stage}: model written to {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
