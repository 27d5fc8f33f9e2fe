"""CUDA-graph replay for the per-frame path (used by the session on CUDA; nothing here runs on CPU).

A function whose tensor shapes and Python-side decisions depend only on a key (for the session:
how many frames the KV cache holds, the step list, the block shape) is captured once per key and
replayed; all graphs share one memory pool. Inputs are copied into static buffers; outputs are
the graph's static tensors (clone them before the next replay). ``save``/``restore`` hooks keep
state that warm-up and capture would change (the KV cache) as it was.
"""

from __future__ import annotations

import torch


class GraphedFunction:
    def __init__(self):
        self.pool = torch.cuda.graph_pool_handle()
        self.graphs: dict = {}

    def __call__(self, key, fn, inputs: tuple[torch.Tensor, ...], save=None, restore=None):
        """``fn(*inputs)`` -> tensor or tuple of tensors, replayed from the graph of ``key``."""
        if key not in self.graphs:
            self.graphs[key] = self._capture(fn, inputs, save, restore)
        graph, static_in, static_out = self.graphs[key]
        for buf, x in zip(static_in, inputs):
            buf.copy_(x)
        graph.replay()
        return static_out

    def _capture(self, fn, inputs, save, restore):
        static_in = tuple(x.clone() for x in inputs)
        state = save() if save else None
        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream):
            for _ in range(2):  # warm-up: lazy initialisation must not happen during capture
                fn(*static_in)
                if restore:
                    restore(state)
        torch.cuda.current_stream().wait_stream(stream)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, pool=self.pool):
            static_out = fn(*static_in)
        if restore:
            restore(state)
        return graph, static_in, static_out
