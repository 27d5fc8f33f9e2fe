"""CUDA-graph replay of the per-frame path: the cached DiT forward and the decoder.

A cached forward's shapes depend only on how many frames the cache holds (and whether it writes),
so one graph is captured per (frames held, write, input shape): at most 2 x (capacity + 1)
graphs, all sharing one memory pool. Warm-up and capture run the real code on the real cache
buffers; the cache's contents and counters are saved before and restored after, so capturing
never changes a session. On the CPU nothing here is used.
"""

from __future__ import annotations

import torch

from worldmodel.transformer import KVCache, WorldDiT


class GraphedFunction:
    """Replays ``fn(*inputs)`` from a CUDA graph per key; inputs are copied into static buffers."""

    def __init__(self):
        self.pool = torch.cuda.graph_pool_handle()
        self.graphs: dict = {}

    def __call__(self, key, fn, inputs: tuple[torch.Tensor, ...], save=None, restore=None):
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
            for _ in range(2):
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


class GraphedDiT:
    """``forward_cached`` and ``decode`` of a model on CUDA, replayed from graphs."""

    def __init__(self, dit: WorldDiT, decode):
        self.dit, self.decode_fn = dit, decode
        self.graphs = GraphedFunction()

    def forward_cached(self, x, sigma, actions, poses, cache: KVCache, write: bool = False):
        def save():
            return cache.k.clone(), cache.v.clone(), cache.frames, cache.written

        def restore(state):
            cache.k.copy_(state[0])
            cache.v.copy_(state[1])
            cache.frames, cache.written = state[2], state[3]

        def run(x, sigma, actions, poses):
            return self.dit.forward_cached(x, sigma, actions, poses, cache, write=write)

        out = self.graphs((cache.frames, write, tuple(x.shape)), run, (x, sigma, actions, poses), save, restore)
        if write:
            cache.advance(x.shape[1])
        return out.clone()

    def decode(self, latents):
        return self.graphs(("decode", tuple(latents.shape)), self.decode_fn, (latents,)).clone()
