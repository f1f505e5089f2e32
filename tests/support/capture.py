"""Capturing Dynamo graphs for the tests (thin wrappers of ``rascompile.capture``), a pipeline's transformer call,
and running one step of a rewritten graph."""

import inspect

import torch

from rascompile.capture import GraphCapture, capture_graphs, capture_pipeline_graphs
from rascompile.passes.signature import StepSignature, step_signature

__all__ = ["GraphCapture", "capture_graph", "capture_pipeline_graph", "run_ras_step", "transformer_call_kwargs"]


def capture_pipeline_graph(pipe, call_kwargs):
    """The Dynamo graph (and its real inputs) of ``pipe.transformer`` as the pipeline calls it (``fullgraph``)."""
    return capture_pipeline_graphs(pipe, call_kwargs, output_type=None, fullgraph=True, dynamic=None)[0]


def capture_graph(model, *args):
    """The one Dynamo graph of ``model(*args)`` (``fullgraph=True``) and its example inputs."""
    return capture_graphs(model, lambda compiled: compiled(*args), fullgraph=True, dynamic=None, reset=False)[0]


def run_ras_step(ras, ctx, inputs, idx, output_cache=None, kv=None, every_output=False):
    """One step of the RAS graph ``ras`` over the tokens ``idx``, its inputs bound by its ``StepSignature`` (or
    the one of the pass context ``ctx``); fresh zeroed caches unless the caller passes its own. Returns the first
    output (``every_output``: the list of its tensor outputs), the output cache and the K/V caches."""
    signature = ctx if isinstance(ctx, StepSignature) else step_signature(ras, ctx)
    if output_cache is None:
        output_cache = torch.zeros(signature.output_cache.shape, dtype=signature.output_cache.dtype)
    kv = [torch.zeros(c.shape, dtype=c.dtype) for c in signature.kv_caches] if kv is None else kv
    with torch.no_grad():
        outputs = ras(*signature.bind(inputs, idx, output_cache, kv))
    if every_output:
        return [o for o in outputs if isinstance(o, torch.Tensor)], output_cache, kv
    return outputs[0], output_cache, kv


class _FirstCall(Exception):
    """Raised by ``transformer_call_kwargs``'s hook to stop the pipeline at its first transformer call."""


def transformer_call_kwargs(pipe, pipe_kwargs: dict) -> dict:
    """The arguments ``pipe`` passes to its transformer on its first call of ``pipe(**pipe_kwargs)``, by name (those
    passed by position too, bound by the forward's signature: EasyAnimate, Sana-Video): the pipeline's own layouts,
    dtypes, ids and masks, read from the real pipeline instead of written again."""
    signature = inspect.signature(pipe.transformer.forward)
    seen = {}

    def hook(module, args, kwargs):
        bound = signature.bind_partial(*args, **kwargs).arguments if args else kwargs
        seen.update({k: v.clone() if isinstance(v, torch.Tensor) else v for k, v in bound.items()})
        raise _FirstCall

    handle = pipe.transformer.register_forward_pre_hook(hook, with_kwargs=True)
    try:
        with torch.no_grad():
            pipe(**pipe_kwargs)
    except _FirstCall:
        pass
    finally:
        handle.remove()
    if not seen:
        raise AssertionError(f"{type(pipe).__name__} never called its transformer")
    return seen
