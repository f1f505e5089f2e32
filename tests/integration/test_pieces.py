"""RAS across the pieces of one transformer call that a graph break split (``runtime/pieces.py``): the pieces run
one decision per call, on their own caches, and equal the same transformer compiled whole."""

import warnings

import pytest
import torch

import rascompile.runtime.registry as registry
from rascompile.runtime.scoped_piece import ScopedPiece
from tests.support.passes import BrokenDiT

STEPS = 6
OPTIONS = dict(
    graph_pieces=True,
    sample_ratio=0.5,
    num_inference_steps=STEPS,
    scheduler_start_step=1,
    error_reset_steps=(4,),
    inner_backend="aot_eager",
)


class WholeDiT(BrokenDiT):
    """The same model without the breaks: one graph."""

    def forward(self, x, timestep, text=None):
        b = x.shape[0]
        tokens = self.embed(x).flatten(2).transpose(1, 2)
        tokens = tokens + self.temb(timestep[:, None])[:, None, :]
        for block in self.blocks:
            tokens = block(tokens, text, self.table, self.mask, self.freqs)
        out = self.proj(tokens)
        return out.transpose(1, 2).reshape(b, 16, x.shape[2] // 2, x.shape[3] // 2)


def _denoise(model, options=OPTIONS, generations=1):
    """``generations`` loops of STEPS Euler-like steps through ``torch.compile(model, backend="ras")``."""
    compiled = torch.compile(model, backend="ras", options=options)
    outs = []
    with warnings.catch_warnings(record=True) as caught, torch.no_grad():
        warnings.simplefilter("always")
        for _ in range(generations):
            x, _ = model.inputs()
            for i in range(STEPS):
                t = torch.full((2,), 1.0 - i / STEPS)
                out = compiled(x, t)
                x = x - 0.2 * out.reshape(x.shape)
            outs.append(x)
    messages = [str(w.message) for w in caught if "rascompile" in str(w.message)]
    return outs, messages, compiled


def _controllers(compiled):
    return registry.controllers_of(compiled)


@pytest.mark.parametrize("pieces", [2, 3])
def test_pieces_run_ras_and_equal_the_whole_graph(pieces):
    """From the second generation on (the first call, during which Dynamo compiles the pieces, runs dense), the
    pieces run the same steps as the model compiled whole and give the same result."""
    whole, _, whole_compiled = _denoise(WholeDiT(pieces).eval(), generations=2)
    got, messages, compiled = _denoise(BrokenDiT(pieces).eval(), generations=2)
    assert not messages, messages
    (control,) = _controllers(compiled)
    kinds = [d.kind for d in control.history]
    assert kinds.count("ras") >= 3, kinds
    (whole_control,) = _controllers(whole_compiled)
    assert kinds == [d.kind for d in whole_control.history]
    torch.testing.assert_close(got[1], whole[1], rtol=1e-5, atol=1e-5)
    params = {id(p) for p in compiled._orig_mod.parameters()}
    graphs = [g for b in registry._SHARED_BACKENDS.values() for g in b.graphs if g.parameter_ids & params]
    assert all(isinstance(g, ScopedPiece) for g in graphs), graphs
    forms = [form.kind for g in graphs for form in g.forms.values()]
    assert forms == ["head"] + ["through"] * (pieces - 2) + ["tail"]


def test_pieces_at_ratio_one_equal_the_uncompiled_model():
    model = BrokenDiT().eval()
    got, messages, _ = _denoise(model, {**OPTIONS, "sample_ratio": 1.0})
    with torch.no_grad():
        x, _ = model.inputs()
        for i in range(STEPS):
            x = x - 0.2 * model(x, torch.full((2,), 1.0 - i / STEPS)).reshape(x.shape)
    torch.testing.assert_close(got[0], x, rtol=1e-6, atol=1e-6)


def test_identical_generations_give_identical_results():
    """Nothing of one generation leaks into the next. The first generation differs: its first call ran while Dynamo
    compiled the pieces, before the scope could open it, so its second step fills the caches instead of skipping."""
    outs, messages, compiled = _denoise(BrokenDiT().eval(), generations=3)
    assert not messages, messages
    torch.testing.assert_close(outs[2], outs[1], rtol=0, atol=0)
    (control,) = _controllers(compiled)
    assert control.generations == 3


class MixingTailDiT(BrokenDiT):
    """BrokenDiT whose second piece mixes the image tokens (a mean over them) before its block: no RAS form."""

    def forward(self, x, timestep, text=None):
        b = x.shape[0]
        tokens = self.embed(x).flatten(2).transpose(1, 2)
        tokens = tokens + self.temb(timestep[:, None])[:, None, :]
        tokens = self.blocks[0](tokens, text, self.table, self.mask, self.freqs)
        torch._dynamo.graph_break()
        tokens = tokens + tokens.mean(dim=1, keepdim=True)
        tokens = self.blocks[1](tokens, text, self.table, self.mask, self.freqs)
        out = self.proj(tokens)
        return out.transpose(1, 2).reshape(b, 16, x.shape[2] // 2, x.shape[3] // 2)


def test_a_piece_without_a_ras_form_turns_every_piece_dense_and_says_so():
    """Never half RAS within a step: when a later piece that takes image tokens cannot be rewritten, the head runs
    every call dense from then on, the result equals the uncompiled model, and a warning says why."""
    model = MixingTailDiT().eval()
    got, messages, compiled = _denoise(model, generations=2)
    with torch.no_grad():
        x, _ = model.inputs()
        for i in range(STEPS):
            x = x - 0.2 * model(x, torch.full((2,), 1.0 - i / STEPS)).reshape(x.shape)
    for out in got:
        torch.testing.assert_close(out, x, rtol=1e-5, atol=1e-5)
    assert any("Dynamo split it into pieces" in m and "cannot be rewritten" in m for m in messages), messages
    (control,) = _controllers(compiled)
    assert not any(d.kind == "ras" for d in control.history)


def test_a_copy_of_a_model_split_into_pieces_runs_its_own_weights():
    """The scope's wrapper on ``forward`` is a bound method: ``copy.deepcopy`` rebinds it to the copy, which then
    runs its own forward (dense, uncompiled), not the original model's."""
    import copy

    model = BrokenDiT().eval()
    _denoise(model)
    twin = copy.deepcopy(model)
    with torch.no_grad():
        for p in twin.parameters():
            p.mul_(0.5)
        x, _ = model.inputs()
        t = torch.full((2,), 0.5)
        got = twin(x, t)
        expected = BrokenDiT.forward(twin, x, t)
        original = BrokenDiT.forward(model, x, t)
    torch.testing.assert_close(got, expected, rtol=0, atol=0)
    assert not torch.allclose(got, original)


def test_pieces_of_a_model_compiled_in_place_run_ras_and_equal_torch_compile():
    """``model.compile(backend="ras")`` (what ``rascompile.apply`` does): the compiled ``_call_impl`` may have
    inlined ``forward``, so the scope wraps the compiled call itself; RAS runs and equals ``torch.compile``."""
    expected, _, _ = _denoise(BrokenDiT().eval(), generations=2)
    model = BrokenDiT().eval()
    model.compile(backend="ras", options=OPTIONS)
    with torch.no_grad():
        outs = []
        for _ in range(2):
            x, _ = model.inputs()
            for i in range(STEPS):
                x = x - 0.2 * model(x, torch.full((2,), 1.0 - i / STEPS)).reshape(x.shape)
            outs.append(x)
    (control,) = registry.controllers_of(model)
    assert [d.kind for d in control.history].count("ras") >= 3, control.history
    torch.testing.assert_close(outs[1], expected[1], rtol=1e-6, atol=1e-6)


def test_two_instances_of_one_class_each_run_ras_on_their_own_caches():
    """Dynamo serves every instance of a class with the graphs compiled for the first (parameters are inputs): the
    second instance, which no compile sees, still gets its own call scope and controller, and runs as the first."""
    first, _, first_compiled = _denoise(BrokenDiT().eval(), generations=2)
    second, messages, second_compiled = _denoise(BrokenDiT().eval(), generations=2)
    assert not messages, messages
    (control,) = _controllers(second_compiled)
    assert control is not _controllers(first_compiled)[0]
    assert [d.kind for d in control.history].count("ras") >= 3, control.history
    torch.testing.assert_close(second[1], first[1], rtol=0, atol=0)


def test_calling_the_uncompiled_model_between_steps_changes_nothing():
    """The model object itself (not its ``torch.compile`` wrapper) runs uncompiled and dense: it is not a step of
    the generation, so the compiled model's generation is the same with such calls between its steps."""
    expected, _, _ = _denoise(BrokenDiT().eval(), generations=2)
    model = BrokenDiT().eval()
    compiled = torch.compile(model, backend="ras", options=OPTIONS)
    with torch.no_grad():
        outs = []
        for _ in range(2):
            x, _ = model.inputs()
            for i in range(STEPS):
                t = torch.full((2,), 1.0 - i / STEPS)
                direct = model(x, t)
                torch.testing.assert_close(direct, BrokenDiT.forward(model, x, t), rtol=0, atol=0)
                x = x - 0.2 * compiled(x, t).reshape(x.shape)
            outs.append(x)
    torch.testing.assert_close(outs[1], expected[1], rtol=1e-6, atol=1e-6)
