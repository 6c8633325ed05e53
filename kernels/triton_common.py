"""Triton device functions shared by the SSM decode kernels.

Imported lazily (dispatch.py imports the Triton modules only when backend="triton" is asked for).
"""

from __future__ import annotations

import triton
import triton.language as tl

__all__ = ["softplus", "mamba2_advance", "mamba_advance"]


@triton.jit
def softplus(v):
    # exp(-|v|) never overflows; agrees with jax.nn.softplus to fp32 rounding (log1p would be a libdevice call)
    return tl.maximum(v, 0.0) + tl.log(1.0 + tl.exp(-tl.abs(v)))


@triton.jit
def mamba2_advance(h, xt, delta, bt, a):
    """h [BP, BN] <- exp(Δ a) h + Δ x ⊗ B, Δ a scalar (Δ = 0 leaves h exactly as it was); xt [BP], bt [BN]."""
    return tl.exp(delta * a) * h + (delta * xt)[:, None] * bt[None, :]


@triton.jit
def mamba_advance(h, xt, delta, bt, a):
    """h [BC, BN] <- exp(Δ a) ⊙ h + Δ x B per channel; xt and Δ [BC]; a and bt [BC, BN]."""
    return tl.exp(delta[:, None] * a) * h + (delta * xt)[:, None] * bt
