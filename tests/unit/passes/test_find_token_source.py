"""find_token_source: the latents input and layout, the timestep and the image tokens; the graph stays as it is."""

import pytest
import torch
import torch.nn.functional as F

from rascompile.passes.context import RewriteError, module_path
from tests.support.passes import (
    HEAD_DIM,
    HEADS,
    WIDTH,
    TinyDiT,
    TinyFoldedVideoDiT,
    TinyPackedDiT,
    TinyRowsDiT,
    capture,
    fact,
    graph_signature,
    node,
    order,
    run_until,
)

PASS = "find_token_source"


def _first_block_node(gm):
    return next(n for n in gm.graph.nodes if n.op != "placeholder" and module_path(n).startswith("blocks."))


def test_image_latents_give_the_tokens_after_patch_and_timestep_embedding():
    gm, inputs = capture(TinyDiT())
    out, ctx = run_until(gm, PASS)
    latents, timestep = (n.name for n in out.graph.nodes if n.op == "placeholder" and "self" not in n.name)
    assert (fact(ctx, "latents"), fact(ctx, "timestep")) == (latents, timestep)
    assert fact(ctx, "latent_layout") == "image"
    assert (fact(ctx, "num_tokens"), fact(ctx, "batch_size"), fact(ctx, "patch_size")) == (16, 2, 2)
    assert tuple(fact(ctx, "latent_hw")) == (8, 8)
    layout = fact(ctx, "latent")
    assert (layout.channel_axis, layout.grid_axes, layout.patch) == (1, (2, 3), (2, 2))
    source = node(out, fact(ctx, "token_source"))
    # the last [B, N, C] node before the first block: the timestep embedding added to the patch tokens
    assert source.meta["ras_dense_shape"] == (2, 16, WIDTH)
    assert source.op == "call_function" and source.target.__name__ == "add"
    assert order(out)[source] < order(out)[_first_block_node(out)]
    assert any(module_path(u).startswith("blocks.0") for u in source.users)


def test_the_graph_is_not_changed():
    gm, _ = capture(TinyDiT(call="keyword", mask=True))
    before, _ = run_until(gm, PASS, before=True)
    out, _ = run_until(gm, PASS)
    assert graph_signature(out) == graph_signature(before)


def test_video_latents_are_read_through_the_patch_convolution():
    gm, _ = capture(TinyDiT(latents="video"))
    out, ctx = run_until(gm, PASS)
    assert fact(ctx, "latent_layout") == "video"
    assert (fact(ctx, "num_tokens"), fact(ctx, "patch_size")) == (32, 2)
    layout = fact(ctx, "latent")
    assert (layout.channel_axis, layout.grid_axes, layout.patch, layout.token_grid) == (
        1,
        (2, 3, 4),
        (1, 2, 2),
        (2, 4, 4),
    )
    assert node(out, fact(ctx, "token_source")).meta["ras_dense_shape"] == (2, 32, WIDTH)


def test_packed_latents_are_the_one_input_with_the_outputs_token_count():
    gm, _ = capture(TinyPackedDiT())
    out, ctx = run_until(gm, PASS)
    latents = node(out, fact(ctx, "latents"))
    assert latents.op == "placeholder" and "hidden_states" in latents.name and "encoder" not in latents.name
    assert fact(ctx, "latent_layout") == "packed"
    assert (fact(ctx, "num_tokens"), fact(ctx, "patch_size"), tuple(fact(ctx, "latent_hw"))) == (16, 1, (16, 1))
    assert fact(ctx, "timestep") is None
    source = node(out, fact(ctx, "token_source"))
    assert source.meta["ras_dense_shape"] == (2, 16, WIDTH)  # after the input projection, not the latents
    embedder = next(n for n in out.graph.nodes if n.op != "placeholder" and module_path(n) == "x_embedder")
    # the projection itself: the block's residual reads it besides ``tokens + text``
    assert source is embedder


def test_two_inputs_with_the_outputs_token_count_are_refused():
    gm, _ = capture(TinyPackedDiT(ambiguous=True))  # both go through a linear first: either could be the latents
    with pytest.raises(RewriteError, match="packed latents are ambiguous"):
        run_until(gm, PASS)


class FloatPositionIds(TinyPackedDiT):
    """FLUX.2 called with float ``img_ids`` [B, N, 4]: a second floating input of the tokens' shape, read as
    positions (here a cosine table added to the tokens), never projected by a linear."""

    def forward(self, hidden_states, img_ids):
        tokens = self.x_embedder(hidden_states)
        tokens = tokens + (img_ids.sum(dim=-1, keepdim=True) * torch.arange(1, WIDTH + 1)).cos()
        q, k, v = (t.unflatten(2, (HEADS, HEAD_DIM)).transpose(1, 2) for t in self.qkv(tokens).chunk(3, -1))
        return self.proj(tokens + F.scaled_dot_product_attention(q, k, v).transpose(1, 2).flatten(2))


def test_float_position_ids_of_the_tokens_shape_are_not_taken_for_the_latents():
    model = FloatPositionIds()
    ids = torch.cartesian_prod(torch.arange(4), torch.arange(4)).float()
    ids = torch.cat([ids, torch.zeros(16, 2)], dim=1).expand(2, -1, -1)
    gm, _ = capture(model, model.inputs()[0], ids)
    out, ctx = run_until(gm, PASS)
    assert "hidden_states" in fact(ctx, "latents") and fact(ctx, "num_tokens") == 16


class IndicatorPacked(TinyPackedDiT):
    """Ideogram 4's packing: ``[text; image]`` rows in one sequence of the output's length, the latents
    ``[B, S, 16]`` zero at the text rows and the text features ``[B, S, 24]`` zero at the image rows, each masked by
    the ``indicator`` before its own linear (neither enters a linear directly)."""

    def __init__(self):
        super().__init__()
        self.context_embedder = torch.nn.Linear(24, WIDTH)

    def forward(self, hidden_states, encoder_hidden_states, indicator):
        image = (indicator == 2).to(hidden_states.dtype).unsqueeze(-1)
        tokens = self.x_embedder(hidden_states * image) + self.context_embedder(encoder_hidden_states * (1 - image))
        q, k, v = (t.unflatten(2, (HEADS, HEAD_DIM)).transpose(1, 2) for t in self.qkv(tokens).chunk(3, -1))
        return self.proj(tokens + F.scaled_dot_product_attention(q, k, v).transpose(1, 2).flatten(2))


def test_packed_latents_are_told_from_text_features_of_the_same_length_by_the_outputs_channels():
    g = torch.Generator().manual_seed(2)
    indicator = torch.cat([torch.full((2, 4), 3), torch.full((2, 16), 2)], dim=1)
    gm, _ = capture(
        IndicatorPacked(), torch.randn(2, 20, 16, generator=g), torch.randn(2, 20, 24, generator=g), indicator
    )
    out, ctx = run_until(gm, PASS)
    assert "hidden_states" in fact(ctx, "latents") and fact(ctx, "num_tokens") == 20


def test_frames_folded_into_the_batch_are_read_as_one_token_per_site_across_them():
    gm, _ = capture(TinyFoldedVideoDiT())
    out, ctx = run_until(gm, PASS)
    layout = fact(ctx, "latent")
    assert (fact(ctx, "num_tokens"), fact(ctx, "token_rows"), fact(ctx, "batch_size")) == (25, 3, 2)
    assert (layout.kind, layout.channel_axis, layout.grid_axes, layout.patch) == ("video", 1, (2, 3, 4), (3, 2, 2))
    assert layout.token_grid == (1, 5, 5)


class FramesFoldedFrameMajor(TinyFoldedVideoDiT):
    """The frames folded frame-major (row f*B + b): the rows of one item are not consecutive."""

    def forward(self, latents, timestep):
        b, c, f, h, w = latents.shape
        tokens = self.embed(latents.permute(2, 0, 1, 3, 4).reshape(-1, c, h, w)).flatten(2).transpose(1, 2)
        tokens = tokens + self._attend(self.spatial, tokens)
        out = self.proj(tokens).reshape(f * b, h // 2, w // 2, 2, 2, c).permute(0, 5, 1, 3, 2, 4)
        return out.reshape(f, b, c, h, w).permute(1, 2, 0, 3, 4)


def test_frames_folded_frame_major_are_not_read():
    gm, _ = capture(FramesFoldedFrameMajor())
    with pytest.raises(RewriteError, match="no image-token source found"):
        run_until(gm, PASS)


def test_latents_as_a_list_of_rows_are_read_through_their_join_and_stacking():
    gm, _ = capture(TinyRowsDiT())
    out, ctx = run_until(gm, PASS)
    layout = fact(ctx, "latent")
    assert fact(ctx, "latents_rows") == ["l_x_0_", "l_x_1_"] and fact(ctx, "latents") == "l_x_0_"
    assert (fact(ctx, "num_tokens"), fact(ctx, "batch_size")) == (16, 2)
    assert (layout.shape, layout.patch, layout.channel_axis) == ((2, 4, 1, 8, 8), (1, 2, 2), 1)
    assert node(out, fact(ctx, "token_source")).target is torch._C._nn.pad_sequence


class RowsJoinedWithText(TinyRowsDiT):
    """The embedded rows also joined with a caption along dim 0: they reach the blocks by a second path."""

    def forward(self, x: list, captions: list, t):
        rows = [xi.view(4, 1, 1, 4, 2, 4, 2).permute(1, 3, 5, 2, 4, 6, 0).reshape(16, 16) for xi in x]
        joined = self.embed(torch.cat(rows, dim=0))
        tokens = torch.nn.utils.rnn.pad_sequence(list(joined.split([16] * len(rows))), batch_first=True)
        tokens = tokens + torch.cat([joined, self.caption(captions[0])]).mean()
        q, k, v = (u.unflatten(2, (HEADS, HEAD_DIM)).transpose(1, 2) for u in self.qkv(tokens).chunk(3, -1))
        return self.final(tokens + F.scaled_dot_product_attention(q, k, v).transpose(1, 2).flatten(2))


def test_rows_joined_with_other_tensors_are_refused_with_the_reason():
    gm, _ = capture(RowsJoinedWithText())
    with pytest.raises(RewriteError, match="a cat with other tensors"):
        run_until(gm, PASS)


def test_rows_stacked_out_of_order_are_refused_with_the_reason():
    gm, _ = capture(TinyRowsDiT(order="reversed"))
    with pytest.raises(RewriteError, match="stacks the rows other than one row per batch item in order"):
        run_until(gm, PASS)


class OverlappingPatches(torch.nn.Module):
    """A patch convolution whose kernel overlaps (3 x 3, stride 2): 9 tokens from 8 x 8 latents, no patch size."""

    def __init__(self):
        super().__init__()
        self.embed = torch.nn.Conv2d(4, WIDTH, 3, stride=2)
        self.block = torch.nn.Linear(WIDTH, WIDTH)
        self.proj = torch.nn.Linear(WIDTH, 16)

    def forward(self, x):
        return self.proj(self.block(self.embed(x).flatten(2).transpose(1, 2)))


def test_a_token_count_that_no_patch_size_gives_is_refused():
    gm, _ = capture(OverlappingPatches(), torch.randn(2, 4, 8, 8))
    with pytest.raises(RewriteError, match=r"no image-token source found .*N = H\*W/p\^2"):
        run_until(gm, PASS)


class FlatInput(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.proj = torch.nn.Linear(64, 64)

    def forward(self, x):
        return self.proj(x)


def test_a_graph_without_latents_is_refused():
    gm, _ = capture(FlatInput(), torch.randn(2, 64))
    with pytest.raises(RewriteError, match="no 4-D or 5-D floating-point model input"):
        run_until(gm, PASS)


class WritesInPlace(torch.nn.Module):
    """A piece that returns nothing: it writes image tokens into a joint buffer in place (as Qwen-Image 2.1 does
    between two graph breaks)."""

    def forward(self, joint, tokens):
        joint[:, 2:] = tokens


def test_a_graph_without_outputs_is_refused_with_a_reason():
    """Regression: a graph whose output tuple is empty raised IndexError inside the pass."""
    gm, _ = capture(WritesInPlace(), torch.zeros(2, 10, 4), torch.randn(2, 8, 4))
    with pytest.raises(RewriteError, match="no image-token source found"):
        run_until(gm, PASS)


class ScaledLatents(TinyDiT):
    """TinyDiT whose latents are first multiplied by a one-element buffer, and whose timestep input is called ``t``."""

    def __init__(self):
        super().__init__()
        self.register_buffer("sigma_scale", torch.ones(1))

    def forward(self, x, t):
        return super().forward(x * self.sigma_scale, t)


class OffsetLatents(TinyDiT):
    """TinyDiT that adds a [1, 4, 8, 8] buffer to the latents before the patch embedding."""

    def __init__(self):
        super().__init__()
        self.register_buffer("offset", torch.zeros(1, 4, 8, 8))

    def forward(self, x, timestep):
        return super().forward(self.offset + x, timestep)


# Buffers are module state, never the caller's inputs, even when Dynamo places them before the real ones.


def test_a_one_element_buffer_is_not_taken_for_the_timestep():
    gm, _ = capture(ScaledLatents())
    out, ctx = run_until(gm, PASS)
    (timestep,) = [n.name for n in out.graph.nodes if n.op == "placeholder" and n.name.startswith("l_t")]
    assert fact(ctx, "timestep") == timestep


def test_a_latent_shaped_buffer_is_not_taken_for_the_latents_at_batch_one():
    model = OffsetLatents()
    gm, _ = capture(model, *model.inputs(batch=1))
    out, ctx = run_until(gm, PASS)
    (latents,) = [n.name for n in out.graph.nodes if n.op == "placeholder" and n.name == "l_x_"]
    assert fact(ctx, "latents") == latents


class DecoderDiT(torch.nn.Module):
    """Motif-Video's shape: the decoder takes a copy of the embedded tokens (``clone``) while the encoder block
    takes the tokens; the decoder then attends over [its tokens; the encoder's image tokens] and keeps its own."""

    def __init__(self):
        super().__init__()
        self.embed = torch.nn.Conv2d(4, WIDTH, 2, stride=2)
        self.encoder = torch.nn.Linear(WIDTH, WIDTH)
        self.qkv = torch.nn.Linear(WIDTH, 3 * WIDTH)
        self.proj = torch.nn.Linear(WIDTH, 16)

    def forward(self, x, timestep):
        b = x.shape[0]
        tokens = self.embed(x).flatten(2).transpose(1, 2) * timestep[:, None, None]
        decoder = tokens.clone()
        encoded = self.encoder(tokens)
        joint = torch.cat([decoder, encoded], dim=1)
        q, k, v = (t.view(b, -1, HEADS, HEAD_DIM).transpose(1, 2) for t in self.qkv(joint).chunk(3, dim=-1))
        attended = F.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(b, -1, WIDTH)
        decoder = decoder + attended[:, : -encoded.shape[1]]
        return self.proj(decoder).transpose(1, 2).reshape(b, 16, 4, 4)


def test_tokens_that_reach_the_blocks_by_two_paths_are_gathered_where_the_paths_part():
    gm, inputs = capture(DecoderDiT(), torch.randn(2, 4, 8, 8), torch.rand(2))
    out, ctx = run_until(gm, PASS)
    source = node(out, fact(ctx, "token_source"))
    assert source.target != "clone" and "clone" in [u.target for u in source.users]


def test_a_sequence_with_two_runs_of_image_tokens_is_refused():
    gm, _ = capture(DecoderDiT(), torch.randn(2, 4, 8, 8), torch.rand(2))
    with pytest.raises(RewriteError, match="joins two runs of image tokens in one sequence"):
        run_until(gm, "retarget_token_region")
