"""The patchify rule: a graph that only cuts the latents into tokens (its patch-embedding linear in the next graph,
as in Lumina-Image 2.0 and HiDream-I1) tells how the latents split, verified element by element."""

import torch

from rascompile.passes.find_token_source import is_model_input
from rascompile.passes.graph_utils import placeholders
from rascompile.passes.rules.patchify import element_rows, patchified_latents
from tests.support.passes import capture


class Patchify(torch.nn.Module):
    def __init__(self, order=(0, 2, 4, 3, 5, 1), scale=None):
        super().__init__()
        self.order, self.scale = order, scale

    def forward(self, latents):
        b, c, h, w = latents.shape
        x = latents.view(b, c, h // 2, 2, w // 2, 2).permute(*self.order).flatten(3).flatten(1, 2)
        return (x * self.scale if self.scale is not None else x,)


class PatchifyVideo(torch.nn.Module):
    def forward(self, latents):
        b, c, f, h, w = latents.shape
        x = latents.view(b, c, f, h // 2, 2, w // 2, 2).permute(0, 2, 3, 5, 1, 4, 6).reshape(b, f * h * w // 4, -1)
        return (x,)


def _found(model, *inputs):
    gm, _ = capture(model, *inputs)
    return patchified_latents(gm, [n for n in placeholders(gm) if is_model_input(n)])


def test_an_image_patchify_gives_its_layout():
    found = _found(Patchify(), torch.randn(2, 4, 8, 8))
    assert found is not None and found.num_tokens == 16
    assert found.layout.kind == "image" and found.layout.patch == (2, 2)


def test_a_video_patchify_gives_its_layout():
    found = _found(PatchifyVideo(), torch.randn(1, 4, 3, 8, 8))
    assert found is not None and found.num_tokens == 48
    assert found.layout.kind == "video" and found.layout.patch == (1, 2, 2) and found.layout.channel_axis == 1


def test_tokens_in_another_order_than_row_major_are_not_read():
    # columns before rows: every token holds one patch, but token t is not the t-th patch in row-major order
    assert _found(Patchify(order=(0, 4, 2, 3, 5, 1)), torch.randn(2, 4, 8, 8)) is None


def test_an_op_that_changes_values_is_not_a_patchify():
    assert _found(Patchify(scale=2.0), torch.randn(2, 4, 8, 8)) is None


def test_element_rows_hold_each_tokens_patch():
    found = _found(Patchify(), torch.randn(1, 1, 4, 4))
    rows = element_rows(found.layout)
    assert rows.shape == (1, 4, 4)
    assert rows[0, 1].tolist() == [2, 3, 6, 7]  # token (0, 1): columns 2-3 of rows 0-1
