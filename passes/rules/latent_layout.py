"""The latent-layout rule: which latent elements make up each image token.

A ``LatentLayout`` describes the latents tensor a transformer takes and how its patch embedding (or the
pipeline's packing) groups its elements into the N tokens, in token order. ``find_token_source`` finds it
from the graph, the controller's token metric reads the tokens' own latent elements through it, and the
heatmaps draw per-token counts on its token grid. Three layouts are recognised:

- ``image``  ``[B, C, H, W]`` with patches ``(p, p)``: SD3, PixArt, Lumina-Next, HunyuanDiT, DiT, ...
- ``video``  ``[B, C, F, H, W]`` (Wan, HunyuanVideo) or ``[B, F, C, H, W]`` (CogVideoX) with patches
  ``(p_t, p, p)``;
- ``packed`` ``[B, N, C]``: the pipeline packed each token's latent elements into its row (Flux, Qwen-Image,
  LTX-Video); a token's elements are its row.

A model that folds the frames of video latents into the batch (Latte) is read as ``video`` with patches
``(F, p, p)``: one token per spatial site across all frames (``folded_frames_layout``).

Token order is row-major over the token grid (``(F / p_t, H / p, W / p)`` for video), the order in which
every diffusers patch embedding flattens its output. A new layout needs a ``LatentLayout`` and a rule in
``layouts_for``; the metric and the heatmaps follow from the description.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.fx

from ..graph_utils import example_value

KINDS = ("image", "video", "packed")
CONVOLUTIONS = {
    torch.conv2d: 2,
    torch.conv3d: 3,
    torch.nn.functional.conv2d: 2,
    torch.nn.functional.conv3d: 3,
}


@dataclass(frozen=True)
class LatentLayout:
    """How a latents tensor splits into tokens.

    ``channel_axis`` holds a latent element's channels (or, when packed, a token's elements); ``grid_axes``
    index the tokens, in token order; ``patch`` is the number of latent elements per token along each grid
    axis (all 1 when packed).
    """

    kind: str
    shape: tuple[int, ...]
    channel_axis: int
    grid_axes: tuple[int, ...]
    patch: tuple[int, ...]

    def __post_init__(self):
        if self.kind not in KINDS:
            raise ValueError(f"kind={self.kind!r} is invalid: must be one of {', '.join(map(repr, KINDS))}")
        if len(self.grid_axes) != len(self.patch):
            raise ValueError(f"grid_axes {self.grid_axes} and patch {self.patch} must have the same length")
        for axis, p in zip(self.grid_axes, self.patch):
            if p < 1 or self.shape[axis] % p:
                raise ValueError(f"patch {self.patch} does not divide the latent sizes {self.shape}")

    @property
    def token_grid(self) -> tuple[int, ...]:
        """Tokens along each grid axis: ``(H / p, W / p)``, ``(F / p_t, H / p, W / p)`` or ``(N,)``."""
        return tuple(self.shape[a] // p for a, p in zip(self.grid_axes, self.patch))

    @property
    def num_tokens(self) -> int:
        return math.prod(self.token_grid)

    @property
    def spatial_patch(self) -> int:
        """The patch side over height and width (1 when packed): the ``patch_size`` of exports and manifests."""
        return self.patch[-1] if self.kind != "packed" else 1

    def describe(self) -> str:
        if self.kind == "packed":
            return "packed latents"
        names = dict(zip(self.grid_axes, "HW" if self.kind == "image" else "FHW"))
        axes = "B" + "".join("C" if a == self.channel_axis else names[a] for a in range(1, len(self.shape)))
        return f"{axes} latents, patch {'x'.join(map(str, self.patch))}"

    def token_blocks(self, shape: tuple[int, ...]) -> tuple[list[int], list[int]]:
        """``(split, order)``: ``x.reshape(split).permute(order)`` brings a tensor ``x`` of ``shape`` (these latents'
        layout, any channel count) to ``[B, *token_grid, *elements of one token]``, tokens in token order."""
        split, grid, rest = [], [], []
        for axis, size in enumerate(shape):
            if axis in self.grid_axes:
                p = self.patch[self.grid_axes.index(axis)]
                grid.append(len(split))
                rest.append(len(split) + 1)
                split += [size // p, p]
            elif axis == 0:
                split.append(size)
            else:
                rest.append(len(split))
                split.append(size)
        return split, [0, *grid, *sorted(rest)]

    def to_grid(self, per_token: torch.Tensor) -> torch.Tensor:
        """``[B, N]`` per-token values as ``[B, *token_grid]`` (a heatmap per image, per frame for video)."""
        return per_token.reshape(per_token.shape[0], *self.token_grid)


def image_layout(shape: tuple[int, ...], num_tokens: int) -> LatentLayout | None:
    """``[B, C, H, W]`` latents with square patches ``p`` such that ``N = (H / p) * (W / p)``."""
    height, width = shape[2], shape[3]
    if not num_tokens or (height * width) % num_tokens:
        return None
    p = math.isqrt(height * width // num_tokens)
    if p * p * num_tokens != height * width or height % p or width % p:
        return None
    return LatentLayout("image", tuple(shape), 1, (2, 3), (p, p))


def packed_layout(shape: tuple[int, ...]) -> LatentLayout:
    return LatentLayout("packed", tuple(shape), 2, (1,), (1,))


def video_layouts(shape: tuple[int, ...], num_tokens: int) -> list[LatentLayout]:
    """Every ``[B, C, F, H, W]`` / ``[B, F, C, H, W]`` reading with ``(p_t, p, p)`` patches giving N tokens."""
    found = []
    height, width = shape[3], shape[4]
    for channel_axis, frame_axis in ((1, 2), (2, 1)):
        frames = shape[frame_axis]
        for pt in _divisors(frames):
            for p in _divisors(math.gcd(height, width)):
                if (frames // pt) * (height // p) * (width // p) == num_tokens:
                    grid = (frame_axis, 3, 4)
                    found.append(LatentLayout("video", tuple(shape), channel_axis, grid, (pt, p, p)))
    return found


def channel_last_video_layouts(shape: tuple[int, ...], num_tokens: int) -> list[LatentLayout]:
    """Every ``[B, F, H, W, C]`` reading with ``(p_t, p, p)`` patches giving N tokens (Kandinsky 5)."""
    found = []
    frames, height, width = shape[1], shape[2], shape[3]
    for pt in _divisors(frames):
        for p in _divisors(math.gcd(height, width)):
            if (frames // pt) * (height // p) * (width // p) == num_tokens:
                found.append(LatentLayout("video", tuple(shape), 4, (1, 2, 3), (pt, p, p)))
    return found


def _divisors(n: int) -> list[int]:
    return [d for d in range(1, n + 1) if n % d == 0]


def _input_axes(node: torch.fx.Node) -> tuple[int, ...] | None:
    """Which axis of a model input each axis of ``node`` is, when ``node`` is that input moved by ``permute`` and
    ``transpose`` only (AnyFlow permutes ``[B, F, C, H, W]`` latents to ``[B, C, F, H, W]`` for its ``Conv3d``);
    None otherwise."""
    value = example_value(node)
    if not isinstance(value, torch.Tensor):
        return None
    axes = list(range(value.dim()))
    while node.op != "placeholder":
        if node.op != "call_method" or not node.args or not isinstance(node.args[0], torch.fx.Node):
            return None
        if node.target == "permute":
            dims = node.args[1] if len(node.args) == 2 and isinstance(node.args[1], (tuple, list)) else node.args[1:]
            axes = [dims[a] for a in axes]
        elif node.target == "transpose":
            a, b = (d % len(axes) for d in node.args[1:3])
            axes = [b if x == a else a if x == b else x for x in axes]
        elif node.target != "contiguous":
            return None
        node = node.args[0]
    return tuple(axes)


def patch_evidence(nodes: list[torch.fx.Node]) -> list[tuple[int, tuple[int, ...], int, tuple[int, ...] | None]]:
    """``(dims, stride, in_channels, input_axes)`` of every strided convolution among ``nodes`` whose kernel equals
    its stride: a patch embedding (``Conv3d`` over ``[B, C, F, H, W]``, or ``Conv2d`` per frame). ``input_axes``:
    which latent axis each axis of the convolution's input is, when it is the latents permuted (else None)."""
    found = []
    for node in nodes:
        if node.op != "call_function" or node.target not in CONVOLUTIONS:
            continue
        weight = node.args[1] if len(node.args) > 1 else node.kwargs.get("weight")
        stride = node.args[3] if len(node.args) > 3 else node.kwargs.get("stride", 1)
        value = example_value(weight) if isinstance(weight, torch.fx.Node) else None
        if not isinstance(value, torch.Tensor):
            continue
        dims = CONVOLUTIONS[node.target]
        stride = tuple(stride) if isinstance(stride, (tuple, list)) else (stride,) * dims
        if tuple(int(s) for s in value.shape[2:]) == stride:
            source = node.args[0] if node.args else node.kwargs.get("input")
            axes = _input_axes(source) if isinstance(source, torch.fx.Node) else None
            found.append((dims, stride, int(value.shape[1]), axes))
    return found


def folded_frames_layout(
    latents: torch.fx.Node, tokens: torch.fx.Node, nodes: list[torch.fx.Node]
) -> tuple[LatentLayout, int] | None:
    """``(layout, rows)`` when ``tokens`` ``[B*F, N, D]`` come from video latents whose frames the model folds into
    the batch: a ``Conv2d`` patch embedding (kernel = stride = p) over ``[B*F, C, H, W]``, the latents permuted to
    ``[B, F, C, H, W]`` and reshaped so (Latte), row ``b*F + f`` holding frame f of item b. Read as one token per
    spatial site across all frames (patches ``(F, p, p)``, N = H*W/p^2): the rows of one site are computed or
    skipped together, so the temporal attention, which runs over the frames of each site, stays exact."""
    shape = tuple(int(s) for s in example_value(latents).shape)
    value = example_value(tokens)
    if len(shape) != 5 or not isinstance(value, torch.Tensor) or value.dim() != 3:
        return None
    rows, num_tokens = int(value.shape[0]), int(value.shape[1])
    for node in nodes:
        if node.op != "call_function" or CONVOLUTIONS.get(node.target) != 2 or not node.args:
            continue
        weight = node.args[1] if len(node.args) > 1 else node.kwargs.get("weight")
        stride = node.args[3] if len(node.args) > 3 else node.kwargs.get("stride", 1)
        kernel = example_value(weight) if isinstance(weight, torch.fx.Node) else None
        stride = tuple(stride) if isinstance(stride, (tuple, list)) else (stride, stride)
        if not isinstance(kernel, torch.Tensor) or tuple(int(s) for s in kernel.shape[2:]) != stride:
            continue
        axes = _folded_axes(node.args[0], latents)
        if axes is None or stride[0] != stride[1]:
            continue
        frame_axis, channel_axis = axes
        frames, p = shape[frame_axis], stride[0]
        if int(kernel.shape[1]) != shape[channel_axis] or rows != shape[0] * frames:
            continue
        if shape[3] % p or shape[4] % p or (shape[3] // p) * (shape[4] // p) != num_tokens:
            continue
        return LatentLayout("video", shape, channel_axis, (frame_axis, 3, 4), (frames, p, p)), frames
    return None


def _folded_axes(node, latents: torch.fx.Node) -> tuple[int, int] | None:
    """``(frame axis, channel axis)`` of the latents when ``node`` is the latents moved to ``[B, F, C, H, W]`` by
    ``permute``/``transpose`` and reshaped to ``[B*F, C, H, W]``; None otherwise."""
    if not (isinstance(node, torch.fx.Node) and node.op == "call_method" and node.target in ("reshape", "view")):
        return None
    moved = node.args[0]
    if not isinstance(moved, torch.fx.Node):
        return None
    axes = _input_axes(moved)
    before, after = example_value(moved), example_value(node)
    if axes is None or not _reaches(moved, latents) or before.dim() != 5 or after.dim() != 4:
        return None
    if axes[0] != 0 or axes[3:] != (3, 4) or tuple(before.shape[2:]) != tuple(after.shape[1:]):
        return None
    if int(before.shape[0]) * int(before.shape[1]) != int(after.shape[0]):
        return None
    return axes[1], axes[2]


def _reaches(node: torch.fx.Node, target: torch.fx.Node) -> bool:
    """Whether ``node`` is ``target`` moved by views (the chain ``_input_axes`` read ends at ``target``)."""
    while node is not target:
        if node.op == "placeholder" or not node.args or not isinstance(node.args[0], torch.fx.Node):
            return False
        node = node.args[0]
    return True


def choose_video_layout(
    candidates: list[LatentLayout], evidence: list[tuple[int, tuple[int, ...], int]]
) -> LatentLayout | str:
    """The one candidate the patch embedding confirms, or the reason none can be chosen."""
    if not candidates:
        return "no reading of the latents as (p_t, p, p) patches gives the token count"
    confirmed = []
    for layout in candidates:
        for dims, stride, in_channels, *axes in evidence:
            if layout.shape[layout.channel_axis] != in_channels:
                continue
            # a Conv3d reads channels on its axis 1 and frames on its axis 2: those latent axes, when it reads the
            # latents permuted
            channel_axis, frame_axis = axes[0][1:3] if axes and axes[0] else (1, 2)
            if dims == 3 and (channel_axis, frame_axis) == (layout.channel_axis, layout.grid_axes[0]):
                if stride == layout.patch:
                    confirmed.append(layout)
            elif dims == 2 and stride == layout.patch[1:] and layout.patch[0] == 1:
                confirmed.append(layout)
    confirmed = list(dict.fromkeys(confirmed))
    if len(confirmed) == 1:
        return confirmed[0]
    if len(candidates) == 1 and not evidence:
        return candidates[0]
    readings = ", ".join(c.describe() for c in candidates)
    return f"cannot tell which latent elements make up each token (readings: {readings})"
