"""A fused Pallas forward of Mamba-2's chunked SSD scan, with the semantics of `l2m_jax.ops.ssm.ssd_chunked`.

Three stages, split like mamba_ssm's chunked scan:
  1. `_chunk_state_kernel`, one program per (batch, chunk, head): the within-chunk cumulative log-decay
     a_t = Σ_{k≤t} dt_k A (fp32) and the chunk's own contribution to the state at its end,
     S = Σ_t exp(a_end − a_t) dt_t x_t ⊗ B_t   [P, N].
  2. State passing in XLA: a lax.scan over chunks (fp32), h_c+1 = exp(a_end,c) h_c + S_c from h0, keeping
     the state that enters each chunk. Small: one [B, H, P, N] update per chunk.
  3. `_chunk_output_kernel`, one program per (batch, chunk, head, block of rows t):
     y_t = exp(a_t) C_t · h_in + Σ_{s≤t} (C_t · B_s) exp(a_t − a_s) dt_s x_s + D x_t,
     looping over the column blocks s ≤ t only (causal), accumulating in fp32.
Dot operands are in the input dtype (bf16 stays bf16, the way mamba_ssm feeds its tensor cores) with fp32
accumulation; fp32 inputs use fp32 dots at full precision. States and decays are fp32 throughout.

Gradients: `ssd_chunked_pallas` is a jax.custom_vjp whose backward is the VJP of the XLA reference
`ssd_chunked` on the saved inputs. Only the forward is fused; the backward is still XLA's (it recomputes the
reference forward), and a Pallas backward is future work.

On GPU this lowers through Pallas' Triton backend; on CPU it runs with interpret=True. Tiles are powers of
two with every dot dimension at least 16 (Triton's tl.dot), and the same rules apply in interpret mode, so
CPU tests refuse what a GPU would.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl

from l2m_jax.ops import ssm as ssm_ops

from . import tiling

__all__ = ["ssd_chunked_pallas", "check_ssd_tiling"]

_F32 = jnp.float32
_MIN_DOT = 16  # Triton's tl.dot needs every dimension >= 16
_ROWS = 64  # default block: rows (and columns) of the output kernel's [Q, Q] tiles, rows of P per state dot


def _pow2(n: int) -> bool:
    return n >= 1 and not n & (n - 1)


def check_ssd_tiling(chunk, head_dim: int, dstate: int, block_rows=None) -> None:
    """Raises a ValueError naming the fix when the fused kernels cannot tile this problem."""
    if not isinstance(chunk, int) or not _pow2(chunk) or chunk < _MIN_DOT:
        raise ValueError(
            f"backend='pallas' SSD needs chunk to be a power of two >= {_MIN_DOT} (Triton tiles), got "
            f"chunk={chunk!r}; pass chunk=64, 128 or 256, or use backend='xla' for this chunk size"
        )
    for name, n in (("P (head dim of x)", head_dim), ("N (state size of B/C)", dstate)):
        if not _pow2(n) or n < _MIN_DOT:
            raise ValueError(
                f"backend='pallas' SSD needs {name} to be a power of two >= {_MIN_DOT} (Triton tiles), got {n}; "
                "use backend='xla' for this shape"
            )
    if block_rows is not None and (
        not isinstance(block_rows, int) or not _pow2(block_rows) or not _MIN_DOT <= block_rows <= chunk
    ):
        raise ValueError(
            f"block_rows must be a power of two in [{_MIN_DOT}, chunk={chunk}], got {block_rows!r}; "
            "leave it None for the default"
        )


def _dot(a, b, contract: tuple[int, int]):
    """2-D dot with fp32 accumulation; fp32 operands at full precision (Triton's default would be TF32)."""
    precision = jax.lax.Precision.HIGHEST if a.dtype == _F32 else None
    return jax.lax.dot_general(
        a, b, (((contract[0],), (contract[1],)), ((), ())), precision=precision, preferred_element_type=_F32
    )


def _compiler_params(num_warps: int, interpret: bool):
    if interpret:
        return None
    from jax.experimental.pallas import triton as plgpu

    return plgpu.CompilerParams(num_warps=num_warps, num_stages=1)


# ----------------------------------------------------------------------------------------------- kernels


def _chunk_state_kernel(x_ref, dt_ref, b_ref, a_ref, acum_ref, state_ref, *, chunk: int, head_dim: int, rows: int):
    """x [Q, P], dt [Q] fp32, B [Q, N], A (1,) -> a_cum [Q] fp32, state [P, N] fp32."""
    dt = dt_ref[...]
    a_cum = jnp.cumsum(dt * a_ref[0])  # fp32: a long cumsum of dt·A loses bits in bf16
    acum_ref[...] = a_cum
    # the last entry, picked exactly (a sum of zeros and one value), so the last step's weight is exp(0) = 1
    last = jax.lax.broadcasted_iota(jnp.int32, (chunk,), 0) == chunk - 1
    a_end = jnp.sum(jnp.where(last, a_cum, 0.0))
    weight = jnp.exp(a_end - a_cum) * dt  # [Q]
    bw = (b_ref[...].astype(_F32) * weight[:, None]).astype(b_ref.dtype)  # [Q, N]

    def p_block(i, carry):
        p = pl.ds(pl.multiple_of(i * rows, rows), rows)
        state_ref[p, :] = _dot(x_ref[:, p], bw, (0, 0))  # [rows, N]: contracted over the chunk's steps
        return carry

    jax.lax.fori_loop(0, head_dim // rows, p_block, 0)


def _chunk_output_kernel(
    x_ref, dt_ref, b_ref, c_ref, acum_ref, h_ref, d_ref, y_ref, *, rows: int, has_d: bool
):
    """x [Q, P], dt [Q] fp32, B/C [Q, N], a_cum [Q] fp32, h_in [P, N] fp32, D (1,) -> y [rows, P]."""
    r = pl.program_id(3)
    row_ids = pl.ds(pl.multiple_of(r * rows, rows), rows)
    c_rows = c_ref[row_ids, :]  # [rows, N]
    a_rows = acum_ref[row_ids]  # [rows]
    # the state entering the chunk, decayed from the chunk start to t (inclusive)
    acc = _dot(c_rows, h_ref[...].astype(c_rows.dtype), (1, 1)) * jnp.exp(a_rows)[:, None]  # [rows, P]
    t = r * rows + jax.lax.broadcasted_iota(jnp.int32, (rows, rows), 0)

    def column_block(j, acc):
        cols = pl.ds(pl.multiple_of(j * rows, rows), rows)
        scores = _dot(c_rows, b_ref[cols, :], (1, 1))  # [rows, rows]: C_t · B_s
        s = j * rows + jax.lax.broadcasted_iota(jnp.int32, (rows, rows), 1)
        # -inf above the diagonal makes exp() exactly 0 there
        decay = jnp.exp(jnp.where(t >= s, a_rows[:, None] - acum_ref[cols][None, :], -jnp.inf))
        weights = (scores * decay * dt_ref[cols][None, :]).astype(x_ref.dtype)
        return acc + _dot(weights, x_ref[cols, :], (1, 0))

    acc = jax.lax.fori_loop(0, r + 1, column_block, acc)  # causal: column blocks s <= t only
    if has_d:
        acc = acc + d_ref[0] * x_ref[row_ids, :].astype(_F32)
    y_ref[...] = acc.astype(y_ref.dtype)


# ----------------------------------------------------------------------------------------------- driver


def _operand_dtype(x, B, C):
    """bf16/f16 dots when x, B and C all share that dtype; fp32 otherwise (Triton dots need equal types)."""
    if x.dtype == B.dtype == C.dtype and x.dtype in (jnp.bfloat16, jnp.float16):
        return x.dtype
    return _F32


def _forward(x, dt, A, B, C, D, h0, mask, *, chunk: int, block_rows: int, interpret: bool):
    """The fused forward; inputs validated. Returns (y [B, L, H, P] in x's dtype, h_last [B, H, P, N] fp32)."""
    batch, length, heads, hdim = x.shape
    groups, dstate = B.shape[-2:]
    per_group = heads // groups
    n_chunks = -(-length // chunk)
    pad = n_chunks * chunk - length
    cdt = _operand_dtype(x, B, C)

    # masked steps run with dt = 0 and zero inputs (the state passes through); padded steps likewise
    xm, dtf, Bm, Cm = ssm_ops._zero_masked(mask, x, dt.astype(_F32), B, C)

    def padded(a, dtype):
        a = a.astype(dtype)
        return jnp.pad(a, [(0, 0), (0, pad)] + [(0, 0)] * (a.ndim - 2)) if pad else a

    xp, dtp, Bp, Cp = padded(xm, cdt), padded(dtf, _F32), padded(Bm, cdt), padded(Cm, cdt)
    Af = A.astype(_F32)
    lp = n_chunks * chunk

    # 1. per-chunk cumulative log-decays and state contributions
    x_spec = pl.BlockSpec((None, chunk, None, hdim), lambda b, c, h: (b, c, h, 0))
    dt_spec = pl.BlockSpec((None, chunk, None), lambda b, c, h: (b, c, h))
    bc_spec = pl.BlockSpec((None, chunk, None, dstate), lambda b, c, h: (b, c, h // per_group, 0))
    head = pl.BlockSpec((1,), lambda b, c, h: (h,))
    acum_spec = pl.BlockSpec((None, None, chunk), lambda b, c, h: (b, h, c))
    state_spec = pl.BlockSpec((None, None, None, hdim, dstate), lambda b, c, h: (b, c, h, 0, 0))
    a_cum, states = pl.pallas_call(
        functools.partial(_chunk_state_kernel, chunk=chunk, head_dim=hdim, rows=min(hdim, block_rows)),
        out_shape=(
            jax.ShapeDtypeStruct((batch, heads, lp), _F32),  # [B, H, L]
            jax.ShapeDtypeStruct((batch, n_chunks, heads, hdim, dstate), _F32),  # [B, c, H, P, N]
        ),
        grid=(batch, n_chunks, heads),
        in_specs=[x_spec, dt_spec, bc_spec, head],
        out_specs=(acum_spec, state_spec),
        interpret=interpret,
        # it holds the weighted B [Q, N], a slice of x [Q, rows] and a [rows, N] result at once: 8 warps
        # keep that within registers for Q = 256, N = 128
        compiler_params=_compiler_params(8 if chunk * dstate >= 16384 else 4, interpret),
        name="ssd_chunk_state",
    )(xp, dtp, Bp, Af)

    # 2. state passing across chunks, fp32, from h0
    chunk_decay = jnp.exp(a_cum.reshape(batch, heads, n_chunks, chunk)[..., -1])  # [B, H, c]
    if h0 is None:
        h0 = jnp.zeros((batch, heads, hdim, dstate), _F32)

    def carry_over(h, inputs):  # h: [B, H, P, N], the state entering the chunk
        decay, own = inputs
        return decay[..., None, None] * h + own, h

    h_last, h_in = jax.lax.scan(carry_over, h0, (jnp.moveaxis(chunk_decay, 2, 0), jnp.moveaxis(states, 1, 0)))
    h_in = jnp.moveaxis(h_in, 0, 1)  # [B, c, H, P, N]

    # 3. outputs, one block of rows per program
    rows = min(chunk, block_rows)
    per_chunk = chunk // rows
    x_spec = pl.BlockSpec((None, chunk, None, hdim), lambda b, c, h, r: (b, c, h, 0))
    dt_spec = pl.BlockSpec((None, chunk, None), lambda b, c, h, r: (b, c, h))
    bc_spec = pl.BlockSpec((None, chunk, None, dstate), lambda b, c, h, r: (b, c, h // per_group, 0))
    acum_spec = pl.BlockSpec((None, None, chunk), lambda b, c, h, r: (b, h, c))
    state_spec = pl.BlockSpec((None, None, None, hdim, dstate), lambda b, c, h, r: (b, c, h, 0, 0))
    head = pl.BlockSpec((1,), lambda b, c, h, r: (h,))
    y_spec = pl.BlockSpec((None, rows, None, hdim), lambda b, c, h, r: (b, c * per_chunk + r, h, 0))
    Dp = jnp.zeros((heads,), _F32) if D is None else D.astype(_F32)
    y = pl.pallas_call(
        functools.partial(_chunk_output_kernel, rows=rows, has_d=D is not None),
        out_shape=jax.ShapeDtypeStruct((batch, lp, heads, hdim), x.dtype),
        grid=(batch, n_chunks, heads, per_chunk),
        in_specs=[x_spec, dt_spec, bc_spec, bc_spec, acum_spec, state_spec, head],
        out_specs=y_spec,
        interpret=interpret,
        compiler_params=_compiler_params(tiling.num_warps(rows * hdim), interpret),
        name="ssd_chunk_output",
    )(xp, dtp, Bp, Cp, a_cum, h_in, Dp)
    return (y[:, :length] if pad else y), h_last


@functools.partial(jax.custom_vjp, nondiff_argnums=(0, 1, 2))
def _fused(chunk, block_rows, interpret, x, dt, A, B, C, D, h0, mask):
    return _forward(x, dt, A, B, C, D, h0, mask, chunk=chunk, block_rows=block_rows, interpret=interpret)


def _fused_fwd(chunk, block_rows, interpret, x, dt, A, B, C, D, h0, mask):
    out = _fused(chunk, block_rows, interpret, x, dt, A, B, C, D, h0, mask)
    return out, (x, dt, A, B, C, D, h0, mask)


def _fused_bwd(chunk, block_rows, interpret, saved, cotangents):
    del block_rows, interpret
    x, dt, A, B, C, D, h0, mask = saved

    def reference(x, dt, A, B, C, D, h0):
        return ssm_ops.ssd_chunked(x, dt, A, B, C, chunk=chunk, D=D, h0=h0, mask=mask)

    _, vjp = jax.vjp(reference, x, dt, A, B, C, D, h0)
    return (*vjp(cotangents), None)  # the mask is not differentiable


_fused.defvjp(_fused_fwd, _fused_bwd)


def ssd_chunked_pallas(
    x: jax.Array,  # [B, L, H, P]
    dt: jax.Array,  # [B, L, H]
    A: jax.Array,  # [H]
    B: jax.Array,  # [B, L, G, N]
    C: jax.Array,  # [B, L, G, N]
    D: jax.Array | None = None,  # [H]
    *,
    chunk: int = 256,
    h0: jax.Array | None = None,  # [B, H, P, N] fp32
    mask: jax.Array | None = None,  # [B, L] bool
    interpret: bool = False,
    block_rows: int | None = None,
) -> tuple[jax.Array, jax.Array]:
    """Mamba-2 SSD, fused forward: the same arguments, semantics, dtypes and results as `ssd_chunked`.

    Args:
      x: [B, L, H, P] inputs; dt: [B, L, H] step sizes, already softplus-ed (used in fp32); A: [H] negative
      decay rates; B, C: [B, L, G, N], head h uses group h // (H // G); D: [H] skip or None; chunk: Q, a power
      of two >= 16 (any L works: padded internally with steps that leave the state unchanged); h0: [B, H, P, N]
      fp32 or None (zeros); mask: [B, L] bool, True = real token, or None; interpret: run the Pallas kernels
      in the interpreter (CPU tests); block_rows: the output kernel's row and column block and the state
      kernel's block of P, a power of two in [16, chunk] (None: 64, capped by chunk and P).

    Returns:
      y: [B, L, H, P] in x's dtype; h_last: [B, H, P, N] fp32.

    P and N must be powers of two >= 16 too. The forward is fused; the backward is the VJP of the XLA
    reference `ssd_chunked` on the saved inputs (it recomputes the reference forward). A Pallas backward is
    future work.
    """
    with jax.named_scope("ssd_chunked_pallas"):
        ssm_ops._check_ssd(x, dt, A, B, C, D, h0, mask, time_axis=True)
        ssm_ops._check_chunk(chunk)
        check_ssd_tiling(chunk, x.shape[-1], B.shape[-1], block_rows)
        rows = min(chunk, _ROWS) if block_rows is None else block_rows
        return _fused(chunk, rows, bool(interpret), x, dt, A, B, C, D, h0, mask)
