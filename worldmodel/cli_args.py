"""What the command-line tools share: a strict parser, argparse ``type=`` callables, and the
one-line error convention (``error: ...`` on stderr, exit status 2)."""

from __future__ import annotations

import argparse
import difflib
import math
import re
import sys
from collections.abc import Callable

from worldmodel.files import os_error_line

MAX_SEED = 2**63 - 1
DEVICE = re.compile(r"cpu|cuda(:\d+)?")


class UsageError(ValueError):
    """A command line argparse cannot use (bad flag or value)."""


class ArgumentParser(argparse.ArgumentParser):
    """argparse without abbreviated flags, whose errors raise :class:`UsageError` with one line
    (suggesting the closest flag for an unknown one) instead of printing the usage and exiting."""

    def __init__(self, *args, **kwargs):
        kwargs.setdefault("allow_abbrev", False)
        super().__init__(*args, **kwargs)

    def parse_known_args(self, args=None, namespace=None):
        """Refuse an unknown ``--flag`` before anything else (a missing required option included), so its
        error can suggest the flag meant; parsers with subcommands leave that to the subcommand's parser."""
        if self._subparsers is None:
            for arg in sys.argv[1:] if args is None else args:
                if arg == "--":
                    break
                if arg.startswith("--") and arg.split("=", 1)[0] not in self._option_string_actions:
                    self.error(f"unrecognized arguments: {arg}")
        return super().parse_known_args(args, namespace)

    def error(self, message: str):
        unknown = re.match(r"unrecognized arguments: (\S+)", message)
        if unknown and unknown.group(1).startswith("-"):
            flag = unknown.group(1).split("=", 1)[0]
            close = difflib.get_close_matches(flag, [s for s in self._option_string_actions if s.startswith("--")], n=1)
            hint = f"; did you mean {close[0]}?" if close else ""
            raise UsageError(f"unknown option {flag}{hint} (see {self.prog} --help)")
        raise UsageError(f"{message} (see {self.prog} --help)")


def run_cli(run: Callable[[], int], interrupted: str | None = None) -> int:
    """Call ``run`` (a CLI body returning its exit status), turning a ValueError or OSError into one
    ``error:`` line and status 2, and Ctrl-C into status 130 (printing ``interrupted`` if given)."""
    try:
        return run()
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
    except OSError as e:
        print(f"error: {os_error_line(e)}", file=sys.stderr)
    except KeyboardInterrupt:
        if interrupted:
            print(interrupted, file=sys.stderr)
        return 130
    return 2


def parse_size(text: str) -> tuple[int, int]:
    """``"WIDTHxHEIGHT"`` (e.g. ``160x120``) -> (width, height), each 1..65535."""
    try:
        w, h = (int(v) for v in text.lower().split("x"))
    except ValueError:
        raise argparse.ArgumentTypeError(f"size must look like WIDTHxHEIGHT (e.g. 160x120), got {text!r}") from None
    if not (0 < w < 65536 and 0 < h < 65536):
        raise argparse.ArgumentTypeError(f"size must be 1..65535 on each side, got {text!r}")
    return w, h


def int_in(low: int, high: int) -> Callable[[str], int]:
    """An argparse type: an integer in ``low..high``."""

    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected an integer, got {text!r}") from None
        if not low <= value <= high:
            raise argparse.ArgumentTypeError(f"expected an integer in {low}..{high}, got {text!r}")
        return value

    return parse


def float_in(low: float, high: float) -> Callable[[str], float]:
    """An argparse type: a number ``x`` with ``low < x <= high``."""

    def parse(text: str) -> float:
        try:
            value = float(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None
        if not (math.isfinite(value) and low < value <= high):
            raise argparse.ArgumentTypeError(f"expected a number above {low:g} and at most {high:g}, got {text!r}")
        return value

    return parse


positive_int = int_in(1, 2**31 - 1)
seed_int = int_in(0, MAX_SEED)


def device_name(text: str) -> str:
    """An argparse type: ``cpu``, ``cuda`` or ``cuda:N`` (whether CUDA is present is checked where it is used)."""
    if not DEVICE.fullmatch(text):
        raise argparse.ArgumentTypeError(f"expected cpu, cuda or cuda:N, got {text!r}")
    return text
