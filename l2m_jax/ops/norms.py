"""RMSNorm and MiL's gated, grouped RMSNorm (fp32 inside, cast back on the way out)."""
from __future__ import annotations

import jax
import jax.numpy as jnp


def rms_norm(x, scale, *, eps: float):
    """x [..., D], scale [D] -> [..., D] in x.dtype; normalised in fp32 (HF LlamaRMSNorm order)."""
    xf = x.astype(jnp.float32)
    var = jnp.mean(xf * xf, axis=-1, keepdims=True)
    y = (xf * jax.lax.rsqrt(var + eps)).astype(x.dtype)
    return scale.astype(x.dtype) * y


def gated_rms_norm(y, z, scale, *, group_size: int, eps: float):
    """MiL's RMSNormGated (norm_before_gate=False): gate first, then normalise each group of channels.

    y, z [..., C], scale [C]; C % group_size == 0. Returns [..., C] in y.dtype.
    """
    c = y.shape[-1]
    if c % group_size:
        raise ValueError(f"gated_rms_norm: channels {c} not divisible by group_size {group_size}")
    g = y.astype(jnp.float32) * jax.nn.silu(z.astype(jnp.float32))
    gg = g.reshape(*g.shape[:-1], c // group_size, group_size)
    var = jnp.mean(gg * gg, axis=-1, keepdims=True)
    out = (gg * jax.lax.rsqrt(var + eps)).reshape(g.shape)
    return (out * scale.astype(jnp.float32)).astype(y.dtype)
