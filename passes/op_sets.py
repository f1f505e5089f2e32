"""The op sets the passes classify graph nodes by, and ``matches``, the one way to ask whether a node is in one.

An ``OpSet`` names ops as a Dynamo graph calls them: ``call_function`` targets (``torch.transpose``,
``operator.mul``) and ``call_method`` names (``"transpose"``, ``"__mul__"``), plus, for families of methods
known by their naming convention (in-place methods end in ``_``), a rule on the method name. Sets combine with
``|``. Where two passes need different sets for what looks like one idea (which ops only move elements), each
has its own named set here, with the reason they differ.
"""

from __future__ import annotations

import operator
from collections.abc import Callable, Iterable
from dataclasses import dataclass

import torch
import torch.fx

from . import ops


@dataclass(frozen=True)
class OpSet:
    """``call_function`` targets, ``call_method`` names, and rules on method names (any one matching)."""

    functions: frozenset = frozenset()
    methods: frozenset[str] = frozenset()
    method_rules: tuple[Callable[[str], bool], ...] = ()

    def __or__(self, other: OpSet) -> OpSet:
        return OpSet(
            self.functions | other.functions, self.methods | other.methods, self.method_rules + other.method_rules
        )


def op_set(functions: Iterable = (), methods: Iterable[str] = ()) -> OpSet:
    return OpSet(frozenset(functions), frozenset(methods))


def matches(node: object, ops: OpSet) -> bool:
    """Whether ``node`` is an FX node that calls an op of ``ops`` (False for anything that is not a node)."""
    if not isinstance(node, torch.fx.Node):
        return False
    if node.op == "call_function":
        return node.target in ops.functions
    if node.op == "call_method":
        return node.target in ops.methods or any(rule(node.target) for rule in ops.method_rules)
    return False


# ------------------------------------------------------------------------------------------ single ops

SDPA = op_set({torch.nn.functional.scaled_dot_product_attention, torch._C._nn.scaled_dot_product_attention})
LINEAR = op_set({torch.nn.functional.linear, torch._C._nn.linear})
LAYER_NORM = op_set({torch.nn.functional.layer_norm})
CAT = op_set({torch.cat})
SETITEM = op_set({operator.setitem})
MUL = op_set({operator.mul, torch.mul}, {"mul", "__mul__"})
ADD_OPERATOR = op_set({operator.add})  # ``a + b`` as Dynamo records it (the RMSNorm matcher's ``+ eps``)
RSQRT = op_set({torch.rsqrt}, {"rsqrt"})
MEAN_METHOD = op_set(methods={"mean"})
POW_METHOD = op_set(methods={"pow"})
VIEW_AS_REAL = op_set({torch.view_as_real})
VIEW_AS_COMPLEX = op_set({torch.view_as_complex})
COMPLEX_VIEWS = VIEW_AS_REAL | VIEW_AS_COMPLEX
POSITION_TABLE_GATHER = op_set({ops.gather_position_table})  # inserted by the position-table rule

# ------------------------------------------------------------------------------------------ element-wise

#: Binary (and ternary) element-wise arithmetic: where a position table meets a token tensor.
ELEMENTWISE = op_set(
    {
        operator.add,
        operator.sub,
        operator.mul,
        operator.truediv,
        torch.add,
        torch.sub,
        torch.mul,
        torch.div,
        torch.where,
        torch.lerp,
        torch.addcmul,
    },
    {"add", "sub", "mul", "div", "where", "lerp", "addcmul", "__add__", "__mul__", "__sub__"},
)

# ------------------------------------------------------------------------------------------ casts, layouts, views

#: Dtype casts written as methods.
CASTS = op_set(methods={"to", "type_as", "float", "half", "bfloat16"})

#: Ops that split or merge heads, transpose or flatten, and nothing else: what ``fuse_kv_projection`` lets stand
#: between a projection and its cache write. Narrower than ``KV_LAYOUT``: the fused op writes one cache row per
#: projected row, so an op that repeats rows (GQA's head repeat, ``expand``) or adds unit axes must stop the
#: chain; casts are matched on their own (``CASTS``).
HEAD_LAYOUT = op_set(
    {torch.transpose, torch.permute, torch.flatten, torch.unflatten, torch.reshape},
    {"view", "reshape", "transpose", "permute", "flatten", "unflatten", "contiguous"},
)

#: Ops that only move, repeat or cast elements: running them on a cache gives the same keys. The K/V-source rule
#: walks through them to the smallest tensor to cache (a GQA model's kv heads, not their repeats).
KV_LAYOUT = (
    HEAD_LAYOUT
    | op_set(
        {torch.unsqueeze, torch.squeeze, torch.repeat_interleave},
        {"unsqueeze", "squeeze", "repeat", "expand", "repeat_interleave"},
    )
    | CASTS
)

#: ``x.squeeze(dims)``: may drop the token axis when one token is left.
SQUEEZE = op_set({torch.squeeze}, {"squeeze"})

#: Ops whose result may share storage with their first argument (the in-place-write rule's alias walk). Wider
#: than ``KV_LAYOUT`` in its own way: slicing, ``select``, ``unbind``, ``detach`` and the complex views alias;
#: ``repeat`` and ``repeat_interleave`` copy. ``functionalize_inplace_writes`` adds ``INPLACE_METHODS``, which
#: return their (aliased) input.
#: ``t.new_zeros(size)`` and its kin: a tensor of its own size, only ``t``'s dtype and device.
NEW_TENSORS = op_set(methods={"new_zeros", "new_ones", "new_full", "new_empty"})

VIEWS = op_set(
    {
        operator.getitem,
        torch.transpose,
        torch.permute,
        torch.flatten,
        torch.unflatten,
        torch.unsqueeze,
        torch.squeeze,
        torch.reshape,
        torch.narrow,
        torch.select,
        torch.split,
        torch.chunk,
        torch.unbind,
        torch.tensor_split,
        torch.movedim,
        torch.view_as_real,
        torch.view_as_complex,
        torch.detach,
    },
    {
        "view",
        "view_as",
        "reshape",
        "reshape_as",
        "transpose",
        "permute",
        "flatten",
        "unflatten",
        "unsqueeze",
        "squeeze",
        "expand",
        "expand_as",
        "narrow",
        "select",
        "split",
        "chunk",
        "unbind",
        "tensor_split",
        "t",
        "movedim",
        "contiguous",
        "to",
        "type_as",
        "float",
        "half",
        "bfloat16",
        "detach",
        "__getitem__",
        "real",
        "imag",
    },
)

# ------------------------------------------------------------------------------------------ in-place writes


def _inplace_name(name: str) -> bool:
    return name.endswith("_") and not name.startswith("_")


def _inplace_with_twin(name: str) -> bool:
    return _inplace_name(name) and hasattr(torch.Tensor, name[:-1])


#: In-place tensor methods, by PyTorch's naming convention (``add_``, ``copy_``, ...; not ``__iadd__``).
INPLACE_METHODS = OpSet(method_rules=(_inplace_name,))
#: In-place methods with an out-of-place twin (``t.op_(...)`` -> ``t.op(...)``): the ones that can be rewritten.
INPLACE_METHODS_WITH_TWIN = OpSet(method_rules=(_inplace_with_twin,))
#: Nodes that write into a tensor: ``t[i] = v`` and in-place methods.
WRITES = SETITEM | INPLACE_METHODS

# ------------------------------------------------------------------------------------------ token mixing

#: Ops that may drop the token axis: they select a part of it (the text part of a joint sequence).
SLICING = op_set(
    {operator.getitem, torch.narrow, torch.split, torch.chunk, torch.tensor_split},
    {"narrow", "split", "chunk", "tensor_split", "__getitem__"},
)
#: Ops that combine or reorder values along the axis (or axes) they are given.
MIXING = op_set(
    {
        torch.sum,
        torch.mean,
        torch.std,
        torch.var,
        torch.amax,
        torch.amin,
        torch.max,
        torch.min,
        torch.softmax,
        torch.log_softmax,
        torch.nn.functional.softmax,
        torch.nn.functional.log_softmax,
        torch.cumsum,
        torch.cumprod,
        torch.sort,
        torch.argsort,
        torch.topk,
        torch.norm,
        torch.logsumexp,
        torch.nn.functional.normalize,
        torch.flip,
        torch.roll,
    },
    {
        "sum",
        "mean",
        "std",
        "var",
        "amax",
        "amin",
        "max",
        "min",
        "softmax",
        "log_softmax",
        "cumsum",
        "cumprod",
        "sort",
        "argsort",
        "topk",
        "norm",
        "logsumexp",
        "flip",
        "roll",
    },
)
#: Matrix products: they contract over the last axis of the first operand and the second-to-last of the second.
MATMUL = op_set({torch.matmul, torch.bmm, operator.matmul}, {"matmul", "bmm", "__matmul__"})
#: Ops that mix every position of their input, whatever the axes.
ALWAYS_MIXING = op_set(
    {
        torch.einsum,
        torch.nn.functional.conv1d,
        torch.nn.functional.conv2d,
        torch.nn.functional.avg_pool1d,
        torch.nn.functional.interpolate,
    }
)
