"""Fixed-shape steps replayed as CUDA graphs: one launch instead of hundreds of kernel launches.

A training step of a 10M-parameter student issues hundreds of small kernels; on a GPU the Python
thread that launches them, not the GPU, sets the pace (issue 14). ``torch.cuda.CUDAGraph`` records
the kernels of a step once and replays them with one call. What a captured step may not do: read
the device from the host, allocate from the host's memory, or depend on Python values that change
between steps (they are baked into the recorded kernels).
"""

from __future__ import annotations

import torch


class GraphedStep:
    """``fn(*tensors)`` captured once as a CUDA graph and then replayed.

    Each call copies its tensor arguments into the graph's own input tensors and returns the
    graph's outputs: the same tensors every call, so read them before the next call. ``None``
    arguments stay ``None``. The first ``warmup`` calls run ``fn`` plainly on a side stream (as
    capture requires: lazy initialisations, cuDNN's autotuning, an optimizer's state); so does
    every call whose ``key`` (the Python values ``fn`` bakes into its kernels, such as learning
    rates) differs from the previous call's. The graph is captured once the key holds still and
    captured again if it changes.
    """

    def __init__(self, fn, warmup: int = 3):
        self.fn = fn
        self.warmup = warmup
        self.calls = 0
        self.key = None
        self.graph = None
        self.inputs: list = []
        self.outputs = None
        self._stream = None

    def __call__(self, *args, key=None):
        stable, self.key = key == self.key, key
        if self.graph is not None and not stable:
            self.graph = self.inputs = self.outputs = None  # its memory returns to the caching allocator
        if self.graph is None:
            if self.calls < self.warmup or not stable:
                self.calls += 1
                return self._plain(args)
            self._capture(args)
        else:
            for mine, new in zip(self.inputs, args):
                if mine is not None and mine is not new:
                    mine.copy_(new)
        self.graph.replay()
        return self.outputs

    def _plain(self, args):
        if self._stream is None:
            self._stream = torch.cuda.Stream()
        main = torch.cuda.current_stream()
        self._stream.wait_stream(main)
        with torch.cuda.stream(self._stream):
            out = self.fn(*args)
        main.wait_stream(self._stream)
        return out

    def _capture(self, args) -> None:
        # the graph's inputs are its own dense copies (a batch's tensors may be broadcast views)
        self.inputs = [None if a is None else a.clone(memory_format=torch.contiguous_format) for a in args]
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            self.outputs = self.fn(*self.inputs)
        self.graph = graph
