"""rascompile::linear_scatter_: the Triton kernel (through Triton's CPU interpreter), the op, its checks.

Three implementations are compared: the Triton kernel, the op's plain torch version
(``reference_rows``), and an independent model-style computation written here with diffusers'
norm modules and Lumina-Next's complex RoPE product. Shapes stay tiny: the interpreter is slow.
tests/conftest.py sets ``TRITON_INTERPRET=1``, so the kernel runs on CPU tensors.
"""

import os

os.environ["TRITON_INTERPRET"] = "1"  # before Triton compiles anything: kernels run on CPU tensors

import pytest  # noqa: E402
import torch  # noqa: E402
from diffusers.models.normalization import RMSNorm  # noqa: E402

from rascompile.kernels.linear_scatter import (
    linear_scatter_,  # noqa: E402
    normalize_arguments,  # noqa: E402
)
from tests.support.kernel_cases import make_case, run_op  # noqa: E402

triton_kernel = pytest.importorskip("rascompile.kernels.triton_linear_scatter", reason="Triton is not installed")

TOLERANCE = {  # the kernel and torch sum in a different order; half types round once on the store
    torch.float32: dict(rtol=1e-5, atol=1e-5),
    torch.float16: dict(rtol=2e-3, atol=2e-3),
    torch.bfloat16: dict(rtol=2e-2, atol=2e-2),
}
EPILOGUES = {
    "none": dict(),
    "bias": dict(bias=True),
    "layer_norm_per_head": dict(norm="layer_norm", per_head=True, bias=True),
    "rms_norm_per_head": dict(norm="rms_norm", per_head=True),
    "layer_norm_across_heads": dict(norm="layer_norm", per_head=False),
    "rope": dict(rope=True, bias=True),
    "layer_norm_across_heads_rope": dict(norm="layer_norm", per_head=False, rope=True),
    "rms_norm_per_head_rope": dict(norm="rms_norm", per_head=True, rope=True),
}


def run_kernel(case):
    case = dict(case, cache=case["cache"].clone())
    cache4, _, group, cos, sin = normalize_arguments(
        *(case[k] for k in ("cache", "x", "weight", "bias", "idx", "token_axis", "head_dim", "norm", "norm_group")),
        case["norm_weight"],
        case["norm_bias"],
        case["rope_cos"],
        case["rope_sin"],
    )
    triton_kernel.launch(
        cache4,
        case["x"],
        case["weight"],
        case["bias"],
        case["idx"],
        row_offset=case["row_offset"],
        norm=case["norm"],
        norm_group=group,
        norm_weight=case["norm_weight"],
        norm_bias=case["norm_bias"],
        eps=case["eps"],
        rope_cos=cos,
        rope_sin=sin,
    )
    return case["cache"]


def model_style(case):
    """The unfused computation the way diffusers models write it, in fp32, then a plain index copy."""
    x, w = case["x"].float(), case["weight"].float()
    y = torch.nn.functional.linear(x, w, None if case["bias"] is None else case["bias"].float())
    batch, k, c_out = y.shape
    head_dim, group = case["head_dim"], case["norm_group"]
    if case["norm"] == "layer_norm":
        norm = torch.nn.LayerNorm(group, eps=case["eps"])
        norm.weight.data, norm.bias.data = case["norm_weight"].float(), case["norm_bias"].float()
        y = norm(y.view(batch, k, -1, group)).view(batch, k, c_out)
    elif case["norm"] == "rms_norm":
        norm = RMSNorm(group, eps=case["eps"])
        norm.weight.data = case["norm_weight"].float()
        y = norm(y.view(batch, k, -1, group)).view(batch, k, c_out)
    y = y.view(batch, k, -1, head_dim)
    if case["rope_cos"] is not None:
        table = torch.polar(torch.ones_like(case["rope_cos"]), torch.atan2(case["rope_sin"], case["rope_cos"]))
        freqs = table[case["idx"]].unsqueeze(2)  # [B, k, 1, D/2]
        y = torch.view_as_real(torch.view_as_complex(y.reshape(batch, k, -1, head_dim // 2, 2)) * freqs).flatten(3)
    cache = case["cache"].clone()
    view = {"btc": lambda c: c.unflatten(2, (-1, head_dim)), "bthd": lambda c: c, "bhtd": lambda c: c.transpose(1, 2)}
    layout = "btc" if cache.dim() == 3 else ("bthd" if case["token_axis"] == 1 else "bhtd")
    target = view[layout](cache)
    for b in range(batch):
        target[b].index_copy_(0, case["idx"][b] + case["row_offset"], y[b].to(cache.dtype))
    return cache


@pytest.mark.triton_interpreter
@pytest.mark.parametrize("dtype", list(TOLERANCE), ids=str)
@pytest.mark.parametrize("epilogue", sorted(EPILOGUES))
def test_kernel_matches_torch(dtype, epilogue):
    case = make_case(dtype, **EPILOGUES[epilogue])
    expected = run_op(case)
    got = run_kernel(case)
    torch.testing.assert_close(got, expected, **TOLERANCE[dtype])
    untouched = torch.ones(case["cache"].shape[:2], dtype=torch.bool)
    untouched[torch.arange(2)[:, None], case["idx"]] = False
    assert torch.equal(got[untouched], case["cache"][untouched]), "rows outside idx changed"


@pytest.mark.triton_interpreter
@pytest.mark.parametrize(
    "sizes",
    [
        dict(k=1),
        dict(k=17, num_tokens=40),  # k not a multiple of the 16-row block
        dict(c_in=13, heads=3, head_dim=6),  # C_in and C_out = 18 not multiples of 16
        dict(heads=3, head_dim=5),  # odd C_out: the last column pair is half masked
        dict(heads=3, head_dim=5, norm="layer_norm", per_head=True),  # odd norm group
        dict(heads=1, head_dim=72, norm="layer_norm", per_head=False, rope=True, c_in=40),  # a 72-wide group
        dict(batch=3, k=9, layout="btc", rope=True),
        dict(layout="bhtd", row_offset=4, norm="rms_norm", rope=True),  # image rows after other rows of the cache
    ],
    ids=lambda s: "-".join(f"{k}{v}" for k, v in s.items()),
)
def test_kernel_odd_sizes_and_layouts(sizes):
    case = make_case(torch.float32, **sizes)
    torch.testing.assert_close(run_kernel(case), run_op(case), **TOLERANCE[torch.float32])


@pytest.mark.triton_interpreter
def test_kernel_non_contiguous_inputs():
    case = make_case(torch.float32, norm="layer_norm", rope=True, bias=True, k=6, layout="bhtd")
    x, idx = case["x"], case["idx"]
    wide_idx = torch.zeros(idx.shape[0], 2 * idx.shape[1], dtype=idx.dtype)
    wide_idx[:, ::2] = idx
    wide_table = torch.stack([case["rope_cos"], case["rope_sin"]], dim=-1)  # the cos/sin of a view_as_real table
    strided = dict(
        case,
        x=x.transpose(0, 1).contiguous().transpose(0, 1),
        weight=case["weight"].t().contiguous().t(),
        idx=wide_idx[:, ::2],
        rope_cos=wide_table[..., 0],
        rope_sin=wide_table[..., 1],
    )
    assert not any(strided[k].is_contiguous() for k in ("x", "weight", "idx", "rope_cos"))
    torch.testing.assert_close(run_kernel(strided), run_op(case), **TOLERANCE[torch.float32])


@pytest.mark.triton_interpreter
def test_kernel_rope_table_per_batch_row():
    case = make_case(torch.float32, rope=True)
    cos = torch.stack([case["rope_cos"], case["rope_cos"].flip(0)])
    sin = torch.stack([case["rope_sin"], case["rope_sin"].flip(0)])
    case = dict(case, rope_cos=cos, rope_sin=sin)
    torch.testing.assert_close(run_kernel(case), run_op(case), **TOLERANCE[torch.float32])


@pytest.mark.parametrize("dtype", list(TOLERANCE), ids=str)
@pytest.mark.parametrize("epilogue", sorted(EPILOGUES))
def test_op_matches_model_style_computation(dtype, epilogue):
    case = make_case(dtype, **EPILOGUES[epilogue])
    torch.testing.assert_close(run_op(case), model_style(case), **TOLERANCE[dtype])


def test_op_passes_torch_library_checks():
    """Schema, fake implementation and the declared mutation, as torch.library.opcheck checks them."""
    for kwargs in (dict(), dict(norm="layer_norm", rope=True, bias=True, layout="bhtd", row_offset=3)):
        case = make_case(**kwargs)
        args = tuple(case.values())
        torch.library.opcheck(torch.ops.rascompile.linear_scatter_.default, args)


BAD_INPUTS = {
    "weight shape": (lambda c: dict(weight=c["weight"][:, :-1]), r"weight is shape \[16, 23\]"),
    "weight dtype": (lambda c: dict(weight=c["weight"].half()), r"weight.dtype is torch.float16; must equal x.dtype"),
    "weight device": (lambda c: dict(weight=c["weight"].to("meta")), r"weight.device is meta"),
    "bias shape": (lambda c: dict(bias=torch.zeros(3)), r"bias is shape \[3\]; must be \[C_out\] = \[16\]"),
    "idx shape": (lambda c: dict(idx=c["idx"][:, :2]), r"idx is shape \[2, 2\]; must be \[B, k\] = \[2, 7\]"),
    "idx dtype": (lambda c: dict(idx=c["idx"].float()), r"idx.dtype is torch.float32"),
    "idx too large": (lambda c: dict(idx=c["idx"] + 20), r"idx is in \[\d+, \d+\]; indices must lie in \[0, 22\]"),
    "idx negative": (lambda c: dict(idx=c["idx"] - 30), r"idx is in \[-\d+, -?\d+\]"),
    "cache heads": (lambda c: dict(cache=torch.zeros(2, 23, 4, 8)), r"cache is shape \[2, 23, 4, 8\]"),
    "token axis": (lambda c: dict(token_axis=3), r"token_axis is 3"),
    "norm": (lambda c: dict(norm="group_norm"), r"norm is 'group_norm'; must be one of none, layer_norm, rms_norm"),
    "norm weight": (
        lambda c: dict(norm="rms_norm", norm_group=8, norm_weight=torch.ones(16)),
        r"norm_weight is shape \[16\]; must be \[norm_group\] = \[8\]",
    ),
    "rope half": (lambda c: dict(rope_cos=torch.ones(23, 4)), r"rope_sin is None; RoPE needs both"),
    "rope width": (
        lambda c: dict(rope_cos=torch.ones(23, 3), rope_sin=torch.ones(23, 3)),
        r"rope_cos is shape \[1, 23, 3\]; must be \[N, D/2\]",
    ),
    "rope too short": (
        lambda c: dict(rope_cos=torch.ones(5, 4), rope_sin=torch.ones(5, 4)),
        r"idx is in .*RoPE positions 5",
    ),
}


@pytest.mark.parametrize("name", sorted(BAD_INPUTS))
def test_bad_input_names_the_tensor(name):
    change, message = BAD_INPUTS[name]
    case = make_case()
    with pytest.raises(ValueError, match=message):
        linear_scatter_(**{**case, **change(case)})


def test_checks_also_run_while_tracing():
    """The fake implementation checks shapes, so a graph with a mismatch fails when it is compiled."""
    case = make_case()
    bad = dict(case, weight=case["weight"][:8])
    with pytest.raises(Exception, match=r"linear_scatter_: cache is shape \[2, 23, 2, 8\]"):
        torch.compile(lambda kw: linear_scatter_(**kw), backend="aot_eager", fullgraph=True)(bad)
