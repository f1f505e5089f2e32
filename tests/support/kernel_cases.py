"""Random inputs for rascompile::linear_scatter_ and a call of the op on a copy of the cache."""

import torch

from rascompile.kernels.linear_scatter import linear_scatter_


def make_case(
    dtype=torch.float32,
    batch=2,
    num_tokens=23,
    k=7,
    c_in=24,
    heads=2,
    head_dim=8,
    bias=False,
    norm="none",
    per_head=True,
    rope=False,
    layout="bthd",
    row_offset=0,
    seed=0,
):
    """Random inputs for one call; the cache starts random so untouched rows are checked too."""
    gen = torch.Generator().manual_seed(seed)
    rand = lambda *s: torch.randn(*s, generator=gen)  # noqa: E731
    c_out = heads * head_dim
    group = head_dim if per_head else c_out
    rows = num_tokens + row_offset + (5 if row_offset else 0)  # a joint cache: text rows around the image rows
    shapes = {
        "btc": (batch, rows, c_out),
        "bthd": (batch, rows, heads, head_dim),
        "bhtd": (batch, heads, rows, head_dim),
    }
    angles = rand(num_tokens, head_dim // 2) * 3
    case = dict(
        cache=rand(*shapes[layout]).to(dtype),
        x=(rand(batch, k, c_in) / c_in**0.5).to(dtype),
        weight=rand(c_out, c_in).to(dtype),
        bias=rand(c_out).to(dtype) if bias else None,
        idx=torch.stack([torch.randperm(num_tokens, generator=gen)[:k] for _ in range(batch)]),
        token_axis=2 if layout == "bhtd" else 1,
        head_dim=head_dim,
        row_offset=row_offset,
        norm=norm,
        norm_group=group if norm != "none" else -1,
        norm_weight=(1 + 0.2 * rand(group)).to(dtype) if norm != "none" else None,
        norm_bias=(0.1 * rand(group)).to(dtype) if norm == "layer_norm" else None,
        eps=1e-5,
        rope_cos=angles.cos() if rope else None,
        rope_sin=angles.sin() if rope else None,
    )
    return case


def run_op(case):
    case = dict(case, cache=case["cache"].clone())
    linear_scatter_(**case)
    return case["cache"]
