"""Triton kernels for the fused multi-step verification (Mamba-2 and Mamba-1), called through jax-triton.

Per program (one tile of one row's state): load the checkpoint tile once; replay the first n_replay[b]
cached steps (x, dt, B of the previous call) without outputs; store the tile as the new checkpoint; run the
T new tokens, writing y for each; store the tile as the running state unless final_state=False (then that
output is left unwritten and not returned). The state crosses HBM once in and twice out (once without the
running state) whatever T is. T is a compile-time constant (one kernel per T, any batch size); n_replay is
read per row at run time. Imported lazily by dispatch.py.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import triton
import triton.language as tl

from . import tiling
from .triton_common import mamba2_advance, mamba_advance, softplus

__all__ = ["mamba2_verify", "mamba_verify"]


@triton.jit
def _mamba2_token(h, t, x_tok, dt_tok, b_tok, c_tok, y_tok, a, d, bias, mask_p, mask_n,
                  SX, SDT, SB, SC, SY, OUTPUT: tl.constexpr):
    """Token t of a Mamba-2 tile: *_tok point at token 0 of this row and tile, S* are per-token strides;
    OUTPUT: also read C and write y (new tokens), else only advance the state (replay)."""
    xt = tl.load(x_tok + t * SX, mask=mask_p, other=0.0).to(tl.float32)
    dtt = tl.load(dt_tok + t * SDT).to(tl.float32)
    bt = tl.load(b_tok + t * SB, mask=mask_n, other=0.0).to(tl.float32)
    h = mamba2_advance(h, xt, softplus(dtt + bias), bt, a)
    if OUTPUT:
        ct = tl.load(c_tok + t * SC, mask=mask_n, other=0.0).to(tl.float32)
        y = tl.sum(h * ct[None, :], axis=1) + d * xt
        tl.store(y_tok + t * SY, y.to(y_tok.dtype.element_ty), mask=mask_p)
    return h


@triton.jit
def _mamba2_verify_kernel(
    h_ptr, n_ptr, cx_ptr, cdt_ptr, cb_ptr,  # checkpoint, replay counts, cached inputs
    x_ptr, dt_ptr, b_ptr, c_ptr, a_ptr, d_ptr, bias_ptr,  # new tokens, params
    y_ptr, hc_out_ptr, hr_out_ptr,  # outputs
    T: tl.constexpr, H: tl.constexpr, P: tl.constexpr, N: tl.constexpr,
    GX: tl.constexpr, GB: tl.constexpr, GC: tl.constexpr,
    BLOCK_P: tl.constexpr, BLOCK_N: tl.constexpr, STORE_FINAL: tl.constexpr,
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
    # token 0 of this row; token t sits t·G·(P or N) further on
    x_off = (b * T * GX + head // (H // GX)) * P + offs_p
    dt_off = b * T * H + head
    b_off = (b * T * GB + head // (H // GB)) * N + offs_n
    c_off = (b * T * GC + head // (H // GC)) * N + offs_n
    y_off = (b * T * H + head) * P + offs_p

    h = tl.load(h_ptr + state, mask=mask, other=0.0)
    a = tl.load(a_ptr + head)
    d = tl.load(d_ptr + head)
    bias = tl.load(bias_ptr + head)
    n_replay = tl.load(n_ptr + b)
    # the replay reads no C and writes no y: their slots get placeholders
    replay = (cx_ptr + x_off, cdt_ptr + dt_off, cb_ptr + b_off, cb_ptr, y_ptr, a, d, bias, mask_p, mask_n,
              GX * P, H, GB * N, GC * N, H * P)
    new = (x_ptr + x_off, dt_ptr + dt_off, b_ptr + b_off, c_ptr + c_off, y_ptr + y_off, a, d, bias,
           mask_p, mask_n, GX * P, H, GB * N, GC * N, H * P)

    for t in range(0, n_replay):
        h = _mamba2_token(h, t, *replay, OUTPUT=False)
    tl.store(hc_out_ptr + state, h, mask=mask)
    for t in range(0, T):
        h = _mamba2_token(h, t, *new, OUTPUT=True)
    if STORE_FINAL:
        tl.store(hr_out_ptr + state, h, mask=mask)


@triton.jit
def _mamba_token(h, t, x_tok, dt_tok, b_tok, c_tok, y_tok, a, d, bias, mask_c, mask,
                 SX, SB, SC, OUTPUT: tl.constexpr):
    """Token t of a Mamba-1 tile (see _mamba2_token); b_tok and c_tok are [BLOCK_C, BLOCK_N] gathers."""
    xt = tl.load(x_tok + t * SX, mask=mask_c, other=0.0).to(tl.float32)
    dtt = tl.load(dt_tok + t * SX, mask=mask_c, other=0.0).to(tl.float32)
    bt = tl.load(b_tok + t * SB, mask=mask, other=0.0).to(tl.float32)
    h = mamba_advance(h, xt, softplus(dtt + bias), bt, a)
    if OUTPUT:
        ct = tl.load(c_tok + t * SC, mask=mask, other=0.0).to(tl.float32)
        y = tl.sum(h * ct, axis=1) + d * xt
        tl.store(y_tok + t * SX, y.to(y_tok.dtype.element_ty), mask=mask_c)
    return h


@triton.jit
def _mamba_verify_kernel(
    h_ptr, n_ptr, cx_ptr, cdt_ptr, cb_ptr,  # checkpoint, replay counts, cached inputs
    x_ptr, dt_ptr, b_ptr, c_ptr, a_ptr, d_ptr, bias_ptr,  # new tokens, params
    y_ptr, hc_out_ptr, hr_out_ptr,  # outputs
    T: tl.constexpr, CH: tl.constexpr, N: tl.constexpr, GB: tl.constexpr, GC: tl.constexpr,
    BLOCK_C: tl.constexpr, BLOCK_N: tl.constexpr, STORE_FINAL: tl.constexpr,
):
    pid_c = tl.program_id(0)
    b = tl.program_id(1).to(tl.int64)
    offs_c = pid_c * BLOCK_C + tl.arange(0, BLOCK_C)
    offs_n = tl.arange(0, BLOCK_N)
    mask_c = offs_c < CH
    mask = mask_c[:, None] & (offs_n < N)[None, :]
    state = (b * CH + offs_c[:, None]) * N + offs_n[None, :]
    # token 0 of this row; channel c reads group c // (CH // G), gathered per channel (a block may span groups)
    x_off = b * T * CH + offs_c
    b_off = (b * T * GB + offs_c // (CH // GB))[:, None] * N + offs_n[None, :]
    c_off = (b * T * GC + offs_c // (CH // GC))[:, None] * N + offs_n[None, :]

    h = tl.load(h_ptr + state, mask=mask, other=0.0)
    a = tl.load(a_ptr + offs_c[:, None] * N + offs_n[None, :], mask=mask, other=0.0)
    d = tl.load(d_ptr + offs_c, mask=mask_c, other=0.0)
    bias = tl.load(bias_ptr + offs_c, mask=mask_c, other=0.0)
    n_replay = tl.load(n_ptr + b)
    # the replay reads no C and writes no y: their slots get placeholders
    replay = (cx_ptr + x_off, cdt_ptr + x_off, cb_ptr + b_off, cb_ptr, y_ptr, a, d, bias, mask_c, mask,
              CH, GB * N, GC * N)
    new = (x_ptr + x_off, dt_ptr + x_off, b_ptr + b_off, c_ptr + c_off, y_ptr + x_off, a, d, bias, mask_c, mask,
           CH, GB * N, GC * N)

    for t in range(0, n_replay):
        h = _mamba_token(h, t, *replay, OUTPUT=False)
    tl.store(hc_out_ptr + state, h, mask=mask)
    for t in range(0, T):
        h = _mamba_token(h, t, *new, OUTPUT=True)
    if STORE_FINAL:
        tl.store(hr_out_ptr + state, h, mask=mask)


def _outputs(x, h, y_shape):
    state = jax.ShapeDtypeStruct(h.shape, jnp.float32)
    return jax.ShapeDtypeStruct(y_shape, x.dtype), state, state


def mamba2_verify(h_ckpt, cache, n_replay, x, dt, B, C, *, A, D, dt_bias, final_state=True):
    """Fused Mamba-2 MultiStep. h_ckpt [B, H, P, N] fp32; cache = (x, dt, B) of the previous call and the
    new x [B, T, Gx, P], dt [B, T, H], B [B, T, Gb, N], C [B, T, Gc, N]; n_replay int32 [B] in [0, T];
    fp32 params [H]. Returns (y [B, T, H, P] in x's dtype, h_ckpt_new, h_run_new or None)."""
    import jax_triton as jt

    batch, heads, hdim, dstate = h_ckpt.shape
    length = x.shape[1]
    bp, bn = tiling.mamba2_block_p(batch, heads, hdim, dstate), tiling.next_pow2(dstate)
    y, h_ckpt_new, h_run_new = jt.triton_call(
        h_ckpt, n_replay, *cache, x, dt, B, C, A, D, dt_bias,
        kernel=_mamba2_verify_kernel,
        out_shape=_outputs(x, h_ckpt, (batch, length, heads, hdim)),
        grid=(hdim // bp, heads, batch),
        num_warps=tiling.num_warps(bp * bn),
        num_stages=1,
        T=length, H=heads, P=hdim, N=dstate, GX=x.shape[2], GB=B.shape[2], GC=C.shape[2], BLOCK_P=bp, BLOCK_N=bn,
        STORE_FINAL=bool(final_state),
    )
    return y, h_ckpt_new, h_run_new if final_state else None


def mamba_verify(h_ckpt, cache, n_replay, x, dt, B, C, *, A, D, dt_bias, final_state=True):
    """Fused Mamba-1 MultiStep. h_ckpt [B, C, N] fp32; cache = (x, dt, B) of the previous call and the new
    x and dt [B, T, C], B [B, T, Gb, N], C [B, T, Gc, N]; n_replay int32 [B] in [0, T]; fp32 params
    A [C, N], D and dt_bias [C]. Returns (y [B, T, C] in x's dtype, h_ckpt_new, h_run_new or None)."""
    import jax_triton as jt

    batch, channels, dstate = h_ckpt.shape
    length = x.shape[1]
    bc, bn = tiling.mamba_block_c(batch, channels, dstate), tiling.next_pow2(dstate)
    y, h_ckpt_new, h_run_new = jt.triton_call(
        h_ckpt, n_replay, *cache, x, dt, B, C, A, D, dt_bias,
        kernel=_mamba_verify_kernel,
        out_shape=_outputs(x, h_ckpt, (batch, length, channels)),
        grid=(channels // bc, batch),
        num_warps=tiling.num_warps(bc * bn),
        num_stages=1,
        T=length, CH=channels, N=dstate, GB=B.shape[2], GC=C.shape[2], BLOCK_C=bc, BLOCK_N=bn,
        STORE_FINAL=bool(final_state),
    )
    return y, h_ckpt_new, h_run_new if final_state else None
