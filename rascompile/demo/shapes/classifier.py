"""A small CNN trained on the shapes data: prompt adherence (the CLIP-score analogue) and features
for a Fréchet distance (the FID analogue).

It predicts, for an image, which (colour, shape) pairs are present (18 independent labels) and the
background kind. ``adherence`` scores generated images against the captions that made them.
``python -m rascompile.demo.shapes.classifier`` trains it and saves ``shapes_classifier.safetensors``.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from .data import BACKGROUNDS, COLOURS, SHAPES, Scene, ShapesDataset, caption_contents, render_batch

WEIGHTS = Path(__file__).resolve().parent / "weights" / "shapes_classifier.safetensors"
PAIRS = [(c, s) for c in COLOURS for s in SHAPES]
FEATURES = 256


def object_labels(scene: Scene) -> torch.Tensor:
    """[18] multi-hot over (colour, shape) pairs present in the scene."""
    labels = torch.zeros(len(PAIRS))
    for obj in scene.objects:
        labels[PAIRS.index((obj.colour, obj.shape))] = 1.0
    return labels


class ShapesClassifier(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.body = torch.nn.Sequential(
            torch.nn.Conv2d(3, 32, 3, padding=1),
            torch.nn.GELU(),
            torch.nn.Conv2d(32, 64, 3, stride=2, padding=1),
            torch.nn.GELU(),
            torch.nn.Conv2d(64, 96, 3, padding=1),
            torch.nn.GELU(),
            torch.nn.Conv2d(96, FEATURES // 2, 3, stride=2, padding=1),
            torch.nn.GELU(),
            torch.nn.Conv2d(FEATURES // 2, FEATURES // 2, 3, padding=1),
            torch.nn.GELU(),
        )
        self.objects = torch.nn.Linear(FEATURES, len(PAIRS))
        self.background = torch.nn.Linear(FEATURES, len(BACKGROUNDS))

    def features(self, images: torch.Tensor) -> torch.Tensor:
        """Penultimate features [B, 256] of images [B, 3, 32, 32] in [-1, 1]: max and mean over positions."""
        h = self.body(images)
        return torch.cat([h.amax(dim=(2, 3)), h.mean(dim=(2, 3))], dim=1)

    def forward(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        h = self.features(images)
        return self.objects(h), self.background(h)

    @classmethod
    def load(cls, path: str | Path = WEIGHTS) -> ShapesClassifier:
        from safetensors.torch import load_file

        path = Path(path)
        if not path.exists():
            raise FileNotFoundError(f"{path} does not exist: python -m rascompile.demo.shapes.classifier trains it")
        model = cls()
        model.load_state_dict(load_file(str(path)))
        return model.eval()


@torch.no_grad()
def adherence(classifier: ShapesClassifier, images: torch.Tensor, captions: list[str]) -> dict[str, float]:
    """How well images show their captions: per object recall, exact object sets, background kind."""
    logits, background = classifier(images)
    predicted = logits.sigmoid() > 0.5
    contents = [caption_contents(c) for c in captions]
    wanted = torch.zeros_like(predicted)
    for row, (pairs, _) in enumerate(contents):
        for pair in pairs:
            wanted[row, PAIRS.index(pair)] = True
    recall = (predicted & wanted).sum(1).float() / wanted.sum(1).clamp(min=1).float()
    exact = (predicted == wanted).all(1).float()
    named = [(row, BACKGROUNDS.index(bg)) for row, (_, bg) in enumerate(contents) if bg is not None]
    rows, kinds = (
        (torch.tensor(v, device=logits.device) for v in zip(*named))
        if named
        else (torch.zeros(0, dtype=torch.long, device=logits.device),) * 2
    )
    background_ok = (background[rows].argmax(1) == kinds).float()
    return {
        "object_recall": recall.mean().item(),
        "exact_objects": exact.mean().item(),
        "background_accuracy": background_ok.mean().item() if named else float("nan"),
    }


def train_classifier(steps: int = 3000, batch_size: int = 128, seed: int = 100, progress: bool = True):
    from ..._extras import require_extra

    require_extra("demo", "tqdm", feature="training the shapes classifier")
    from tqdm import tqdm

    torch.manual_seed(seed)
    model = ShapesClassifier()
    optimizer = torch.optim.AdamW(model.parameters(), lr=2e-3, weight_decay=1e-4)
    scheduler = torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=2e-3, total_steps=steps)
    data = ShapesDataset(steps * batch_size, seed)
    for step in tqdm(range(steps), desc="classifier", disable=not progress, file=sys.stderr):
        scenes = [data.scene(step * batch_size + i) for i in range(batch_size)]
        images = render_batch(scenes)
        images = images + 0.05 * torch.randn_like(images)  # generated images are a little noisy
        logits, background = model(images)
        labels = torch.stack([object_labels(s) for s in scenes])
        kinds = torch.tensor([BACKGROUNDS.index(s.background) for s in scenes])
        loss = F.binary_cross_entropy_with_logits(logits, labels) + F.cross_entropy(background, kinds)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        scheduler.step()
    return model.eval()


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description="train the shapes classifier")
    parser.add_argument("--steps", type=int, default=3000)
    parser.add_argument("--out", default=str(WEIGHTS))
    args = parser.parse_args(argv)
    from safetensors.torch import save_file

    start = time.perf_counter()
    model = train_classifier(args.steps)
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, args.out)
    held_out = ShapesDataset(1024, seed=10_000)
    scenes = [held_out.scene(i) for i in range(len(held_out))]
    scores = adherence(model, render_batch(scenes), [s.caption for s in scenes])
    print(f"trained in {(time.perf_counter() - start) / 60:.1f} min; held-out real images: {scores}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
