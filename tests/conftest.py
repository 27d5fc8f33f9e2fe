"""Test-wide settings: Triton kernels run in Triton's CPU interpreter (set before anything imports triton)."""

import os

os.environ.setdefault("TRITON_INTERPRET", "1")
