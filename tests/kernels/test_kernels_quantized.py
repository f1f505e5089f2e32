"""rascompile::linear_scatter_quantized_: float8 rows and per-row scales written by the Triton epilogue (through
Triton's CPU interpreter) and by the op's plain torch version, against an independent quantization written here."""

import os

os.environ["TRITON_INTERPRET"] = "1"  # before Triton compiles anything: kernels run on CPU tensors

import pytest  # noqa: E402
import torch  # noqa: E402

from rascompile.kernels.linear_scatter import linear_scatter_  # noqa: E402
from rascompile.kernels.linear_scatter_quantized import linear_scatter_quantized_, normalize_quantized  # noqa: E402
from tests.support.kernel_cases import make_case  # noqa: E402

triton_kernel = pytest.importorskip("rascompile.kernels.triton_linear_scatter", reason="Triton is not installed")

FP8 = torch.float8_e4m3fn
CASES = {  # layout, make_case's epilogue options
    "btc_none": ("btc", dict()),
    "bthd_bias": ("bthd", dict(bias=True)),
    "bhtd_rope": ("bhtd", dict(rope=True)),
    "bthd_rms_norm_per_head_rope": ("bthd", dict(norm="rms_norm", per_head=True, rope=True)),
    "bthd_layer_norm_across_heads": ("bthd", dict(norm="layer_norm", per_head=False, bias=True)),
    "btc_layer_norm_per_head": ("btc", dict(norm="layer_norm", per_head=True)),  # refused: see below
}
ROW_TOLERANCE = {torch.float32: dict(rtol=1e-5, atol=1e-5), torch.bfloat16: dict(rtol=2e-2, atol=2e-2)}


def quantized_case(layout, dtype=torch.float32, **options):
    case = make_case(dtype=dtype, layout=layout, **options)
    cache = case.pop("cache")
    case.pop("row_offset")
    case["cache"] = (cache.float() * 10).to(FP8)  # untouched rows must stay as they are
    case["scale"] = torch.rand(*cache.shape[:-1], 1, generator=torch.Generator().manual_seed(5)) + 0.5
    return case


def expected_write(case):
    """The rows as linear_scatter_ writes them into a cache of x's dtype, and those rows quantized here: each row of
    the cache's last dim divided by its largest magnitude over 448 (e4m3's largest) and rounded to nearest."""
    plain = torch.zeros(case["cache"].shape, dtype=case["x"].dtype)
    args = {k: v for k, v in case.items() if k not in ("cache", "scale")}
    linear_scatter_(plain, **args)
    scale = plain.float().abs().amax(-1, keepdim=True) / 448.0
    scale = torch.where(scale > 0, scale, torch.finfo(torch.float32).tiny)
    return plain, (plain.float() / scale).to(FP8), scale


def written_rows(case, tensor):
    """``tensor``'s rows at the case's indices, as [B, k, ...] whatever the layout."""
    t = tensor.transpose(1, 2) if case["token_axis"] == 2 else tensor
    return torch.stack([t[b, case["idx"][b]] for b in range(t.shape[0])])


def run_torch(case):
    case = dict(case, cache=case["cache"].clone(), scale=case["scale"].clone())
    rows = linear_scatter_quantized_(**case)
    return rows, case["cache"], case["scale"]


def run_kernel(case):
    case = dict(case, cache=case["cache"].clone(), scale=case["scale"].clone())
    tables = (case["norm_weight"], case["norm_bias"], case["rope_cos"], case["rope_sin"])
    names = ("cache", "scale", "x", "weight", "bias", "idx", "token_axis", "head_dim", "norm", "norm_group")
    cache4, scale4, _, group, quant_group, cos, sin = normalize_quantized(*(case[k] for k in names), *tables)
    rows = case["x"].new_empty(*case["x"].shape[:2], case["weight"].shape[0])
    triton_kernel.launch(
        cache4,
        case["x"],
        case["weight"],
        case["bias"],
        case["idx"],
        row_offset=0,
        norm=case["norm"],
        norm_group=group,
        norm_weight=case["norm_weight"],
        norm_bias=case["norm_bias"],
        eps=case["eps"],
        rope_cos=cos,
        rope_sin=sin,
        scale4=scale4,
        rows_out=rows,
        quant_group=quant_group,
    )
    return rows, case["cache"], case["scale"]


def assert_untouched_rows_kept(case, cache, scale):
    keep = torch.ones(cache.shape[0], cache.shape[case["token_axis"]], dtype=torch.bool)
    keep[torch.arange(keep.shape[0])[:, None], case["idx"]] = False
    view = lambda t: t.transpose(1, 2) if case["token_axis"] == 2 else t  # noqa: E731
    assert torch.equal(view(cache).view(torch.uint8)[keep], view(case["cache"]).view(torch.uint8)[keep])
    assert torch.equal(view(scale)[keep], view(case["scale"])[keep])


WRITABLE = sorted(set(CASES) - {"btc_layer_norm_per_head"})


@pytest.mark.parametrize("name", WRITABLE)
def test_torch_version_writes_the_rows_quantized_and_returns_them_unquantized(name):
    layout, options = CASES[name]
    case = quantized_case(layout, **options)
    plain, quantized, scale = expected_write(case)
    rows, cache, got_scale = run_torch(case)
    assert torch.equal(rows.view_as(written_rows(case, plain).flatten(2)), written_rows(case, plain).flatten(2))
    assert torch.equal(written_rows(case, cache).view(torch.uint8), written_rows(case, quantized).view(torch.uint8))
    assert torch.equal(written_rows(case, got_scale), written_rows(case, scale))
    assert_untouched_rows_kept(case, cache, got_scale)


@pytest.mark.triton_interpreter
@pytest.mark.parametrize("dtype", list(ROW_TOLERANCE), ids=str)
@pytest.mark.parametrize("name", WRITABLE)
def test_kernel_epilogue_quantizes_as_torch_does(name, dtype):
    layout, options = CASES[name]
    case = quantized_case(layout, dtype=dtype, **options)
    rows, cache, scale = run_kernel(case)
    want_rows, _, _ = run_torch(case)
    torch.testing.assert_close(rows, want_rows, **ROW_TOLERANCE[dtype])
    assert_untouched_rows_kept(case, cache, scale)
    # Against the kernel's own unquantized rows, quantized in torch: the same scales and the same float8 values.
    rows_in_layout = written_rows(case, torch.zeros(case["cache"].shape)).clone()
    rows_in_layout.copy_(rows.float().view_as(rows_in_layout))
    own_scale = (rows_in_layout.abs().amax(-1, keepdim=True) / 448.0).clamp(min=torch.finfo(torch.float32).tiny)
    torch.testing.assert_close(written_rows(case, scale), own_scale, rtol=1e-6, atol=0)
    got = written_rows(case, cache).float() * own_scale
    want = (rows_in_layout / own_scale).to(FP8).float() * own_scale
    assert torch.equal(got, want)


def test_a_norm_group_that_splits_a_scale_is_refused_naming_it():
    layout, options = CASES["btc_layer_norm_per_head"]  # a [B, T, C] cache: one scale per token, norm per head
    with pytest.raises(ValueError, match=r"norm_group is 8; must be a multiple of the cache's last dim \(16\)"):
        run_torch(quantized_case(layout, **options))


@pytest.mark.parametrize(
    "change, message",
    [
        (lambda c: c.update(scale=c["scale"][..., :1, :]), r"scale is shape \[2, 23, 1, 1\]; must be the cache's"),
        (lambda c: c.update(scale=c["scale"].double()), "scale.dtype is torch.float64; must be float32"),
        (lambda c: c.update(cache=c["cache"].float()), "cache.dtype is torch.float32; must be one of float8_e4m3fn"),
    ],
)
def test_bad_input_names_the_field(change, message):
    case = quantized_case("bthd")
    change(case)
    with pytest.raises(ValueError, match=message):
        run_torch(case)


def test_the_unquantized_op_refuses_a_float8_cache():
    case = quantized_case("bthd")
    case.pop("scale")
    with pytest.raises(ValueError, match="cache.dtype is torch.float8_e4m3fn; must be one of float16, bfloat16"):
        linear_scatter_(**case, row_offset=0)


def test_op_passes_torch_library_checks():
    case = quantized_case("bhtd", rope=True, norm="rms_norm")
    args = [case[k] for k in ("cache", "scale", "x", "weight", "bias", "idx")]
    kwargs = {k: case[k] for k in ("token_axis", "head_dim", "norm", "norm_group", "norm_weight", "eps")}
    kwargs |= dict(rope_cos=case["rope_cos"], rope_sin=case["rope_sin"])
    # test_schema is left out: it compares the tensors with ops that have no float8 kernels on the CPU
    checks = ("test_autograd_registration", "test_faketensor", "test_aot_dispatch_dynamic")
    torch.library.opcheck(torch.ops.rascompile.linear_scatter_quantized_.default, args, kwargs, test_utils=checks)
