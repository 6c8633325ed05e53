"""Grouped-query causal attention over an explicit key/value set (a sequence or a KV cache)."""
from __future__ import annotations

import jax
import jax.numpy as jnp

_NEG = -1e30  # finite: a fully masked row (a pad query) gives a uniform, finite output instead of NaN


def attention_mask(q_pos, k_pos, k_valid, *, sliding_window: int | None = None):
    """Boolean [B, Lq, S]: key j is visible to query i.

    q_pos int [B, Lq], k_pos int [B, S], k_valid bool [B, S]. Causal on positions; with a sliding
    window (Mistral) only the last `sliding_window` positions, as HF does (q - k < window).
    """
    m = (k_pos[:, None, :] <= q_pos[:, :, None]) & k_valid[:, None, :]
    if sliding_window is not None:
        m &= (q_pos[:, :, None] - k_pos[:, None, :]) < sliding_window
    return m


def gqa_attention(q, k, v, mask):
    """q [B, Lq, H, P], k/v [B, S, G, P], mask bool [B, Lq, S] -> [B, Lq, H, P] in q.dtype.

    Head h reads kv group h // (H // G) (HF repeat_kv order). Scores and softmax in fp32.
    """
    b, lq, h, p = q.shape
    g = k.shape[2]
    if h % g:
        raise ValueError(f"gqa_attention: {h} query heads are not a multiple of {g} kv heads")
    qg = q.reshape(b, lq, g, h // g, p)
    with jax.named_scope("gqa_attention"):
        s = jnp.einsum("BLGRP,BSGP->BGRLS", qg, k, preferred_element_type=jnp.float32) * (p ** -0.5)
        s = jnp.where(mask[:, None, None], s, _NEG)
        w = jax.nn.softmax(s, axis=-1).astype(v.dtype)
        o = jnp.einsum("BGRLS,BSGP->BLGRP", w, v, preferred_element_type=jnp.float32)
    return o.reshape(b, lq, h, p).astype(q.dtype)
