import os
import sys
import warnings

# Triton kernels run on CPU tensors through Triton's interpreter. Triton reads this when a kernel
# is defined, and other tests import Triton (through inductor) before tests/test_kernels.py runs.
os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest
import torch

sys.path.insert(0, os.path.dirname(__file__))

torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))
warnings.filterwarnings("ignore", message=".*requires torchvision.*")


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


@pytest.fixture(autouse=True)
def _fresh_dynamo():
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()
