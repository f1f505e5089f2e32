"""A deterministic procedural data set: coloured shapes on backgrounds, each with a short caption.

Every image is 32 x 32 RGB with one to three objects (circle, square or triangle; six colours; two
sizes) over a flat, gradient or textured background. Item ``i`` of ``ShapesDataset(seed=s)`` depends
only on ``(s, i)``. At the model's resolution (16 x 16 latents, patch 2: 8 x 8 tokens of 4 x 4
pixels) a small object covers about 4 tokens and a large one about 12, so foreground and background
regions are clearly apart.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

IMAGE_SIZE = 32
COLOURS = {
    "red": (0.9, 0.15, 0.15),
    "green": (0.15, 0.8, 0.2),
    "blue": (0.2, 0.35, 0.95),
    "yellow": (0.95, 0.85, 0.1),
    "purple": (0.65, 0.2, 0.85),
    "white": (0.97, 0.97, 0.97),
}
SHAPES = ("circle", "square", "triangle")
SIZES = {"small": 4.0, "large": 7.0}  # half extent in pixels
BACKGROUNDS = ("flat", "gradient", "textured")
VOCABULARY = (
    "<pad>",
    "a",
    "and",
    "on",
    "background",
    *SIZES,
    *COLOURS,
    *SHAPES,
    *BACKGROUNDS,
)
MAX_CAPTION_TOKENS = 20
TOKEN_IDS = {word: i for i, word in enumerate(VOCABULARY)}


@dataclass(frozen=True)
class ShapeObject:
    shape: str
    colour: str
    size: str
    x: float  # centre, pixels
    y: float


@dataclass(frozen=True)
class Scene:
    objects: tuple[ShapeObject, ...]
    background: str
    background_seed: int

    @property
    def caption(self) -> str:
        parts = [f"a {o.size} {o.colour} {o.shape}" for o in self.objects]
        return " and ".join(parts) + f" on a {self.background} background"


def sample_scene(rng: np.random.Generator, num_objects: int | None = None) -> Scene:
    """A random scene: objects placed so that they overlap little."""
    count = int(rng.integers(1, 4)) if num_objects is None else num_objects
    objects: list[ShapeObject] = []
    for _ in range(count):
        size = str(rng.choice(list(SIZES)))
        extent = SIZES[size]
        for _attempt in range(20):
            x, y = rng.uniform(extent + 1, IMAGE_SIZE - extent - 1, size=2)
            if all(np.hypot(x - o.x, y - o.y) > extent + SIZES[o.size] - 1 for o in objects):
                break
        objects.append(ShapeObject(str(rng.choice(SHAPES)), str(rng.choice(list(COLOURS))), size, float(x), float(y)))
    return Scene(tuple(objects), str(rng.choice(BACKGROUNDS)), int(rng.integers(0, 2**31)))


def render(scene: Scene) -> np.ndarray:
    """The scene as float32 [3, 32, 32] in [0, 1], with anti-aliased edges."""
    rng = np.random.default_rng(scene.background_seed)
    yy, xx = np.mgrid[0:IMAGE_SIZE, 0:IMAGE_SIZE].astype(np.float32) + 0.5
    image = _background(scene.background, rng, xx, yy)
    for obj in scene.objects:
        coverage = _coverage(obj, xx, yy)[None]
        image = image * (1 - coverage) + np.asarray(COLOURS[obj.colour], np.float32)[:, None, None] * coverage
    return np.clip(image, 0.0, 1.0).astype(np.float32)


def _background(kind: str, rng: np.random.Generator, xx: np.ndarray, yy: np.ndarray) -> np.ndarray:
    base = rng.uniform(0.15, 0.55, size=3).astype(np.float32)  # muted, so objects stand out
    if kind == "flat":
        return np.broadcast_to(base[:, None, None], (3, IMAGE_SIZE, IMAGE_SIZE)).copy()
    if kind == "gradient":
        other = rng.uniform(0.1, 0.6, size=3).astype(np.float32)
        angle = rng.uniform(0, 2 * np.pi)
        t = ((xx - 16) * np.cos(angle) + (yy - 16) * np.sin(angle)) / 32 + 0.5
        return base[:, None, None] * (1 - t) + other[:, None, None] * t
    texture = np.zeros_like(xx)
    for _ in range(3):
        fx, fy = rng.uniform(-0.35, 0.35, size=2)
        texture += np.sin(fx * xx + fy * yy + rng.uniform(0, 2 * np.pi))
    return base[:, None, None] + 0.08 * texture[None]


def _coverage(obj: ShapeObject, xx: np.ndarray, yy: np.ndarray) -> np.ndarray:
    """Fraction of each pixel inside the shape, from a signed distance (negative inside)."""
    r = SIZES[obj.size]
    dx, dy = xx - obj.x, yy - obj.y
    if obj.shape == "circle":
        distance = np.hypot(dx, dy) - r
    elif obj.shape == "square":
        distance = np.maximum(np.abs(dx), np.abs(dy)) - r * 0.85
    else:  # upward triangle: base at y + r, apex at y - r
        edge = (2 * np.abs(dx) - (dy + r)) / np.sqrt(5.0)  # the half width grows from 0 at the apex to r
        distance = np.maximum(edge, dy - r)
    return np.clip(0.5 - distance, 0.0, 1.0).astype(np.float32)


def tokenize(caption: str) -> list[int]:
    """Token ids of a caption, padded to ``MAX_CAPTION_TOKENS``; unknown words are an error listing the vocabulary."""
    words = caption.lower().split()
    unknown = [w for w in words if w not in TOKEN_IDS or w == "<pad>"]
    if unknown:
        raise ValueError(
            f"caption {caption!r} has word(s) outside the vocabulary: {', '.join(map(repr, unknown))}; "
            f"the vocabulary is: {', '.join(VOCABULARY[1:])}"
        )
    if len(words) > MAX_CAPTION_TOKENS:
        raise ValueError(f"caption {caption!r} has {len(words)} words; at most {MAX_CAPTION_TOKENS} are allowed")
    return [TOKEN_IDS[w] for w in words] + [0] * (MAX_CAPTION_TOKENS - len(words))


def caption_contents(caption: str) -> tuple[set[tuple[str, str]], str | None]:
    """The (colour, shape) pairs a caption asks for, and its background kind (None if it names none).

    Size words may stand between a colour and its shape; other words are ignored.
    """
    words = [w for w in caption.lower().split() if w not in SIZES]
    pairs = {(a, b) for a, b in zip(words, words[1:]) if a in COLOURS and b in SHAPES}
    backgrounds = [w for w in words if w in BACKGROUNDS]
    return pairs, (backgrounds[-1] if backgrounds else None)


class ShapesDataset(torch.utils.data.Dataset):
    """``len`` items; item ``i`` is ``(image [3, 32, 32] in [-1, 1], token ids [20], scene)``."""

    def __init__(self, length: int, seed: int = 0):
        self.length = length
        self.seed = seed

    def __len__(self) -> int:
        return self.length

    def scene(self, index: int) -> Scene:
        if not 0 <= index < self.length:
            raise IndexError(f"index {index} is outside [0, {self.length})")
        return sample_scene(np.random.default_rng((self.seed, index)))

    def __getitem__(self, index: int):
        scene = self.scene(index)
        image = torch.from_numpy(render(scene)) * 2 - 1
        return image, torch.tensor(tokenize(scene.caption)), scene


def render_batch(scenes: list[Scene]) -> torch.Tensor:
    """Images [B, 3, 32, 32] in [-1, 1]."""
    return torch.from_numpy(np.stack([render(s) for s in scenes])) * 2 - 1
