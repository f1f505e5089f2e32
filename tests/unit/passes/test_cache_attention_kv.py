"""cache_attention_kv: attention reads per-layer K/V caches of all N image tokens, the active rows written fresh."""

import pytest
import torch

from rascompile.passes import ops
from rascompile.passes.context import RewriteError
from rascompile.passes.graph_utils import is_sdpa
from rascompile.passes.normalize_attention_args import sdpa_argument
from tests.support.passes import (
    ACTIVE_IDX,
    KV_CACHE,
    OUTPUT_CACHE,
    TEXT,
    WIDTH,
    TinyDiT,
    TinyFoldedVideoDiT,
    added_placeholders,
    all_tokens,
    calls,
    capture,
    dense,
    graph_signature,
    run_graph,
    run_until,
    subset,
    zero_caches,
)

PASS = "cache_attention_kv"


def _feeds(node, target):
    """Whether ``node`` reaches ``target`` through its users."""
    stack, seen = [node], set()
    while stack:
        n = stack.pop()
        if n is target:
            return True
        if n not in seen:
            seen.add(n)
            stack.extend(n.users)
    return False


def test_image_keys_and_values_get_a_cache_each_in_attention_order():
    gm, _ = capture(TinyDiT(blocks=2))
    out, _ = run_until(gm, PASS)
    added = added_placeholders(out)
    caches = [name for name in added if name.startswith(KV_CACHE)]
    assert list(added)[:2] == [ACTIVE_IDX, OUTPUT_CACHE] and caches == [f"{KV_CACHE}{i}" for i in range(4)]
    assert all(added[name] == ((2, 16, WIDTH), torch.float32) for name in caches)
    updates = calls(out, ops.update_kv_cache)
    assert [u.args[0].name for u in updates] == caches
    attention = [n for n in out.graph.nodes if is_sdpa(n)]
    for update, (block, kind) in zip(updates, [(0, "key"), (0, "value"), (1, "key"), (1, "value")]):
        cache, fresh, idx, axis = update.args
        assert (idx.name, axis, fresh.meta["ras_dense_shape"]) == (ACTIVE_IDX, 1, (2, 16, WIDTH))
        assert update.meta.get("ras_impure")
        assert _feeds(update, sdpa_argument(attention[block], kind))
        assert not _feeds(update, sdpa_argument(attention[block], "query"))
        assert list(fresh.users) == [update]  # the fresh rows reach attention only through the cache


def test_a_joint_sequence_concatenated_at_attention_caches_its_image_part_only():
    gm, _ = capture(TinyDiT(text=True))
    out, _ = run_until(gm, PASS)
    added = added_placeholders(out)
    assert added[f"{KV_CACHE}0"] == added[f"{KV_CACHE}1"] == ((2, 2, 16, 4), torch.float32)
    (attention,) = [n for n in out.graph.nodes if is_sdpa(n)]
    for kind, update in zip(("key", "value"), calls(out, ops.update_joint_kv_cache)):
        cache, parts, idx, axis, image_part = update.args
        assert sdpa_argument(attention, kind) is update  # the op joins the text part with the cache
        assert (axis, image_part) == (2, 0)
        assert [p.meta["ras_dense_shape"] for p in parts] == [(2, 2, 16, 4), (2, 2, TEXT, 4)]
    assert not any(is_sdpa(u) for n in calls(out, "cat") for u in n.users)


def test_the_joint_sequence_op_joins_the_steps_text_with_the_cached_image_rows():
    """The cache keeps the N image rows (the active ones fresh); the text rows come from the step, never cached."""
    g = torch.Generator().manual_seed(0)
    cache = torch.randn(2, 2, 16, 4, generator=g)
    image, text = torch.randn(2, 2, 3, 4, generator=g), torch.randn(2, 2, TEXT, 4, generator=g)
    idx = torch.tensor([[1, 7, 12], [0, 5, 15]])
    expected = cache.clone()
    for b in range(2):
        expected[b, :, idx[b]] = image[b]
    joined = ops.update_joint_kv_cache(cache, [image, text], idx, 2, 0)
    torch.testing.assert_close(cache, expected, rtol=0, atol=0)
    torch.testing.assert_close(joined, torch.cat([expected, text], dim=2), rtol=0, atol=0)
    # single-stream: text rows on both sides of the k fresh image rows, from row 2
    fresh = torch.randn(2, 2, 2 + 3 + 1, 4, generator=g)
    joined = ops.update_joint_rows_cache(cache, fresh, idx, 2, 2)
    for b in range(2):
        expected[b, :, idx[b]] = fresh[b, :, 2:5]
    torch.testing.assert_close(cache, expected, rtol=0, atol=0)
    torch.testing.assert_close(joined, torch.cat([fresh[:, :, :2], expected, fresh[:, :, 5:]], dim=2), rtol=0, atol=0)


def test_with_the_cache_off_the_graph_is_left_as_it_is():
    gm, _ = capture(TinyDiT())
    before, _ = run_until(gm, PASS, before=True, kv_cache=False)
    out, _ = run_until(gm, PASS, kv_cache=False)
    assert graph_signature(out) == graph_signature(before)
    assert not any(name.startswith(KV_CACHE) for name in added_placeholders(out))


@pytest.mark.parametrize("options", [{}, {"text": True}, {"blocks": 2, "call": "keyword"}])
def test_a_step_over_all_tokens_fills_the_caches_and_later_subsets_reproduce_dense(options):
    model = TinyDiT(**options)
    gm, inputs = capture(model)
    out, _ = run_until(gm, PASS)
    expected = dense(gm, inputs)
    output_cache, kv = zero_caches(out)
    torch.testing.assert_close(run_graph(out, inputs, all_tokens(2, 16), output_cache, kv)[0], expected)
    assert all(c.abs().sum() > 0 for c in kv)
    for k in (3, 12):  # the inputs did not change: cached keys and values are the dense ones
        got = run_graph(out, inputs, subset(2, 16, k, seed=k), output_cache, kv)[0]
        torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)


def test_the_cached_key_is_the_dense_key_projection():
    model = TinyDiT()
    gm, inputs = capture(model)
    out, _ = run_until(gm, PASS)
    output_cache, kv = zero_caches(out)
    run_graph(out, inputs, all_tokens(2, 16), output_cache, kv)
    x, timestep = model.inputs()
    with torch.no_grad():
        tokens = model.embed(x).flatten(2).transpose(1, 2) + model.temb(timestep[:, None])[:, None, :]
        _, key, value = model.blocks[0].qkv(tokens).chunk(3, dim=-1)
    torch.testing.assert_close(kv[0], key, rtol=0, atol=0)
    torch.testing.assert_close(kv[1], value, rtol=0, atol=0)


def test_a_key_that_is_the_query_tensor_is_refused():
    gm, _ = capture(TinyDiT(shared_qk=True))
    run_until(gm, PASS, before=True)
    with pytest.raises(RewriteError, match="the query and the key share"):
        run_until(gm, PASS)


def test_frames_folded_into_the_batch_cache_the_spatial_attention_only():
    """Spatial attention over each frame's tokens caches ``[B*F, N, ...]`` keys and values, written at the active
    index repeated per frame; the temporal attention, whose tokens index its batch rows (the frames of each
    active site), reads only fresh keys and gets no cache."""
    gm, _ = capture(TinyFoldedVideoDiT())
    out, _ = run_until(gm, PASS)
    caches = {name: shape for name, (shape, _) in added_placeholders(out).items() if name.startswith(KV_CACHE)}
    assert list(caches.values()) == [(6, 25, WIDTH)] * 2
    (rows,) = calls(out, torch.repeat_interleave)
    assert rows.args == (next(n for n in out.graph.nodes if n.name == ACTIVE_IDX), 3, 0)
    assert all(w.args[2] is rows for w in calls(out, ops.update_kv_cache))


# ------------------------------------------------------------------------------------ float8 caches

FP8 = dict(kv_cache_dtype="fp8_e4m3")


def test_float8_rows_round_trip_within_e4m3s_precision_of_their_row():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, 3, 16, 8, generator=g) * torch.logspace(-3, 3, 16)[None, None, :, None]
    rows, scale = ops.quantize_rows(x)
    assert rows.dtype == torch.float8_e4m3fn and scale.shape == (2, 3, 16, 1)
    back = rows.float() * scale
    amax = x.abs().amax(dim=-1, keepdim=True)
    # 3 mantissa bits: half an ulp is 1/16 of the value; values far below the row's largest fall to subnormals
    assert ((back - x).abs() <= x.abs() / 16 + amax * 2.0**-9 / 448 * 2**6).all()
    # each row's largest lands on float8's largest, so it comes back to float32 rounding
    torch.testing.assert_close(back.abs().amax(dim=-1, keepdim=True), amax, rtol=1e-6, atol=0)


def test_a_float8_cache_keeps_the_steps_own_rows_exact_and_the_others_dequantized():
    g = torch.Generator().manual_seed(1)
    cache = torch.zeros(2, 2, 16, 4, dtype=torch.float8_e4m3fn)
    scale = torch.zeros(2, 2, 16, 1)
    full = torch.randn(2, 2, 16, 4, generator=g)
    every = all_tokens(2, 16)
    out = ops.update_quantized_kv_cache(cache, scale, full, every, 2)
    torch.testing.assert_close(out, full, rtol=0, atol=0)  # a step over all tokens: every row fresh
    dequantized = cache.float() * scale
    assert 0 < (dequantized - full).abs().max() <= full.abs().max() / 16
    idx = torch.tensor([[1, 7, 12], [0, 5, 15]])
    fresh = torch.randn(2, 2, 3, 4, generator=g)
    out = ops.update_quantized_kv_cache(cache, scale, fresh, idx, 2)
    for b in range(2):
        torch.testing.assert_close(out[b, :, idx[b]], fresh[b], rtol=0, atol=0)
        kept = [i for i in range(16) if i not in idx[b]]
        torch.testing.assert_close(out[b, :, kept], dequantized[b, :, kept], rtol=0, atol=0)


@pytest.mark.parametrize("options", [{}, {"text": True}])
def test_float8_caches_give_each_cache_a_scale_and_keep_the_invariants_within_float8(options):
    gm, inputs = capture(TinyDiT(**options))
    out, _ = run_until(gm, PASS, **FP8)
    added = added_placeholders(out)
    caches = [(shape, dtype) for name, (shape, dtype) in added.items() if name.startswith(KV_CACHE)]
    shape = (2, 2, 16, 4) if options else (2, 16, WIDTH)  # heads split at attention, or not at all
    assert caches[0::2] == [(shape, torch.float8_e4m3fn)] * 2
    assert caches[1::2] == [((*shape[:-1], 1), torch.float32)] * 2
    expected = dense(gm, inputs)
    output_cache, kv = zero_caches(out)
    # a capture step computes every row fresh: exact
    torch.testing.assert_close(run_graph(out, inputs, all_tokens(2, 16), output_cache, kv)[0], expected)
    unquantized, _ = run_until(gm, PASS)
    plain_cache, plain_kv = zero_caches(unquantized)
    run_graph(unquantized, inputs, all_tokens(2, 16), plain_cache, plain_kv)
    for k in (3, 12):  # skipped tokens' keys and values come back from float8: close to dense, not equal
        idx = subset(2, 16, k, seed=k)
        got = run_graph(out, inputs, idx, output_cache, kv)[0]
        plain = run_graph(unquantized, inputs, idx, plain_cache, plain_kv)[0]
        torch.testing.assert_close(plain, expected, rtol=1e-5, atol=1e-5)
        error = (got - expected).abs().max() / expected.abs().max()
        assert 0 < error < 0.05, error
