"""Test-wide settings: Triton kernels run in Triton's CPU interpreter (set before anything imports triton)."""

import importlib.util
import os
from pathlib import Path

os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402
import torch  # noqa: E402


@pytest.fixture
def one_thread():
    """These tensors are tiny: one thread is fastest, and immune to a busy second core."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture
def train_script():
    """Loads ``train/scripts/NAME.py`` as a module: ``train_script("rollout_latents").main``."""
    def load(name: str):
        path = Path(__file__).resolve().parents[1] / "train" / "scripts" / f"{name}.py"
        spec = importlib.util.spec_from_file_location(name, path)
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        return module
    return load
