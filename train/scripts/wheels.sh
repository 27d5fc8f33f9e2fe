#!/usr/bin/env bash
# The wheels that the GPU machine's image lacks, into .whl/ (git-ignored; carry it with the command):
#   bash train/scripts/wheels.sh           omegaconf and antlr4 (every lease)
#   bash train/scripts/wheels.sh doom      and ViZDoom for the GPU image's Python (GPU_PYTHON, default 3.12), without
#                                          freedoom1.wad (Doom plays freedoom2.wad): 27 MiB instead of 37, so that it
#                                          fits the 64 MiB that travel
# Downloads go to a scratch folder, never into the tree.
set -euo pipefail
DEST=${DEST:-.whl}
TMP=$(mktemp -d)
trap 'rm -rf "$TMP"' EXIT
mkdir -p "$DEST"
python3 -m pip download -q omegaconf==2.3.0 --no-deps -d "$TMP/whl"
python3 -m pip download -q antlr4-python3-runtime==4.9.3 --no-deps --no-binary :all: -d "$TMP/antlr"
python3 -m pip wheel -q --no-deps "$TMP"/antlr/antlr4* -w "$TMP/whl"
if [ "${1:-}" = doom ]; then
  python3 -m pip download -q vizdoom==1.3.2 --no-deps --only-binary :all: --python-version "${GPU_PYTHON:-3.12}" \
    --platform manylinux_2_28_x86_64 -d "$TMP/vizdoom"
  src=$(ls "$TMP"/vizdoom/vizdoom-*.whl)
  python3 -m train.wheels "$src" "$TMP/whl/$(basename "$src")" --drop vizdoom/freedoom1.wad
fi
cp "$TMP"/whl/*.whl "$DEST/"
ls -la "$DEST"
