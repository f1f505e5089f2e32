"""rascompile.capture: the one graph-capturing Dynamo backend of check, export, bench and the tests."""

import torch

from rascompile.capture import GraphCapture, capture_graphs, capture_pipeline_graphs, unwrap


class Breaking(torch.nn.Module):
    """Two linear layers with a graph break between them: two Dynamo graphs."""

    def __init__(self):
        super().__init__()
        self.a, self.b = torch.nn.Linear(4, 4), torch.nn.Linear(4, 4)

    def forward(self, x):
        x = self.a(x)
        torch._dynamo.graph_break()
        return self.b(x)


def test_records_every_graph_and_runs_it():
    model, x = Breaking(), torch.randn(2, 4)
    graphs = capture_graphs(model, lambda compiled: compiled(x))
    assert len(graphs) == 2
    gm, inputs = graphs[0]
    assert isinstance(gm, torch.fx.GraphModule) and isinstance(inputs, list)
    assert any(a is x for a in inputs)  # not copied unless asked
    with torch.no_grad():
        assert torch.equal(graphs[1][0](*graphs[1][1])[0], model(x))


def test_copied_inputs_keep_their_values():
    x = torch.randn(2, 4)
    before = x.clone()
    graphs = capture_graphs(torch.nn.Linear(4, 4), lambda compiled: (compiled(x), x.add_(1)), copy_inputs=True)
    ((_, inputs),) = graphs
    kept = [a for a in inputs if isinstance(a, torch.Tensor) and not isinstance(a, torch.nn.Parameter)]
    assert len(kept) == 1 and torch.equal(kept[0], before) and not torch.equal(x, before)


def test_wraps_a_backend():
    seen = []

    def backend(gm, example_inputs, **kwargs):
        seen.append(len(example_inputs))
        return gm.forward

    capture = GraphCapture(backend)
    x = torch.randn(2, 4)
    with torch.no_grad():
        torch.compile(torch.nn.Linear(4, 4), backend=capture)(x)
    torch._dynamo.reset()
    assert seen == [len(capture.example_inputs[0])] and len(capture.graphs) == 1


class Pipe:
    """A pipeline-shaped object: calls its transformer once per step."""

    def __init__(self):
        self.transformer = torch.compile(torch.nn.Linear(4, 4))  # compiled already: captured through its module
        self.calls = []

    def __call__(self, x, num_inference_steps, output_type="pil"):
        self.calls.append((num_inference_steps, output_type))
        for _ in range(num_inference_steps):
            x = self.transformer(x)
        return x


def test_pipeline_graphs_one_step_and_restored():
    pipe = Pipe()
    original = pipe.transformer
    graphs = capture_pipeline_graphs(pipe, {"x": torch.randn(2, 4), "num_inference_steps": 30})
    assert len(graphs) == 1 and pipe.transformer is original and pipe.calls == [(1, "latent")]
    assert unwrap(original) is original._orig_mod and unwrap(pipe) is pipe
    capture_pipeline_graphs(pipe, {"x": torch.randn(2, 4)}, output_type=None)
    assert pipe.calls[-1] == (1, "pil")
