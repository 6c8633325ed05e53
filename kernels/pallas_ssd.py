"""A fused Pallas forward of Mamba-2's chunked SSD scan, with the semantics of `l2m_jax.ops.ssm.ssd_chunked`.

Three stages, split like mamba_ssm's chunked scan:
  1. `_chunk_state_kernel`, one program per (batch, chunk, head): the within-chunk cumulative log-decay
     a_t = Σ_{k≤t} dt_k A (fp32) and the chunk's own contribution to the state at its end,
     S = Σ_t exp(a_end − a_t) dt_t x_t ⊗ B_t   [P, N].
  2. `_pass_kernel`, the state passing, one program per (batch, head, block of P rows): a loop over the
     chunks, h_c+1 = exp(a_end,c) h_c + S_c from h0 in fp32 registers, storing the state that enters each
     chunk. (A lax.scan in XLA did the same in one small kernel launch per chunk, which at 128 chunks cost more
     than the rest of the forward.)
  3. `_chunk_output_kernel`, one program per (batch, chunk, head, block of rows t):
     y_t = exp(a_t) C_t · h_in + Σ_{s≤t} (C_t · B_s) exp(a_t − a_s) dt_s x_s + D x_t,
     looping over the column blocks s ≤ t only (causal), accumulating in fp32.
Dot operands are in the input dtype (bf16 stays bf16, the way mamba_ssm feeds its tensor cores) with fp32
accumulation; fp32 inputs use fp32 dots at full precision. States and decays are fp32 throughout.

Gradients: `ssd_chunked_pallas` is a jax.custom_vjp. Its backward (`_backward`) recomputes stages 1-2,
runs the intra-chunk gradients in two Pallas kernels (`_bwd_columns_kernel`: the sums over later rows, giving
dx, dB and dt's direct term; `_bwd_rows_kernel`: the sums over earlier columns, giving dC), each with its part of
the log-decay gradient; the state passing runs backwards in `_pass_kernel` and the other state terms are fp32
einsums in XLA.
backward="xla" instead takes the VJP of the XLA reference `ssd_chunked`: the slow path it is tested against.

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

__all__ = ["ssd_chunked_pallas", "check_ssd_tiling", "pass_states"]

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


_dot = tiling.dot


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


def _pass_kernel(add_ref, decay_ref, init_ref, emit_ref, final_ref, *, n: int, reverse: bool):
    """add [c, rows, N] fp32, decay [c] fp32, init [rows, N] -> emit [c, rows, N] (the carry entering each
    step), final [rows, N] (after the last): carry = decay[c] · carry + add[c], over c in order or reversed."""

    def step(i, carry):
        c = n - 1 - i if reverse else i
        emit_ref[c] = carry
        return decay_ref[c] * carry + add_ref[c]

    final_ref[...] = jax.lax.fori_loop(0, n, step, init_ref[...].astype(_F32))


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


def _intra_block(c_rows, b_cols, x_cols, dy_rows, a_rows, a_cols, t, s):
    """One [rows t, cols s] tile of the intra-chunk backward, fp32 [rows, cols]: (C_t·B_s) exp(a_t − a_s)
    and dy_t·x_s exp(a_t − a_s) for s <= t, 0 above the diagonal, and dy_t·x_s itself."""
    decay = jnp.exp(jnp.where(t >= s, a_rows[:, None] - a_cols[None, :], -jnp.inf))
    dyx = _dot(dy_rows, x_cols, (1, 1))
    return _dot(c_rows, b_cols, (1, 1)) * decay, dyx * decay, dyx


def _bwd_columns_kernel(x_ref, dt_ref, b_ref, c_ref, acum_ref, dy_ref, dx_ref, db_ref, ddt_ref, da_ref, *,
                        rows: int, n_blocks: int):
    """The intra-chunk gradients that sum over rows t >= s, for one block of columns s: dx_s, dB_s (this
    head's share), the direct dt_s term and the −Σ_t W_ts part of the log-decay gradient, where
    W_ts = (C_t·B_s) exp(a_t − a_s) dt_s (dy_t·x_s)."""
    j = pl.program_id(3)
    cols = pl.ds(pl.multiple_of(j * rows, rows), rows)
    x_c, b_c, a_c, dt_c = x_ref[cols, :], b_ref[cols, :], acum_ref[cols], dt_ref[cols]
    s = j * rows + jax.lax.broadcasted_iota(jnp.int32, (rows, rows), 1)
    cdt = x_c.dtype

    def row_block(r, carry):
        dx, db, ddt, da = carry
        rws = pl.ds(pl.multiple_of(r * rows, rows), rows)
        c_r, dy_r = c_ref[rws, :], dy_ref[rws, :]
        t = r * rows + jax.lax.broadcasted_iota(jnp.int32, (rows, rows), 0)
        cbl, dyxl, dyx = _intra_block(c_r, b_c, x_c, dy_r, acum_ref[rws], a_c, t, s)  # [t, s]
        dx = dx + _dot((cbl * dt_c[None, :]).astype(cdt), dy_r, (0, 0))               # [s, P]
        db = db + _dot((dyxl * dt_c[None, :]).astype(cdt), c_r, (0, 0))               # [s, N]
        direct = jnp.sum(cbl * dyx, axis=0)                                            # [s]: Σ_t W_ts / dt_s
        return dx, db, ddt + direct, da - direct * dt_c

    zeros = (jnp.zeros(x_c.shape, _F32), jnp.zeros(b_c.shape, _F32), jnp.zeros((rows,), _F32),
             jnp.zeros((rows,), _F32))
    dx, db, ddt, da = jax.lax.fori_loop(j, n_blocks, row_block, zeros)    # causal: row blocks t >= s only
    dx_ref[...], db_ref[...], ddt_ref[...], da_ref[...] = dx, db, ddt, da


def _bwd_rows_kernel(x_ref, dt_ref, b_ref, c_ref, acum_ref, dy_ref, dc_ref, da_ref, *, rows: int):
    """The intra-chunk gradients that sum over columns s <= t, for one block of rows t: dC_t (this head's
    share) and the +Σ_s W_ts part of the log-decay gradient."""
    r = pl.program_id(3)
    rws = pl.ds(pl.multiple_of(r * rows, rows), rows)
    c_r, dy_r, a_r = c_ref[rws, :], dy_ref[rws, :], acum_ref[rws]
    t = r * rows + jax.lax.broadcasted_iota(jnp.int32, (rows, rows), 0)
    cdt = c_r.dtype

    def col_block(j, carry):
        dc, da = carry
        cols = pl.ds(pl.multiple_of(j * rows, rows), rows)
        b_c, dt_c = b_ref[cols, :], dt_ref[cols]
        s = j * rows + jax.lax.broadcasted_iota(jnp.int32, (rows, rows), 1)
        cbl, dyxl, dyx = _intra_block(c_r, b_c, x_ref[cols, :], dy_r, a_r, acum_ref[cols], t, s)
        return (dc + _dot((dyxl * dt_c[None, :]).astype(cdt), b_c, (1, 0)),             # [t, N]
                da + jnp.sum(cbl * dyx * dt_c[None, :], axis=1))                        # [t]: Σ_s W_ts

    dc, da = jax.lax.fori_loop(0, r + 1, col_block, (jnp.zeros(c_r.shape, _F32), jnp.zeros((rows,), _F32)))
    dc_ref[...], da_ref[...] = dc, da


# ----------------------------------------------------------------------------------------------- driver


def _operand_dtype(x, B, C):
    """bf16/f16 dots when x, B and C all share that dtype; fp32 otherwise (Triton dots need equal types)."""
    if x.dtype == B.dtype == C.dtype and x.dtype in (jnp.bfloat16, jnp.float16):
        return x.dtype
    return _F32


def _prepare(x, dt, B, C, mask, chunk: int):
    """Masked steps zeroed (dt = 0 and zero inputs: the state passes through), L padded to whole chunks the
    same way, dot operands in their dtype: (xp, dtp fp32, Bp, Cp, n_chunks, pad, operand dtype)."""
    length = x.shape[1]
    n_chunks = -(-length // chunk)
    pad = n_chunks * chunk - length
    cdt = _operand_dtype(x, B, C)
    xm, dtf, Bm, Cm = ssm_ops._zero_masked(mask, x, dt.astype(_F32), B, C)
    return (_pad_time(xm, cdt, pad), _pad_time(dtf, _F32, pad), _pad_time(Bm, cdt, pad), _pad_time(Cm, cdt, pad),
            n_chunks, pad, cdt)


def _pad_time(a, dtype, pad: int):
    a = a.astype(dtype)
    return jnp.pad(a, [(0, 0), (0, pad)] + [(0, 0)] * (a.ndim - 2)) if pad else a


def _states(xp, dtp, Bp, Af, h0, *, chunk: int, block_rows: int, interpret: bool):
    """Stages 1 and 2: (a_cum [B, H, Lp] fp32, h_in [B, c, H, P, N] fp32 (the state entering each chunk),
    h_last [B, H, P, N] fp32) of padded inputs."""
    batch, lp, heads, hdim = xp.shape
    groups, dstate = Bp.shape[-2:]
    per_group, n_chunks = heads // groups, lp // chunk

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
    h_in, h_last = pass_states(states, chunk_decay, h0, interpret=interpret)
    return a_cum, h_in, h_last


def pass_states(add, decay, init, *, reverse: bool = False, interpret: bool = False):
    """The linear recurrence across chunks in one Pallas kernel (`_pass_kernel`), fp32:
    for c = 0 .. n−1 (n−1 .. 0 when reverse): emit[c] = carry; carry = decay[b, h, c] · carry + add[b, c, h].

    add [B, c, H, P, N], decay [B, H, c], init [B, H, P, N] -> (emit [B, c, H, P, N], final carry [B, H, P, N]).
    Forward, it turns each chunk's own state into the state entering it (h_in) and the final state; reversed,
    it carries a gradient from the last chunk to the first. One program per (batch, head, block of P rows)
    keeps its tile of the carry in registers for the whole loop.
    """
    batch, n, heads, hdim, dstate = add.shape
    if decay.shape != (batch, heads, n) or init.shape != (batch, heads, hdim, dstate):
        raise ValueError(f"pass_states: add {add.shape}, decay {decay.shape} and init {init.shape} do not fit "
                         "[B, c, H, P, N], [B, H, c], [B, H, P, N]")
    rows = tiling.mamba2_block_p(batch, heads, hdim, dstate)
    seq = pl.BlockSpec((None, n, None, rows, dstate), lambda b, h, p: (b, 0, h, p, 0))
    one = pl.BlockSpec((None, None, rows, dstate), lambda b, h, p: (b, h, p, 0))
    return pl.pallas_call(
        functools.partial(_pass_kernel, n=n, reverse=reverse),
        out_shape=(jax.ShapeDtypeStruct(add.shape, _F32), jax.ShapeDtypeStruct(init.shape, _F32)),
        grid=(batch, heads, hdim // rows),
        in_specs=[seq, pl.BlockSpec((None, None, n), lambda b, h, p: (b, h, 0)), one],
        out_specs=(seq, one),
        interpret=interpret,
        compiler_params=_compiler_params(tiling.num_warps(rows * dstate), interpret),
        name="ssd_pass_states_reverse" if reverse else "ssd_pass_states",
    )(add.astype(_F32), decay.astype(_F32), init.astype(_F32))


def _chunk_specs(chunk: int, hdim: int, dstate: int, per_group: int):
    """BlockSpecs over a (batch, chunk, head, block) grid: a chunk of x-like [Q, P], dt-like [Q], B/C-like
    [Q, N] (the head's group), a_cum [Q], the entering state [P, N] and the head's scalar."""
    return dict(
        x=pl.BlockSpec((None, chunk, None, hdim), lambda b, c, h, r: (b, c, h, 0)),
        dt=pl.BlockSpec((None, chunk, None), lambda b, c, h, r: (b, c, h)),
        bc=pl.BlockSpec((None, chunk, None, dstate), lambda b, c, h, r: (b, c, h // per_group, 0)),
        acum=pl.BlockSpec((None, None, chunk), lambda b, c, h, r: (b, h, c)),
        state=pl.BlockSpec((None, None, None, hdim, dstate), lambda b, c, h, r: (b, c, h, 0, 0)),
        head=pl.BlockSpec((1,), lambda b, c, h, r: (h,)),
    )


def _forward(x, dt, A, B, C, D, h0, mask, *, chunk: int, block_rows: int, interpret: bool):
    """The fused forward; inputs validated. Returns (y [B, L, H, P] in x's dtype, h_last [B, H, P, N] fp32)."""
    batch, length, heads, hdim = x.shape
    groups, dstate = B.shape[-2:]
    xp, dtp, Bp, Cp, n_chunks, pad, _ = _prepare(x, dt, B, C, mask, chunk)
    a_cum, h_in, h_last = _states(xp, dtp, Bp, A.astype(_F32), h0, chunk=chunk, block_rows=block_rows,
                                  interpret=interpret)

    # 3. outputs, one block of rows per program
    rows = min(chunk, block_rows)
    per_chunk = chunk // rows
    sp = _chunk_specs(chunk, hdim, dstate, heads // groups)
    y_spec = pl.BlockSpec((None, rows, None, hdim), lambda b, c, h, r: (b, c * per_chunk + r, h, 0))
    Dp = jnp.zeros((heads,), _F32) if D is None else D.astype(_F32)
    y = pl.pallas_call(
        functools.partial(_chunk_output_kernel, rows=rows, has_d=D is not None),
        out_shape=jax.ShapeDtypeStruct((batch, n_chunks * chunk, heads, hdim), x.dtype),
        grid=(batch, n_chunks, heads, per_chunk),
        in_specs=[sp["x"], sp["dt"], sp["bc"], sp["bc"], sp["acum"], sp["state"], sp["head"]],
        out_specs=y_spec,
        interpret=interpret,
        compiler_params=_compiler_params(tiling.num_warps(rows * hdim), interpret),
        name="ssd_chunk_output",
    )(xp, dtp, Bp, Cp, a_cum, h_in, Dp)
    return (y[:, :length] if pad else y), h_last


def _backward(x, dt, A, B, C, D, h0, mask, dy, dh_last, *, chunk: int, block_rows: int, interpret: bool):
    """The gradients of (y, h_last) with respect to (x, dt, A, B, C, D, h0), given their cotangents.

    The O(Q²) intra-chunk terms run in two Pallas kernels per (batch, chunk, head, block): `_bwd_columns_kernel`
    (sums over t >= s: dx, dB, the direct dt term) and `_bwd_rows_kernel` (sums over s <= t: dC), each with
    its part of the gradient of the log-decays a_t. The O(Q·P·N) state terms (the entering state's part of y,
    each chunk's own state) are fp32 einsums in XLA; the state passing runs backwards in `pass_states`.
    The a_t gradient then reaches dt and A through a_t = A · Σ_{k<=t} dt_k. The forward's a_cum and entering
    states are recomputed by its stages 1-2 (cheap next to the intra-chunk work), not kept from the forward.
    """
    batch, length, heads, hdim = x.shape
    groups, dstate = B.shape[-2:]
    e = heads // groups
    xp, dtp, Bp, Cp, n_chunks, pad, cdt = _prepare(x, dt, B, C, mask, chunk)
    Af = A.astype(_F32)
    a_cum, h_in, _ = _states(xp, dtp, Bp, Af, h0, chunk=chunk, block_rows=block_rows, interpret=interpret)
    dyp = _pad_time(dy, cdt, pad)
    lp = n_chunks * chunk

    # the intra-chunk terms
    rows = min(chunk, block_rows)
    per_chunk = chunk // rows
    sp = _chunk_specs(chunk, hdim, dstate, e)

    def block(width):
        return pl.BlockSpec((None, rows, None, width), lambda b, c, h, r: (b, c * per_chunk + r, h, 0))

    vec = pl.BlockSpec((None, None, rows), lambda b, c, h, r: (b, h, c * per_chunk + r))
    inputs, in_specs = (xp, dtp, Bp, Cp, a_cum, dyp), [sp["x"], sp["dt"], sp["bc"], sp["bc"], sp["acum"], sp["x"]]
    per_head = (batch, lp, heads)
    dx_in, db_in, ddt_in, da_cols = pl.pallas_call(
        functools.partial(_bwd_columns_kernel, rows=rows, n_blocks=per_chunk),
        out_shape=(jax.ShapeDtypeStruct((*per_head, hdim), _F32), jax.ShapeDtypeStruct((*per_head, dstate), _F32),
                   jax.ShapeDtypeStruct((batch, heads, lp), _F32), jax.ShapeDtypeStruct((batch, heads, lp), _F32)),
        grid=(batch, n_chunks, heads, per_chunk),
        in_specs=in_specs,
        out_specs=(block(hdim), block(dstate), vec, vec),
        interpret=interpret,
        compiler_params=_compiler_params(tiling.num_warps(rows * max(hdim, dstate)), interpret),
        name="ssd_bwd_columns",
    )(*inputs)
    dc_in, da_rows = pl.pallas_call(
        functools.partial(_bwd_rows_kernel, rows=rows),
        out_shape=(jax.ShapeDtypeStruct((*per_head, dstate), _F32), jax.ShapeDtypeStruct((batch, heads, lp), _F32)),
        grid=(batch, n_chunks, heads, per_chunk),
        in_specs=in_specs,
        out_specs=(block(dstate), vec),
        interpret=interpret,
        compiler_params=_compiler_params(tiling.num_warps(rows * dstate), interpret),
        name="ssd_bwd_rows",
    )(*inputs)

    # the state terms, fp32, in chunks [B, c, Q, G, E, ...] (head h = group g, member e)
    def chunked(a, *tail):
        return a.astype(_F32).reshape(batch, n_chunks, chunk, *tail)

    def per_step(v):  # [B, H, Lp] -> [B, c, Q, G, E]
        return jnp.moveaxis(v.reshape(batch, groups, e, n_chunks, chunk), (3, 4), (1, 2))

    xc, dyc = chunked(xp, groups, e, hdim), chunked(dyp, groups, e, hdim)
    dtc, Bc, Cc = chunked(dtp, groups, e), chunked(Bp, groups, dstate), chunked(Cp, groups, dstate)
    ac = per_step(a_cum)
    hin = h_in.reshape(batch, n_chunks, groups, e, hdim, dstate)
    a_end = ac[:, :, -1]                                          # [B, c, G, E]
    exp_a, to_end, decay = jnp.exp(ac), jnp.exp(a_end[:, :, None] - ac), jnp.exp(a_end)

    # the state entering each chunk: its own outputs' gradient, then the reverse state passing
    dh_own = jnp.einsum("BcQGE,BcQGEP,BcQGN->BcGEPN", exp_a, dyc, Cc)

    # carried from the last chunk to the first: the gradient of the state after chunk c (= entering c + 1) is
    # that of chunk c's own state
    d_states, dh0 = pass_states(dh_own.reshape(batch, n_chunks, heads, hdim, dstate),
                                jnp.moveaxis(decay.reshape(batch, n_chunks, heads), 1, 2), dh_last,
                                reverse=True, interpret=interpret)
    d_states = d_states.reshape(batch, n_chunks, groups, e, hdim, dstate)   # [B, c, G, E, P, N]
    d_decay = jnp.sum(d_states * hin, axis=(-2, -1))              # [B, c, G, E]

    # y_t += exp(a_t) h_in C_t
    da = exp_a * jnp.sum(dyc * jnp.einsum("BcGEPN,BcQGN->BcQGEP", hin, Cc), axis=-1)
    dC = jnp.einsum("BcQGE,BcGEPN,BcQGEP->BcQGN", exp_a, hin, dyc)
    # each chunk's own state, S = Σ_s exp(a_end − a_s) dt_s x_s ⊗ B_s
    dSB = jnp.einsum("BcGEPN,BcQGN->BcQGEP", d_states, Bc)
    w = to_end * dtc
    dx = w[..., None] * dSB
    dB = jnp.einsum("BcQGE,BcQGEP,BcGEPN->BcQGN", w, xc, d_states)
    xdsb = jnp.sum(xc * dSB, axis=-1)
    ddt = to_end * xdsb
    own = w * xdsb                                               # how much each step's a_s moves S (with −)
    da = (da - own).at[:, :, -1].add(jnp.sum(own, axis=2) + d_decay * decay)

    # add the intra-chunk terms
    dx = dx + dx_in.reshape(batch, n_chunks, chunk, groups, e, hdim)
    dB = dB + jnp.sum(db_in.reshape(batch, n_chunks, chunk, groups, e, dstate), axis=4)
    dC = dC + jnp.sum(dc_in.reshape(batch, n_chunks, chunk, groups, e, dstate), axis=4)
    ddt = ddt + per_step(ddt_in)
    da = da + per_step(da_cols) + per_step(da_rows)

    # a_t = A · Σ_{k<=t} dt_k within the chunk
    Ag = Af.reshape(groups, e)
    dA = jnp.sum(da * jnp.cumsum(dtc, axis=2), axis=(0, 1, 2)).reshape(heads)
    ddt = ddt + Ag * jnp.flip(jnp.cumsum(jnp.flip(da, 2), axis=2), 2)
    dD = None
    if D is not None:
        dx = dx + D.astype(_F32).reshape(groups, e, 1) * dyc
        dD = jnp.sum(xc * dyc, axis=(0, 1, 2, 5)).reshape(heads).astype(D.dtype)

    def back_to(a, tail, like):  # [B, c, Q, ...] -> [B, L, ...] in like's dtype, 0 at masked steps
        a = a.reshape(batch, lp, *tail)[:, :length]
        if mask is not None:
            a = jnp.where(mask.reshape(mask.shape + (1,) * len(tail)), a, 0.0)
        return a.astype(like.dtype)

    grads = (back_to(dx, (heads, hdim), x), back_to(ddt, (heads,), dt), dA.astype(A.dtype),
             back_to(dB, (groups, dstate), B), back_to(dC, (groups, dstate), C), dD,
             None if h0 is None else dh0.reshape(batch, heads, hdim, dstate).astype(h0.dtype))
    return grads


@functools.partial(jax.custom_vjp, nondiff_argnums=(0, 1, 2, 3))
def _fused(chunk, block_rows, interpret, backward, x, dt, A, B, C, D, h0, mask):
    return _forward(x, dt, A, B, C, D, h0, mask, chunk=chunk, block_rows=block_rows, interpret=interpret)


def _fused_fwd(chunk, block_rows, interpret, backward, x, dt, A, B, C, D, h0, mask):
    out = _fused(chunk, block_rows, interpret, backward, x, dt, A, B, C, D, h0, mask)
    return out, (x, dt, A, B, C, D, h0, mask)


def _fused_bwd(chunk, block_rows, interpret, backward, saved, cotangents):
    x, dt, A, B, C, D, h0, mask = saved
    if backward == "pallas":
        dy, dh_last = cotangents
        return (*_backward(x, dt, A, B, C, D, h0, mask, dy, dh_last, chunk=chunk, block_rows=block_rows,
                           interpret=interpret), None)

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
    backward: str = "pallas",
) -> tuple[jax.Array, jax.Array]:
    """Mamba-2 SSD, fused forward and backward: the same arguments, semantics, dtypes and results as `ssd_chunked`.

    Args:
      x: [B, L, H, P] inputs; dt: [B, L, H] step sizes, already softplus-ed (used in fp32); A: [H] negative
      decay rates; B, C: [B, L, G, N], head h uses group h // (H // G); D: [H] skip or None; chunk: Q, a power
      of two >= 16 (any L works: padded internally with steps that leave the state unchanged); h0: [B, H, P, N]
      fp32 or None (zeros); mask: [B, L] bool, True = real token, or None; interpret: run the Pallas kernels
      in the interpreter (CPU tests); block_rows: the output kernel's row and column block and the state
      kernel's block of P, a power of two in [16, chunk] (None: 64, capped by chunk and P); backward:
      "pallas" (the fused backward, `_backward`) or "xla" (the VJP of the reference `ssd_chunked` on the saved
      inputs: the slow reference the fused one is tested against).

    Returns:
      y: [B, L, H, P] in x's dtype; h_last: [B, H, P, N] fp32.

    P and N must be powers of two >= 16 too.
    """
    with jax.named_scope("ssd_chunked_pallas"):
        ssm_ops._check_ssd(x, dt, A, B, C, D, h0, mask, time_axis=True)
        ssm_ops._check_chunk(chunk)
        check_ssd_tiling(chunk, x.shape[-1], B.shape[-1], block_rows)
        if backward not in ("pallas", "xla"):
            raise ValueError(f"backward={backward!r}: choose 'pallas' (fused) or 'xla' (the reference's VJP)")
        rows = min(chunk, _ROWS) if block_rows is None else block_rows
        return _fused(chunk, rows, bool(interpret), backward, x, dt, A, B, C, D, h0, mask)
