"""Capturing Dynamo graphs: what ``torch.compile`` hands a backend for a module or for a pipeline's transformer.

``rascompile.check``, ``rascompile.export`` (tracing a pipeline), ``rascompile bench`` and the tests all need the
Dynamo graph(s) of a call and their example inputs. They get them here:

- :class:`GraphCapture`, a Dynamo backend that records ``(gm, example_inputs)`` for each graph and runs it
  eagerly, or through the backend it wraps (``GraphCapture(RASBackend(...))`` keeps a RAS backend's inputs);
- :func:`capture_graphs`, the graphs of ``call(torch.compile(module, backend=GraphCapture()))``;
- :func:`capture_pipeline_graphs`, the graphs of ``pipe.transformer`` in a one-step pipeline call.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
import torch.fx

#: One captured graph: the ``GraphModule`` and its example inputs, in placeholder order.
Captured = tuple[torch.fx.GraphModule, list]


class GraphCapture:
    """A Dynamo backend that records each graph and its example inputs in :attr:`graphs` (compile order).

    It runs a graph eagerly (``gm.forward``), or, with ``backend``, returns what that backend compiles (the
    keyword arguments Dynamo passes go to it). ``copy_inputs`` keeps copies of the tensor inputs that are not
    parameters, so that later in-place changes by the caller do not reach the recorded ones."""

    def __init__(self, backend: Callable | None = None, *, copy_inputs: bool = False):
        self.backend = backend
        self.copy_inputs = copy_inputs
        self.graphs: list[Captured] = []

    def __call__(self, gm: torch.fx.GraphModule, example_inputs: list, **kwargs: Any) -> Callable:
        compiled = self.backend(gm, example_inputs, **kwargs) if self.backend is not None else gm.forward
        inputs = [_kept(a) for a in example_inputs] if self.copy_inputs else list(example_inputs)
        self.graphs.append((gm, inputs))
        return compiled

    @property
    def example_inputs(self) -> list[list]:
        """The example inputs of each graph, in compile order."""
        return [inputs for _, inputs in self.graphs]


def capture_graphs(
    module: Callable,
    call: Callable[[Callable], Any],
    *,
    fullgraph: bool = False,
    dynamic: bool | None = False,
    copy_inputs: bool = False,
    reset: bool = True,
) -> list[Captured]:
    """The Dynamo graphs of ``module`` and their inputs, as ``call(compiled_module)`` runs them once (under
    ``torch.no_grad()``).

    ``fullgraph`` makes a graph break an error (``torch._dynamo.exc.Unsupported``); without it graph breaks give
    several graphs, in compile order. ``dynamic`` is ``torch.compile``'s (``False``: one graph per shape).
    ``copy_inputs`` as for :class:`GraphCapture`. ``reset`` resets Dynamo's caches when done (also when ``call``
    raises), so the recording backend leaves nothing behind."""
    capture = GraphCapture(copy_inputs=copy_inputs)
    compiled = torch.compile(module, backend=capture, fullgraph=fullgraph, dynamic=dynamic)
    try:
        with torch.no_grad():
            call(compiled)
    finally:
        if reset:
            torch._dynamo.reset()
    return capture.graphs


def capture_pipeline_graphs(
    pipe: Any,
    call_kwargs: dict,
    *,
    output_type: str | None = "latent",
    fullgraph: bool = False,
    dynamic: bool | None = False,
    copy_inputs: bool = False,
) -> list[Captured]:
    """The Dynamo graphs of ``pipe.transformer`` in one call ``pipe(**call_kwargs)`` of one step
    (``num_inference_steps=1``; ``output_type`` too unless it is ``None``).

    A transformer that is ``torch.compile``-d already is captured through its module. ``pipe.transformer`` is
    restored and Dynamo's caches are reset when done, also when the call raises. Other arguments as for
    :func:`capture_graphs`."""
    original = pipe.transformer
    transformer = unwrap(original)
    overrides: dict[str, Any] = {"num_inference_steps": 1}
    if output_type is not None:
        overrides["output_type"] = output_type

    def run(compiled: Callable) -> None:
        pipe.transformer = compiled
        pipe(**{**call_kwargs, **overrides})

    try:
        return capture_graphs(transformer, run, fullgraph=fullgraph, dynamic=dynamic, copy_inputs=copy_inputs)
    finally:
        pipe.transformer = original


def unwrap(module: Any) -> Any:
    """The module under a ``torch.compile`` wrapper (``module`` itself when it is not one)."""
    return getattr(module, "_orig_mod", module)


def _kept(value: Any) -> Any:
    if isinstance(value, torch.Tensor) and not isinstance(value, torch.nn.Parameter):
        return value.detach().clone()
    return value
