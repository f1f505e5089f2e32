"""The shipped shapes model: data set, weights, training smoke test, quality with and without RAS, demo."""

import json

import numpy as np
import pytest
import torch

from rascompile.demo.shapes.classifier import ShapesClassifier, adherence
from rascompile.demo.shapes.data import (
    COLOURS,
    SIZES,
    VOCABULARY,
    ShapesDataset,
    caption_contents,
    render,
    render_batch,
    tokenize,
)
from rascompile.demo.shapes.generate import Generator
from rascompile.demo.shapes.model import ShapesModel, ShapesModelConfig, initialize_adaln_zero, to_images, to_latents
from rascompile.demo.shapes.quality import fidelity, frechet_distance
from rascompile.demo.shapes.train import shift_sigma, train

# Held-out scenes: 24 images keep the adherence figures steady (a handful of images varies by +-0.2 per seed).
# Not 32: with CFG that is a batch of 64, equal to the token count, which the passes cannot tell apart (dense).
CAPTIONS = [ShapesDataset(24, seed=80_000).scene(i).caption for i in range(24)]


@pytest.fixture(scope="module")
def model():
    return ShapesModel.load()


@pytest.fixture(scope="module")
def classifier():
    return ShapesClassifier.load()


def test_dataset_is_deterministic_and_varied():
    a, b = ShapesDataset(50, seed=3), ShapesDataset(50, seed=3)
    assert [a.scene(i) for i in range(50)] == [b.scene(i) for i in range(50)]
    assert torch.equal(a[7][0], b[7][0])
    assert a.scene(0) != ShapesDataset(50, seed=4).scene(0)
    scenes = [a.scene(i) for i in range(50)]
    assert {len(s.objects) for s in scenes} == {1, 2, 3}
    assert {s.background for s in scenes} == {"flat", "gradient", "textured"}
    image = a[0][0]
    assert image.shape == (3, 32, 32) and image.dtype == torch.float32 and -1 <= image.min() and image.max() <= 1


def test_objects_are_drawn_where_the_scene_says():
    for scene in [ShapesDataset(30, seed=1).scene(i) for i in range(30)]:
        image = render(scene)
        top = scene.objects[-1]  # drawn last, so nothing covers its centre
        pixel = image[:, int(top.y), int(top.x)]
        np.testing.assert_allclose(pixel, COLOURS[top.colour], atol=0.02)
        assert SIZES[top.size] in (4.0, 7.0)


def test_captions_tokens_and_vocabulary():
    scene = ShapesDataset(1, seed=0).scene(0)
    ids = tokenize(scene.caption)
    assert len(ids) == 20 and ids[-1] == 0
    assert " ".join(VOCABULARY[i] for i in ids if i) == scene.caption
    with pytest.raises(ValueError, match=r"'dog'.*the vocabulary is: a, and, on, background, small, large, red"):
        tokenize("a large dog on a flat background")
    assert caption_contents("a small blue square and a large red circle on a flat background") == (
        {("blue", "square"), ("red", "circle")},
        "flat",
    )


def test_latent_space_is_invertible():
    images = render_batch([ShapesDataset(4, seed=2).scene(i) for i in range(4)])
    assert to_latents(images).shape == (4, 12, 16, 16)
    assert torch.equal(to_images(to_latents(images)), images)


def test_shipped_classifier_reads_real_images(classifier):
    data = ShapesDataset(256, seed=10_000)
    scenes = [data.scene(i) for i in range(256)]
    scores = adherence(classifier, render_batch(scenes), [s.caption for s in scenes])
    assert scores["object_recall"] > 0.9 and scores["background_accuracy"] > 0.95, scores


def test_training_smoke(model):
    """A few optimizer steps from the shipped weights: finite loss of the size the model card reports."""
    copy = ShapesModel(model.config)
    copy.load_state_dict(model.state_dict())
    for precision in ("fp32", "bf16"):
        _, log = train(steps=3, batch_size=8, out=None, model=copy, progress=False, warmup=1, precision=precision)
        assert len(log) == 3 and all(np.isfinite(r["loss"]) and r["loss"] < 0.5 for r in log), (precision, log)


def test_adaln_zero_initialisation():
    """After DiT's adaLN-Zero the model predicts zero velocity and every block starts as the identity."""
    torch.manual_seed(0)
    fresh = ShapesModel(ShapesModelConfig(layers=2, heads=2, head_dim=16))
    assert fresh.transformer.proj_out.weight.any()  # diffusers' initialisation, until asked
    initialize_adaln_zero(fresh.transformer)
    blocks = fresh.transformer.transformer_blocks
    for linear in [fresh.transformer.proj_out, *(b.norm1.linear for b in blocks), blocks[0].norm1_context.linear]:
        assert not linear.weight.any() and not linear.bias.any()
    assert fresh.transformer.transformer_blocks[0].attn.to_q.weight.std() > 0
    latents = torch.randn(2, 12, 16, 16)
    ids = torch.tensor([tokenize("a small red circle on a flat background")] * 2)
    with torch.no_grad():
        velocity = fresh.velocity(latents, torch.tensor([0.3, 0.9]), ids)
    assert velocity.shape == latents.shape and not velocity.any()


def test_sigma_shift():
    sigma = torch.tensor([0.0, 0.25, 0.5, 1.0])
    assert torch.equal(shift_sigma(sigma, 1.0), sigma)
    torch.testing.assert_close(shift_sigma(sigma, 3.0), torch.tensor([0.0, 0.5, 0.75, 1.0]))


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"precision": "fp16"}, r"precision='fp16' is not supported; choose one of fp32, bf16"),
        ({"sigma_shift": 0.0}, "sigma_shift=0.0"),
        ({"weight_init": "xavier"}, r"weight_init='xavier' is not supported; choose one of default, adaln-zero"),
        ({"weight_init": "adaln-zero", "model": "continued"}, r"applies to a new model"),
        ({"adam_beta2": 1.0}, r"adam_beta2=1.0 must be in \(0, 1\)"),
    ],
)
def test_training_rejects_bad_settings(kwargs, message, model):
    if kwargs.get("model") == "continued":
        kwargs = kwargs | {"model": model}
    with pytest.raises(ValueError, match=message):
        train(steps=1, batch_size=2, out=None, progress=False, **kwargs)


def _recorded(path, keys):
    from safetensors import safe_open

    with safe_open(str(path), "pt") as f:
        meta = f.metadata()
    return {k: meta[k] for k in keys}


def test_training_command(tmp_path):
    """``python -m rascompile.demo.shapes.train``: the shipped recipe by default, each option recorded in the
    weights."""
    from rascompile.demo.shapes.train import main

    keys = ("weight_init", "precision", "lr", "adam_beta2", "sigma_shift", "steps")
    out, log = tmp_path / "w.safetensors", tmp_path / "loss.json"
    argv = ["--steps", "1", "--batch-size", "2", "--warmup", "1", "--out", str(out), "--log", str(log)]
    assert main(argv) == 0
    assert _recorded(out, keys) == dict(
        weight_init="adaln-zero", precision="bf16", lr="0.0024", adam_beta2="0.95", sigma_shift="1.0", steps="1"
    )
    assert len(json.loads(log.read_text())) == 1
    assert ShapesModel.load(out).transformer.proj_out.weight.abs().max() < 1e-2  # zero-initialised, one small step

    options = ["--weight-init", "default", "--precision", "fp32", "--lr", "1e-3", "--adam-beta2", "0.99"]
    assert main(argv + options + ["--sigma-shift", "2"]) == 0
    assert _recorded(out, keys) == dict(
        weight_init="default", precision="fp32", lr="0.001", adam_beta2="0.99", sigma_shift="2.0", steps="1"
    )
    assert ShapesModel.load(out).transformer.proj_out.weight.abs().max() > 1e-2  # diffusers' initialisation


@pytest.fixture(scope="module")
def generations(model):
    from rascompile.cli.demo import demo_config

    generate = Generator(model)
    dense = generate(CAPTIONS, config=None, steps=12)
    other_seed = generate(CAPTIONS, config=None, steps=12, seed=1)
    ras = generate(CAPTIONS, config=demo_config(12, 0.5), steps=12)
    return dense, other_seed, ras


def test_generated_images_follow_their_captions(classifier, generations):
    """The classifier finds more of each image's own caption than of another image's caption."""
    dense, _, ras = generations
    shuffled = CAPTIONS[1:] + CAPTIONS[:1]
    for result in (dense, ras):
        own = adherence(classifier, result.images, CAPTIONS)
        other = adherence(classifier, result.images, shuffled)
        assert own["object_recall"] >= other["object_recall"] + 0.2, (own, other)


def test_ras_stays_close_to_dense_and_computes_fewer_tokens(generations):
    """RAS changes an image far less than changing the seed does."""
    dense, other_seed, ras = generations
    ras_scores = fidelity(ras.images, dense.images)
    seed_scores = fidelity(other_seed.images, dense.images)
    assert ras_scores["psnr"] > seed_scores["psnr"] + 5 and ras_scores["ssim"] > seed_scores["ssim"] + 0.2, (
        ras_scores,
        seed_scores,
    )
    assert dense.step_counts is None
    counts = ras.step_counts
    # every token is computed on some of the 12 steps and no more often than all of them; on average fewer
    assert counts.shape == (len(CAPTIONS), 8, 8) and 0 < counts.min() and counts.max() <= 12
    assert counts.float().mean() < 12


def test_frechet_distance():
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(500, 4, generator=gen)
    assert frechet_distance(x, x) == pytest.approx(0.0, abs=1e-6)
    shifted = frechet_distance(x, x + 1.0)
    assert shifted == pytest.approx(4.0, rel=1e-6)  # |mu difference|^2 with equal covariances


def test_demo_command(tmp_path, capsys):
    from rascompile.cli.main import main

    argv = ["demo", "--steps", "8", "--ratios", "0.5", "--images-per-caption", "2", "--no-progress"]
    assert main(argv + ["--out", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert "4 caption(s) x 2 image(s) in one call (batch 8, 16 with guidance)" in out
    assert "dense" in out and "RAS 0.5" in out and "PSNR" in out and "transformer s" in out
    assert "RAS steps computed the objects' tokens" in out and "outside the transformer" in out
    # the default bound holds in the demo's own generation (8 steps: RAS steps 1..4 and 6..7 between dense ones)
    longest = int(out.split("the longest a token went uncomputed: ")[1].split(" ")[0])
    assert longest <= 3 and "(max_skip_steps 3)" in out
    assert (tmp_path / "grid.png").stat().st_size > 0 and (tmp_path / "heatmaps.png").stat().st_size > 0
    assert main(["demo", "--caption", "a large dog", "--no-progress", "--out", str(tmp_path)]) == 2
    assert "the vocabulary is" in capsys.readouterr().err


def test_quality_harness_quick(tmp_path):
    import subprocess
    import sys
    from pathlib import Path

    script = Path(__file__).resolve().parents[2] / "benchmarks" / "quality.py"
    argv = ["--quick", "--samples", "8", "--batch", "8", "--real", "128", "--out", str(tmp_path)]
    result = subprocess.run([sys.executable, str(script), *argv], capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-2000:]
    rows = json.loads((tmp_path / "results.json").read_text())["rows"]
    assert [r["name"] for r in rows][:3] == ["dense 3", "dense 8", "RAS 0.5 @ 8"]
    assert "psnr" in rows[2] and all(r["images_per_s"] > 0 for r in rows)
    assert (tmp_path / "pareto.png").exists() and (tmp_path / "regions.png").exists()
    assert (tmp_path / "table3.md").read_text().count("\n") == 2 + 8
    # two rows of the knobs' sweep and one bounded row at ratio 0.5, with its staleness
    table4 = (tmp_path / "table4.md").read_text()
    assert table4.count("\n") == 2 + 3 and "staleness max / p99" in table4
    bounded = next(r for r in rows if r["name"] == "high_ratio 0, starvation_scale 0.1, max_skip_steps 4 @ ratio 0.5")
    assert bounded["max_staleness"] <= 4
    # RAS 0.5 at 8 steps (start 1, reset at 5): 6 RAS steps, 2 dense steps. D = 32 and high_ratio 0.1 drops
    # floor(32 * 0.9) + floor(32 * 0.1) = 31 tokens: 33 of 64 are computed.
    assert rows[0]["tokens_computed"] == 1.0 and rows[2]["tokens_computed"] == pytest.approx((2 + 6 * 33 / 64) / 8)
    ablations = {r["name"]: r for r in rows if r["table"] == "3"}
    assert ablations["static sampling ratio"]["tokens_computed"] == pytest.approx((2 + 6 * 17 / 64) / 8)
    assert ablations["reference defaults (high_ratio 1)"]["tokens_computed"] == pytest.approx(
        (2 + 3 * 18 / 64 + 3 * 14 / 64) / 8
    )
    # the dynamic default drops D = 46 on steps 1-3 (19 computed: 41 + 4 dropped) and 50 on 4, 6, 7 (14)
    assert ablations["default (dynamic ratio)"]["tokens_computed"] == pytest.approx((2 + 3 * 19 / 64 + 3 * 14 / 64) / 8)
    assert all(0.0 <= r["always_or_never"] <= 1.0 for r in ablations.values())
    assert all(0.0 <= r["objects_computed"] <= 1.0 for r in ablations.values())
    # float8 caches beside model-dtype caches at ratio 0.5: the same tokens computed, compared image by image
    model_dtype, fp8 = (
        next(r for r in rows if r["name"] == f"{d} caches @ ratio 0.5") for d in ("model-dtype", "float8")
    )
    assert (model_dtype["kv_cache_dtype"], fp8["kv_cache_dtype"]) == (None, "fp8_e4m3")
    assert fp8["tokens_computed"] == model_dtype["tokens_computed"]
    assert 15 < fp8["psnr_vs_model_dtype"] <= 100 and "psnr_vs_model_dtype" not in model_dtype
    assert "against model-dtype caches" in (tmp_path / "table5.md").read_text()


def test_object_tokens_from_colours_match_the_scene_geometry():
    """The colour rule that finds objects in generated images agrees with where real scenes put them."""
    from rascompile.demo.shapes.regions import object_tokens, scene_object_tokens

    scenes = [ShapesDataset(200, seed=90_000).scene(i) for i in range(200)]
    found = object_tokens(render_batch(scenes))
    truth = torch.stack([scene_object_tokens(s) for s in scenes])
    assert truth.float().mean() > 0.15  # objects cover a good share of the tokens, so agreement is informative
    assert (found == truth).float().mean() > 0.97
    assert (found & ~truth).float().mean() < 0.005  # backgrounds are never taken for objects
    empty = [type(s)((), s.background, s.background_seed) for s in scenes[:50]]
    assert not object_tokens(render_batch(empty)).any()


def test_computation_by_region_counts_ras_steps_only():
    from rascompile.demo.shapes.regions import computation_by_region

    objects = torch.zeros(2, 8, 8, dtype=torch.bool)
    objects[:, :2] = True
    counts = torch.full((2, 8, 8), 3)  # 3 dense steps compute everything
    counts[:, :2] += 4  # object tokens: 4 of the 8 RAS steps
    counts[:, 2:] += torch.tensor([2, 0])[:, None, None]  # background: 2 of 8 in image 0, none in image 1
    shares = computation_by_region(counts, objects, dense_steps=3, ras_steps=8)
    assert shares == {"objects_computed": 0.5, "background_computed": 0.125}
    assert computation_by_region(counts, torch.zeros_like(objects), 3, 8)["objects_computed"] != 0.5  # nan
    with pytest.raises(ValueError, match="ras_steps=0"):
        computation_by_region(counts, objects, 3, 0)
