"""train.wheels: a wheel without some members, the rest byte for byte, RECORD without their rows."""

from __future__ import annotations

import csv
import io
import os
import zipfile

import pytest

from train.wheels import main, slim_wheel

RECORD = "pkg-1.0.dist-info/RECORD"


def make_wheel(path, members: dict[str, bytes]):
    record = io.StringIO()
    writer = csv.writer(record)  # pip's own line ending, \r\n
    for name, data in members.items():
        writer.writerow([name, f"sha256={len(data)}", str(len(data))])
    writer.writerow([RECORD, "", ""])
    with zipfile.ZipFile(path, "w", zipfile.ZIP_DEFLATED) as z:
        for name, data in members.items():
            z.writestr(name, data)
        z.writestr(RECORD, record.getvalue())


def test_slim_wheel_drops_the_members_and_their_record_rows_only(tmp_path):
    members = {name: os.urandom(size) for name, size in
               [("pkg/__init__.py", 10), ("pkg/big,file.wad", 5000), ("pkg/keep.wad", 3000), ("pkg/lib.so", 700)]}
    src, out = tmp_path / "pkg-1.0-py3-none-any.whl", tmp_path / "out.whl"
    make_wheel(src, members)
    slim_wheel(src, out, {"pkg/big,file.wad", "pkg/lib.so"})
    with zipfile.ZipFile(out) as z:
        assert sorted(z.namelist()) == sorted(["pkg/__init__.py", "pkg/keep.wad", RECORD])
        for name in ("pkg/__init__.py", "pkg/keep.wad"):
            assert z.read(name) == members[name]
        record = z.read(RECORD)
    assert record == b'pkg/__init__.py,sha256=10,10\r\npkg/keep.wad,sha256=3000,3000\r\n' + RECORD.encode() + b",,\r\n"
    assert not (tmp_path / "out.whl.part").exists()


@pytest.mark.parametrize("case", ["missing member", "not a zip", "no RECORD"])
def test_slim_wheel_refuses_bad_input_in_one_line_and_writes_nothing(tmp_path, capsys, case):
    src, out = tmp_path / "in.whl", tmp_path / "out.whl"
    if case == "not a zip":
        src.write_bytes(b"not a zip at all")
    elif case == "no RECORD":
        with zipfile.ZipFile(src, "w") as z:
            z.writestr("pkg/a.wad", b"x")
    else:
        make_wheel(src, {"pkg/a.wad": b"x"})
    drop = "pkg/b.wad" if case == "missing member" else "pkg/a.wad"
    assert main([str(src), str(out), "--drop", drop]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: ") and str(src) in err[0]
    assert not out.exists() and not (tmp_path / "out.whl.part").exists()
