"""``python -m train STAGE [key=value ...]``: train one stage (``python -m train STAGE --help`` lists its keys).

Multi-GPU: ``torchrun --nproc_per_node=N -m train STAGE ...`` (``data.batch`` is the global batch).
Bad options, configs and files print one line ``error: ...`` and exit with status 2.
"""

from __future__ import annotations

import sys

from omegaconf import OmegaConf

from train import __doc__ as package_doc
from train.config import STAGES, compose, stage_help
from worldmodel.cli_args import ArgumentParser, run_cli

INTERRUPTED = "interrupted; run the same command again to continue from the newest checkpoint"


def run(argv: list[str]) -> int:
    stage = next((a for a in argv if not a.startswith("-")), None)
    if stage in STAGES and ("-h" in argv or "--help" in argv):
        print(stage_help(stage))
        return 0
    parser = ArgumentParser(
        prog="python -m train", description=package_doc.splitlines()[0],
        epilog="Example: python -m train teacher init.autoencoder=runs/autoencoder/model.safetensors preset=default "
               "run.steps=50000 data.batch=64. Killed runs continue from their newest checkpoint when started again.")
    parser.add_argument("stage", choices=STAGES)
    parser.add_argument("overrides", nargs="*", metavar="key=value", help="config overrides (unknown keys are an error)")
    parser.add_argument("--print-config", action="store_true",
                        help="print the composed config (the model section is filled in when a run starts) and exit")
    args = parser.parse_intermixed_args(argv)
    if args.print_config:
        cfg, _ = compose(args.stage, args.overrides)
        print(OmegaConf.to_yaml(cfg))
        return 0
    from train.trainer import run as train

    path = train(args.stage, args.overrides)
    print(f"{args.stage}: model written to {path}")
    return 0


def main(argv: list[str] | None = None) -> int:
    return run_cli(lambda: run(list(sys.argv[1:] if argv is None else argv)), INTERRUPTED)


if __name__ == "__main__":
    sys.exit(main())
