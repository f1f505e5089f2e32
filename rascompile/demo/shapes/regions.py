"""Where the objects are, in token units, and how often RAS computed them.

A generated image has no scene to ask where its objects are, but the procedural data makes them easy
to find: objects have one of six saturated colours (``COLOURS``) and backgrounds are muted, so a pixel
within ``COLOUR_TOLERANCE`` of an object colour belongs to an object. A token (``TOKEN_PIXELS`` x
``TOKEN_PIXELS`` pixels) is an object token when at least ``TOKEN_SHARE`` of its pixels are. On real
images this agrees with the scene's geometry (``scene_object_tokens``), which the tests check.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

from ...config import RASConfig
from .data import COLOURS, IMAGE_SIZE, Scene, _coverage

#: Pixels per token side: latents are 2x smaller than images and the transformer's patch is 2.
TOKEN_PIXELS = 4
COLOUR_TOLERANCE = 0.2  # RGB distance, channels in [0, 1]
TOKEN_SHARE = 0.25


def object_pixels(images: torch.Tensor) -> torch.Tensor:
    """[B, 32, 32] bool: the pixels of ``images`` ([B, 3, 32, 32] in [-1, 1]) close to an object colour."""
    rgb = (images.float() + 1) / 2
    palette = torch.tensor(list(COLOURS.values()), dtype=rgb.dtype, device=rgb.device)  # [6, 3]
    distance = (rgb[:, None] - palette[None, :, :, None, None]).norm(dim=2)  # [B, 6, H, W]
    return distance.amin(dim=1) < COLOUR_TOLERANCE


def _pixels_to_tokens(pixels: torch.Tensor) -> torch.Tensor:
    share = F.avg_pool2d(pixels.float()[:, None], TOKEN_PIXELS)[:, 0]
    return share >= TOKEN_SHARE


def object_tokens(images: torch.Tensor) -> torch.Tensor:
    """[B, 8, 8] bool: the tokens of ``images`` that show an object."""
    return _pixels_to_tokens(object_pixels(images))


def scene_object_tokens(scene: Scene) -> torch.Tensor:
    """[8, 8] bool: the tokens a real scene's objects cover, from their geometry."""
    yy, xx = np.mgrid[0:IMAGE_SIZE, 0:IMAGE_SIZE].astype(np.float32) + 0.5
    covered = np.zeros((IMAGE_SIZE, IMAGE_SIZE), np.float32)
    for obj in scene.objects:
        covered = np.maximum(covered, _coverage(obj, xx, yy))
    return _pixels_to_tokens(torch.from_numpy(covered > 0.5)[None])[0]


def computation_by_region(step_counts: torch.Tensor, objects: torch.Tensor, dense_steps: int, ras_steps: int) -> dict:
    """How often the RAS steps computed object tokens and background tokens.

    ``step_counts`` [B, 8, 8] counts every step that computed a token (dense steps included); ``objects``
    [B, 8, 8] marks the object tokens. Returns the share of RAS steps that computed an object token and a
    background token, averaged over the tokens of all images (``nan`` where an image set has none).
    """
    if ras_steps <= 0:
        raise ValueError(f"ras_steps={ras_steps} is invalid: computation by region needs at least one RAS step")
    on_ras_steps = (step_counts.float() - dense_steps) / ras_steps
    objects = objects.to(on_ras_steps.device)

    def share(mask: torch.Tensor) -> float:
        return on_ras_steps[mask].mean().item() if mask.any() else float("nan")

    return {"objects_computed": share(objects), "background_computed": share(~objects)}


def outline_objects(ax, objects: torch.Tensor, colour: str = "cyan") -> None:
    """Outline the object tokens ``objects`` [8, 8] on a matplotlib axis that shows a token grid with ``imshow``,
    along the tokens' edges."""
    if not objects.any():
        return
    scale = 16  # contours of the upsampled mask follow the token edges
    mask = objects.float().repeat_interleave(scale, 0).repeat_interleave(scale, 1).numpy()
    rows, cols = objects.shape
    ax.contour(mask, levels=[0.5], colors=colour, linewidths=1, extent=(-0.5, cols - 0.5, -0.5, rows - 0.5))


#: The staleness the heatmaps flag: tokens skipped on more RAS steps in a row than rascompile's default
#: ``max_skip_steps`` are marked.
STALENESS_BOUND = RASConfig().max_skip_steps


def mark_stale(ax, skip_runs: torch.Tensor | None, bound: int = STALENESS_BOUND) -> int:
    """Mark with a white cross the tokens of a token-grid ``imshow`` whose longest run of skipped RAS steps
    ``skip_runs`` [8, 8] exceeds ``bound``; returns how many."""
    if skip_runs is None:
        return 0
    rows, cols = torch.nonzero(skip_runs > bound, as_tuple=True)
    if len(rows):
        ax.scatter(cols.numpy(), rows.numpy(), marker="x", s=14, c="white", linewidths=1)
    return len(rows)
