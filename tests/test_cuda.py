"""GPU-only checks (skipped on machines without CUDA): graphs replay exactly what eager mode computes."""

import pytest
import torch

from worldmodel.actions import make_action
from worldmodel.model import build_model
from worldmodel.session import Session

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


@pytest.mark.parametrize("block_size", [1, 3])
def test_cuda_graph_session_equals_eager(block_size):
    model = build_model("tiny", seed=0, block_size=block_size)
    runs = []
    for graphs in (False, True):
        s = Session(model, device="cuda", seed=1, cuda_graphs=graphs)
        frames = [s.reset(None).frames]
        a = make_action(model.action_spec, ["W"], dx=5.0).cuda()[None]
        a = a if block_size == 1 else a[:, None].expand(-1, block_size, -1)
        for _ in range(3 * s.cache.capacity):
            frames.append(s.step(a).frames.reshape(1, -1))
        runs.append(torch.cat([f.reshape(1, -1) for f in frames], 1).float())
    assert (runs[0] - runs[1]).abs().max() <= 1.0  # uint8 frames: at most one level of rounding apart
