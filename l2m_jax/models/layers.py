"""The trunk's modules: RMSNorm, SwiGLU MLP, GQA attention with RoPE and a KV cache."""
from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp
from flax import nnx

from ..cache import AttnCache
from ..config import ModelConfig
from ..ops import attention as attn_ops
from ..ops.attention import attention_mask, causal_attention, gqa_attention, gqa_probabilities, right_padding
from ..ops.norms import rms_norm
from ..ops.rope import apply_rope

_normal = nnx.initializers.normal(0.02)


class Context(NamedTuple):
    """Per-call facts every layer needs."""
    positions: jax.Array        # int32 [B, L]
    mask: jax.Array             # bool [B, L], True = real token
    new_lengths: jax.Array | None  # int32 [B] after this call (None without a cache)
    inv_freq: jax.Array         # [P/2]
    has_mask: bool              # False: every token is real (lets SSM ops skip masking)
    n_replay: jax.Array | None = None  # int32 [B]: verifier calls only (SpecState)
    backend: str = "xla"        # kernel back-end of SSM decode steps and verification


def linear(cfg: ModelConfig, d_in: int, d_out: int, rngs, init=_normal) -> nnx.Linear:
    return nnx.Linear(d_in, d_out, use_bias=False, kernel_init=init, dtype=jnp.dtype(cfg.dtype),
                      param_dtype=jnp.dtype(cfg.param_dtype), rngs=rngs)


class RMSNorm(nnx.Module):
    def __init__(self, dim: int, eps: float, param_dtype):
        self.scale = nnx.Param(jnp.ones((dim,), param_dtype))
        self.eps = eps

    def __call__(self, x):
        return rms_norm(x, self.scale[...], eps=self.eps)


class MLP(nnx.Module):
    """SwiGLU: down(silu(gate(x)) * up(x))."""

    def __init__(self, cfg: ModelConfig, rngs: nnx.Rngs):
        self.gate = linear(cfg, cfg.d_model, cfg.ffn_dim, rngs)
        self.up = linear(cfg, cfg.d_model, cfg.ffn_dim, rngs)
        self.down = linear(cfg, cfg.ffn_dim, cfg.d_model, rngs)

    def __call__(self, x):
        return self.down(jax.nn.silu(self.gate(x)) * self.up(x))


class Attention(nnx.Module):
    def __init__(self, cfg: ModelConfig, rngs: nnx.Rngs):
        self.cfg = cfg
        self.q = linear(cfg, cfg.d_model, cfg.q_dim, rngs)
        self.k = linear(cfg, cfg.d_model, cfg.kv_dim, rngs)
        self.v = linear(cfg, cfg.d_model, cfg.kv_dim, rngs)
        self.o = linear(cfg, cfg.q_dim, cfg.d_model, rngs)

    def __call__(self, x, ctx: Context, cache: AttnCache | None):
        """x [B, L, D] -> ([B, L, D], new cache).

        Full-sequence calls (no cache) and prefills (calls longer than DECODE_MAX_QUERIES into a cache) take
        the implementation of `attn_ops.ATTN_IMPL` where it can express the mask, the reference elsewhere:
          no cache, no mask             causal (+ sliding window): always the chosen implementation;
          no cache, a mask              right padding (checked at run time, lax.cond): the chosen one with the
                                        rows' lengths; any other mask (left padding, holes): the reference;
          a cache, L > DECODE_MAX_QUERIES, L <= S
                                        every row starting empty (lengths 0, checked at run time): the chosen
                                        one over this call's own keys with the new lengths; rows continuing
                                        a filled cache: the reference over the whole cache. A pad query
                                        that sees no key averages the call's L values instead of the S
                                        slots (cudnn: zeros); no real position reads it.
        Shorter cached calls (decode, verification) keep the decode switch (DECODE_IMPL).
        """
        cfg = self.cfg
        b, l, _ = x.shape
        q = apply_rope(self.q(x).reshape(b, l, cfg.n_heads, cfg.head_dim), ctx.positions, ctx.inv_freq)
        k = apply_rope(self.k(x).reshape(b, l, cfg.n_kv_heads, cfg.head_dim), ctx.positions, ctx.inv_freq)
        v = self.v(x).reshape(b, l, cfg.n_kv_heads, cfg.head_dim)
        fast = attn_ops.ATTN_IMPL != "reference"
        window = cfg.sliding_window
        if cache is None:
            k_all, v_all, k_pos, k_valid = k, v, ctx.positions, ctx.mask
            if fast and not ctx.has_mask:
                y = causal_attention(q, k, v, sliding_window=window)
                return self.o(y.reshape(b, l, cfg.q_dim)), None
            if fast:
                lengths, right = right_padding(ctx.mask)
                y = jax.lax.cond(right, lambda: causal_attention(q, k, v, kv_lengths=lengths, sliding_window=window),
                                 lambda: self._reference(q, k, v, ctx.positions, k_pos, k_valid))
                return self.o(y.reshape(b, l, cfg.q_dim)), None
        else:
            rows = jnp.arange(b)[:, None]
            # slot = position; a pad whose slot falls past the capacity is dropped, never clamped
            k_all = cache.k.at[rows, ctx.positions].set(k.astype(cache.k.dtype), mode="drop")
            v_all = cache.v.at[rows, ctx.positions].set(v.astype(cache.v.dtype), mode="drop")
            cache = AttnCache(k_all, v_all)
            if attn_ops.DECODE_IMPL != "full" and l <= attn_ops.DECODE_MAX_QUERIES:
                # decode / verification: read only the filled slots, block by block
                y = attn_ops.cached_decode_attention(q, k_all, v_all, ctx.positions, ctx.new_lengths,
                                                     sliding_window=window)
                return self.o(y.reshape(b, l, cfg.q_dim)), cache
            s = k_all.shape[1]
            k_pos = jnp.broadcast_to(jnp.arange(s, dtype=jnp.int32), (b, s))
            k_valid = k_pos < ctx.new_lengths[:, None]
            if fast and attn_ops.DECODE_MAX_QUERIES < l <= s:
                # a prefill into empty rows sees only its own keys (rounded to the cache's dtype, as the
                # reference reads them): slots past L are never valid then
                empty = jnp.all(ctx.positions[:, 0] == 0)
                k_new, v_new = k.astype(k_all.dtype), v.astype(v_all.dtype)
                y = jax.lax.cond(empty, lambda: causal_attention(q, k_new, v_new, kv_lengths=ctx.new_lengths,
                                                                 sliding_window=window),
                                 lambda: self._reference(q, k_all, v_all, ctx.positions, k_pos, k_valid))
                return self.o(y.reshape(b, l, cfg.q_dim)), cache
        y = self._reference(q, k_all, v_all, ctx.positions, k_pos, k_valid)
        return self.o(y.reshape(b, l, cfg.q_dim)), cache

    def probabilities(self, x, ctx: Context):
        """x [B, L, D] (a full sequence, the block's normalised input) -> the reference's attention weights
        [B, H, L, L] in fp32: causal, the sliding window and padded keys (ctx.mask) masked."""
        cfg = self.cfg
        b, l, _ = x.shape
        q = apply_rope(self.q(x).reshape(b, l, cfg.n_heads, cfg.head_dim), ctx.positions, ctx.inv_freq)
        k = apply_rope(self.k(x).reshape(b, l, cfg.n_kv_heads, cfg.head_dim), ctx.positions, ctx.inv_freq)
        m = attention_mask(ctx.positions, ctx.positions, ctx.mask, sliding_window=cfg.sliding_window)
        return gqa_probabilities(q, k, m)

    def _reference(self, q, k_all, v_all, q_pos, k_pos, k_valid):
        m = attention_mask(q_pos, k_pos, k_valid, sliding_window=self.cfg.sliding_window)
        return gqa_attention(q, k_all.astype(q.dtype), v_all.astype(q.dtype), m)
