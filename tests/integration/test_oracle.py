"""Tests of the tiny model/pipeline builders (tests/support/models.py) and of the RAS oracle (oracle.py there)."""

from __future__ import annotations

import math

import pytest
import torch
from diffusers.models.attention_processor import Attention
from diffusers.models.embeddings import get_2d_rotary_pos_embed_lumina

from rascompile.config import RASConfig
from tests.support.models import (
    LUMINA_TEXT_LEN,
    PATCH_SIZE,
    SD3_TEXT_LEN,
    lumina_call_kwargs,
    sd3_call_kwargs,
    tiny_lumina_pipeline,
    tiny_lumina_transformer,
    tiny_sd3_pipeline,
    tiny_sd3_transformer,
)
from tests.support.oracle import OracleJointAttnProcessor, OracleLuminaAttnProcessor, RASOracle

STEPS = 8
RAS_SETTINGS = dict(scheduler_start_step=2, error_reset_steps=(5,))
DENSE_STEPS = {0, 1, 5}
SIZES = [(16, 16), (16, 24)]  # latent (height, width): N = 64 and N = 96 tokens
MODELS = ["sd3", "lumina"]
CALL_KWARGS = {"sd3": sd3_call_kwargs, "lumina": lumina_call_kwargs}


@pytest.fixture(scope="module")
def pipes():
    return {"sd3": tiny_sd3_pipeline(), "lumina": tiny_lumina_pipeline()}


def call_kwargs(model: str, size=(16, 16), **overrides) -> dict:
    args = dict(num_prompts=2, num_images_per_prompt=2, latent_height=size[0], latent_width=size[1], steps=STEPS)
    args.update(overrides)
    return CALL_KWARGS[model](**args)


def run(pipe, kwargs: dict, oracle: RASOracle | None = None):
    """Run the pipeline; return (final latents, [(transformer input latents, transformer output)] per step)."""
    records = []

    def hook(module, args, kw, output):
        hidden = kw["hidden_states"] if "hidden_states" in kw else args[0]
        records.append((hidden.clone(), output[0].clone()))

    handle = pipe.transformer.register_forward_hook(hook, with_kwargs=True)
    try:
        if oracle is None:
            latents = pipe(**kwargs)[0]
        else:
            with oracle.install(pipe):
                latents = pipe(**kwargs)[0]
    finally:
        handle.remove()
    return latents, records


def record_calls(pipe, kwargs: dict) -> list[dict]:
    """The keyword arguments of every transformer call of a plain pipeline run."""
    calls = []
    handle = pipe.transformer.register_forward_hook(
        lambda module, args, kw, output: calls.append(dict(kw)), with_kwargs=True
    )
    try:
        pipe(**kwargs)
    finally:
        handle.remove()
    return calls


def pixel_mask(tokens: torch.Tensor, num_tokens: int, height: int, width: int) -> torch.Tensor:
    """Token indices [B, k] -> bool pixel mask [B, 1, H, W] (independent of the oracle's helper)."""
    batch = tokens.shape[0]
    grid_w = width // PATCH_SIZE
    mask = torch.zeros(batch, 1, height, width, dtype=torch.bool)
    for b in range(batch):
        for t in tokens[b].tolist():
            r, c = divmod(t, grid_w)
            mask[b, 0, r * PATCH_SIZE : (r + 1) * PATCH_SIZE, c * PATCH_SIZE : (c + 1) * PATCH_SIZE] = True
    return mask


# ----------------------------------------------------------------------------------------- builders


def test_builders_are_tiny_seeded_fp32_eval():
    for build in (tiny_sd3_transformer, tiny_lumina_transformer):
        model, again = build(), build()
        assert not model.training
        params = dict(model.named_parameters())
        assert sum(p.numel() for p in params.values()) < 200_000
        for name, param in params.items():
            assert param.dtype == torch.float32, name
            assert param.device.type == "cpu", name
            assert torch.equal(param, dict(again.named_parameters())[name]), name
            # Nothing left zero-initialised (adaLN, final projections, Lumina gates, ...).
            assert param.abs().max() > 0, name
    sd3 = tiny_sd3_transformer()
    assert sd3.inner_dim == 32 and sd3.config.patch_size == PATCH_SIZE
    lumina = tiny_lumina_transformer()
    attn1 = lumina.layers[0].attn1
    assert lumina.hidden_size == 32 and lumina.head_dim == 8
    assert attn1.heads == 4 and attn1.to_k.out_features // lumina.head_dim == 2  # GQA: 2 KV heads
    assert attn1.norm_q is not None and attn1.norm_k is not None  # qk-norm


@pytest.mark.parametrize("size", SIZES)
@pytest.mark.parametrize("model", MODELS)
def test_pipelines_run_end_to_end(pipes, model, size):
    pipe = pipes[model]
    latents, records = run(pipe, call_kwargs(model, size))
    again, _ = run(pipe, call_kwargs(model, size))
    other_seed, _ = run(pipe, call_kwargs(model, size, seed=1))

    assert latents.shape == (4, 4, *size)  # 2 prompts x 2 images
    assert torch.isfinite(latents).all()
    assert torch.equal(latents, again)  # deterministic
    assert not torch.allclose(latents, other_seed)

    assert len(records) == STEPS
    out_channels = 8 if model == "lumina" else 4  # Lumina: learn_sigma
    for hidden, output in records:
        assert hidden.shape == (8, 4, *size)  # CFG: 2 x 2 prompts x 2 images
        assert torch.equal(hidden[:4], hidden[4:])  # both CFG halves of an image get the same latents
        assert output.shape == (8, out_channels, *size)
        assert torch.isfinite(output).all()
    # CFG really is on: the two halves of the batch give different predictions.
    assert not torch.allclose(records[0][1][:4], records[0][1][4:])


@pytest.mark.parametrize("model", MODELS)
def test_text_conditioning_and_masks_matter(pipes, model):
    pipe = pipes[model]
    calls = record_calls(pipe, call_kwargs(model))
    kw = calls[3]
    with torch.no_grad():
        base = pipe.transformer(**kw)[0]
        swapped = dict(kw, encoder_hidden_states=torch.randn_like(kw["encoder_hidden_states"]))
        assert (pipe.transformer(**swapped)[0] - base).abs().mean() > 0.05 * base.abs().mean()
        if model == "sd3":
            assert kw["encoder_hidden_states"].shape == (8, SD3_TEXT_LEN, 32)
        else:
            mask = kw["encoder_mask"]
            assert mask.shape == (8, LUMINA_TEXT_LEN)
            assert (mask == 0).any() and (mask[0] == 1).all()
            # Masked text slots are ignored ...
            text = kw["encoder_hidden_states"].clone()
            text[mask == 0] = 100.0
            assert torch.allclose(pipe.transformer(**dict(kw, encoder_hidden_states=text))[0], base, atol=1e-6)
            # ... but a different mask changes the result.
            full = torch.ones_like(mask)
            assert not torch.allclose(pipe.transformer(**dict(kw, encoder_mask=full))[0], base, atol=1e-3)


@pytest.mark.parametrize("model", MODELS)
def test_token_order_is_row_major(model):
    """Token t of the patch embedding covers latent pixels [r*p:(r+1)*p, c*p:(c+1)*p], (r, c) = divmod(t, W/p)."""
    height, width = 8, 12
    grid_w = width // PATCH_SIZE
    if model == "sd3":
        embed = tiny_sd3_transformer().pos_embed
        tokens = lambda x: embed(x)  # noqa: E731
    else:
        embed = tiny_lumina_transformer().patch_embedder
        freqs = get_2d_rotary_pos_embed_lumina(8, 384, 384)
        tokens = lambda x: embed(x, freqs)[0]  # noqa: E731
    zeros = torch.zeros(1, 4, height, width)
    with torch.no_grad():
        base = tokens(zeros)
        for r, c in [(0, 0), (0, 5), (1, 0), (3, 4), (2, 1)]:
            impulse = zeros.clone()
            impulse[0, :, r * PATCH_SIZE : (r + 1) * PATCH_SIZE, c * PATCH_SIZE : (c + 1) * PATCH_SIZE] = 1.0
            changed = ((tokens(impulse) - base).abs().sum(-1) > 0)[0].nonzero().flatten().tolist()
            assert changed == [r * grid_w + c]


# ----------------------------------------------------------------------------------------- schedule


def test_schedule_defaults():
    oracle = RASOracle(28)
    assert oracle.sample_ratio == 0.5 and oracle.scheduler_start_step == 4
    assert oracle.scheduler_end_step == 28 and oracle.error_reset_steps == (12, 22)
    assert oracle.metric == "std" and oracle.starvation_scale == 0.1 and oracle.high_ratio == 1.0
    reference = RASConfig.reference_defaults()
    assert (reference.starvation_scale, reference.high_ratio) == (oracle.starvation_scale, oracle.high_ratio)
    assert oracle.skip_num_step == 0 and oracle.skip_num_step_length == 0
    ras = [s for s in range(28) if oracle.is_ras_step(s)]
    assert ras == [s for s in range(4, 28) if s not in (12, 22)]
    assert oracle.num_dropped(4, 4096) == 2048
    assert oracle.num_active(4, 4096) == 2048 and oracle.num_active(12, 4096) == 4096


def test_schedule_static_and_end_step():
    oracle = RASOracle(10, sample_ratio=0.7, scheduler_start_step=2, scheduler_end_step=7, error_reset_steps=(5,))
    assert [s for s in range(10) if oracle.is_ras_step(s)] == [2, 3, 4, 6, 7]
    assert oracle.num_dropped(3, 64) == math.floor(0.3 * 64) == 19
    assert oracle.num_active(3, 64) == 45
    # Step 0 is dense even with start step 0: nothing is cached yet.
    assert not RASOracle(10, scheduler_start_step=0).is_ras_step(0)


def test_schedule_dynamic_mode():
    # N = 256, avg D = 128, T = 10, start = 2, L = 2 -> centre group ((10 + 2) // 2) // 2 = 3.
    oracle = RASOracle(10, scheduler_start_step=2, skip_num_step=32, skip_num_step_length=2)
    # D_raw = 128 + 32 * (s // 2 - 3), rounded down to a multiple of 64.
    expected = {2: 64, 3: 64, 4: 64, 5: 64, 6: 128, 7: 128, 8: 128, 9: 128}
    assert {s: oracle.num_dropped(s, 256) for s in expected} == expected
    oracle = RASOracle(10, scheduler_start_step=2, skip_num_step=64, skip_num_step_length=2)
    expected = {2: 0, 4: 64, 6: 128, 8: 192}
    assert {s: oracle.num_dropped(s, 256) for s in expected} == expected
    # Clamped to [0, N].
    oracle = RASOracle(10, scheduler_start_step=2, skip_num_step=256, skip_num_step_length=2)
    assert oracle.num_dropped(2, 256) == 0 and oracle.num_dropped(8, 256) == 256


def test_split_dropped():
    assert RASOracle(8, high_ratio=1.0).split_dropped(32) == (0, 32)
    assert RASOracle(8, high_ratio=0.0).split_dropped(32) == (32, 0)
    assert RASOracle(8, high_ratio=0.5).split_dropped(33) == (16, 16)
    assert RASOracle(8, high_ratio=0.7).split_dropped(32) == (9, 22)


# ----------------------------------------------------------------------------------------- selection


def _delta_with_token_scores(scores: list[list[float]], grid_h: int, grid_w: int) -> torch.Tensor:
    """A delta [B, 4, 2*grid_h, 2*grid_w] whose per-token std metric is exactly proportional to `scores`."""
    pattern = torch.tensor([1.0, -1.0, 1.0, -1.0])  # unbiased std over 4 channels = 2 / sqrt(3)
    s = torch.tensor(scores).reshape(len(scores), grid_h, grid_w)
    s = s.repeat_interleave(PATCH_SIZE, 1).repeat_interleave(PATCH_SIZE, 2)
    return pattern.view(1, 4, 1, 1) * s.unsqueeze(1)


def test_token_scores_std_and_l2norm():
    delta = torch.randn(2, 4, 4, 6, generator=torch.Generator().manual_seed(0))
    for metric, per_pixel in [("std", delta.std(dim=1)), ("l2norm", delta.pow(2).sum(1).sqrt())]:
        scores = RASOracle(8, metric=metric).token_scores(delta, patch_size=2)
        assert scores.shape == (2, 6)
        for t in range(6):
            r, c = divmod(t, 3)
            expected = per_pixel[:, 2 * r : 2 * r + 2, 2 * c : 2 * c + 2].mean(dim=(1, 2))
            assert torch.allclose(scores[:, t], expected, atol=1e-6)


def test_selection_high_low_and_per_row():
    scores = [[5, 1, 7, 3, 8, 2], [1, 2, 3, 4, 5, 6]]
    delta = _delta_with_token_scores(scores, 2, 3)

    active = RASOracle(8, high_ratio=1.0).select_tokens(delta, 2, patch_size=2)
    assert active[0].nonzero().flatten().tolist() == [0, 1, 3, 5]  # the two highest (8, 7) dropped
    assert active[1].nonzero().flatten().tolist() == [0, 1, 2, 3]  # rows are independent

    active = RASOracle(8, high_ratio=0.0).select_tokens(delta, 2, patch_size=2)
    assert active[0].nonzero().flatten().tolist() == [0, 2, 3, 4]  # the two lowest (1, 2) dropped

    active = RASOracle(8, high_ratio=0.5).select_tokens(delta, 2, patch_size=2)
    assert active[0].nonzero().flatten().tolist() == [0, 2, 3, 5]  # lowest (1) and highest (8) dropped

    # Ties: stable ascending sort, so among equal scores the later token counts as "higher".
    tied = _delta_with_token_scores([[1, 1, 1, 1, 1, 1]], 2, 3)
    assert RASOracle(8).select_tokens(tied, 2, patch_size=2)[0].tolist() == [True] * 4 + [False] * 2


def test_starvation_counts_and_rescoring():
    delta = _delta_with_token_scores([[1, 2, 3, 4]], 2, 2)
    oracle = RASOracle(5, high_ratio=0.0, starvation_scale=1.0)
    first = oracle.select_tokens(delta, 2, patch_size=2)
    assert (~first[0]).nonzero().flatten().tolist() == [0, 1]
    assert oracle.drop_counts.tolist() == [[-5, -5, -6, -6]]  # -(T + 1) + times dropped
    # Scores * exp(d): tokens 0 and 1 are now multiplied by e relative to 2 and 3:
    # [1e, 2e, 3, 4] ascending -> 0 (2.72), 2 (3), 3 (4), 1 (5.44): drop 0 and 2.
    second = oracle.select_tokens(delta, 2, patch_size=2)
    assert (~second[0]).nonzero().flatten().tolist() == [0, 2]
    assert oracle.drop_counts.tolist() == [[-4, -5, -5, -6]]
    oracle.reset()
    assert oracle.drop_counts is None


# ----------------------------------------------------------------------------------------- oracle vs pipeline


@pytest.mark.parametrize("size", SIZES)
@pytest.mark.parametrize("model", MODELS)
def test_full_sample_ratio_equals_plain_pipeline(pipes, model, size):
    pipe = pipes[model]
    plain, plain_records = run(pipe, call_kwargs(model, size))
    oracle = RASOracle(STEPS, sample_ratio=1.0, **RAS_SETTINGS)
    latents, records = run(pipe, call_kwargs(model, size), oracle)
    assert torch.allclose(latents, plain, atol=1e-6, rtol=0)
    for (_, out), (_, plain_out) in zip(records, plain_records, strict=True):
        assert torch.allclose(out, plain_out, atol=1e-6, rtol=0)
    num_tokens = size[0] * size[1] // PATCH_SIZE**2
    for step, active in enumerate(oracle.history):
        if step in DENSE_STEPS:
            assert active is None
        else:  # RAS steps that happen to keep every token
            assert torch.equal(active, torch.arange(num_tokens).expand(8, -1))


@pytest.mark.parametrize("size", SIZES)
@pytest.mark.parametrize("model", MODELS)
def test_half_sample_ratio(pipes, model, size):
    pipe = pipes[model]
    height, width = size
    num_tokens = height * width // PATCH_SIZE**2
    plain, plain_records = run(pipe, call_kwargs(model, size))
    oracle = RASOracle(STEPS, sample_ratio=0.5, **RAS_SETTINGS)
    latents, records = run(pipe, call_kwargs(model, size), oracle)

    assert (latents - plain).abs().max() > 1e-2  # RAS changes the result
    assert len(oracle.history) == STEPS and len(records) == STEPS

    for step in range(STEPS):
        hidden, out = records[step]
        active = oracle.history[step]
        if step in DENSE_STEPS:
            assert active is None
            continue
        # Number of active tokens: N - floor(0.5 * N); each row sorted, unique, in range.
        assert active.shape == (8, num_tokens - num_tokens // 2)
        assert (active[:, 1:] > active[:, :-1]).all() and active.min() >= 0 and active.max() < num_tokens
        # CFG rows of the same image got identical selections; different images (very likely) not.
        assert torch.equal(active[:4], active[4:])
        assert any(not torch.equal(active[0], active[i]) for i in range(1, 4))
        # Dropped tokens repeat the previous step's output; active tokens are recomputed.
        active_pixels = pixel_mask(active, num_tokens, height, width).expand_as(out)
        previous = records[step - 1][1]
        assert torch.equal(out[~active_pixels], previous[~active_pixels])
        assert not torch.allclose(out[active_pixels], previous[active_pixels], atol=1e-4)

    # Before the first RAS step everything is identical to the plain pipeline.
    for step in (0, 1):
        assert torch.equal(records[step][0], plain_records[step][0])
        assert torch.allclose(records[step][1], plain_records[step][1], atol=1e-6, rtol=0)
    # The selection is made from the latent update of the previous step: check the first RAS step.
    delta = records[2][0] - records[1][0]
    expected = RASOracle(STEPS, **RAS_SETTINGS).select_tokens(delta, num_tokens // 2, patch_size=PATCH_SIZE)
    assert torch.equal(oracle.history[2], expected.nonzero()[:, 1].reshape(8, -1))


@pytest.mark.parametrize("model", MODELS)
def test_kv_cache_matters(pipes, model):
    pipe = pipes[model]
    cached, _ = run(pipe, call_kwargs(model), RASOracle(STEPS, **RAS_SETTINGS))
    broken, _ = run(pipe, call_kwargs(model), RASOracle(STEPS, use_kv_cache=False, **RAS_SETTINGS))
    assert (cached - broken).abs().max() > 1e-2


@pytest.mark.parametrize("model", MODELS)
def test_ras_step_ignores_dropped_tokens_work(pipes, model):
    """The oracle computes dropped tokens too; check they cannot leak into the result.

    Replays the transformer calls of a generation up to the first RAS step twice: once as is, once
    with large noise added to the input latents of the tokens dropped at that step (which keeps them
    the highest-scoring ones, so the selection is unchanged).  The outputs must be identical.
    """
    pipe = pipes[model]
    size = (16, 24)
    num_tokens = size[0] * size[1] // PATCH_SIZE**2
    calls = record_calls(pipe, call_kwargs(model, size))
    oracle = RASOracle(STEPS, **RAS_SETTINGS)
    with oracle.install(pipe), torch.no_grad():
        for step in (0, 1, 2, 3):  # steps 2 and 3 are RAS steps
            reference = pipe.transformer(**calls[step])[0]
        active = oracle.history[3]
        dropped = ~pixel_mask(active, num_tokens, *size)
        noise = 10.0 * torch.randn(calls[3]["hidden_states"].shape, generator=torch.Generator().manual_seed(3))
        perturbed = calls[3]["hidden_states"] + noise * dropped

        oracle.reset()
        for step in (0, 1, 2):
            pipe.transformer(**calls[step])
        result = pipe.transformer(**dict(calls[3], hidden_states=perturbed))[0]
    assert torch.equal(oracle.history[3], active)
    assert torch.allclose(result, reference, atol=1e-5, rtol=0)


def test_generation_boundaries_and_reset(pipes):
    pipe = pipes["sd3"]
    oracle = RASOracle(STEPS, **RAS_SETTINGS)
    with oracle.install(pipe):
        first = pipe(**call_kwargs("sd3"))[0]
        history = list(oracle.history)
        assert oracle.step == 0
        second = pipe(**call_kwargs("sd3"))[0]  # step counting restarts: same result
        assert torch.equal(first, second)
        assert len(oracle.history) == STEPS
        for a, b in zip(history, oracle.history, strict=True):
            assert (a is None and b is None) or torch.equal(a, b)
        # An interrupted generation followed by reset() starts cleanly.
        calls = record_calls(pipe, call_kwargs("sd3"))  # (runs through the oracle; ends at step 0)
        with torch.no_grad():
            for step in range(3):
                pipe.transformer(**calls[step])
        assert oracle.step == 3
        oracle.reset()
        assert oracle.step == 0 and oracle.history == []
        third = pipe(**call_kwargs("sd3"))[0]
        assert torch.equal(first, third)


@pytest.mark.parametrize("model", MODELS)
def test_install_and_uninstall(pipes, model):
    pipe = pipes[model]
    transformer = pipe.transformer
    before = {name: m.processor for name, m in transformer.named_modules() if isinstance(m, Attention)}
    plain, _ = run(pipe, call_kwargs(model))
    oracle = RASOracle(STEPS, **RAS_SETTINGS)
    with oracle.install(pipe):
        assert "forward" in transformer.__dict__
        installed = {name: m.processor for name, m in transformer.named_modules() if isinstance(m, Attention)}
        if model == "sd3":
            assert all(isinstance(p, OracleJointAttnProcessor) for p in installed.values())
        else:
            for name, processor in installed.items():
                assert isinstance(processor, OracleLuminaAttnProcessor)
                assert processor.cache_image_kv == name.endswith("attn1")
        with pytest.raises(RuntimeError):
            oracle.install(pipe)
        pipe(**call_kwargs(model))
    assert "forward" not in transformer.__dict__
    after = {name: m.processor for name, m in transformer.named_modules() if isinstance(m, Attention)}
    assert all(after[name] is before[name] for name in before)
    assert torch.equal(run(pipe, call_kwargs(model))[0], plain)


def test_kv_cache_shapes(pipes):
    for model, expected in [("sd3", (8, 4, 96, 8)), ("lumina", (8, 96, 2, 8))]:
        pipe = pipes[model]
        oracle = RASOracle(STEPS, **RAS_SETTINGS)
        with oracle.install(pipe):
            pipe(**call_kwargs(model, (16, 24)))
            caches = [p for p in oracle._processors if getattr(p, "cache_image_kv", True)]
            assert len(caches) == 2  # one per layer
            for processor in caches:
                assert processor.key_cache.shape == expected and processor.value_cache.shape == expected


def test_dynamic_mode_and_other_settings_run(pipes):
    pipe = pipes["sd3"]
    # 32 x 32 latent: N = 256.  Dynamic: D = 64 for steps 2..5, 128 for 6..9 (see test_schedule_dynamic_mode).
    oracle = RASOracle(10, scheduler_start_step=2, error_reset_steps=(), skip_num_step=32, skip_num_step_length=2)
    run(pipe, call_kwargs("sd3", (32, 32), steps=10, num_prompts=1, num_images_per_prompt=1), oracle)
    ks = [None if a is None else a.shape[1] for a in oracle.history]
    assert ks == [None, None, 192, 192, 192, 192, 128, 128, 128, 128]

    # l2norm metric and a split of dropped tokens between the lowest and highest scores.
    for model in MODELS:
        oracle = RASOracle(STEPS, metric="l2norm", high_ratio=0.5, **RAS_SETTINGS)
        latents, _ = run(pipes[model], call_kwargs(model, (16, 24)), oracle)
        assert torch.isfinite(latents).all()
        assert [None if a is None else a.shape for a in oracle.history] == [
            None if s in DENSE_STEPS else (8, 48) for s in range(STEPS)
        ]
