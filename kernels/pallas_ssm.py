"""Pallas kernels for the SSM decode step and the fused multi-step verification.

One kernel body (`_token_loops`) serves both jobs and both variants. Each program owns a tile of the state
([bp, N] rows of one Mamba-2 head, or [bc, N] channels of Mamba-1), loads it once and keeps it in registers
while it
  (verify) replays the first n_replay[b] cached steps without outputs, stores the checkpoint,
  then runs the T new tokens, writing y per token, and stores the final state unless final_state=False (the
  models' verifier replays from the checkpoint and never reads it);
  (update) runs the single new token and stores the state.
So the big state crosses HBM once in and once out (update; verify with final_state=False) or twice out (verify).

On GPU this lowers through Pallas' Triton backend (tiles must then be powers of two); on CPU it runs with
interpret=True. Inputs are assumed validated by dispatch.py.

`set_form(form)` (read when a kernel is traced) picks how the verification runs its tokens:
  "loop"      (default) fori_loops over the replay and the new tokens, as above;
  "unrolled"  both token loops unrolled into straight-line code: every per-token load then has a static address
              the compiler can issue ahead of the state updates, and the replay runs all T cached steps with
              the ones past n_replay masked out (jnp.where) instead of a loop of data-dependent length;
  "matrix"    Mamba-2 verification with no per-token loop at all (`_mamba2_matrix_kernel`): the token block is
              one chunk of the SSD form. Its inputs are loaded once as [T', ...] tiles (T' = T rounded up to a
              power of two >= 16, zero-padded), the replay becomes one chunk state
              h_ckpt = e^{Σl} h + Σ_s e^{Σ_{u>s} l_u} Δ_s x_s ⊗ B_s (a dot over the cached tokens, the steps past
              n_replay given Δ = 0), the outputs the chunk's quadratic form
              y_t = e^{L_t} C_t · h_ckpt + Σ_{s≤t} e^{L_t − L_s} Δ_s (C_t · B_s) x_s + D x_t, and the final state
              a second chunk state; five small dots. The state dots run in 3-pass TF32 on a GPU (close to fp32;
              plain TF32 would cost the state bits). Mamba-1 (a decay per channel and state entry, no matrix
              form) and the single step keep their loops.
Same results (to rounding); which is fastest is a GPU measurement (experiments/bench_verify.py
--pallas-forms), so "loop" stays the default until one says otherwise.
"""

from __future__ import annotations

import contextlib
import functools
import math

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl

from . import tiling

__all__ = ["FORMS", "backend_form", "mamba2_update", "mamba2_verify", "mamba_update", "mamba_verify", "set_form"]

_F32 = jnp.float32
FORMS = ("loop", "unrolled", "matrix")
FORM = "loop"  # see set_form


def set_form(form: str) -> None:
    """How the kernels traced from now on run their tokens: one of FORMS (module docstring). l2m_jax's jitted entry
    points key their programs on it (`l2m_jax.ops.switches`)."""
    global FORM
    if form not in FORMS:
        raise ValueError(f"set_form takes one of {FORMS}, got {form!r}")
    FORM = form


@contextlib.contextmanager
def backend_form(name: str):
    """For benchmarks naming a form in the backend: "pallas-unrolled" / "pallas-matrix" yield "pallas" with that
    form set while inside (trace the op inside); any other name is yielded as it is, with the "loop" form."""
    form = name[len("pallas-"):] if name.startswith("pallas-") else "loop"
    set_form(form)                                        # refuses an unknown form by name
    try:
        yield "pallas" if name.startswith("pallas-") else name
    finally:
        set_form("loop")


def _softplus(v):
    # log1p(exp(-|v|)) never overflows; same function as jax.nn.softplus
    return jnp.maximum(v, 0.0) + jnp.log1p(jnp.exp(-jnp.abs(v)))


def _compiler_params(tile_elements: int, interpret: bool):
    if interpret:
        return None
    from jax.experimental.pallas import triton as plgpu

    return plgpu.CompilerParams(num_warps=tiling.num_warps(tile_elements), num_stages=1)


def _check_pow2(interpret: bool, **sizes: int) -> None:
    if interpret:
        return
    for name, n in sizes.items():
        if n & (n - 1):
            raise ValueError(
                f"backend='pallas' on GPU needs {name} to be a power of two (Triton tiles), got {name}={n}; "
                "use backend='triton' or backend='xla' for this shape"
            )


def _token_loops(refs, length, replay, make_step, unroll=False, store_final=True):
    """The kernel body shared by both variants: replay (verify only), checkpoint, new tokens, final state.

    make_step(A_ref, D_ref, dt_bias_ref) -> (advance, output) with advance(h, x, dt, B) -> (h, x_fp32)
    and output(h, x_fp32, C) -> y. unroll: straight-line loops (module docstring). store_final=False (verify
    only): the state after the new tokens is not written (the verifier replays from the checkpoint instead).
    """
    if replay:
        n_ref, h_ref, cx_ref, cdt_ref, cb_ref, *refs = refs
    else:
        h_ref, *refs = refs
    x_ref, dt_ref, b_ref, c_ref, a_ref, d_ref, bias_ref, y_ref, *state_outs = refs
    advance, output = make_step(a_ref, d_ref, bias_ref)

    def new_token(t, h):
        h, xt = advance(h, x_ref[t], dt_ref[t], b_ref[t])
        y_ref[t] = output(h, xt, c_ref[t]).astype(y_ref.dtype)
        return h

    h = h_ref[...]
    if replay and unroll:
        n = n_ref[0]
        for t in range(cx_ref.shape[0]):      # every cached step, the ones past n_replay masked out
            h = jnp.where(t < n, advance(h, cx_ref[t], cdt_ref[t], cb_ref[t])[0], h)
        state_outs[0][...] = h
    elif replay:
        h = jax.lax.fori_loop(0, n_ref[0], lambda t, h: advance(h, cx_ref[t], cdt_ref[t], cb_ref[t])[0], h)
        state_outs[0][...] = h
    if unroll:
        for t in range(length):
            h = new_token(t, h)
    else:
        h = jax.lax.fori_loop(0, length, new_token, h)
    if store_final:
        state_outs[-1][...] = h


def _mamba2_kernel(length: int, replay: bool, unroll: bool, store_final: bool = True):
    def make_step(a_ref, d_ref, bias_ref):
        a, d, bias = a_ref[0].astype(_F32), d_ref[0].astype(_F32), bias_ref[0].astype(_F32)

        def advance(h, xt, dtt, bt):  # h [bp, N], xt [bp], dtt scalar, bt [N]
            delta = _softplus(dtt.astype(_F32) + bias)
            xt = xt.astype(_F32)
            return jnp.exp(delta * a) * h + (delta * xt)[:, None] * bt.astype(_F32)[None, :], xt

        def output(h, xt, ct):
            return jnp.sum(h * ct.astype(_F32)[None, :], axis=1) + d * xt

        return advance, output

    return lambda *refs: _token_loops(refs, length, replay, make_step, unroll, store_final)


# ----------------------------------------------------------------------------------------------- Mamba-2


def _mamba2_call(h, x, dt, B, C, A, D, dt_bias, replay_args, interpret, store_final=True):
    """x [B, T, Gx, P], dt [B, T, H], B [B, T, Gb, N], C [B, T, Gc, N]; replay_args = (n, cx, cdt, cB) or None.
    Returns (y, h_new) without replay, (y, h_ckpt_new[, h_run_new if store_final]) with it."""
    batch, heads, hdim, dstate = h.shape
    length = x.shape[1]
    rx, rb, rc = heads // x.shape[2], heads // B.shape[2], heads // C.shape[2]
    bp = tiling.mamba2_block_p(batch, heads, hdim, dstate)
    _check_pow2(interpret, N=dstate, block_P=bp)

    state = pl.BlockSpec((None, None, bp, dstate), lambda b, i, p: (b, i, p, 0))
    x_spec = pl.BlockSpec((None, length, None, bp), lambda b, i, p: (b, 0, i // rx, p))
    dt_spec = pl.BlockSpec((None, length, None), lambda b, i, p: (b, 0, i))
    b_spec = pl.BlockSpec((None, length, None, dstate), lambda b, i, p: (b, 0, i // rb, 0))
    c_spec = pl.BlockSpec((None, length, None, dstate), lambda b, i, p: (b, 0, i // rc, 0))
    head = pl.BlockSpec((1,), lambda b, i, p: (i,))
    y_spec = pl.BlockSpec((None, length, None, bp), lambda b, i, p: (b, 0, i, p))

    in_specs = [state, x_spec, dt_spec, b_spec, c_spec, head, head, head]
    args = [h, x, dt, B, C, A, D, dt_bias]
    n_states = 1
    if replay_args is not None:
        n, cx, cdt, cb = replay_args
        in_specs = [pl.BlockSpec((1,), lambda b, i, p: (b,)), state, x_spec, dt_spec, b_spec] + in_specs[1:]
        args = [n, h, cx, cdt, cb] + args[1:]
        n_states = 2 if store_final else 1
    state_shape = jax.ShapeDtypeStruct(h.shape, _F32)
    outs = pl.pallas_call(
        _mamba2_kernel(length, replay_args is not None, FORM == "unrolled", store_final),
        out_shape=(jax.ShapeDtypeStruct((batch, length, heads, hdim), x.dtype),) + (state_shape,) * n_states,
        grid=(batch, heads, hdim // bp),
        in_specs=in_specs,
        out_specs=(y_spec,) + (state,) * n_states,
        interpret=interpret,
        compiler_params=_compiler_params(bp * dstate, interpret),
        name="mamba2_verify" if replay_args is not None else "mamba2_update",
    )(*args)
    return outs


def mamba2_update(h, x, dt, B, C, *, A, D, dt_bias, interpret=False):
    """One Mamba-2 step: h [B, H, P, N] fp32, x [B, Gx, P], dt [B, H], B [B, Gb, N], C [B, Gc, N]."""
    y, h_new = _mamba2_call(h, x[:, None], dt[:, None], B[:, None], C[:, None], A, D, dt_bias, None, interpret)
    return y[:, 0], h_new


def mamba2_verify(h_ckpt, cache, n_replay, x, dt, B, C, *, A, D, dt_bias, interpret=False, final_state=True):
    """Fused Mamba-2 MultiStep; shapes as in reference.ssm_verify_ref. Returns (y, h_ckpt_new, h_run_new);
    final_state=False leaves h_run_new unwritten (None): the state crosses HBM once in and once out, as in a step."""
    if FORM == "matrix":
        outs = _mamba2_matrix_call(h_ckpt, cache, n_replay, x, dt, B, C, A, D, dt_bias, interpret, final_state)
    else:
        outs = _mamba2_call(h_ckpt, x, dt, B, C, A, D, dt_bias, (n_replay, *cache), interpret, final_state)
    return outs if final_state else (*outs, None)


# ------------------------------------------------------------------------- Mamba-2 verification, matrix form

_MIN_DOT = 16  # Triton's tl.dot needs every dimension >= 16


def _state_dot(a, b, contract: tuple[int, int], interpret: bool):
    """tiling.dot of fp32 operands: on a GPU 3-pass TF32 (error ~1e-6, like fp32; one pass of TF32 would round
    the state to 10 mantissa bits) on the tensor cores; in interpret mode full fp32."""
    return tiling.dot(a, b, contract, None if interpret else jax.lax.DotAlgorithmPreset.TF32_TF32_F32_X3)


def _mamba2_matrix_kernel(tokens: int, rows: int, interpret: bool, store_final: bool = True):
    """One program per (batch row, head, group of P rows): the T new tokens (and the T cached ones) as one SSD
    chunk (module docstring). Token tiles are [T', ...] with rows >= tokens zero-padded. What depends only on the
    head (Δ, decays, C·Bᵀ) is computed once; the program's P rows then go through in blocks of `rows`."""

    def kernel(n_ref, h_ref, cx_ref, cdt_ref, cb_ref, x_ref, dt_ref, b_ref, c_ref, a_ref, d_ref, bias_ref,
               y_ref, ckpt_ref, *run_ref):
        dot = functools.partial(_state_dot, interpret=interpret)
        padded = x_ref.shape[0]
        a, d, bias = a_ref[0].astype(_F32), d_ref[0].astype(_F32), bias_ref[0].astype(_F32)
        step = jax.lax.broadcasted_iota(jnp.int32, (padded,), 0)

        def chunk(dt_ref, b_ref, count):
            """Δ (0 past count: those steps leave the state as it is), the cumulative log-decay L_t, its total
            and the weights of the chunk state e^{total} h + Σ_s e^{total − L_s} Δ_s x_s ⊗ B_s."""
            delta = jnp.where(step < count, _softplus(dt_ref[...].astype(_F32) + bias), 0.0)
            cum = jnp.cumsum(delta * a)
            total = jnp.sum(delta * a)
            return delta, cum, total, b_ref[...].astype(_F32) * (jnp.exp(total - cum) * delta)[:, None]  # [T', N]

        _, _, total_c, weighted_c = chunk(cdt_ref, cb_ref, n_ref[0])
        delta, cum, total, weighted = chunk(dt_ref, b_ref, tokens)
        c = c_ref[...].astype(_F32)                                                            # [T', N]
        t = jax.lax.broadcasted_iota(jnp.int32, (padded, padded), 0)
        s = jax.lax.broadcasted_iota(jnp.int32, (padded, padded), 1)
        # -inf above the diagonal makes exp() exactly 0 there (and never overflows)
        decay = jnp.exp(jnp.where(t >= s, cum[:, None] - cum[None, :], -jnp.inf))
        mix = dot(c, b_ref[...].astype(_F32), (1, 1)) * decay * delta[None, :]                # [T', T']
        decay_in = jnp.exp(cum)[:, None]

        def block(i, carry):
            p = pl.ds(0 if isinstance(i, int) else pl.multiple_of(i * rows, rows), rows)
            h_ckpt = jnp.exp(total_c) * h_ref[p, :] + dot(cx_ref[:, p].astype(_F32), weighted_c, (0, 0))  # [rows, N]
            ckpt_ref[p, :] = h_ckpt
            x = x_ref[:, p].astype(_F32)                                                       # [T', rows]
            if store_final:
                run_ref[0][p, :] = jnp.exp(total) * h_ckpt + dot(x, weighted, (0, 0))
            y = decay_in * dot(c, h_ckpt, (1, 1)) + dot(mix, x, (1, 0)) + d * x               # [T', rows]
            y_ref[:, p] = y.astype(y_ref.dtype)
            return carry

        blocks = h_ref.shape[0] // rows
        if blocks == 1:
            block(0, 0)
        else:
            jax.lax.fori_loop(0, blocks, block, 0)

    return kernel


def check_matrix_tiling(head_dim: int, dstate: int) -> None:
    """Raises a ValueError naming the fix where the matrix form cannot tile a Mamba-2 state [P, N]."""
    for name, n in (("P (head dim)", head_dim), ("N (state size)", dstate)):
        if n < _MIN_DOT or n & (n - 1):
            raise ValueError(
                f"the matrix form of the pallas verification needs {name} to be a power of two >= {_MIN_DOT} "
                f"(Triton's dot tiles), got {n}; use pallas_ssm.set_form('loop') for this shape"
            )


def _mamba2_matrix_call(h, cache, n_replay, x, dt, B, C, A, D, dt_bias, interpret, store_final=True):
    """x [B, T, Gx, P], dt [B, T, H], B [B, T, Gb, N], C [B, T, Gc, N]; cache = (x, dt, B) like the new ones."""
    batch, heads, hdim, dstate = h.shape
    tokens = x.shape[1]
    check_matrix_tiling(hdim, dstate)
    padded = max(_MIN_DOT, tiling.next_pow2(tokens))

    def pad(a):  # zero rows past the T tokens: their Δ is masked to 0 in the kernel and their y dropped
        return jnp.pad(a, [(0, 0), (0, padded - tokens)] + [(0, 0)] * (a.ndim - 2))

    rx, rb, rc = heads // x.shape[2], heads // B.shape[2], heads // C.shape[2]
    bp, blocks = tiling.mamba2_matrix_tiles(batch, heads, hdim, dstate)
    rows = bp
    bp *= blocks                                               # P rows per program, in `blocks` blocks of `rows`
    state = pl.BlockSpec((None, None, bp, dstate), lambda b, i, p: (b, i, p, 0))
    x_spec = pl.BlockSpec((None, padded, None, bp), lambda b, i, p: (b, 0, i // rx, p))
    dt_spec = pl.BlockSpec((None, padded, None), lambda b, i, p: (b, 0, i))
    b_spec = pl.BlockSpec((None, padded, None, dstate), lambda b, i, p: (b, 0, i // rb, 0))
    c_spec = pl.BlockSpec((None, padded, None, dstate), lambda b, i, p: (b, 0, i // rc, 0))
    head = pl.BlockSpec((1,), lambda b, i, p: (i,))
    y_spec = pl.BlockSpec((None, padded, None, bp), lambda b, i, p: (b, 0, i, p))
    state_shape = jax.ShapeDtypeStruct(h.shape, _F32)
    n_states = 2 if store_final else 1
    y, *states = pl.pallas_call(
        _mamba2_matrix_kernel(tokens, rows, interpret, store_final),
        out_shape=(jax.ShapeDtypeStruct((batch, padded, heads, hdim), x.dtype),) + (state_shape,) * n_states,
        grid=(batch, heads, hdim // bp),
        in_specs=[pl.BlockSpec((1,), lambda b, i, p: (b,)), state, x_spec, dt_spec, b_spec,
                  x_spec, dt_spec, b_spec, c_spec, head, head, head],
        out_specs=(y_spec,) + (state,) * n_states,
        interpret=interpret,
        compiler_params=_compiler_params(rows * dstate, interpret),
        name="mamba2_verify_matrix",
    )(n_replay, h, *map(pad, cache), *map(pad, (x, dt, B, C)), A, D, dt_bias)
    return (y[:, :tokens], *states)


# ----------------------------------------------------------------------------------------------- Mamba-1


def _mamba_kernel(length: int, replay: bool, unroll: bool, store_final: bool = True):
    def make_step(a_ref, d_ref, bias_ref):
        a = a_ref[...].astype(_F32)  # [bc, N]
        d, bias = d_ref[...].astype(_F32), bias_ref[...].astype(_F32)  # [bc]

        def advance(h, xt, dtt, bt):  # h [bc, N], xt and dtt [bc], bt [N]
            delta = _softplus(dtt.astype(_F32) + bias)
            xt = xt.astype(_F32)
            return jnp.exp(delta[:, None] * a) * h + (delta * xt)[:, None] * bt.astype(_F32)[None, :], xt

        def output(h, xt, ct):
            return jnp.sum(h * ct.astype(_F32)[None, :], axis=1) + d * xt

        return advance, output

    return lambda *refs: _token_loops(refs, length, replay, make_step, unroll, store_final)


def _mamba_call(h, x, dt, B, C, A, D, dt_bias, replay_args, interpret, store_final=True):
    """x, dt [B, T, C]; B [B, T, Gb, N]; C [B, T, Gc, N]; replay_args = (n, cx, cdt, cB) or None."""
    batch, channels, dstate = h.shape
    length = x.shape[1]
    per_b, per_c = channels // B.shape[2], channels // C.shape[2]
    # a block must sit inside one B group and one C group: each program reads one row of each
    bc = tiling.mamba_block_c(batch, channels, dstate, aligned_to=math.gcd(per_b, per_c))
    _check_pow2(interpret, N=dstate, block_C=bc)

    state = pl.BlockSpec((None, bc, dstate), lambda b, j: (b, j, 0))
    chan = pl.BlockSpec((None, length, bc), lambda b, j: (b, 0, j))
    b_spec = pl.BlockSpec((None, length, None, dstate), lambda b, j: (b, 0, (j * bc) // per_b, 0))
    c_spec = pl.BlockSpec((None, length, None, dstate), lambda b, j: (b, 0, (j * bc) // per_c, 0))
    a_spec = pl.BlockSpec((bc, dstate), lambda b, j: (j, 0))
    vec = pl.BlockSpec((bc,), lambda b, j: (j,))

    in_specs = [state, chan, chan, b_spec, c_spec, a_spec, vec, vec]
    args = [h, x, dt, B, C, A, D, dt_bias]
    n_states = 1
    if replay_args is not None:
        n, cx, cdt, cb = replay_args
        in_specs = [pl.BlockSpec((1,), lambda b, j: (b,)), state, chan, chan, b_spec] + in_specs[1:]
        args = [n, h, cx, cdt, cb] + args[1:]
        n_states = 2 if store_final else 1
    state_shape = jax.ShapeDtypeStruct(h.shape, _F32)
    return pl.pallas_call(
        _mamba_kernel(length, replay_args is not None, FORM == "unrolled", store_final),
        out_shape=(jax.ShapeDtypeStruct((batch, length, channels), x.dtype),) + (state_shape,) * n_states,
        grid=(batch, channels // bc),
        in_specs=in_specs,
        out_specs=(chan,) + (state,) * n_states,
        interpret=interpret,
        compiler_params=_compiler_params(bc * dstate, interpret),
        name="mamba_verify" if replay_args is not None else "mamba_update",
    )(*args)


def mamba_update(h, x, dt, B, C, *, A, D, dt_bias, interpret=False):
    """One Mamba-1 step: h [B, C, N] fp32, x and dt [B, C], B [B, Gb, N], C [B, Gc, N]."""
    y, h_new = _mamba_call(h, x[:, None], dt[:, None], B[:, None], C[:, None], A, D, dt_bias, None, interpret)
    return y[:, 0], h_new


def mamba_verify(h_ckpt, cache, n_replay, x, dt, B, C, *, A, D, dt_bias, interpret=False, final_state=True):
    """Fused Mamba-1 MultiStep; shapes as in reference.ssm_verify_ref. Returns (y, h_ckpt_new, h_run_new), h_run_new
    None (not written) with final_state=False."""
    outs = _mamba_call(h_ckpt, x, dt, B, C, A, D, dt_bias, (n_replay, *cache), interpret, final_state)
    return outs if final_state else (*outs, None)
