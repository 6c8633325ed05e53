"""Triton kernels for one SSM decode step (Mamba-2 and Mamba-1), called through jax-triton.

Each program loads one tile of the fp32 state, applies the step, writes y and stores the tile: the state
crosses HBM once each way. Arrays are contiguous row-major (JAX's layout); shapes and group counts are
compile-time constants, so one compiled kernel serves every batch size. Imported lazily by dispatch.py.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import triton
import triton.language as tl

from . import tiling
from .triton_common import mamba2_advance, mamba_advance, softplus

__all__ = ["mamba2_update", "mamba_update"]


@triton.jit
def _mamba2_update_kernel(
    h_ptr, x_ptr, dt_ptr, b_ptr, c_ptr, a_ptr, d_ptr, bias_ptr,  # inputs
    y_ptr, h_out_ptr,  # outputs
    H: tl.constexpr, P: tl.constexpr, N: tl.constexpr,
    GX: tl.constexpr, GB: tl.constexpr, GC: tl.constexpr,
    BLOCK_P: tl.constexpr, BLOCK_N: tl.constexpr,
):
    pid_p = tl.program_id(0)
    head = tl.program_id(1)
    b = tl.program_id(2).to(tl.int64)  # int64: B·H·P·N passes 2**31 at large batch
    offs_p = pid_p * BLOCK_P + tl.arange(0, BLOCK_P)
    offs_n = tl.arange(0, BLOCK_N)
    mask_p = offs_p < P
    mask_n = offs_n < N
    mask = mask_p[:, None] & mask_n[None, :]
    state = ((b * H + head) * P + offs_p[:, None]) * N + offs_n[None, :]

    h = tl.load(h_ptr + state, mask=mask, other=0.0)
    a = tl.load(a_ptr + head)
    d = tl.load(d_ptr + head)
    bias = tl.load(bias_ptr + head)
    xt = tl.load(x_ptr + (b * GX + head // (H // GX)) * P + offs_p, mask=mask_p, other=0.0).to(tl.float32)
    dtt = tl.load(dt_ptr + b * H + head).to(tl.float32)
    bt = tl.load(b_ptr + (b * GB + head // (H // GB)) * N + offs_n, mask=mask_n, other=0.0).to(tl.float32)
    ct = tl.load(c_ptr + (b * GC + head // (H // GC)) * N + offs_n, mask=mask_n, other=0.0).to(tl.float32)

    h = mamba2_advance(h, xt, softplus(dtt + bias), bt, a)
    y = tl.sum(h * ct[None, :], axis=1) + d * xt
    tl.store(y_ptr + (b * H + head) * P + offs_p, y.to(y_ptr.dtype.element_ty), mask=mask_p)
    tl.store(h_out_ptr + state, h, mask=mask)


@triton.jit
def _mamba_update_kernel(
    h_ptr, x_ptr, dt_ptr, b_ptr, c_ptr, a_ptr, d_ptr, bias_ptr,  # inputs
    y_ptr, h_out_ptr,  # outputs
    CH: tl.constexpr, N: tl.constexpr, GB: tl.constexpr, GC: tl.constexpr,
    BLOCK_C: tl.constexpr, BLOCK_N: tl.constexpr,
):
    pid_c = tl.program_id(0)
    b = tl.program_id(1).to(tl.int64)
    offs_c = pid_c * BLOCK_C + tl.arange(0, BLOCK_C)
    offs_n = tl.arange(0, BLOCK_N)
    mask_c = offs_c < CH
    mask = mask_c[:, None] & (offs_n < N)[None, :]
    state = (b * CH + offs_c[:, None]) * N + offs_n[None, :]
    # channel c reads group c // (CH // G): gathered per channel, so a block may span groups
    rows_b = (b * GB + offs_c // (CH // GB))[:, None] * N + offs_n[None, :]
    rows_c = (b * GC + offs_c // (CH // GC))[:, None] * N + offs_n[None, :]

    h = tl.load(h_ptr + state, mask=mask, other=0.0)
    a = tl.load(a_ptr + offs_c[:, None] * N + offs_n[None, :], mask=mask, other=0.0)
    d = tl.load(d_ptr + offs_c, mask=mask_c, other=0.0)
    bias = tl.load(bias_ptr + offs_c, mask=mask_c, other=0.0)
    xt = tl.load(x_ptr + b * CH + offs_c, mask=mask_c, other=0.0).to(tl.float32)
    dtt = tl.load(dt_ptr + b * CH + offs_c, mask=mask_c, other=0.0).to(tl.float32)
    bt = tl.load(b_ptr + rows_b, mask=mask, other=0.0).to(tl.float32)
    ct = tl.load(c_ptr + rows_c, mask=mask, other=0.0).to(tl.float32)

    h = mamba_advance(h, xt, softplus(dtt + bias), bt, a)
    y = tl.sum(h * ct, axis=1) + d * xt
    tl.store(y_ptr + b * CH + offs_c, y.to(y_ptr.dtype.element_ty), mask=mask_c)
    tl.store(h_out_ptr + state, h, mask=mask)


def mamba2_update(h, x, dt, B, C, *, A, D, dt_bias):
    """One Mamba-2 step: h [B, H, P, N] fp32, x [B, Gx, P], dt [B, H], B [B, Gb, N], C [B, Gc, N], fp32
    params A, D, dt_bias [H]. Returns y [B, H, P] in x's dtype and h_new [B, H, P, N] fp32."""
    import jax_triton as jt

    batch, heads, hdim, dstate = h.shape
    bp, bn = tiling.mamba2_block_p(batch, heads, hdim, dstate), tiling.next_pow2(dstate)
    return jt.triton_call(
        h, x, dt, B, C, A, D, dt_bias,
        kernel=_mamba2_update_kernel,
        out_shape=(jax.ShapeDtypeStruct((batch, heads, hdim), x.dtype), jax.ShapeDtypeStruct(h.shape, jnp.float32)),
        grid=(hdim // bp, heads, batch),
        num_warps=tiling.num_warps(bp * bn),
        num_stages=1,
        H=heads, P=hdim, N=dstate, GX=x.shape[1], GB=B.shape[1], GC=C.shape[1], BLOCK_P=bp, BLOCK_N=bn,
    )


def mamba_update(h, x, dt, B, C, *, A, D, dt_bias):
    """One Mamba-1 step: h [B, C, N] fp32, x and dt [B, C], B [B, Gb, N], C [B, Gc, N], fp32 params
    A [C, N], D and dt_bias [C]. Returns y [B, C] in x's dtype and h_new [B, C, N] fp32."""
    import jax_triton as jt

    batch, channels, dstate = h.shape
    bc, bn = tiling.mamba_block_c(batch, channels, dstate), tiling.next_pow2(dstate)
    return jt.triton_call(
        h, x, dt, B, C, A, D, dt_bias,
        kernel=_mamba_update_kernel,
        out_shape=(jax.ShapeDtypeStruct((batch, channels), x.dtype), jax.ShapeDtypeStruct(h.shape, jnp.float32)),
        grid=(channels // bc, batch),
        num_warps=tiling.num_warps(bc * bn),
        num_stages=1,
        CH=channels, N=dstate, GB=B.shape[1], GC=C.shape[1], BLOCK_C=bc, BLOCK_N=bn,
    )
