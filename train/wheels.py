"""A wheel without some of its files, so that what travels to the GPU machine fits its 64 MiB:

    python -m train.wheels SRC OUT --drop vizdoom/freedoom1.wad [--drop ...]

OUT holds every other member of SRC byte for byte, and its ``*.dist-info/RECORD`` loses the dropped
files' lines, so pip installs it as usual. ``train/scripts/wheels.sh doom`` uses it. A member that
is not in SRC, or a SRC that is not a wheel, is an error (one line, exit status 2); OUT is written
whole or not at all.
"""

from __future__ import annotations

import csv
import os
import sys
import zipfile
from pathlib import Path

from worldmodel.cli_args import ArgumentParser, run_cli


def record_without(record: bytes, drop: set[str]) -> bytes:
    """A RECORD file (CSV rows ``path,hash,size``) without the rows of the paths in ``drop``; the other
    rows stay byte for byte, line endings included."""
    lines = record.splitlines(keepends=True)
    return b"".join(line for line in lines if next(csv.reader([line.decode()]), [""])[0] not in drop)


def slim_wheel(src: Path, out: Path, drop: set[str]) -> None:
    """Write ``src`` without the members named in ``drop`` to ``out`` (through a temporary file)."""
    try:
        zin = zipfile.ZipFile(src)
    except zipfile.BadZipFile:
        raise ValueError(f"{src} is not a wheel (not a zip archive)") from None
    with zin:
        names = set(zin.namelist())
        missing = sorted(drop - names)
        if missing:
            raise ValueError(f"{src} has no member {missing[0]}")
        if not any(n.endswith(".dist-info/RECORD") for n in names):
            raise ValueError(f"{src} is not a wheel (no .dist-info/RECORD)")
        part = out.with_name(out.name + ".part")
        try:
            with zipfile.ZipFile(part, "w", zipfile.ZIP_DEFLATED, compresslevel=9) as zout:
                for item in zin.infolist():
                    if item.filename in drop:
                        continue
                    data = zin.read(item)
                    if item.filename.endswith(".dist-info/RECORD"):
                        data = record_without(data, drop)
                    zout.writestr(item, data)
            os.replace(part, out)
        finally:
            part.unlink(missing_ok=True)


def main(argv: list[str] | None = None) -> int:
    parser = ArgumentParser(prog="python -m train.wheels", description=__doc__.split("\n\n")[0])
    parser.add_argument("src", type=Path)
    parser.add_argument("out", type=Path)
    parser.add_argument("--drop", action="append", required=True, help="an archive member to leave out (repeatable)")

    def run() -> int:
        args = parser.parse_args(argv)
        slim_wheel(args.src, args.out, set(args.drop))
        print(f"{args.out.name}: {args.src.stat().st_size / 2**20:.1f} -> {args.out.stat().st_size / 2**20:.1f} MiB")
        return 0

    return run_cli(run)


if __name__ == "__main__":
    sys.exit(main())
