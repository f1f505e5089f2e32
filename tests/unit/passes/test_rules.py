"""The rules the passes are built from, each on small synthetic graphs (no diffusers model):

- the latent-layout rule (``passes/rules/latent_layout.py``): image, video and packed latents, which latent elements
  make up each token, and the token metric over them;
- the in-place-write rule (``passes/functionalize_inplace_writes.py``);
- the position-table rule (``passes/rules/position_tables.py``): image-only and joint tables, either text order;
- the K/V-source rule (``passes/rules/kv_sources.py``): image-only keys, a joint sequence concatenated at attention,
  a joint sequence built before the projection (single-stream blocks).

Every rewritten graph is held to the invariants: a capture step and a permutation of all tokens equal dense,
and k < N tokens after a capture step reproduce dense from the caches.
"""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from rascompile.passes.context import RewriteError
from rascompile.passes.pipeline import build_ras_graph
from rascompile.passes.rules.latent_layout import LatentLayout, choose_video_layout, patch_evidence, video_layouts
from rascompile.runtime.selector import layout_token_metric, token_metric
from tests.support.capture import capture_graph, run_ras_step

HEADS, HEAD_DIM, WIDTH, TEXT = 2, 4, 8, 3


def assert_invariants(gm, inputs):
    """Rewrite ``gm`` and check (a) capture = dense, (b) permutation = dense, (c) cached subsets = dense."""
    ras, _, ctx = build_ras_graph(gm)
    with torch.no_grad():
        dense = gm(*inputs)[0]
    n, b = ctx.num_tokens, ctx.batch_size
    everything = torch.arange(n).expand(b, n).contiguous()
    out, output_cache, kv = run_ras_step(ras, ctx, inputs, everything)
    torch.testing.assert_close(out, dense, rtol=0, atol=1e-6)
    g = torch.Generator().manual_seed(0)
    permuted = torch.stack([torch.randperm(n, generator=g) for _ in range(b)])
    torch.testing.assert_close(run_ras_step(ras, ctx, inputs, permuted)[0], dense, rtol=1e-5, atol=1e-5)
    _, output_cache, kv = run_ras_step(ras, ctx, inputs, everything)
    for k in (1, n // 3, n - 1):
        subset = torch.stack([torch.randperm(n, generator=g)[:k].sort().values for _ in range(b)])
        out, _, _ = run_ras_step(ras, ctx, inputs, subset, output_cache, kv)
        torch.testing.assert_close(out, dense, rtol=1e-5, atol=1e-5)
    return ras, ctx


def _init_(module: torch.nn.Module) -> torch.nn.Module:
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in module.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.3)
    return module.eval()


def _rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    x1, x2 = x.unflatten(-1, (-1, 2)).unbind(-1)
    return torch.stack([x1 * cos - x2 * sin, x1 * sin + x2 * cos], dim=-1).flatten(-2)


def _rope_table(rows: int) -> tuple[torch.Tensor, torch.Tensor]:
    angles = torch.arange(rows)[:, None] * torch.linspace(0.1, 1.0, HEAD_DIM // 2)[None, :]
    return angles.cos()[None, None], angles.sin()[None, None]  # [1, 1, rows, D/2]


class SyntheticDiT(torch.nn.Module):
    """Patch embedding -> ``blocks`` attention blocks -> final projection -> unpatchify, with switches for the
    patterns the rules handle.

    ``latents``: "image" [B, 4, 8, 8] (Conv2d patch 2), "video" [B, 4, 2, 8, 8] (Conv3d patch (1, 2, 2)),
    "frames" [B, 2, 4, 8, 8] (Conv2d per frame). ``kv``: "image" (image-only attention), "joint-at-attention"
    (text keys concatenated at attention, as SD3), "single-stream" (text and image concatenated before the
    projection, as Flux's single blocks), "image-first" (the same with [image; text]). ``rope``: None, "image"
    (a table over the N image tokens), "joint" (a table over the joint sequence, applied after the
    concatenation), "inplace" (the image table written into an ``empty_like`` buffer, as Wan).
    """

    def __init__(self, latents="image", kv="image", rope=None, blocks=2, write=None):
        super().__init__()
        self.latents, self.kv, self.rope, self.write = latents, kv, rope, write
        if latents == "video":
            self.embed = torch.nn.Conv3d(4, WIDTH, (1, 2, 2), stride=(1, 2, 2))
        else:
            self.embed = torch.nn.Conv2d(4, WIDTH, 2, stride=2)
        self.qkv = torch.nn.ModuleList(torch.nn.Linear(WIDTH, 3 * WIDTH) for _ in range(blocks))
        self.text_qkv = torch.nn.ModuleList(torch.nn.Linear(WIDTH, 3 * WIDTH) for _ in range(blocks))
        self.proj = torch.nn.Linear(WIDTH, 16)
        self.num_tokens = 32 if latents != "image" else 16
        rows = self.num_tokens + (TEXT if rope == "joint" else 0)
        cos, sin = _rope_table(rows)
        self.register_buffer("cos", cos)
        self.register_buffer("sin", sin)
        _init_(self)

    def _tokens(self, x):
        if self.latents == "frames":
            b, f = x.shape[:2]
            h = self.embed(x.reshape(b * f, 4, 8, 8))  # [B*F, C, 4, 4]
            return h.reshape(b, f, WIDTH, 16).permute(0, 1, 3, 2).reshape(b, f * 16, WIDTH)
        return self.embed(x).flatten(2).transpose(1, 2)

    def _heads(self, t):
        return t.unflatten(2, (HEADS, HEAD_DIM)).transpose(1, 2)

    def _apply_rope(self, q, k):
        if self.rope in ("image", "joint"):
            return _rotate(q, self.cos, self.sin), _rotate(k, self.cos, self.sin)
        if self.rope == "inplace":
            out = []
            for t in (q, k):
                x1, x2 = t.unflatten(-1, (-1, 2)).unbind(-1)
                buffer = torch.empty_like(t)
                buffer[..., 0::2] = x1 * self.cos - x2 * self.sin
                buffer[..., 1::2] = x1 * self.sin + x2 * self.cos
                out.append(buffer)
            return out
        return q, k

    def _block(self, i, tokens, text):
        n = tokens.shape[1]
        if self.write == "add":  # an in-place method on a fresh token tensor
            tokens = tokens * 1.0
            tokens.add_(0.5)
        if self.kv in ("single-stream", "image-first"):
            joint = torch.cat([text, tokens] if self.kv == "single-stream" else [tokens, text], dim=1)
            q, k, v = (self._heads(t) for t in self.qkv[i](joint).chunk(3, dim=-1))
            if self.rope == "joint":
                q, k = self._apply_rope(q, k)
            out = F.scaled_dot_product_attention(q, k, v).transpose(1, 2).flatten(2)
            image = out[:, -n:] if self.kv == "single-stream" else out[:, :n]
            return tokens + image
        q, k, v = (self._heads(t) for t in self.qkv[i](tokens).chunk(3, dim=-1))
        if self.write == "alias":  # writes into the projection's storage, which q and v (views of it) read later
            k[..., :2].mul_(2.0)
        q, k = self._apply_rope(q, k)
        if self.kv == "joint-at-attention":
            _, tk, tv = (self._heads(t) for t in self.text_qkv[i](text).chunk(3, dim=-1))
            k, v = torch.cat([k, tk], dim=2), torch.cat([v, tv], dim=2)
        out = F.scaled_dot_product_attention(q, k, v).transpose(1, 2).flatten(2)
        return tokens + out

    def forward(self, x, text):
        tokens = self._tokens(x)
        for i in range(len(self.qkv)):
            tokens = self._block(i, tokens, text)
        out = self.proj(tokens)  # [B, N, 16]: 4 channels x 2 x 2 per token
        return out.transpose(1, 2).reshape(x.shape[0], -1).reshape(x.shape[0], *x.shape[1:]) * 1.0


def _inputs(latents):
    g = torch.Generator().manual_seed(1)
    shape = {"image": (2, 4, 8, 8), "video": (2, 4, 2, 8, 8), "frames": (2, 2, 4, 8, 8)}[latents]
    return torch.randn(*shape, generator=g), torch.randn(2, TEXT, WIDTH, generator=g)


# ------------------------------------------------------------------------------------------ latent-layout rule


def test_layout_describes_tokens_and_refuses_bad_descriptions():
    layout = LatentLayout("video", (2, 4, 6, 8, 8), 1, (2, 3, 4), (2, 2, 2))
    assert layout.token_grid == (3, 4, 4) and layout.num_tokens == 48 and layout.spatial_patch == 2
    assert layout.to_grid(torch.arange(96).reshape(2, 48)).shape == (2, 3, 4, 4)
    with pytest.raises(ValueError, match="kind='volume'"):
        LatentLayout("volume", (2, 4, 8, 8), 1, (2, 3), (2, 2))
    with pytest.raises(ValueError, match="does not divide"):
        LatentLayout("image", (2, 4, 8, 8), 1, (2, 3), (3, 3))


def test_video_readings_are_chosen_by_the_patch_convolution():
    readings = video_layouts((2, 4, 4, 8, 8), 64)  # C = F = 4: both axis orders give 64 tokens with (1, 2, 2)
    assert {(r.channel_axis, r.patch) for r in readings} >= {(1, (1, 2, 2)), (2, (1, 2, 2))}
    conv3d = choose_video_layout(readings, [(3, (1, 2, 2), 4)])
    assert (conv3d.channel_axis, conv3d.patch) == (1, (1, 2, 2))
    ambiguous = choose_video_layout(readings, [])
    assert isinstance(ambiguous, str) and "cannot tell which latent elements" in ambiguous
    # the Conv3d reads the latents permuted [B, F, C, H, W] -> [B, C, F, H, W] (AnyFlow): channels on latent axis 2
    permuted = choose_video_layout(readings, [(3, (1, 2, 2), 4, (0, 2, 1, 3, 4))])
    assert (permuted.channel_axis, permuted.grid_axes, permuted.patch) == (2, (1, 3, 4), (1, 2, 2))


def test_patch_evidence_follows_the_permutes_from_the_latents_to_the_convolution():
    class FramesFirst(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.embed = torch.nn.Conv3d(4, 8, (1, 2, 2), stride=(1, 2, 2))

        def forward(self, x):  # [B, F, C, H, W]
            return self.embed(x.permute(0, 2, 1, 3, 4)).flatten(2).transpose(1, 2)

    gm, _ = capture_graph(FramesFirst(), torch.randn(2, 2, 4, 8, 8))
    ((dims, stride, channels, axes),) = patch_evidence(list(gm.graph.nodes))
    assert (dims, stride, channels, axes) == (3, (1, 2, 2), 4, (0, 2, 1, 3, 4))
    layout = choose_video_layout(video_layouts((2, 2, 4, 8, 8), 32), patch_evidence(list(gm.graph.nodes)))
    assert (layout.channel_axis, layout.grid_axes, layout.patch) == (2, (1, 3, 4), (1, 2, 2))


@pytest.mark.parametrize("metric", ["std", "l2norm"])
def test_video_token_metric_averages_each_tokens_own_elements(metric):
    layout = LatentLayout("video", (2, 3, 4, 4, 6), 1, (2, 3, 4), (2, 2, 3))
    delta = torch.randn(layout.shape, generator=torch.Generator().manual_seed(0))
    got = layout_token_metric(delta, layout, metric)
    per_element = delta.std(dim=1) if metric == "std" else delta.norm(dim=1)
    expected = torch.empty(2, layout.num_tokens)
    for b in range(2):
        for token, (f, h, w) in enumerate(
            (f, h, w)
            for f in range(2)
            for h in range(2)
            for w in range(2)  # token grid (2, 2, 2), row-major
        ):
            expected[b, token] = per_element[b, 2 * f : 2 * f + 2, 2 * h : 2 * h + 2, 3 * w : 3 * w + 3].mean()
    torch.testing.assert_close(got, expected)


def test_image_layout_metric_is_the_reference_metric():
    layout = LatentLayout("image", (2, 4, 8, 8), 1, (2, 3), (2, 2))
    delta = torch.randn(layout.shape, generator=torch.Generator().manual_seed(0))
    assert torch.equal(layout_token_metric(delta, layout, "std"), token_metric(delta, 2, "std"))


@pytest.mark.parametrize(
    "latents, channel_axis, grid_axes",
    [("image", 1, (2, 3)), ("video", 1, (2, 3, 4)), ("frames", 2, (1, 3, 4))],
)
def test_latents_are_found_in_every_layout(latents, channel_axis, grid_axes):
    gm, inputs = capture_graph(SyntheticDiT(latents=latents), *_inputs(latents))
    _, ctx = assert_invariants(gm, inputs)
    assert (ctx.latent.channel_axis, ctx.latent.grid_axes, ctx.latent.patch[-1]) == (channel_axis, grid_axes, 2)
    assert ctx.latent_layout == ("image" if latents == "image" else "video")


class LinearPatchVideo(torch.nn.Module):
    """[B, 4, 4, 8, 8] latents patchified by a reshape and a linear layer: no convolution tells the reading.
    ``per_pixel``: each token holds one pixel's 4 x 4 values of axes 1 and 2, which reads as channels x frames and as
    frames x channels alike."""

    def __init__(self, per_pixel: bool = False):
        super().__init__()
        self.per_pixel = per_pixel
        self.embed = torch.nn.Linear(16, WIDTH)
        self.qkv = torch.nn.Linear(WIDTH, 3 * WIDTH)
        self.proj = torch.nn.Linear(WIDTH, 16)

    def forward(self, x):
        b = x.shape[0]
        if self.per_pixel:
            patches = x.permute(0, 3, 4, 1, 2).reshape(b, 64, 16)
        else:
            patches = x.reshape(b, 4, 4, 4, 2, 4, 2).permute(0, 2, 3, 5, 1, 4, 6).reshape(b, 64, 16)
        tokens = self.embed(patches)
        q, k, v = (t.unflatten(2, (HEADS, HEAD_DIM)).transpose(1, 2) for t in self.qkv(tokens).chunk(3, dim=-1))
        tokens = tokens + F.scaled_dot_product_attention(q, k, v).transpose(1, 2).flatten(2)
        return self.proj(tokens).reshape(x.shape)


def test_a_video_reading_without_a_convolution_is_confirmed_by_replaying_the_patchify():
    gm, inputs = capture_graph(LinearPatchVideo(), torch.randn(2, 4, 4, 8, 8))
    _, ctx = assert_invariants(gm, inputs)
    assert (ctx.latent.channel_axis, ctx.latent.grid_axes, ctx.latent.patch) == (1, (2, 3, 4), (1, 2, 2))


def test_an_unconfirmed_video_reading_runs_dense_with_the_reason():
    gm, _ = capture_graph(LinearPatchVideo(per_pixel=True), torch.randn(2, 4, 4, 8, 8))
    with pytest.raises(RewriteError, match="cannot tell which latent elements make up each token"):
        build_ras_graph(gm)


# ------------------------------------------------------------------------------------------ in-place-write rule


def test_rope_written_into_an_empty_like_buffer_is_made_out_of_place():
    gm, inputs = capture_graph(SyntheticDiT(latents="video", rope="inplace"), *_inputs("video"))
    _, ctx = assert_invariants(gm, inputs)
    writes = [r.detail for r in ctx.records if r.kind == "inplace_write"]
    assert writes.count("setitem") == 8  # 2 halves x q, k x 2 blocks


def test_a_write_into_storage_another_view_reads_later_is_refused():
    gm, _ = capture_graph(SyntheticDiT(write="alias"), *_inputs("image"))
    with pytest.raises(RewriteError, match="in-place mul_ into storage that .* reads afterwards"):
        build_ras_graph(gm)


def test_an_in_place_method_on_tokens_is_made_out_of_place():
    gm, inputs = capture_graph(SyntheticDiT(write="add"), *_inputs("image"))
    _, ctx = assert_invariants(gm, inputs)
    assert [(r.kind, r.detail) for r in ctx.records].count(("inplace_write", "add_")) == 2


# ------------------------------------------------------------------------------------------ position-table rule


def test_an_image_table_is_gathered_once_for_every_layer():
    gm, inputs = capture_graph(SyntheticDiT(rope="image", blocks=3), *_inputs("image"))
    ras, ctx = assert_invariants(gm, inputs)
    gathers = [n for n in ras.graph.nodes if getattr(n.target, "__name__", "") == "gather_position_table"]
    assert len(gathers) == 2, "cos and sin: one gather each, shared by the three blocks' queries and keys"


@pytest.mark.parametrize("kv", ["single-stream", "image-first"])
def test_a_joint_table_keeps_text_rows_and_gathers_image_rows_at_their_offset(kv):
    gm, inputs = capture_graph(SyntheticDiT(kv=kv, rope="joint"), *_inputs("image"))
    _, ctx = assert_invariants(gm, inputs)
    offset = TEXT if kv == "single-stream" else 0
    assert any(r.kind == "joint_table" and r.offset == offset for r in ctx.records)


# ------------------------------------------------------------------------------------------ K/V-source rule


@pytest.mark.parametrize(
    "kv, record, offset",
    [
        ("image", "kv_cached", None),
        ("joint-at-attention", "kv_cached", None),
        ("single-stream", "kv_joint", 3),
        ("image-first", "kv_joint", 0),
    ],
)
def test_keys_and_values_are_cached_where_attention_reads_them(kv, record, offset):
    """Every cache holds the 16 image tokens' rows only, whether attention reads image-only or joint keys."""
    gm, inputs = capture_graph(SyntheticDiT(kv=kv), *_inputs("image"))
    _, ctx = assert_invariants(gm, inputs)
    assert len(ctx.kv_slots) == 4 and all(s.shape[s.axis] == 16 for s in ctx.kv_slots)
    slots = {s.placeholder: s for s in ctx.kv_slots}
    found = [(r.kind, r.offset) for r in ctx.records if r.cache and slots[r.cache].kind == "key"]
    assert (record, offset) in found, ctx.records


def test_rules_cover_a_video_single_stream_model_with_inplace_rope():
    """The rules compose: video latents, RoPE written in place, text joined before attention."""
    model = SyntheticDiT(latents="video", kv="joint-at-attention", rope="inplace")
    gm, inputs = capture_graph(model, *_inputs("video"))
    _, ctx = assert_invariants(gm, inputs)
    assert math.prod(ctx.latent.token_grid) == ctx.num_tokens == 32


class SharedQueryKey(torch.nn.Module):
    """Attention whose query, key and value are one tensor: caching the key there would widen the query."""

    def __init__(self):
        super().__init__()
        self.embed = torch.nn.Conv2d(4, WIDTH, 2, stride=2)
        self.block = torch.nn.Linear(WIDTH, WIDTH)
        self.proj = torch.nn.Linear(WIDTH, 16)

    def forward(self, x, text):
        tokens = self.embed(x).flatten(2).transpose(1, 2)
        heads = self.block(tokens).unsqueeze(1)
        tokens = tokens + F.scaled_dot_product_attention(heads, heads, heads).squeeze(1)
        return self.proj(tokens).transpose(1, 2).reshape(x.shape)


def test_a_key_shared_with_the_query_is_refused():
    gm, _ = capture_graph(SharedQueryKey(), *_inputs("image"))
    with pytest.raises(RewriteError, match="the query and the key share"):
        build_ras_graph(gm)


class BrokenBeforeTheTokens(SyntheticDiT):
    """A graph break in the text conditioning, before the patch embedding: Dynamo makes two graphs, and the
    second holds the whole token region."""

    def forward(self, x, text, timestep):
        text = text * timestep[:, None, None]
        torch._dynamo.graph_break()
        return super().forward(x, text)


def test_the_graph_that_holds_the_token_region_is_rewritten_and_the_others_run_dense():
    import warnings

    from rascompile.runtime.registry import controllers_of

    model = BrokenBeforeTheTokens(kv="joint-at-attention")
    x, text = _inputs("image")
    options = dict(num_inference_steps=4, scheduler_start_step=1, error_reset_steps=(), inner_backend="aot_eager")
    compiled = torch.compile(model, backend="ras", options=options)
    with warnings.catch_warnings(record=True) as caught, torch.no_grad():
        warnings.simplefilter("always")
        for t in (1000.0, 750.0, 500.0, 250.0):
            timestep = torch.full((2,), t)
            out = compiled(x, text, timestep)
            if t == 1000.0:
                torch.testing.assert_close(out, model(x, text, timestep))  # the first step is dense
            x = x - 0.1 * out
    dense_reasons = [str(w.message) for w in caught if "runs dense" in str(w.message)]
    assert len(dense_reasons) == 1 and "no image-token source" in dense_reasons[0], dense_reasons
    (control,) = controllers_of(compiled)
    assert [d.kind for d in control.history] == ["capture", "ras", "ras", "ras"]


# ------------------------------------------------------------------------------------------ op sets


def test_op_sets_match_functions_methods_and_method_rules():
    from rascompile.passes.op_sets import HEAD_LAYOUT, INPLACE_METHODS, KV_LAYOUT, WRITES, matches

    graph = torch.fx.Graph()
    x = graph.placeholder("x")
    repeat = graph.call_method("repeat", (x, 2))
    transpose = graph.call_function(torch.transpose, (x, 0, 1))
    add_ = graph.call_method("add_", (x, 1))
    dunder = graph.call_method("__iadd__", (x, 1))
    assert matches(transpose, HEAD_LAYOUT) and matches(transpose, KV_LAYOUT)
    assert matches(repeat, KV_LAYOUT) and not matches(repeat, HEAD_LAYOUT)  # the fused op writes one row per row
    assert matches(add_, INPLACE_METHODS) and matches(add_, WRITES) and not matches(dunder, WRITES)
    assert not matches(x, KV_LAYOUT) and not matches(3, KV_LAYOUT)


class SequenceFirstDiT(torch.nn.Module):
    """ERNIE-Image's layout: image tokens made sequence-first ``[N, B, C]`` and joined with text on dim 0, a
    modulation expanded along the joint sequence (``(1 + scale).expand(S, ...)``), a rotate-half RoPE over the
    batch-first joint sequence, and the output ``final(x)[:N].transpose(0, 1)``."""

    def __init__(self):
        super().__init__()
        self.embed = torch.nn.Conv2d(4, WIDTH, 2, stride=2)
        self.text = torch.nn.Linear(WIDTH, WIDTH)
        self.modulation = torch.nn.Linear(1, WIDTH)
        self.qkv = torch.nn.Linear(WIDTH, 3 * WIDTH)
        self.final = torch.nn.Linear(WIDTH, 16)
        _init_(self)

    def forward(self, x, timestep, text):
        b, n = x.shape[0], (x.shape[2] // 2) * (x.shape[3] // 2)
        image = self.embed(x).flatten(2).transpose(1, 2).transpose(0, 1)
        joint = torch.cat([image, self.text(text).transpose(0, 1)], dim=0)  # [S, B, C]
        scale = self.modulation(timestep[:, None]).unsqueeze(0).expand(joint.shape[0], -1, -1).contiguous()
        h = (joint * (1 + scale)).permute(1, 0, 2)  # [B, S, C]
        positions = torch.arange(h.shape[1], dtype=torch.float32)[None, :, None, None] * 0.3
        cos, sin = positions.cos(), positions.sin()
        q, k, v = (t.unflatten(-1, (HEADS, HEAD_DIM)) for t in self.qkv(h).chunk(3, dim=-1))
        q, k = (t * cos + torch.cat((-t[..., 2:], t[..., :2]), dim=-1) * sin for t in (q, k))
        attended = F.scaled_dot_product_attention(*(t.transpose(1, 2) for t in (q, k, v)))
        h = (h + attended.transpose(1, 2).flatten(2)).permute(1, 0, 2)  # [S, B, C]
        out = self.final(h)[:n].transpose(0, 1)
        return out.transpose(1, 2).reshape(b, 16, x.shape[2] // 2, x.shape[3] // 2)


def test_a_sequence_first_joint_sequence_keeps_the_invariants():
    g = torch.Generator().manual_seed(3)
    inputs = (
        torch.randn(2, 4, 8, 8, generator=g),
        torch.rand(2, generator=g),
        torch.randn(2, TEXT, WIDTH, generator=g),
    )
    gm, example = capture_graph(SequenceFirstDiT(), *inputs)
    _, ctx = assert_invariants(gm, example)
    kinds = [r.kind for r in ctx.records]
    assert "broadcast_table" in kinds and "joint_table" in kinds
    assert any(r.kind == "scatter" and "transpose" in r.node for r in ctx.records)


class ChannelLastDiT(torch.nn.Module):
    """Kandinsky 5's layout: channel-last latents ``[B, F, H, W, C]`` cut into ``(1, 2, 2)`` patches by view, permute
    and flatten, a patch linear, the grid flattened to tokens, one attention block, then the tokens reshaped back onto
    the grid for an output layer that runs there."""

    def __init__(self):
        super().__init__()
        self.embed = torch.nn.Linear(4 * 4, WIDTH)
        self.qkv = torch.nn.Linear(WIDTH, 3 * WIDTH)
        self.norm = torch.nn.LayerNorm(WIDTH)
        self.out = torch.nn.Linear(WIDTH, 4 * 4)
        _init_(self)

    def forward(self, x):
        b, f, h, w, c = x.shape
        patches = x.view(b, f, h // 2, 2, w // 2, 2, c).permute(0, 1, 2, 4, 3, 5, 6).flatten(4, 6)
        tokens = self.embed(patches).flatten(1, 3)
        q, k, v = (t.unflatten(-1, (HEADS, HEAD_DIM)).transpose(1, 2) for t in self.qkv(tokens).chunk(3, dim=-1))
        tokens = tokens + F.scaled_dot_product_attention(q, k, v).transpose(1, 2).flatten(2)
        grid = tokens.reshape(b, f, h // 2, w // 2, WIDTH)
        out = self.out(self.norm(grid)).view(b, f, h // 2, w // 2, 2, 2, c)
        return out.permute(0, 1, 2, 4, 3, 5, 6).reshape(b, f, h, w, c)


def test_channel_last_latents_cut_by_views_and_a_linear_keep_the_invariants():
    gm, example = capture_graph(
        ChannelLastDiT(), torch.randn(2, 2, 8, 8, 4, generator=torch.Generator().manual_seed(4))
    )
    _, ctx = assert_invariants(gm, example)
    assert (ctx.latent.channel_axis, ctx.latent.grid_axes, ctx.latent.patch) == (4, (1, 2, 3), (1, 2, 2))
    assert ctx.latent.describe() == "BFHWC latents, patch 1x2x2"
    # the merge is on the tokens before they go back onto the grid, not after the output linear
    assert ctx.output_cache_shape == (2, 32, WIDTH)


class DtypeFromTokensDiT(torch.nn.Module):
    """Cosmos' shape: the timestep projection is cast to the tokens' dtype (``temb.type_as(tokens)``) before it
    modulates them; the cast takes nothing else from the tokens."""

    def __init__(self):
        super().__init__()
        self.embed = torch.nn.Conv2d(4, WIDTH, 2, stride=2)
        self.temb = torch.nn.Linear(1, WIDTH)
        self.qkv = torch.nn.Linear(WIDTH, 3 * WIDTH)
        self.proj = torch.nn.Linear(WIDTH, 16)
        _init_(self)

    def forward(self, x, timestep):
        b = x.shape[0]
        tokens = self.embed(x).flatten(2).transpose(1, 2)
        q, k, v = (t.unflatten(-1, (HEADS, HEAD_DIM)).transpose(1, 2) for t in self.qkv(tokens).chunk(3, dim=-1))
        tokens = tokens + F.scaled_dot_product_attention(q, k, v).transpose(1, 2).flatten(2)
        tokens = tokens * (1 + self.temb(timestep[:, None]).type_as(tokens)[:, None, :])
        return self.proj(tokens).transpose(1, 2).reshape(b, 16, x.shape[2] // 2, x.shape[3] // 2)


def test_a_cast_to_the_tokens_dtype_takes_no_tokens():
    g = torch.Generator().manual_seed(5)
    gm, example = capture_graph(DtypeFromTokensDiT(), torch.randn(2, 4, 8, 8, generator=g), torch.rand(2, generator=g))
    assert_invariants(gm, example)
