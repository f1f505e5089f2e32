"""Shared pieces of the per-pass unit tests (tests/unit/passes/test_<pass>.py).

Every construction of a pass context and every run of passes lives here, so the tests assert on graphs (node
targets, node order, ``node.meta``, placeholder names and shapes) and on numbers, never on how ``PassContext``
is laid out or on log strings:

- ``TinyDiT`` / ``TinyPackedDiT``: a few-line DiT (patch embedding, attention block(s), final projection,
  unpatchify) with switches for the patterns a pass matches or must refuse;
- ``capture(model)``: its Dynamo graph and inputs (``tests.support.capture.capture_graph``);
- ``run_until(gm, pass_name, **settings)``: a copy of the graph after ``RAS_PASSES`` up to the named pass, and
  the context; ``run_pass`` runs one more named pass on it; ``fact(ctx, name)`` reads a fact the passes found;
- ``run_graph`` / ``run_step``: run a (partly) rewritten graph eagerly on the original inputs, the active index
  and caches, which are built from the graph's own placeholders.
"""

from __future__ import annotations

import dataclasses
import typing
from collections.abc import Callable
from typing import Any

import torch
import torch.fx
import torch.nn.functional as F
from diffusers import ModelMixin

from rascompile.capture import capture_graphs
from rascompile.passes import context as context_module
from rascompile.passes import graph_utils
from rascompile.passes.find_token_source import MODULE_STATE_MARKERS
from rascompile.passes.graph_utils import copy_graph_module
from rascompile.passes.pipeline import RAS_PASSES
from tests.support.capture import capture_graph

WIDTH, HEADS, HEAD_DIM, OUT, TEXT = 8, 2, 4, 16, 3
ACTIVE_IDX, OUTPUT_CACHE, KV_CACHE = "ras_active_idx", "ras_output_cache", "ras_kv_cache_"


# ----------------------------------------------------------------------------------------------- synthetic models


def _init_(module: torch.nn.Module, seed: int = 0) -> torch.nn.Module:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.3)
    return module.eval()


class Block(torch.nn.Module):
    """One attention block over [B, N, WIDTH] tokens (see ``TinyDiT`` for the switches)."""

    def __init__(self, dit: TinyDiT):
        super().__init__()
        self.qkv = torch.nn.Linear(WIDTH, 3 * WIDTH)
        self.text_kv = torch.nn.Linear(WIDTH, 2 * WIDTH)
        self.out = torch.nn.Linear(WIDTH, WIDTH)
        self.o = dit.options

    def _heads(self, t: torch.Tensor, n: int) -> torch.Tensor:
        b = t.shape[0]
        return t.view(b, n if self.o["literal"] else -1, HEADS, HEAD_DIM).transpose(1, 2)

    def forward(self, tokens, text, table, mask, freqs):
        o = self.o
        n = tokens.shape[1]
        h = tokens + table if table is not None else tokens
        if o["squeeze"]:  # a no-op on [B, N, C] with N > 1 (Allegro's blocks): not with one active token
            h = h.squeeze(1)
        if o["write"] == "add_":  # an in-place method on a fresh token tensor
            h = h * 1.0
            h.add_(0.5)
        if o["mix"] == "mean":  # every token reads the mean over all tokens
            h = h + h.mean(dim=1, keepdim=True)
        if o["mix"] == "gram":  # a product that contracts over the token axis
            h = h + 0.01 * (h @ (h.transpose(1, 2) @ h))
        q, k, v = (self._heads(t, n) for t in self.qkv(h).chunk(3, dim=-1))
        if o["write"] == "alias":  # writes into the projection's storage, which q and v (views of it) read later
            k[..., :2].mul_(2.0)
        if o["write"] == "setitem":  # RoPE-like halves written into a fresh buffer (Wan, CogView4)
            rotated = torch.zeros_like(q)
            rotated[..., :2] = q[..., :2] * 2.0
            rotated[..., 2:] = q[..., 2:] - 1.0
            q = rotated
        if freqs is not None:  # complex RoPE (Lumina-Next): view_as_real(view_as_complex(x) * table)
            q, k = (
                torch.view_as_real(torch.view_as_complex(t.reshape(*t.shape[:-1], -1, 2)) * freqs).flatten(3)
                for t in (q, k)
            )
        if o["text"]:  # joint attention: text keys and values concatenated at attention (SD3)
            tk, tv = (self._heads(t, TEXT) for t in self.text_kv(text).chunk(2, dim=-1))
            k, v = torch.cat([k, tk], dim=2), torch.cat([v, tv], dim=2)
        if o["shared_qk"]:
            k = q
        if o["call"] == "none":  # no attention at all: a piece of a model (an output head)
            attended = q + k + v
        elif o["call"] == "keyword":  # diffusers' dispatch_attention_fn
            attended = F.scaled_dot_product_attention(
                query=q, key=k, value=v, attn_mask=mask, dropout_p=0.0, is_causal=o["causal"]
            )
        elif o["call"] == "mixed":
            attended = F.scaled_dot_product_attention(q, k, value=v, attn_mask=mask, scale=0.5)
        else:
            attended = F.scaled_dot_product_attention(q, k, v, mask, 0.0, o["causal"])
        attended = attended.transpose(1, 2).reshape(tokens.shape[0], n if o["literal"] else -1, WIDTH)
        return tokens + self.out(attended)


class TinyDiT(torch.nn.Module):
    """Latents [B, 4, 8, 8] -> Conv2d patch 2 (N = 16 tokens of WIDTH 8), plus a timestep embedding -> ``blocks``
    attention blocks -> ``proj`` Linear(8, 16) -> unpatchify to [B, 16, 4, 4] (channel = feature, pixel = token).

    ``latents="video"``: [B, 4, 2, 8, 8] through a Conv3d with patch (1, 2, 2) (N = 32), output [B, 16, 2, 4, 4].
    Switches (``options``):

    - ``call``: how attention is called: "positional", "keyword" (diffusers' dispatcher), "mixed", or "none" (no
      attention: a piece of a model, such as an output head);
    - ``mask``: an additive mask buffer over the N x N image tokens; ``causal``: causal attention;
    - ``table``: a position table [1, N, WIDTH] added to the tokens in every block;
    - ``rope="complex"``: a complex RoPE table [N, HEAD_DIM / 2] applied to queries and keys (Lumina-Next);
    - ``text``: text keys and values joined at attention (SD3); the model then takes ``text`` [B, 3, WIDTH];
    - ``literal``: head reshapes with the literal token count (``view(b, 16, 2, 4)``) instead of -1;
    - ``write``: an in-place write in the blocks ("add_", "setitem", "alias") or before them ("input", "timestep",
      "tokens");
    - ``mix``: a mean over the tokens ("mean") or a product contracting over them ("gram");
    - ``shared_qk``: the key is the query tensor; ``leak``: also returns the hidden tokens;
    - ``squeeze``: ``squeeze(1)`` on the tokens in every block (a no-op with N tokens, Allegro's blocks).
    """

    def __init__(self, blocks: int = 1, latents: str = "image", **options):
        super().__init__()
        defaults = dict(
            call="positional", mask=False, table=False, rope=None, text=False, literal=False, write=None,
            mix=None, causal=False, shared_qk=False, leak=False, squeeze=False,
        )  # fmt: skip
        unknown = set(options) - set(defaults)
        if unknown:
            raise TypeError(f"unknown TinyDiT options {sorted(unknown)}")
        self.options = {**defaults, **options}
        self.latents = latents
        if latents == "video":
            self.embed = torch.nn.Conv3d(4, WIDTH, (1, 2, 2), stride=(1, 2, 2))
            self.num_tokens = 32
        else:
            self.embed = torch.nn.Conv2d(4, WIDTH, 2, stride=2)
            self.num_tokens = 16
        self.temb = torch.nn.Linear(1, WIDTH)
        self.blocks = torch.nn.ModuleList(Block(self) for _ in range(blocks))
        self.proj = torch.nn.Linear(WIDTH, OUT)
        _init_(self)
        n = self.num_tokens
        g = torch.Generator().manual_seed(1)
        self.register_buffer("mask", torch.randn(1, 1, n, n, generator=g) if self.options["mask"] else None)
        self.register_buffer("table", torch.randn(1, n, WIDTH, generator=g) if self.options["table"] else None)
        freqs = None
        if self.options["rope"] == "complex":
            angles = torch.arange(n)[:, None] * torch.linspace(0.1, 1.0, HEAD_DIM // 2)[None, :]
            freqs = torch.polar(torch.ones_like(angles), angles)  # [N, D/2] complex
        self.register_buffer("freqs", freqs)

    def forward(self, x, timestep, text=None):
        b = x.shape[0]
        write = self.options["write"]
        if write == "input":  # into the latents input itself
            x.mul_(1.0)
        if write == "timestep":  # into a tensor the latents never reach
            timestep = timestep * 1.0
            timestep.add_(1.0)
        tokens = self.embed(x).flatten(2).transpose(1, 2)  # [B, N, WIDTH]
        tokens = tokens + self.temb(timestep[:, None])[:, None, :]
        if write == "tokens":  # the in-place op is the last op of the embedding: the token source
            tokens.mul_(2.0)
        for block in self.blocks:
            tokens = block(tokens, text, self.table, self.mask, self.freqs)
        out = self.proj(tokens)  # [B, N, OUT]
        image = (
            out.transpose(1, 2).reshape(b, OUT, *(s // 2 for s in x.shape[2:]))
            if x.dim() == 4
            else (out.transpose(1, 2).reshape(b, OUT, x.shape[2], x.shape[3] // 2, x.shape[4] // 2))
        )
        return (image, tokens) if self.options["leak"] else image

    def inputs(self, batch: int = 2, seed: int = 1) -> tuple[torch.Tensor, ...]:
        g = torch.Generator().manual_seed(seed)
        shape = (batch, 4, 8, 8) if self.latents == "image" else (batch, 4, 2, 8, 8)
        x = torch.randn(*shape, generator=g)
        timestep = torch.rand(batch, generator=g)
        if self.options["text"]:
            return x, timestep, torch.randn(batch, TEXT, WIDTH, generator=g)
        return x, timestep


class BrokenDiT(TinyDiT, ModelMixin):
    """TinyDiT with two blocks and a graph break between them: Dynamo compiles the forward as two pieces, the first
    with the patch embedding and block 0, the second with block 1 and the final projection. A diffusers model, as
    the transformers the piece runtime serves are."""

    def __init__(self, pieces: int = 2, **options):
        super().__init__(blocks=pieces, **options)

    def forward(self, x, timestep, text=None):
        b = x.shape[0]
        tokens = self.embed(x).flatten(2).transpose(1, 2)
        tokens = tokens + self.temb(timestep[:, None])[:, None, :]
        tokens = self.blocks[0](tokens, text, self.table, self.mask, self.freqs)
        torch._dynamo.graph_break()  # not in a loop: Dynamo would run a frame with a break in a loop eagerly
        tokens = self.blocks[1](tokens, text, self.table, self.mask, self.freqs)
        if len(self.blocks) > 2:
            torch._dynamo.graph_break()
            tokens = self.blocks[2](tokens, text, self.table, self.mask, self.freqs)
        out = self.proj(tokens)
        return out.transpose(1, 2).reshape(b, 16, x.shape[2] // 2, x.shape[3] // 2)


class TinyPackedDiT(torch.nn.Module):
    """Packed latents [B, N = 16, 16] (Flux-style) -> ``x_embedder`` Linear(16, 8) -> one attention block ->
    ``proj`` Linear(8, 16): the output [B, N, 16] is the token tensor itself. ``text`` [B, 3, 16] is a second
    3-D input, with ``ambiguous=True`` of the same token count as the latents."""

    def __init__(self, ambiguous: bool = False):
        super().__init__()
        self.ambiguous = ambiguous
        self.x_embedder = torch.nn.Linear(OUT, WIDTH)
        self.context_embedder = torch.nn.Linear(OUT, WIDTH)
        self.qkv = torch.nn.Linear(WIDTH, 3 * WIDTH)
        self.proj = torch.nn.Linear(WIDTH, OUT)
        _init_(self)

    def forward(self, hidden_states, encoder_hidden_states):
        tokens = self.x_embedder(hidden_states)
        text = self.context_embedder(encoder_hidden_states).mean(dim=1, keepdim=True)
        q, k, v = (t.unflatten(2, (HEADS, HEAD_DIM)).transpose(1, 2) for t in self.qkv(tokens + text).chunk(3, -1))
        tokens = tokens + F.scaled_dot_product_attention(q, k, v).transpose(1, 2).flatten(2)
        return self.proj(tokens)

    def inputs(self, batch: int = 2) -> tuple[torch.Tensor, torch.Tensor]:
        g = torch.Generator().manual_seed(1)
        return torch.randn(batch, 16, OUT, generator=g), torch.randn(
            batch, 16 if self.ambiguous else TEXT, OUT, generator=g
        )


class TinyFoldedVideoDiT(torch.nn.Module):
    """Latte's layout: latents ``[B, 4, F, 10, 10]`` permuted to ``[B, F, C, H, W]`` and folded into the batch
    (``[B*F, C, H, W]``, row b*F + f), a patch-2 ``Conv2d``: spatial tokens ``[B*F, N = 25, WIDTH]``; an attention
    over each frame's tokens; the tokens regrouped per site ``[B*N, F, WIDTH]`` (row b*N + n) for an attention over
    the frames, modulated by a per-item, per-site table ``[B*N, WIDTH]``; back to ``[B*F, N, WIDTH]``, the final
    projection and the unpatchify. ``fold``: ``"token-major"`` regroups the sites as row n*B + b instead."""

    FRAMES, SIDE = 3, 10

    def __init__(self, fold: str = "item-major"):
        super().__init__()
        self.fold = fold
        self.embed = torch.nn.Conv2d(4, WIDTH, 2, stride=2)
        self.t_proj = torch.nn.Linear(1, WIDTH)
        self.sites = torch.nn.Parameter(torch.zeros(25, WIDTH))
        self.spatial = torch.nn.Linear(WIDTH, 3 * WIDTH)
        self.temporal = torch.nn.Linear(WIDTH, 3 * WIDTH)
        self.proj = torch.nn.Linear(WIDTH, 2 * 2 * 4)
        _init_(self)

    @staticmethod
    def _attend(qkv: torch.nn.Linear, x: torch.Tensor) -> torch.Tensor:
        q, k, v = (t.unflatten(2, (HEADS, HEAD_DIM)).transpose(1, 2) for t in qkv(x).chunk(3, -1))
        return F.scaled_dot_product_attention(q, k, v).transpose(1, 2).flatten(2)

    def forward(self, latents, timestep):
        b, c, f, h, w = latents.shape
        tokens = self.embed(latents.permute(0, 2, 1, 3, 4).reshape(-1, c, h, w)).flatten(2).transpose(1, 2)
        n = tokens.shape[1]
        tokens = tokens + self._attend(self.spatial, tokens)
        table = (self.t_proj(timestep[:, None])[:, None] * self.sites[None]).reshape(b * n, 1, WIDTH)
        if self.fold == "token-major":
            sites = tokens.reshape(b, f, n, -1).permute(2, 0, 1, 3).reshape(n * b, f, -1)
            table = table.reshape(b, n, 1, WIDTH).transpose(0, 1).reshape(n * b, 1, WIDTH)
        else:
            sites = tokens.reshape(b, f, n, -1).permute(0, 2, 1, 3).reshape(b * n, f, -1)
        sites = sites + self._attend(self.temporal, sites * (1 + table))
        if self.fold == "token-major":
            tokens = sites.reshape(n, b, f, -1).permute(1, 2, 0, 3).reshape(b * f, n, -1)
        else:
            tokens = sites.reshape(b, n, f, -1).permute(0, 2, 1, 3).reshape(b * f, n, -1)
        out = self.proj(tokens).reshape(b * f, h // 2, w // 2, 2, 2, c).permute(0, 5, 1, 3, 2, 4)
        return out.reshape(b, f, c, h, w).permute(0, 2, 1, 3, 4)

    def inputs(self, batch: int = 2) -> tuple[torch.Tensor, torch.Tensor]:
        g = torch.Generator().manual_seed(3)
        latents = torch.randn(batch, 4, self.FRAMES, self.SIDE, self.SIDE, generator=g)
        return latents, torch.arange(1.0, batch + 1.0)


class TinyRowsDiT(torch.nn.Module):
    """Z-Image's layout: latents as a list of per-row ``[4, 1, 8, 8]`` tensors, each cut into ``[N = 16, 16]``
    patch rows by views, joined along dim 0, embedded by a linear, split back and stacked by ``pad_sequence``
    into ``[B, N, WIDTH]``; each row's tokens then joined with its ``TEXT`` caption rows (``[image; caption]``,
    stacked again), one attention block, a final linear over the joint sequence, taken apart row by row
    (``unbind``, ``[:N]``) and unpatchified into a list. ``order="reversed"`` stacks the rows in reverse."""

    def __init__(self, order: str = "in-order"):
        super().__init__()
        self.order = order
        self.embed = torch.nn.Linear(16, WIDTH)
        self.caption = torch.nn.Linear(OUT, WIDTH)
        self.qkv = torch.nn.Linear(WIDTH, 3 * WIDTH)
        self.final = torch.nn.Linear(WIDTH, 16)
        _init_(self)

    def forward(self, x: list, captions: list, t):
        rows = [xi.view(4, 1, 1, 4, 2, 4, 2).permute(1, 3, 5, 2, 4, 6, 0).reshape(16, 16) for xi in x]
        parts = list(self.embed(torch.cat(rows, dim=0)).split([16] * len(rows), dim=0))
        if self.order == "reversed":
            parts = parts[::-1]
        tokens = torch.nn.utils.rnn.pad_sequence(parts, batch_first=True) * (1 + t[:, None, None])
        text = [self.caption(c) for c in captions]
        joint = torch.nn.utils.rnn.pad_sequence([torch.cat([tokens[i][:16], text[i]]) for i in range(len(x))], True)
        q, k, v = (u.unflatten(2, (HEADS, HEAD_DIM)).transpose(1, 2) for u in self.qkv(joint).chunk(3, -1))
        joint = joint + F.scaled_dot_product_attention(q, k, v).transpose(1, 2).flatten(2)
        out = self.final(joint)
        return [
            o[:16].view(1, 4, 4, 1, 2, 2, 4).permute(6, 0, 3, 1, 4, 2, 5).reshape(4, 1, 8, 8) for o in out.unbind(0)
        ]

    def inputs(self, batch: int = 2) -> tuple:
        g = torch.Generator().manual_seed(4)
        x = [torch.randn(4, 1, 8, 8, generator=g) for _ in range(batch)]
        captions = [torch.randn(TEXT, OUT, generator=g) for _ in range(batch)]
        return x, captions, torch.linspace(0.2, 0.8, batch)


def capture(model: torch.nn.Module, *inputs) -> tuple[torch.fx.GraphModule, list]:
    """The Dynamo graph of ``model`` (static shapes) and its example inputs (parameters included)."""
    inputs = inputs or model.inputs()
    torch._dynamo.reset()  # each class's forward is one code object: many captures would hit the recompile limit
    gm, example_inputs = capture_graph(model, *inputs)
    return gm, list(example_inputs)


def capture_dynamic(model: torch.nn.Module, *inputs) -> tuple[torch.fx.GraphModule, list]:
    """The Dynamo graph of ``model`` traced with symbolic sizes (``dynamic=True``) and its example inputs."""
    torch._dynamo.reset()
    return capture_graphs(model, lambda compiled: compiled(*inputs), fullgraph=True, dynamic=True, reset=False)[0]


# ------------------------------------------------------------------------------------------------- running passes


def pass_names() -> list[str]:
    return [getattr(fn, "__name__", repr(fn)) for fn in RAS_PASSES.passes]


def _find_pass(name: str) -> Callable:
    for fn in RAS_PASSES.passes:
        if getattr(fn, "__name__", None) == name:
            return fn
    raise LookupError(f"no pass named {name!r} in RAS_PASSES ({', '.join(pass_names())})")


def make_context(**settings) -> Any:
    """A fresh pass context with ``settings`` (kv_cache, fuse_kv_projection, probe_tokens, ...).

    Settings go to a frozen ``settings`` object when the context has one and it knows them, else to the context.
    """
    ctx_type = context_module.PassContext
    fields = {f.name for f in dataclasses.fields(ctx_type)} if dataclasses.is_dataclass(ctx_type) else set()
    if "settings" in fields:
        hints = typing.get_type_hints(ctx_type, vars(context_module))
        settings_type = hints.get("settings")
        if dataclasses.is_dataclass(settings_type):
            known = {f.name for f in dataclasses.fields(settings_type)}
            own = {k: v for k, v in settings.items() if k in known}
            rest = {k: v for k, v in settings.items() if k not in known}
            return ctx_type(settings=settings_type(**own), **rest)
    return ctx_type(**settings)


def fact(ctx: Any, name: str) -> Any:
    """A fact the passes recorded (``num_tokens``, ``token_source``, ``latents``, ``kv_slots``, ...), wherever the
    context keeps it: on itself, or on one of its dataclass-valued members."""
    if hasattr(ctx, name):
        return getattr(ctx, name)
    for value in vars(ctx).values():
        if dataclasses.is_dataclass(value) and hasattr(value, name):
            return getattr(value, name)
    raise AttributeError(f"the pass context has no fact {name!r}")


def run_until(gm: torch.fx.GraphModule, pass_name: str, *, before: bool = False, **settings):
    """``(graph, ctx)``: a copy of ``gm`` after ``RAS_PASSES`` up to and including ``pass_name`` (up to but not
    including it with ``before=True``), with the dense shapes recorded as ``build_ras_graph`` records them."""
    _find_pass(pass_name)
    graph_utils.record_dense_shapes(gm)
    graph = copy_graph_module(gm)
    ctx = make_context(**settings)
    for fn in RAS_PASSES.passes:
        name = getattr(fn, "__name__", None)
        if before and name == pass_name:
            break
        graph = fn(graph, ctx)
        if name == pass_name:
            break
    graph.recompile()
    return graph, ctx


def run_pass(gm: torch.fx.GraphModule, ctx: Any, pass_name: str) -> torch.fx.GraphModule:
    """Run the one pass named ``pass_name`` on ``gm`` (in place) with ``ctx``."""
    gm = _find_pass(pass_name)(gm, ctx)
    gm.recompile()
    return gm


def run_all(gm: torch.fx.GraphModule, **settings):
    """The finished RAS graph (every pass) and its context."""
    return run_until(gm, pass_names()[-1], **settings)


# ------------------------------------------------------------------------------------------------- reading graphs


def target_name(node: torch.fx.Node) -> str:
    if node.op in ("call_function",):
        return getattr(node.target, "__name__", str(node.target))
    return str(node.target)


def calls(gm: torch.fx.GraphModule, target: Any) -> list[torch.fx.Node]:
    """``call_function`` nodes of ``target`` (a function, or its ``__name__``) and ``call_method`` nodes of that
    method name, in graph order."""
    found = []
    for node in gm.graph.nodes:
        if node.op == "call_function" and (node.target is target or target_name(node) == target):
            found.append(node)
        elif node.op == "call_method" and node.target == target:
            found.append(node)
    return found


def node(gm: torch.fx.GraphModule, name: str) -> torch.fx.Node:
    return next(n for n in gm.graph.nodes if n.name == name)


def order(gm: torch.fx.GraphModule) -> dict[torch.fx.Node, int]:
    return {n: i for i, n in enumerate(gm.graph.nodes)}


def placeholders(gm: torch.fx.GraphModule) -> list[torch.fx.Node]:
    return [n for n in gm.graph.nodes if n.op == "placeholder"]


def added_placeholders(gm: torch.fx.GraphModule) -> dict[str, tuple[tuple[int, ...], torch.dtype]]:
    """``{name: (shape, dtype)}`` of the placeholders the passes added (``ras_*``), in graph order."""
    found = {}
    for n in placeholders(gm):
        if n.name.startswith("ras_"):
            value = graph_utils.example_value(n)
            found[n.name] = (tuple(int(s) for s in value.shape), value.dtype)
    return found


def graph_signature(gm: torch.fx.GraphModule) -> list[tuple]:
    """``(op, target, args)`` of every node, with nodes by name: equal for graphs that compute the same way."""

    def show(a):
        return torch.fx.node.map_arg(a, lambda n: n.name)

    return [(n.op, target_name(n), repr(show(n.args)), repr(show(n.kwargs))) for n in gm.graph.nodes]


# ------------------------------------------------------------------------------------------------- running graphs


def zero_caches(gm: torch.fx.GraphModule) -> tuple[torch.Tensor | None, list[torch.Tensor]]:
    """A zeroed output cache (None when the graph has none yet) and zeroed K/V caches, from the placeholders."""
    output_cache, kv = None, []
    for name, (shape, dtype) in added_placeholders(gm).items():
        if name == OUTPUT_CACHE:
            output_cache = torch.zeros(shape, dtype=dtype)
        elif name.startswith(KV_CACHE):
            kv.append(torch.zeros(shape, dtype=dtype))
    return output_cache, kv


def run_graph(gm, inputs, idx=None, output_cache=None, kv=None):
    """Run a (partly) rewritten graph eagerly: the original inputs, then ``ras_active_idx``, ``ras_output_cache`` and
    the K/V caches as far as the graph has them. Returns the graph's outputs (a tuple)."""
    zero_output, zero_kv = zero_caches(gm)
    output_cache = zero_output if output_cache is None else output_cache
    kv = list(zero_kv if kv is None else kv)
    args = list(inputs)
    for n in placeholders(gm)[len(inputs) :]:
        if n.name == ACTIVE_IDX:
            args.append(idx)
        elif n.name == OUTPUT_CACHE:
            args.append(output_cache)
        elif n.name.startswith(KV_CACHE):
            args.append(kv.pop(0))
        else:
            raise LookupError(f"no value for the placeholder {n.name}")
    with torch.no_grad():
        return gm(*args)


def run_step(ras, inputs, idx, output_cache=None, kv=None):
    """One step of a finished RAS graph with caches from the graph's placeholders unless given:
    ``(output, output_cache, kv)``."""
    zero_output, zero_kv = zero_caches(ras)
    output_cache = zero_output if output_cache is None else output_cache
    kv = zero_kv if kv is None else kv
    return run_graph(ras, inputs, idx, output_cache, kv)[0], output_cache, kv


def dense(gm, inputs) -> torch.Tensor:
    with torch.no_grad():
        return gm(*inputs)[0]


def all_tokens(batch: int, n: int) -> torch.Tensor:
    return torch.arange(n).expand(batch, n).contiguous()


def permutation(batch: int, n: int, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.stack([torch.randperm(n, generator=g) for _ in range(batch)])


def subset(batch: int, n: int, k: int, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.stack([torch.randperm(n, generator=g)[:k].sort().values for _ in range(batch)])


def assert_ras_matches_dense(gm, inputs, ras, ks=(1, 5, 15)):
    """The RAS invariants: all tokens and a permutation of them equal dense; after such a capture step, subsets of
    k tokens reproduce dense from the caches (the inputs did not change)."""
    expected = dense(gm, inputs)
    batch, n = _batch_and_tokens(ras)
    out, output_cache, kv = run_step(ras, inputs, all_tokens(batch, n))
    torch.testing.assert_close(out, expected, rtol=0, atol=1e-6)
    torch.testing.assert_close(run_step(ras, inputs, permutation(batch, n))[0], expected, rtol=1e-5, atol=1e-5)
    for k in ks:
        out, _, _ = run_step(ras, inputs, subset(batch, n, k, seed=k), output_cache, kv)
        torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-5)


def _batch_and_tokens(ras) -> tuple[int, int]:
    """(B of the active index, N): the output cache holds N tokens (of B rows, or B*F when frames are folded)."""
    placeholders_ = added_placeholders(ras)
    return placeholders_[ACTIVE_IDX][0][0], placeholders_[OUTPUT_CACHE][0][1]


# ------------------------------------------------------------------------------------------------------ export


def lower(gm: torch.fx.GraphModule, inputs: list) -> tuple[torch.fx.GraphModule, list]:
    """``lower_for_export`` on a copy of ``gm`` with the parameters, buffers and complex tensors among ``inputs``
    (the graph's leading placeholders) as constants, as ``rascompile.deploy.onnx_export`` splits them:
    ``(lowered graph, the runtime inputs it still takes)``."""
    from rascompile.passes.export.lowering import ExportLowering, lower_for_export

    constants, runtime = {}, []
    for placeholder, value in zip(placeholders(gm), inputs):
        if any(m in placeholder.name for m in MODULE_STATE_MARKERS) or value.is_complex():
            constants[placeholder.name] = value.detach()
        else:
            runtime.append(value)
    lowered = lower_for_export(copy_graph_module(gm), ExportLowering(constants))
    return lowered, runtime
