"""A plain, eager reference implementation of Region-Adaptive Sampling (RAS) -- "the oracle".

This module is test code.  It shares no code with ``rascompile`` (it never imports it) and favours
readability over speed.  It is driven by a diffusers pipeline: :meth:`RASOracle.install` swaps the
transformer's attention processors for the oracle processors below and wraps
``pipe.transformer.forward`` (an instance attribute; :meth:`RASOracle.uninstall` undoes both).

Semantics (one generation of ``T = num_inference_steps`` transformer calls)
--------------------------------------------------------------------------
Each transformer call is one step ``s = 0 .. T-1`` (counted modulo ``T``; step 0 resets all state).
The latent is ``H x W`` with patch size ``p``; image tokens are the ``N = (H/p) * (W/p)`` patches in
row-major order over the ``(H/p) x (W/p)`` grid -- the order of both diffusers patch embeddings
(SD3: ``Conv2d`` then ``flatten(2).transpose(1, 2)``; Lumina: ``view/permute(0, 2, 4, ...)`` then
``flatten(1, 2)``); token ``t`` covers the pixels ``[r*p:(r+1)*p, c*p:(c+1)*p]`` with
``r, c = divmod(t, W/p)``.

* Schedule: ``s`` is dense when ``s < scheduler_start_step``, ``s > scheduler_end_step`` or
  ``s in error_reset_steps``; every other step is a RAS step.  (Step 0 is always dense: nothing is
  cached yet.)  A RAS step drops ``D = floor((1 - sample_ratio) * N)`` tokens (static mode) or, in
  dynamic mode (``skip_num_step != 0`` and ``skip_num_step_length = L > 0``),
  ``D = ((avg + skip_num_step * (s // L - ((T + start) // L) // 2)) // R) * R`` with ``avg`` the
  static ``D`` and ``R = dynamic_round_to`` (64 by default), clamped to ``[0, N]``.
* Selection before RAS step ``s``: ``delta = x(s) - x(s-1)`` (the latents the transformer received
  at this and the previous call); per latent pixel the unbiased std over channels (``"std"``) or the
  L2 norm over channels (``"l2norm"``); per token the mean over its ``p x p`` pixels; multiplied by
  ``exp(starvation_scale * d)`` where ``d`` starts at ``-(T + 1)`` for every token and batch row at
  the start of a generation and grows by 1 each time the token is dropped.  Stable ascending sort;
  the ``floor(D * (1 - high_ratio))`` lowest and the ``floor(D * high_ratio)`` highest are dropped,
  the rest are active.  Every batch row is selected independently (the two CFG rows of an image see
  the same latents and drop counts, hence get the same selection).
* A RAS step: attention queries of active tokens only; image keys/values come from a per-layer
  cache of all ``N`` image tokens (written in full at dense steps) in which the active tokens' fresh
  keys/values (after q/k-norm and RoPE) overwrite their slots first.  Text keys/values are fresh.
  The output for a dropped token is its last computed output (output cache, per patch), for an
  active token the fresh one.

How the oracle computes a RAS step, and why it is faithful
----------------------------------------------------------
The oracle runs the unmodified transformer on **all** N image tokens.  Inside each image
self-attention (SD3 joint attention; Lumina ``attn1``) the keys/values of the DROPPED tokens are
replaced by the cached ones, and the ACTIVE tokens' fresh keys/values are written into the cache.
After the forward, the output of the active tokens is taken from the fresh result and the output of
the dropped tokens from the output cache.  This equals computing the active tokens only:

1. Every operation outside attention is token-wise: the patch embeddings (non-overlapping
   patches), positional embeddings, layer/RMS norms, adaLN modulation (driven by the per-sample
   timestep/text embedding), MLPs, q/k/v/out projections, q/k norms, RoPE, the final norm and
   projection, and unpatchify.  Token ``t``'s value after such an op depends only on token ``t``'s
   value before it (and on per-sample conditioning that does not depend on image tokens).
2. So, layer by layer, the only way a dropped token's (discarded) computation could reach an
   active token or a text token is through its key/value in attention -- and those are replaced by
   the cached ones, exactly what the active-only computation uses.  The active tokens' keys/values
   are fresh in both.  Text tokens (SD3 joint attention queries; Lumina cross-attention keys) see
   the same key/value set in both.  By induction every active token's (and text token's) hidden
   state equals the active-only computation; the dropped tokens' hidden states are never read.
3. The queries of dropped tokens are computed and thrown away: attention is row-wise in the
   queries, and the attention masks (Lumina: all-ones self-attention mask, per-key text mask) are
   the same for every query row.
4. Proportional attention (Lumina): the diffusers processor derives the softmax scale from the
   query count.  The oracle always has N queries, so it uses the dense scale -- which is the
   intended RAS semantics (the compiled path keeps the dense scale too).

Differences from an active-only computation are therefore floating-point rounding only.

Caches: per attention layer and batch row, ``[B, heads, N, head_dim]`` for SD3 (after ``norm_k``)
and ``[B, N, kv_heads, head_dim]`` for Lumina (after ``norm_k`` and RoPE, before the GQA repeat);
the output cache is the merged transformer output ``[B, C_out, H, W]`` (for Lumina ``C_out`` is
``2 * in_channels``: learn_sigma).

``use_kv_cache=False`` is a deliberately broken variant (dropped tokens' keys/values come from the
fresh computation) used to prove that tests exercise the cache.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from diffusers import LuminaNextDiT2DModel, SD3Transformer2DModel
from diffusers.models.attention_processor import Attention
from diffusers.models.embeddings import apply_rotary_emb
from diffusers.models.modeling_outputs import Transformer2DModelOutput

__all__ = ["RASOracle", "OracleJointAttnProcessor", "OracleLuminaAttnProcessor"]


class RASOracle:
    """Eager RAS reference.  See the module docstring for the semantics.

    Usage::

        oracle = RASOracle(num_inference_steps=8, scheduler_start_step=2, error_reset_steps=(5,))
        with oracle.install(pipe):
            latents = pipe(**kwargs)[0]
        oracle.history  # per step: None (dense) or LongTensor [B, k] of active token indices

    After a generation:

    * ``history[s]`` -- ``None`` for a dense step, else the active token indices of every batch row,
      ``LongTensor [B, k]``, ascending within each row.
    * ``drop_counts`` -- ``LongTensor [B, N]``, the starvation counters ``d`` (``None`` before the
      first RAS step of a generation).
    """

    def __init__(
        self,
        num_inference_steps: int,
        *,
        sample_ratio: float = 0.5,
        scheduler_start_step: int = 4,
        scheduler_end_step: int | None = None,
        error_reset_steps: tuple[int, ...] = (12, 22),
        metric: str = "std",
        starvation_scale: float = 0.1,
        high_ratio: float = 1.0,
        skip_num_step: int = 0,
        skip_num_step_length: int = 0,
        dynamic_round_to: int = 64,
        use_kv_cache: bool = True,
    ):
        if metric not in ("std", "l2norm"):
            raise ValueError(f"metric must be 'std' or 'l2norm', got {metric!r}")
        if not 0.0 <= sample_ratio <= 1.0:
            raise ValueError(f"sample_ratio must be in [0, 1], got {sample_ratio}")
        if not 0.0 <= high_ratio <= 1.0:
            raise ValueError(f"high_ratio must be in [0, 1], got {high_ratio}")
        self.num_inference_steps = int(num_inference_steps)
        self.sample_ratio = float(sample_ratio)
        self.scheduler_start_step = int(scheduler_start_step)
        self.scheduler_end_step = self.num_inference_steps if scheduler_end_step is None else int(scheduler_end_step)
        self.error_reset_steps = tuple(int(s) for s in error_reset_steps)
        self.metric = metric
        self.starvation_scale = float(starvation_scale)
        self.high_ratio = float(high_ratio)
        self.skip_num_step = int(skip_num_step)
        self.skip_num_step_length = int(skip_num_step_length)
        self.dynamic_round_to = int(dynamic_round_to)
        self.use_kv_cache = bool(use_kv_cache)

        self.patch_size: int | None = None
        self._transformer = None
        self._original_processors: dict[str, object] = {}
        self._had_instance_forward = False
        self._instance_forward = None
        self._processors: list[_CachingProcessor] = []
        self._num_calls = 0
        self.reset()

    # ------------------------------------------------------------------ schedule (pure functions)

    def is_ras_step(self, step: int) -> bool:
        """Whether 0-based step ``step`` is a RAS step (else dense)."""
        if step == 0:  # nothing cached yet
            return False
        if step < self.scheduler_start_step or step > self.scheduler_end_step:
            return False
        return step not in self.error_reset_steps

    def num_dropped(self, step: int, num_tokens: int) -> int:
        """``D``: how many of ``num_tokens`` image tokens RAS step ``step`` drops."""
        average = math.floor((1.0 - self.sample_ratio) * num_tokens)
        if self.skip_num_step == 0 or self.skip_num_step_length <= 0:
            return average
        length = self.skip_num_step_length
        group = step // length
        centre = ((self.num_inference_steps + self.scheduler_start_step) // length) // 2
        raw = average + self.skip_num_step * (group - centre)
        dropped = raw - raw % self.dynamic_round_to
        return min(max(dropped, 0), num_tokens)

    def split_dropped(self, num_dropped: int) -> tuple[int, int]:
        """``(n_low, n_high)``: how many of the lowest / highest scoring tokens are dropped."""
        n_low = math.floor(num_dropped * (1.0 - self.high_ratio))
        n_high = math.floor(num_dropped * self.high_ratio)
        return n_low, n_high

    def num_active(self, step: int, num_tokens: int) -> int:
        """``k``: active tokens at ``step`` (``num_tokens`` on dense steps)."""
        if not self.is_ras_step(step):
            return num_tokens
        n_low, n_high = self.split_dropped(self.num_dropped(step, num_tokens))
        return num_tokens - n_low - n_high

    # ------------------------------------------------------------------ selection

    def token_scores(self, delta: torch.Tensor, patch_size: int | None = None) -> torch.Tensor:
        """Per-token metric of a latent update ``delta [B, C, H, W]`` -> ``[B, N]`` (no starvation)."""
        p = patch_size or self.patch_size
        batch, _, height, width = delta.shape
        if self.metric == "std":
            per_pixel = delta.std(dim=1)  # unbiased, over channels -> [B, H, W]
        else:
            per_pixel = torch.linalg.vector_norm(delta, dim=1)
        per_token = per_pixel.reshape(batch, height // p, p, width // p, p).mean(dim=(2, 4))
        return per_token.reshape(batch, (height // p) * (width // p))

    def select_tokens(self, delta: torch.Tensor, num_dropped: int, patch_size: int | None = None) -> torch.Tensor:
        """Choose the active tokens for a RAS step and update the drop counts.

        Returns a bool mask ``[B, N]``, True for active tokens.
        """
        scores = self.token_scores(delta, patch_size)
        batch, num_tokens = scores.shape
        if self.drop_counts is None:
            self.drop_counts = torch.full(
                (batch, num_tokens), -(self.num_inference_steps + 1), dtype=torch.int64, device=delta.device
            )
        scores = scores * torch.exp(self.starvation_scale * self.drop_counts.to(scores.dtype))
        order = torch.sort(scores, dim=1, stable=True).indices  # ascending
        n_low, n_high = self.split_dropped(num_dropped)
        dropped = torch.cat([order[:, :n_low], order[:, num_tokens - n_high :]], dim=1)
        active = torch.ones(batch, num_tokens, dtype=torch.bool, device=delta.device)
        active[torch.arange(batch, device=delta.device).unsqueeze(1), dropped] = False
        self.drop_counts += (~active).to(torch.int64)
        return active

    @staticmethod
    def token_mask_to_pixels(active: torch.Tensor, height: int, width: int, patch_size: int) -> torch.Tensor:
        """Token mask ``[B, N]`` -> pixel mask ``[B, 1, H, W]`` (row-major tokens, p x p patches)."""
        grid = active.reshape(active.shape[0], 1, height // patch_size, width // patch_size)
        return grid.repeat_interleave(patch_size, dim=2).repeat_interleave(patch_size, dim=3)

    # ------------------------------------------------------------------ state

    def reset(self) -> None:
        """Forget everything about the current generation; the next call is step 0."""
        self._num_calls = 0
        self.history: list[torch.Tensor | None] = []
        self.drop_counts: torch.Tensor | None = None
        self._previous_latents: torch.Tensor | None = None
        self._output_cache: torch.Tensor | None = None
        self._active: torch.Tensor | None = None  # bool [B, N] during a RAS forward, else None
        for processor in self._processors:
            processor.clear()

    @property
    def step(self) -> int:
        """The step index the next transformer call will have."""
        return self._num_calls % self.num_inference_steps

    # ------------------------------------------------------------------ install / uninstall

    def install(self, pipe_or_transformer) -> RASOracle:
        """Install into a pipeline (or a bare transformer).  Returns ``self`` (a context manager)."""
        if self._transformer is not None:
            raise RuntimeError("RASOracle is already installed")
        transformer = getattr(pipe_or_transformer, "transformer", pipe_or_transformer)
        if isinstance(transformer, SD3Transformer2DModel):
            expected, make = "JointAttnProcessor2_0", lambda module: OracleJointAttnProcessor(self)
        elif isinstance(transformer, LuminaNextDiT2DModel):
            expected = "LuminaAttnProcessor2_0"

            def make(module):
                # attn1: image self-attention (cached); attn2: cross-attention to text (keys are text).
                return OracleLuminaAttnProcessor(self, cache_image_kv=not module.is_cross_attention)
        else:
            raise TypeError(f"unsupported transformer {type(transformer).__name__}")

        self.patch_size = int(transformer.config.patch_size)
        self._original_processors = {}
        self._processors = []
        for name, module in transformer.named_modules():
            if isinstance(module, Attention):
                if type(module.processor).__name__ != expected:
                    raise TypeError(f"{name}: expected {expected}, found {type(module.processor).__name__}")
                self._original_processors[name] = module.processor
                processor = make(module)
                self._processors.append(processor)
                module.set_processor(processor)

        self._had_instance_forward = "forward" in transformer.__dict__
        self._instance_forward = transformer.__dict__.get("forward")
        original_forward = transformer.forward

        def forward(*args, **kwargs):
            return self._run_step(original_forward, args, kwargs)

        transformer.forward = forward
        self._transformer = transformer
        self.reset()
        return self

    def uninstall(self) -> None:
        """Restore the original attention processors and ``forward``."""
        transformer = self._transformer
        if transformer is None:
            return
        modules = dict(transformer.named_modules())
        for name, processor in self._original_processors.items():
            modules[name].set_processor(processor)
        if self._had_instance_forward:
            transformer.forward = self._instance_forward
        else:
            del transformer.forward
        self._transformer = None
        self._original_processors = {}
        self._processors = []
        self._instance_forward = None

    def __enter__(self) -> RASOracle:
        return self

    def __exit__(self, *exc) -> None:
        self.uninstall()

    # ------------------------------------------------------------------ one transformer call

    def _run_step(self, forward, args, kwargs):
        hidden_states = kwargs["hidden_states"] if "hidden_states" in kwargs else args[0]
        step = self.step
        if step == 0:
            self.reset()
        self._num_calls += 1

        batch, _, height, width = hidden_states.shape
        p = self.patch_size
        num_tokens = (height // p) * (width // p)

        active = None
        if self.is_ras_step(step):
            previous = self._previous_latents
            if previous is None or previous.shape != hidden_states.shape or self._output_cache is None:
                raise RuntimeError(f"RAS step {step} without a previous step of the same shape")
            delta = hidden_states - previous
            active = self.select_tokens(delta, self.num_dropped(step, num_tokens))

        self._active = active
        try:
            result = forward(*args, **kwargs)
        finally:
            self._active = None

        fresh = result[0] if isinstance(result, tuple) else result.sample
        if active is None:
            merged = fresh
            self.history.append(None)
        else:
            pixels = self.token_mask_to_pixels(active, height, width, p)
            merged = torch.where(pixels, fresh, self._output_cache)
            # nonzero() is row-major: per batch row, the active token indices in ascending order.
            self.history.append(active.nonzero()[:, 1].reshape(batch, -1))
        self._output_cache = merged.detach().clone()
        self._previous_latents = hidden_states.detach().clone()

        if isinstance(result, tuple):
            return (merged, *result[1:])
        return Transformer2DModelOutput(sample=merged)

    # ------------------------------------------------------------------ used by the processors

    def kv_through_cache(self, processor: _CachingProcessor, key: torch.Tensor, value: torch.Tensor, token_dim: int):
        """Image keys/values of one layer (token axis ``token_dim``) -> the ones attention uses.

        Dense step: fresh, and the cache is written in full.  RAS step: active tokens fresh, dropped
        tokens from the cache; the result becomes the cache (so active slots are overwritten).
        """
        active = self._active
        if active is not None and self.use_kv_cache:
            shape = [1] * key.dim()
            shape[0], shape[token_dim] = active.shape
            mask = active.reshape(shape)
            key = torch.where(mask, key, processor.key_cache)
            value = torch.where(mask, value, processor.value_cache)
        processor.key_cache = key.detach()
        processor.value_cache = value.detach()
        return key, value


class _CachingProcessor:
    """Holds one attention layer's image key/value cache."""

    def __init__(self, oracle: RASOracle):
        self.oracle = oracle
        self.key_cache: torch.Tensor | None = None
        self.value_cache: torch.Tensor | None = None

    def clear(self) -> None:
        self.key_cache = None
        self.value_cache = None


class OracleJointAttnProcessor(_CachingProcessor):
    """``JointAttnProcessor2_0`` (SD3) re-implemented with the RAS image key/value cache.

    Sequence: ``[image tokens ; text tokens]``; only the image part of keys/values is cached
    (layout ``[B, heads, N, head_dim]``, after ``norm_k``).
    """

    def __call__(
        self,
        attn: Attention,
        hidden_states: torch.Tensor,
        encoder_hidden_states: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        *args,
        **kwargs,
    ):
        batch_size, num_image_tokens, _ = hidden_states.shape

        # Image ("sample") projections.
        query = attn.to_q(hidden_states)
        key = attn.to_k(hidden_states)
        value = attn.to_v(hidden_states)
        head_dim = key.shape[-1] // attn.heads
        query = query.view(batch_size, -1, attn.heads, head_dim).transpose(1, 2)
        key = key.view(batch_size, -1, attn.heads, head_dim).transpose(1, 2)
        value = value.view(batch_size, -1, attn.heads, head_dim).transpose(1, 2)
        if attn.norm_q is not None:
            query = attn.norm_q(query)
        if attn.norm_k is not None:
            key = attn.norm_k(key)

        # RAS: dropped image tokens' keys/values come from the cache.
        key, value = self.oracle.kv_through_cache(self, key, value, token_dim=2)

        # Text ("context") projections: always fresh.
        if encoder_hidden_states is not None:
            text_query = attn.add_q_proj(encoder_hidden_states)
            text_key = attn.add_k_proj(encoder_hidden_states)
            text_value = attn.add_v_proj(encoder_hidden_states)
            text_query = text_query.view(batch_size, -1, attn.heads, head_dim).transpose(1, 2)
            text_key = text_key.view(batch_size, -1, attn.heads, head_dim).transpose(1, 2)
            text_value = text_value.view(batch_size, -1, attn.heads, head_dim).transpose(1, 2)
            if attn.norm_added_q is not None:
                text_query = attn.norm_added_q(text_query)
            if attn.norm_added_k is not None:
                text_key = attn.norm_added_k(text_key)
            query = torch.cat([query, text_query], dim=2)
            key = torch.cat([key, text_key], dim=2)
            value = torch.cat([value, text_value], dim=2)

        out = F.scaled_dot_product_attention(query, key, value, dropout_p=0.0, is_causal=False)
        out = out.transpose(1, 2).reshape(batch_size, -1, attn.heads * head_dim)
        out = out.to(query.dtype)

        text_out = None
        if encoder_hidden_states is not None:
            out, text_out = out[:, :num_image_tokens], out[:, num_image_tokens:]
            if not attn.context_pre_only:
                text_out = attn.to_add_out(text_out)

        out = attn.to_out[0](out)  # linear
        out = attn.to_out[1](out)  # dropout
        if encoder_hidden_states is not None:
            return out, text_out
        return out


class OracleLuminaAttnProcessor(_CachingProcessor):
    """``LuminaAttnProcessor2_0`` re-implemented with the RAS image key/value cache.

    With ``cache_image_kv`` (self-attention ``attn1``: keys are the image tokens) the keys/values are
    cached as ``[B, N, kv_heads, head_dim]`` after ``norm_k`` and RoPE, before the GQA repeat.
    Cross-attention (``attn2``: keys are text) runs unchanged.
    """

    def __init__(self, oracle: RASOracle, cache_image_kv: bool):
        super().__init__(oracle)
        self.cache_image_kv = cache_image_kv

    # The argument names matter: diffusers' Attention.forward drops keyword arguments that the
    # processor's signature does not name.
    def __call__(
        self,
        attn: Attention,
        hidden_states: torch.Tensor,
        encoder_hidden_states: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        query_rotary_emb: torch.Tensor | None = None,
        key_rotary_emb: torch.Tensor | None = None,
        base_sequence_length: int | None = None,
    ) -> torch.Tensor:
        if hidden_states.ndim != 3:
            raise ValueError("the Lumina oracle processor expects [B, S, C] hidden states")
        batch_size, sequence_length, _ = hidden_states.shape

        query = attn.to_q(hidden_states)
        key = attn.to_k(encoder_hidden_states)
        value = attn.to_v(encoder_hidden_states)
        head_dim = query.shape[-1] // attn.heads
        kv_heads = key.shape[-1] // head_dim
        dtype = query.dtype

        if attn.norm_q is not None:
            query = attn.norm_q(query)
        if attn.norm_k is not None:
            key = attn.norm_k(key)

        query = query.view(batch_size, -1, attn.heads, head_dim)
        key = key.view(batch_size, -1, kv_heads, head_dim)
        value = value.view(batch_size, -1, kv_heads, head_dim)

        if query_rotary_emb is not None:
            query = apply_rotary_emb(query, query_rotary_emb, use_real=False)
        if key_rotary_emb is not None:
            key = apply_rotary_emb(key, key_rotary_emb, use_real=False)
        query, key = query.to(dtype), key.to(dtype)

        # RAS: dropped image tokens' keys/values come from the cache.
        if self.cache_image_kv:
            key, value = self.oracle.kv_through_cache(self, key, value, token_dim=1)

        # Proportional attention.  sequence_length is the query count, which in the oracle is always
        # N (all image tokens), i.e. the dense scale.
        if key_rotary_emb is None:
            softmax_scale = None
        elif base_sequence_length is not None:
            softmax_scale = math.sqrt(math.log(sequence_length, base_sequence_length)) * attn.scale
        else:
            softmax_scale = attn.scale

        # Grouped-query attention: repeat the key/value heads.
        n_rep = attn.heads // kv_heads
        if n_rep >= 1:
            key = key.unsqueeze(3).repeat(1, 1, 1, n_rep, 1).flatten(2, 3)
            value = value.unsqueeze(3).repeat(1, 1, 1, n_rep, 1).flatten(2, 3)

        mask = attention_mask.bool().view(batch_size, 1, 1, -1)
        mask = mask.expand(-1, attn.heads, sequence_length, -1)

        out = F.scaled_dot_product_attention(
            query.transpose(1, 2), key.transpose(1, 2), value.transpose(1, 2), attn_mask=mask, scale=softmax_scale
        )
        return out.transpose(1, 2).to(dtype)
