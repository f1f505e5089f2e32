"""Capturing Dynamo graphs for the tests (thin wrappers of ``rascompile.capture``), and running one step of a
rewritten graph."""

import torch

from rascompile.capture import GraphCapture, capture_graphs, capture_pipeline_graphs

__all__ = ["GraphCapture", "capture_graph", "capture_pipeline_graph", "run_ras_step"]


def capture_pipeline_graph(pipe, call_kwargs):
    """The Dynamo graph (and its real inputs) of ``pipe.transformer`` as the pipeline calls it (``fullgraph``)."""
    return capture_pipeline_graphs(pipe, call_kwargs, output_type=None, fullgraph=True, dynamic=None)[0]


def capture_graph(model, *args):
    """The one Dynamo graph of ``model(*args)`` (``fullgraph=True``) and its example inputs."""
    return capture_graphs(model, lambda compiled: compiled(*args), fullgraph=True, dynamic=None, reset=False)[0]


def run_ras_step(ras, ctx, inputs, idx, output_cache=None, kv=None):
    """One step of the RAS graph over the tokens ``idx``; fresh zeroed caches unless the caller passes its own."""
    output_cache = torch.zeros(ctx.output_cache_shape) if output_cache is None else output_cache
    kv = [torch.zeros(s.shape, dtype=s.dtype) for s in ctx.kv_slots] if kv is None else kv
    with torch.no_grad():
        return ras(*inputs, idx, output_cache, *kv)[0], output_cache, kv
