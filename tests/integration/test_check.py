"""``rascompile check`` / ``rascompile.check`` / ``rascompile.testing.assert_ras_equivalent``: the checks pass on
the tiny SD3 and Lumina-Next models, report dense graphs with their reason, and fail on deliberately broken
rewrites (each check on the bug it exists for)."""

import json
import operator
from pathlib import Path

import pytest
import torch
from diffusers import SD3Transformer2DModel

import rascompile
import rascompile.passes.ops
import rascompile.passes.pipeline
import rascompile.runtime.step_graphs
from rascompile.check import CheckError, check
from rascompile.cli.main import main
from rascompile.passes.manager import PassManager
from rascompile.runtime.memory import gib
from rascompile.testing import assert_ras_equivalent
from tests.support.capture import transformer_call_kwargs
from tests.support.models import (
    SD3_IN_CHANNELS,
    SD3_POOLED_DIM,
    SD3_TEXT_DIM,
    SD3_TEXT_LEN,
    lumina_call_kwargs,
    sd3_call_kwargs,
    tiny_lumina_pipeline,
    tiny_sd3_pipeline,
    tiny_sd3_transformer,
)
from tests.support.synthetic import TokenPoolingDiT

SNAPSHOTS = Path(__file__).parents[1] / "support" / "snapshots"
MODELS = {"sd3": (tiny_sd3_pipeline, sd3_call_kwargs), "lumina": (tiny_lumina_pipeline, lumina_call_kwargs)}
OFFSET = 1e-3


def _sd3():
    return tiny_sd3_pipeline(), sd3_call_kwargs()


@pytest.mark.parametrize("name", sorted(MODELS))
def test_tiny_models_pass(name):
    build, kwargs = MODELS[name]
    report = rascompile.check(build(), kwargs())  # the package attribute: the callable module
    assert report.passed, report.format()
    [graph] = report.graphs
    assert graph.ras and graph.reason is None
    assert (graph.num_tokens, graph.batch_size, graph.dtype) == (64, 2, "float32")
    assert [(c.name, c.k) for c in graph.checks] == [
        ("capture", 64),
        ("permutation", 64),
        ("subset", 32),
        ("subset", 16),
        ("subset", 1),
    ]
    assert graph.k_values == [64, 64, 32, 16, 1]
    assert all(c.passed and c.error is None and c.max_abs_diff <= c.tolerance for c in graph.checks)
    assert graph.checks[0].tolerance == pytest.approx(1e-5 * graph.output_scale)
    assert graph.summary == (SNAPSHOTS / f"{name}.txt").read_text()  # passes.graph_summary, as test_passes pins it
    text = report.format()
    assert "graph 0: RAS, N=64 image tokens, B=2" in text and text.splitlines()[-1].startswith("PASS")
    assert json.loads(report.to_json())["graphs"][0]["checks"][4]["k"] == 1
    bound = rascompile.RASConfig().max_skip_steps
    assert graph.staleness["max"] <= (bound if bound is not None else 28)
    assert f"a token goes uncomputed at most {graph.staleness['max']} RAS steps in a row" in text
    # the cache figures rascompile.plan gives for the same call
    first = transformer_call_kwargs(build(), kwargs())
    call = {k: v.to("meta") if isinstance(v, torch.Tensor) else v for k, v in first.items()}
    planned = rascompile.plan(build().transformer, height=128, width=128, call_kwargs=call)
    assert graph.cache_bytes == planned.cache_set_bytes and graph.kv_cache_count == len(planned.caches) - 1
    assert f"caches per guidance branch: {gib(graph.cache_bytes)} (1 output cache, {graph.kv_cache_count} K/V" in text


def test_the_report_gives_the_selections_staleness_under_the_config():
    """Under the reference's selection (no bound, the highest-scoring tokens dropped and kept dropped) a token goes
    uncomputed from a reset to the next; bounded, at most the bound."""
    reference = rascompile.check(*_sd3(), config=rascompile.RASConfig.reference_defaults(sample_ratio=0.25))
    bounded = rascompile.check(*_sd3(), config=rascompile.RASConfig(sample_ratio=0.25, max_skip_steps=3))
    assert reference.graphs[0].staleness["max"] == 9  # of 28 steps, 13..21 are RAS steps between the resets
    assert bounded.graphs[0].staleness["max"] == 3
    assert "max_skip_steps 3" in bounded.format()


def test_token_mixing_model_runs_dense_and_fails_only_when_ras_is_required():
    model, inputs = TokenPoolingDiT(), {"x": torch.randn(2, 4, 8, 8)}
    report = check(model, inputs)
    [graph] = report.graphs
    assert not graph.ras and "token axis" in graph.reason
    assert report.passed and graph.checks == [] and graph.num_tokens is None
    assert "dense (" in report.format() and "pass: a dense graph" in report.format()
    assert assert_ras_equivalent(model, inputs, require_ras=False).passed

    required = check(model, inputs, require_ras=True)
    assert not required.passed and not required.graphs[0].passed
    assert required.failures() == [f"graph 0 runs dense ({graph.reason}) and RAS is required"]
    with pytest.raises(AssertionError, match="runs dense .*token axis.* RAS is required"):
        assert_ras_equivalent(model, inputs)  # require_ras=True is the default here


def _offset_output(gm, ctx):
    """A broken pass: adds OFFSET to the RAS graph's first output."""
    out = next(n for n in gm.graph.nodes if n.op == "output")
    first = out.args[0][0]
    with gm.graph.inserting_before(out):
        shifted = gm.graph.call_function(operator.add, (first, OFFSET))
    out.args = ((shifted, *out.args[0][1:]),)
    gm.recompile()
    return gm


def test_a_wrong_output_fails_every_check(monkeypatch):
    monkeypatch.setattr(
        rascompile.passes.pipeline,
        "RAS_PASSES",
        PassManager([*rascompile.passes.pipeline.RAS_PASSES.passes, _offset_output]),
    )
    pipe, kwargs = _sd3()
    report = check(pipe, kwargs)
    assert not report.passed
    [graph] = report.graphs
    assert graph.ras and not graph.passed
    for c in graph.checks:
        assert not c.passed and c.max_abs_diff == pytest.approx(OFFSET, rel=1e-3), c
    text = report.format()
    assert "FAIL" in text.splitlines()[-len(graph.checks) - 1] and f"{OFFSET:.2e}" in text
    with pytest.raises(AssertionError, match=r"capture at k=64 failed \(max \|diff\| 0.001 > "):
        assert_ras_equivalent(*_sd3())


def test_attention_without_the_kv_cache_fails_only_the_subset_checks(monkeypatch):
    """With every token active attention sees every key anyway; only a subset step needs the cached ones."""
    build = rascompile.runtime.step_graphs.build_ras_graph
    monkeypatch.setattr(
        rascompile.runtime.step_graphs, "build_ras_graph", lambda gm, **kw: build(gm, **{**kw, "kv_cache": False})
    )
    report = check(*_sd3())
    verdicts = {(c.name, c.k): c.passed for c in report.graphs[0].checks}
    assert verdicts == {
        ("capture", 64): True,
        ("permutation", 64): True,
        ("subset", 32): False,
        ("subset", 16): False,
        ("subset", 1): False,
    }
    assert report.failures()[0].startswith("graph 0: subset at k=32 failed (max |diff|")


def test_positions_that_do_not_follow_the_tokens_fail_the_permutation_check(monkeypatch):
    """Lumina-Next's RoPE table and attention mask gathered in sorted token order: right for the identity order
    of the capture step, wrong once the active tokens come in another order."""
    gather = rascompile.passes.ops.gather_position_table
    monkeypatch.setattr(
        rascompile.passes.ops,
        "gather_position_table",
        lambda table, idx, axis, ndim: gather(table, idx.sort(dim=1).values, axis, ndim),
    )
    report = check(tiny_lumina_pipeline(), lumina_call_kwargs())
    verdicts = [(c.name, c.passed) for c in report.graphs[0].checks]
    # (one active token per row is in sorted order whatever it is: k = 1 passes)
    assert verdicts == [
        ("capture", True),
        ("permutation", False),
        ("subset", False),
        ("subset", False),
        ("subset", True),
    ]


class GraphBreakSD3(SD3Transformer2DModel):
    """The tiny SD3 transformer with a graph break before it: Dynamo gives two graphs. (A subclass: wrapped in
    another module, as ``self.transformer``, the passes find no final projection and the model runs dense.)"""

    def forward(self, hidden_states, **kwargs):
        hidden_states = hidden_states * 2.0
        torch._dynamo.graph_break()
        return super().forward(hidden_states=hidden_states, **kwargs)


def _graph_break_sd3() -> GraphBreakSD3:
    tiny = tiny_sd3_transformer()
    model = GraphBreakSD3.from_config(tiny.config)
    model.load_state_dict(tiny.state_dict())
    return model.eval()


def test_every_graph_of_a_graph_break_is_checked():
    g = torch.Generator().manual_seed(0)
    kwargs = {
        "hidden_states": torch.randn(2, SD3_IN_CHANNELS, 16, 16, generator=g),
        "encoder_hidden_states": torch.randn(2, SD3_TEXT_LEN, SD3_TEXT_DIM, generator=g),
        "pooled_projections": torch.randn(2, SD3_POOLED_DIM, generator=g),
        "timestep": torch.tensor([500.0, 500.0]),
        "return_dict": False,
    }
    report = check(_graph_break_sd3(), kwargs)
    assert [g.ras for g in report.graphs] == [False, True], report.format()
    assert "image-token source" in report.graphs[0].reason
    assert report.graphs[1].num_tokens == 64 and len(report.graphs[1].checks) == 5
    assert report.passed and not check(_graph_break_sd3(), kwargs, require_ras=True).passed
    assert report.model == "GraphBreakSD3" and report.pipeline is None


def test_bad_arguments():
    with pytest.raises(CheckError, match="takes a diffusers pipeline"):
        check(object(), {})
    with pytest.raises(CheckError, match="one-step call of StableDiffusion3Pipeline failed"):
        check(tiny_sd3_pipeline(), {"prompt_embeds": torch.randn(1, 3, 5)})
    with pytest.raises(ValueError, match="inner_backend"):
        check(TokenPoolingDiT(), {"x": torch.randn(2, 4, 8, 8)}, inner_backend="tvm")


# ============================================================================================ the command


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    """A tiny SD3 pipeline saved without text encoders, and its prompt embeddings."""
    from safetensors.torch import save_file

    d = tmp_path_factory.mktemp("check_cli")
    tiny_sd3_pipeline().save_pretrained(d / "pipe")
    call = sd3_call_kwargs()
    save_file({k: v.contiguous() for k, v in call.items() if torch.is_tensor(v)}, d / "prompt.safetensors")
    return d


def _argv(d, *extra):
    return [
        "check",
        str(d / "pipe"),
        "--height",
        "128",
        "--width",
        "128",
        "--embeddings",
        str(d / "prompt.safetensors"),
    ]


def test_command_json(saved, capsys):
    assert main([*_argv(saved), "--guidance-scale", "4", "--require-ras", "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["passed"] and report["require_ras"] and report["pipeline"] == "StableDiffusion3Pipeline"
    [graph] = report["graphs"]
    assert graph["ras"] and (graph["num_tokens"], graph["batch_size"]) == (64, 2)
    assert [c["k"] for c in graph["checks"]] == [64, 64, 32, 16, 1] and all(c["passed"] for c in graph["checks"])


def test_command_table_and_failure(saved, capsys, monkeypatch):
    assert main([*_argv(saved), "--num-images-per-prompt", "2", "--seed", "3", "--inner-backend", "aot_eager"]) == 0
    out = capsys.readouterr().out
    assert "graph 0: RAS, N=64 image tokens, B=4" in out and out.splitlines()[-1].startswith("PASS")
    assert "inner backend aot_eager; seed 3" in out
    monkeypatch.setattr(
        rascompile.passes.pipeline,
        "RAS_PASSES",
        PassManager([*rascompile.passes.pipeline.RAS_PASSES.passes, _offset_output]),
    )
    assert main(_argv(saved)) == 1
    out = capsys.readouterr().out
    assert "FAIL (1 graph: 1 RAS, 0 dense)" in out and "capture at k=64 failed" in out


@pytest.mark.parametrize(
    ("argv", "expected"),
    [
        (["check", "{d}/missing"], "missing is not a directory"),
        (["check", "{d}"], "is not a diffusers pipeline: it has no model_index.json"),
        (["check", "{d}/pipe"], "--embeddings FILE"),
        (["check", "{d}/pipe", "--embeddings", "{d}/nope.safetensors"], "nope.safetensors does not exist"),
        (["check", "{d}/pipe", "--embeddings", "{d}/prompt.safetensors", "--height", "100"], "not a multiple of 16"),
        (["check", "{d}/pipe", "--embeddings", "{d}/prompt.safetensors", "--seed", "-1"], "argument --seed"),
    ],
)
def test_command_bad_input(saved, capsys, argv, expected):
    try:
        code = main([a.format(d=saved) for a in argv])
    except SystemExit as exc:  # argparse
        code = exc.code
    captured = capsys.readouterr()
    lines = [line for line in captured.err.splitlines() if "error:" in line]
    assert code == 2 and len(lines) == 1 and expected in lines[0], captured.err
    assert "Traceback" not in captured.err and captured.out == ""
