"""``StepSignature`` (passes/signature.py): the contract between the passes and the runtime.

It is built from a pass context, binds the RAS graph's positional inputs in the graph's own placeholder order, and
round-trips through the export manifest's fields; a malformed manifest is refused with the field named.
"""

from __future__ import annotations

import copy
import json

import pytest
import torch

from rascompile.passes.pipeline import build_ras_graph
from rascompile.passes.rules.latent_layout import LatentLayout
from rascompile.passes.signature import (
    ACTIVE_IDX,
    MANIFEST_FIELDS,
    CacheInput,
    KVCacheInput,
    ModelInput,
    SignatureError,
    StepSignature,
    step_signature,
)
from rascompile.runtime.controller import GraphLayout
from tests.support.capture import capture_graph
from tests.support.passes import TinyDiT


def _signature() -> StepSignature:
    """An exported SD3-like graph: latents [2, 4, 8, 8] in 2x2 patches (N = 16), a timestep, two K/V caches."""
    return StepSignature(
        inputs=(
            ModelInput("hidden_states", "l_hidden_states_", (2, 4, 8, 8), torch.float32),
            ModelInput("encoder_hidden_states", "l_encoder_hidden_states_", (2, 3, 8), torch.float32),
            ModelInput("timestep", "l_timestep_", (2,), torch.float32),
        ),
        latents=0,
        timestep=2,
        active_idx=ACTIVE_IDX,
        output_cache=CacheInput("ras_output_cache", (2, 16, 16), torch.float32),
        kv_caches=(
            KVCacheInput("ras_kv_cache_0", (2, 2, 19, 4), torch.float16, attention="blocks.0.attn", kind="key"),
            KVCacheInput("ras_kv_cache_1", (2, 2, 19, 4), torch.float16, attention="blocks.0.attn", kind="value"),
        ),
        batch_size=2,
        num_tokens=16,
        patch_size=2,
        latent_hw=(8, 8),
        latent_kind="image",
        latent=LatentLayout("image", (2, 4, 8, 8), 1, (2, 3), (2, 2)),
    )


def test_manifest_round_trip():
    signature = _signature()
    fields = signature.to_manifest()
    assert list(fields) == list(MANIFEST_FIELDS)
    assert json.loads(json.dumps(fields)) == fields  # JSON-able as it is
    assert StepSignature.from_manifest(fields) == signature
    assert fields["latents"] == "hidden_states" and fields["timestep"] == "timestep"
    assert fields["inputs"][0] == {
        "name": "hidden_states",
        "placeholder": "l_hidden_states_",
        "shape": [2, 4, 8, 8],
        "dtype": "float32",
    }
    assert fields["output_cache"] == {"name": "ras_output_cache", "shape": [2, 16, 16], "dtype": "float32"}
    assert fields["kv_caches"][1] == {
        "name": "ras_kv_cache_1",
        "shape": [2, 2, 19, 4],
        "dtype": "float16",
        "attention": "blocks.0.attn",
        "kind": "value",
    }
    # the deploy manifest's other fields are not the signature's and are ignored
    manifest = {"format": 2, "outputs": ["sample"], "sha256": {}, **fields}
    assert StepSignature.from_manifest(manifest) == signature


def test_bind_and_feeds_follow_the_graph_order():
    signature = _signature()
    args = ("latents", "text", "t")
    bound = signature.bind(args, "idx", "out", ["k0", "v0"])
    assert bound == ("latents", "text", "t", "idx", "out", "k0", "v0")
    assert signature.ras_input_names == (
        "hidden_states",
        "encoder_hidden_states",
        "timestep",
        "ras_active_idx",
        "ras_output_cache",
        "ras_kv_cache_0",
        "ras_kv_cache_1",
    )
    assert signature.updated_cache_names == ("ras_output_cache_out", "ras_kv_cache_0_out", "ras_kv_cache_1_out")
    named = dict(zip(signature.input_names, args))
    assert list(signature.feeds(named)) == list(signature.input_names)
    feeds = signature.feeds(named, "idx", "out", ["k0", "v0"])
    assert list(feeds) == list(signature.ras_input_names) and tuple(feeds.values()) == bound
    with pytest.raises(ValueError, match="1 K/V caches given; the step graph takes 2"):
        signature.bind(args, "idx", "out", ["k0"])
    with pytest.raises(ValueError, match="2 model inputs given; the step graph takes 3"):
        signature.bind(args[:2], "idx", "out", ["k0", "v0"])


def test_layout_is_derived_from_the_signature():
    layout = GraphLayout.from_signature(_signature())
    assert layout.output_cache == ((2, 16, 16), torch.float32)
    assert layout.kv_caches == (((2, 2, 19, 4), torch.float16),) * 2
    assert (layout.batch_size, layout.num_tokens, layout.patch_size, layout.latent_layout) == (2, 16, 2, "image")
    assert layout.latent.token_grid == (4, 4)


@pytest.mark.parametrize(
    "path, value, message",
    [
        (("num_tokens",), None, r"manifest field 'num_tokens' is missing"),
        (("batch_size",), 0, r"manifest field 'batch_size' is 0; must be an integer from 1 to 4096"),
        (("latents",), "noise", r"manifest field 'latents' is 'noise'; must be the name of an input"),
        (("timestep",), "t", r"manifest field 'timestep' is 't'; must be null or the name of an input"),
        (("inputs", 1, "dtype"), "float8", r"manifest field 'inputs\[1\].dtype' is 'float8'; must be one of"),
        (("inputs", 0, "placeholder"), None, r"manifest field 'inputs\[0\].placeholder' is missing"),
        (("output_cache", "shape"), "16", r"manifest field 'output_cache.shape' is '16'; must be a JSON array"),
        (("kv_caches", 1, "kind"), "query", r"manifest field 'kv_caches\[1\].kind' is 'query'; must be one of 'key'"),
        (("kv_caches", 0), [], r"manifest field 'kv_caches\[0\]' is \[\]; must be a JSON object"),
        (("patch_size",), 3, r"manifest field 'patch_size' is 3; must divide the latent height and width"),
        (("num_tokens",), 64, r"manifest field 'num_tokens' is 64; must equal \(H / p\) \* \(W / p\) = 16"),
        (("latent_hw",), [8], r"manifest field 'latent_hw' is \[8\]; must be a JSON array of 2 to 2 entries"),
    ],
)
def test_a_bad_manifest_names_the_field(path, value, message):
    manifest = copy.deepcopy(_signature().to_manifest())
    record = manifest
    for key in path[:-1]:
        record = record[key]
    if value is None:
        del record[path[-1]]
    else:
        record[path[-1]] = value
    with pytest.raises(SignatureError, match=message):
        StepSignature.from_manifest(manifest)


def test_only_image_signatures_go_into_a_manifest():
    packed = StepSignature(**{**_signature().__dict__, "latent_kind": "packed", "latent": None})
    with pytest.raises(SignatureError, match="latent_kind is 'packed'"):
        packed.to_manifest()


def test_built_from_the_pass_context_it_drives_the_ras_graph():
    model = TinyDiT()
    gm, inputs = capture_graph(model, *model.inputs())
    ras_gm, _, ctx = build_ras_graph(gm)
    signature = step_signature(gm, ctx)
    # from the dense graph, from its placeholder names or from the RAS graph: one signature
    names = [n.name for n in gm.graph.nodes if n.op == "placeholder"]
    assert step_signature(ras_gm, ctx) == signature
    assert step_signature(names, ctx).input_names == signature.input_names
    ras_names = [n.name for n in ras_gm.graph.nodes if n.op == "placeholder"]
    assert list(signature.ras_input_names) == ras_names
    assert signature.latents_name == ctx.latents and signature.num_tokens == ctx.num_tokens
    assert [c.kind for c in signature.kv_caches] == [s.kind for s in ctx.kv_slots]
    assert signature.latent == ctx.latent and signature.latent_kind == ctx.latent_layout
    # the inputs' shapes come from the graph; the dense step equals a RAS step over every token
    assert signature.inputs[signature.latents].shape == tuple(inputs[signature.latents].shape)
    n, b = signature.num_tokens, signature.batch_size
    caches = [torch.zeros(c.shape, dtype=c.dtype) for c in signature.caches]
    every = torch.arange(n).expand(b, n).contiguous()
    with torch.no_grad():
        out = ras_gm(*signature.bind(inputs, every, caches[0], caches[1:]))[0]
        torch.testing.assert_close(out, gm(*inputs)[0])


def test_latents_passed_as_rows_are_stacked_for_the_controller():
    rows = StepSignature(
        **{
            **_signature().__dict__,
            "inputs": (
                ModelInput("x", "l_x_0_", (4, 1, 8, 8), torch.float32),
                ModelInput("t", "l_t_", (2,), torch.float32),
                ModelInput("x", "l_x_1_", (4, 1, 8, 8), torch.float32),
            ),
            "latents": 0,
            "timestep": 1,
            "latents_rows": (0, 2),
        }
    )
    x0, x1 = torch.randn(4, 1, 8, 8), torch.randn(4, 1, 8, 8)
    assert torch.equal(rows.latents_of([x0, torch.ones(2), x1]), torch.stack([x0, x1]))
    assert torch.equal(_signature().latents_of([x0, "text", "t"]), x0)
    with pytest.raises(SignatureError, match="latents_rows=.*starting with latents=0"):
        StepSignature(**{**rows.__dict__, "latents_rows": (2, 0)})
