"""Capturing Dynamo graphs for the tests, and running one step of a rewritten graph."""

import torch


class GraphCapture:
    """A Dynamo backend that records the graphs and example inputs it is given and runs them eagerly."""

    def __init__(self):
        self.graphs = []

    def __call__(self, gm, example_inputs, **_):
        self.graphs.append((gm, list(example_inputs)))
        return gm.forward


def capture_pipeline_graph(pipe, call_kwargs):
    """The Dynamo graph (and its real inputs) of ``pipe.transformer`` as the pipeline calls it."""
    capture = GraphCapture()
    original = pipe.transformer
    pipe.transformer = torch.compile(original, backend=capture, fullgraph=True)
    try:
        with torch.no_grad():
            pipe(**{**call_kwargs, "num_inference_steps": 1})
    finally:
        pipe.transformer = original
        torch._dynamo.reset()
    return capture.graphs[0]


def capture_graph(model, *args):
    """The one Dynamo graph of ``model(*args)`` (``fullgraph=True``) and its example inputs."""
    graphs = []

    def backend(gm, example_inputs, **_):
        graphs.append((gm, example_inputs))
        return gm.forward

    with torch.no_grad():
        torch.compile(model, backend=backend, fullgraph=True)(*args)
    return graphs[0]


def run_ras_step(ras, ctx, inputs, idx, output_cache=None, kv=None):
    """One step of the RAS graph over the tokens ``idx``; fresh zeroed caches unless the caller passes its own."""
    output_cache = torch.zeros(ctx.output_cache_shape) if output_cache is None else output_cache
    kv = [torch.zeros(s.shape, dtype=s.dtype) for s in ctx.kv_slots] if kv is None else kv
    with torch.no_grad():
        return ras(*inputs, idx, output_cache, *kv)[0], output_cache, kv
