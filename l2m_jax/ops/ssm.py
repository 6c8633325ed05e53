"""Selective state-space recurrences: Mamba-2 SSD and Mamba-1 selective scan.

Mamba-2 (one scalar decay per head h; B and C shared by the heads of a group, head h uses group
h // (H // G), block-contiguous like GQA's repeat_kv):
    S_t = exp(dt_t A) S_{t-1} + dt_t x_t ⊗ B_t          S: [P, N] per head
    y_t = S_t C_t + D x_t
Mamba-1 (a decay per channel c and state dim n; channel c uses group c // (C // G)):
    h_t = exp(Δ_t A) ⊙ h_{t-1} + Δ_t B_t u_t            h: [N] per channel
    y_t = C_t · h_t + D u_t

Every op takes dt / Δ already softplus-ed. A mask [B, L] (True = real token) makes masked steps leave the
state unchanged (they run with dt = 0 and zero inputs, so pad garbage, even NaN, cannot leak); their outputs
are finite but meaningless. States, decays and cumulative log-decays are fp32; outputs come back in the dtype
of x / u. No z gating here (mixers do it).

Einsum letters follow the legend in ops/__init__.py, plus: c = chunk index, R = a second position inside a
chunk (the source position, Q being the target), E = heads per group (H // G).
"""

from __future__ import annotations

import contextlib

import jax
import jax.numpy as jnp

__all__ = [
    "ssd_chunked",
    "ssd_sequential",
    "ssd_step",
    "selective_scan",
    "selective_scan_sequential",
    "selective_step",
]

_F32 = jnp.float32

# The full-sequence SSD scan the Mamba-2 mixer runs in training and prefill: "xla" (`ssd_chunked`) or "pallas"
# (kernels/pallas_ssd.py, fused forward and backward; interpret=True runs it on a CPU). Read at trace time.
SSD_BACKEND = ("xla", False)


def set_ssd_backend(backend: str, *, interpret: bool = False) -> None:
    """Switch the Mamba-2 mixer's full-sequence scan for programs traced afterwards (`l2m_jax.ops.switches`: the
    library's jitted entry points key their programs on it)."""
    global SSD_BACKEND
    if backend not in ("xla", "pallas"):
        raise ValueError(f"ssd backend {backend!r}: choose 'xla' (ssd_chunked) or 'pallas' (the fused kernels)")
    if interpret and backend != "pallas":
        raise ValueError("interpret=True applies to the 'pallas' SSD backend only")
    SSD_BACKEND = (backend, bool(interpret))


@contextlib.contextmanager
def ssd_backend(backend: str, *, interpret: bool = False):
    """`with ssd_backend("pallas"): ...` traces the Mamba-2 mixers inside with it, then restores the previous."""
    saved = SSD_BACKEND
    set_ssd_backend(backend, interpret=interpret)
    try:
        yield
    finally:
        set_ssd_backend(saved[0], interpret=saved[1])


def _shape_error(name: str, got, want: str, fix: str = "") -> ValueError:
    return ValueError(f"{name} must have shape {want}, got {tuple(got)}" + (f"; {fix}" if fix else ""))


def _check_mask(mask, batch: int, length: int) -> None:
    if mask is not None and (tuple(mask.shape) != (batch, length) or mask.dtype != jnp.bool_):
        raise ValueError(
            f"mask must be bool [B, L] = [{batch}, {length}] (True = real token), got {mask.dtype}{tuple(mask.shape)}"
        )


def _check_state(h, want: tuple, name: str) -> None:
    if tuple(h.shape) != want:
        raise _shape_error(name, h.shape, str(list(want)))
    if h.dtype != _F32:
        raise ValueError(
            f"{name} must be float32 (SSM states are kept in fp32), got {h.dtype}; cast it with .astype(jnp.float32)"
        )


def _check_chunk(chunk) -> None:
    if not isinstance(chunk, int) or chunk < 1:
        raise ValueError(f"chunk must be a positive int, got {chunk!r}")


# --------------------------------------------------------------------------------------------- Mamba-2 SSD


def _check_ssd(x, dt, A, B, C, D, h0, mask, time_axis: bool) -> tuple[int, int]:
    """Validates SSD arguments; returns (heads H, groups G)."""
    lead = "[B, L, " if time_axis else "[B, "
    if x.ndim != (4 if time_axis else 3):
        raise _shape_error("x", x.shape, lead + "H, P]")
    heads = x.shape[-2]
    if tuple(dt.shape) != tuple(x.shape[:-1]):
        raise _shape_error("dt", dt.shape, f"{list(x.shape[:-1])} (x's shape without P)")
    if tuple(A.shape) != (heads,):
        raise _shape_error("A", A.shape, f"[H] = [{heads}]")
    if B.ndim != x.ndim or tuple(B.shape[:-2]) != tuple(x.shape[:-2]):
        raise _shape_error("B", B.shape, lead + "G, N] matching x's leading axes")
    if tuple(C.shape) != tuple(B.shape):
        raise _shape_error("C", C.shape, f"{list(B.shape)} (same as B)")
    groups = B.shape[-2]
    if groups < 1 or heads % groups:
        raise ValueError(f"the group count G={groups} of B/C must divide the head count H={heads} of x")
    if D is not None and tuple(D.shape) != (heads,):
        raise _shape_error("D", D.shape, f"[H] = [{heads}]")
    if h0 is not None:
        _check_state(h0, (x.shape[0], heads, x.shape[-1], B.shape[-1]), "h0 / h")
    if time_axis:
        _check_mask(mask, x.shape[0], x.shape[1])
    return heads, groups


def _zero_masked(mask, *arrays):
    """Zeros every [B, L, ...] array at masked steps, so pad garbage (even NaN) cannot leak through a product."""
    if mask is None:
        return arrays
    return tuple(jnp.where(mask.reshape(mask.shape + (1,) * (a.ndim - 2)), a, jnp.zeros((), a.dtype)) for a in arrays)


def ssd_step(
    h: jax.Array,  # [B, H, P, N] fp32
    x: jax.Array,  # [B, H, P]
    dt: jax.Array,  # [B, H]
    A: jax.Array,  # [H]
    B: jax.Array,  # [B, G, N]
    C: jax.Array,  # [B, G, N]
    D: jax.Array | None = None,  # [H]
) -> tuple[jax.Array, jax.Array]:
    """One Mamba-2 recurrence step.

    Returns y [B, H, P] in x's dtype and h_new [B, H, P, N] fp32.
    """
    heads, groups = _check_ssd(x, dt, A, B, C, D, h, None, time_axis=False)
    batch, _, hdim = x.shape
    e = heads // groups
    xf = x.astype(_F32).reshape(batch, groups, e, hdim)
    dtf = dt.astype(_F32).reshape(batch, groups, e)
    decay = jnp.exp(dtf * A.astype(_F32).reshape(groups, e))  # [B, G, E]
    hg = h.reshape(batch, groups, e, hdim, -1)
    hg = decay[..., None, None] * hg + jnp.einsum("BGE,BGEP,BGN->BGEPN", dtf, xf, B.astype(_F32))
    y = jnp.einsum("BGEPN,BGN->BGEP", hg, C.astype(_F32)).reshape(batch, heads, hdim)
    if D is not None:
        y = y + D.astype(_F32)[:, None] * x.astype(_F32)
    return y.astype(x.dtype), hg.reshape(h.shape)


def ssd_sequential(
    x: jax.Array,  # [B, L, H, P]
    dt: jax.Array,  # [B, L, H]
    A: jax.Array,  # [H]
    B: jax.Array,  # [B, L, G, N]
    C: jax.Array,  # [B, L, G, N]
    *,
    chunk: int = 256,
    D: jax.Array | None = None,  # [H]
    h0: jax.Array | None = None,  # [B, H, P, N] fp32
    mask: jax.Array | None = None,  # [B, L] bool
) -> tuple[jax.Array, jax.Array]:
    """Reference for `ssd_chunked`: a lax.scan of `ssd_step` over time (`chunk` is accepted and ignored)."""
    del chunk
    _check_ssd(x, dt, A, B, C, D, h0, mask, time_axis=True)
    if h0 is None:
        h0 = jnp.zeros((x.shape[0], x.shape[2], x.shape[3], B.shape[-1]), _F32)
    # masked steps run with dt = 0, x = 0: decay 1 and no input, so the state passes through
    x, dt, B, C = _zero_masked(mask, x, dt.astype(_F32), B, C)

    def step(h, inputs):
        y, h = ssd_step(h, *inputs[:2], A, *inputs[2:], D)
        return h, y

    seq = tuple(jnp.moveaxis(a, 1, 0) for a in (x, dt, B, C))
    h_last, ys = jax.lax.scan(step, h0, seq)
    return jnp.moveaxis(ys, 0, 1), h_last


def _segsum(a: jax.Array) -> jax.Array:  # [..., Q] -> [..., Q, R]
    """out[..., q, r] = sum_{r < k <= q} a[k] for q >= r, -inf above the diagonal.

    Summing the masked terms directly (rather than differencing one long cumsum) keeps small decays exact
    even when the chunk's total log-decay is large; -inf above the diagonal makes exp() exactly 0 there
    without ever exponentiating a positive number.
    """
    q = a.shape[-1]
    below = jnp.tril(jnp.ones((q, q), bool), -1)  # k > r
    terms = jnp.where(below, a[..., :, None], 0.0)  # [..., k, r]
    sums = jnp.cumsum(terms, axis=-2)  # [..., q, r]
    return jnp.where(jnp.tril(jnp.ones((q, q), bool)), sums, -jnp.inf)


def ssd_chunked(
    x: jax.Array,  # [B, L, H, P]
    dt: jax.Array,  # [B, L, H]
    A: jax.Array,  # [H]
    B: jax.Array,  # [B, L, G, N]
    C: jax.Array,  # [B, L, G, N]
    *,
    chunk: int = 256,
    D: jax.Array | None = None,  # [H]
    h0: jax.Array | None = None,  # [B, H, P, N] fp32
    mask: jax.Array | None = None,  # [B, L] bool
) -> tuple[jax.Array, jax.Array]:
    """Mamba-2 SSD as a chunked scan: exact quadratic form inside chunks, state passing between them.

    Args:
      x: [B, L, H, P] inputs (values).
      dt: [B, L, H] step sizes, already softplus-ed (used in fp32).
      A: [H] negative decay rates (-exp(A_log)).
      B: [B, L, G, N] input projections (keys); head h uses group h // (H // G).
      C: [B, L, G, N] output projections (queries), grouped like B.
      chunk: Q, chunk length; any L works (padded internally with steps that leave the state unchanged).
      D: [H] skip connection or None.
      h0: [B, H, P, N] fp32 initial state or None (zeros).
      mask: [B, L] bool, True = real token, or None.

    Returns:
      y: [B, L, H, P] in x's dtype; h_last: [B, H, P, N] fp32, the state after the last step.

    Computed in fp32 throughout; memory O(B·L·H·Q) for the intra-chunk decay matrices.
    """
    with jax.named_scope("ssd_chunked"):
        heads, groups = _check_ssd(x, dt, A, B, C, D, h0, mask, time_axis=True)
        _check_chunk(chunk)
        batch, length, _, hdim = x.shape
        dstate = B.shape[-1]
        e = heads // groups
        if h0 is None:
            h0 = jnp.zeros((batch, heads, hdim, dstate), _F32)
        xm, dtf, B, C = _zero_masked(mask, x, dt.astype(_F32), B, C)

        n_chunks = -(-length // chunk)
        pad = n_chunks * chunk - length  # padded steps have dt = 0, x = 0: the state passes through

        def split(a):  # [B, L, ...] -> [B, c, Q, ...] in fp32
            a = jnp.pad(a.astype(_F32), [(0, 0), (0, pad)] + [(0, 0)] * (a.ndim - 2))
            return a.reshape(batch, n_chunks, chunk, *a.shape[2:])

        xc = split(xm).reshape(batch, n_chunks, chunk, groups, e, hdim)  # [B, c, Q, G, E, P]
        dtc = split(dtf).reshape(batch, n_chunks, chunk, groups, e)  # [B, c, Q, G, E]
        Bc, Cc = split(B), split(C)  # [B, c, Q, G, N]
        # fp32: the cumulative log-decay of a long chunk loses bits in bf16
        log_a = jnp.moveaxis(dtc * A.astype(_F32).reshape(groups, e), 2, -1)  # [B, c, G, E, Q]
        seg = _segsum(log_a)  # [B, c, G, E, Q, R]
        xdt = xc * dtc[..., None]  # [B, c, R, G, E, P]

        # intra-chunk: y_q = sum_{r <= q} (C_q · B_r) exp(seg[q, r]) dt_r x_r
        scores = jnp.einsum("BcQGN,BcRGN->BcGQR", Cc, Bc)
        weights = scores[:, :, :, None] * jnp.exp(seg)  # [B, c, G, E, Q, R]
        y = jnp.einsum("BcGEQR,BcRGEP->BcQGEP", weights, xdt)

        # each chunk's own contribution to the state at its end
        to_end = jnp.exp(seg[..., -1, :])  # [B, c, G, E, R]
        chunk_states = jnp.einsum("BcRGN,BcGER,BcRGEP->BcGEPN", Bc, to_end, xdt)
        chunk_decay = jnp.exp(jnp.sum(log_a, axis=-1))  # [B, c, G, E]

        def carry_over(h, inputs):  # h: [B, G, E, P, N], the state entering the chunk
            decay, own = inputs
            return decay[..., None, None] * h + own, h

        h_last, h_in = jax.lax.scan(
            carry_over,
            h0.reshape(batch, groups, e, hdim, dstate),
            (jnp.moveaxis(chunk_decay, 1, 0), jnp.moveaxis(chunk_states, 1, 0)),
        )
        h_in = jnp.moveaxis(h_in, 0, 1)  # [B, c, G, E, P, N]

        # inter-chunk: the entering state, decayed from the chunk start to q (inclusive)
        from_start = jnp.exp(jnp.cumsum(log_a, axis=-1))  # [B, c, G, E, Q]
        y = y + jnp.einsum("BcQGN,BcGEPN,BcGEQ->BcQGEP", Cc, h_in, from_start)

        y = y.reshape(batch, n_chunks * chunk, heads, hdim)[:, :length]
        if D is not None:
            y = y + D.astype(_F32)[:, None] * xm.astype(_F32)
        return y.astype(x.dtype), h_last.reshape(batch, heads, hdim, dstate)


# ------------------------------------------------------------------------------------ Mamba-1 selective scan


def _check_selective(u, delta, A, B, C, D, h0, mask, time_axis: bool) -> int:
    """Validates selective-scan arguments; returns the channel count C."""
    lead = "[B, L, " if time_axis else "[B, "
    if u.ndim != (3 if time_axis else 2):
        raise _shape_error("u", u.shape, lead + "C]")
    channels = u.shape[-1]
    if tuple(delta.shape) != tuple(u.shape):
        raise _shape_error("delta", delta.shape, f"{list(u.shape)} (same as u)")
    if A.ndim != 2 or A.shape[0] != channels:
        raise _shape_error("A", A.shape, f"[C, N] = [{channels}, N]")
    dstate = A.shape[1]
    if B.ndim != u.ndim + 1 or tuple(B.shape[:-2]) != tuple(u.shape[:-1]) or B.shape[-1] != dstate:
        raise _shape_error("B", B.shape, lead + f"G, N] with N = {dstate} (A's state size)")
    if tuple(C.shape) != tuple(B.shape):
        raise _shape_error("C", C.shape, f"{list(B.shape)} (same as B)")
    groups = B.shape[-2]
    if groups < 1 or channels % groups:
        raise ValueError(f"the group count G={groups} of B/C must divide the channel count C={channels} of u")
    if D is not None and tuple(D.shape) != (channels,):
        raise _shape_error("D", D.shape, f"[C] = [{channels}]")
    if h0 is not None:
        _check_state(h0, (u.shape[0], channels, dstate), "h0 / h")
    if time_axis:
        _check_mask(mask, u.shape[0], u.shape[1])
    return channels


def _per_channel(bc: jax.Array, channels: int) -> jax.Array:  # [..., G, N] -> [..., C, N]
    """Channel c reads group c // (C // G): a block-contiguous repeat."""
    return jnp.repeat(bc.astype(_F32), channels // bc.shape[-2], axis=-2)


def selective_step(
    h: jax.Array,  # [B, C, N] fp32
    u: jax.Array,  # [B, C]
    delta: jax.Array,  # [B, C]
    A: jax.Array,  # [C, N]
    B: jax.Array,  # [B, G, N]
    C: jax.Array,  # [B, G, N]
    D: jax.Array | None = None,  # [C]
) -> tuple[jax.Array, jax.Array]:
    """One Mamba-1 recurrence step. Returns y [B, C] in u's dtype and h_new [B, C, N] fp32."""
    channels = _check_selective(u, delta, A, B, C, D, h, None, time_axis=False)
    uf, df = u.astype(_F32), delta.astype(_F32)
    h = jnp.exp(df[..., None] * A.astype(_F32)) * h + (df * uf)[..., None] * _per_channel(B, channels)
    y = jnp.einsum("BCN,BCN->BC", h, _per_channel(C, channels))
    if D is not None:
        y = y + D.astype(_F32) * uf
    return y.astype(u.dtype), h


def selective_scan_sequential(
    u: jax.Array,  # [B, L, C]
    delta: jax.Array,  # [B, L, C]
    A: jax.Array,  # [C, N]
    B: jax.Array,  # [B, L, G, N]
    C: jax.Array,  # [B, L, G, N]
    *,
    D: jax.Array | None = None,  # [C]
    h0: jax.Array | None = None,  # [B, C, N] fp32
    mask: jax.Array | None = None,  # [B, L] bool
    chunk: int = 64,
) -> tuple[jax.Array, jax.Array]:
    """Reference for `selective_scan`: a lax.scan of `selective_step` over time (`chunk` is ignored)."""
    del chunk
    _check_selective(u, delta, A, B, C, D, h0, mask, time_axis=True)
    if h0 is None:
        h0 = jnp.zeros((u.shape[0], u.shape[2], A.shape[1]), _F32)
    u, delta, B, C = _zero_masked(mask, u, delta.astype(_F32), B, C)

    def step(h, inputs):
        ut, dt, bt, ct = inputs
        y, h = selective_step(h, ut, dt, A, bt, ct, D)
        return h, y

    seq = tuple(jnp.moveaxis(a, 1, 0) for a in (u, delta, B, C))
    h_last, ys = jax.lax.scan(step, h0, seq)
    return jnp.moveaxis(ys, 0, 1), h_last


def _combine(left, right):
    """Composes two affine maps h -> a h + b (left first): the associative-scan operator."""
    a1, b1 = left
    a2, b2 = right
    return a1 * a2, a2 * b1 + b2


def selective_scan(
    u: jax.Array,  # [B, L, C]
    delta: jax.Array,  # [B, L, C]
    A: jax.Array,  # [C, N]
    B: jax.Array,  # [B, L, G, N]
    C: jax.Array,  # [B, L, G, N]
    *,
    D: jax.Array | None = None,  # [C]
    h0: jax.Array | None = None,  # [B, C, N] fp32
    mask: jax.Array | None = None,  # [B, L] bool
    chunk: int = 64,
) -> tuple[jax.Array, jax.Array]:
    """Mamba-1 selective scan: lax.scan over chunks, an associative scan inside each chunk.

    Args:
      u: [B, L, C] inputs.
      delta: [B, L, C] step sizes, already softplus-ed (used in fp32).
      A: [C, N] negative decay rates.
      B: [B, L, G, N] input projections; channel c uses group c // (C // G).
      C: [B, L, G, N] output projections, grouped like B.
      D: [C] skip connection or None.
      h0: [B, C, N] fp32 initial state or None (zeros).
      mask: [B, L] bool, True = real token, or None.
      chunk: Q, steps per associative scan; any L works.

    Returns:
      y: [B, L, C] in u's dtype; h_last: [B, C, N] fp32.

    Live memory is O(B·Q·C·N): each chunk's body is rematerialised in the backward pass, so only the
    per-chunk carries are stored.
    """
    with jax.named_scope("selective_scan"):
        channels = _check_selective(u, delta, A, B, C, D, h0, mask, time_axis=True)
        _check_chunk(chunk)
        batch, length, _ = u.shape
        dstate = A.shape[1]
        if h0 is None:
            h0 = jnp.zeros((batch, channels, dstate), _F32)
        um, df, B, C = _zero_masked(mask, u, delta.astype(_F32), B, C)

        n_chunks = -(-length // chunk)
        pad = n_chunks * chunk - length  # padded steps have delta = 0, u = 0: the state passes through

        def split(a):  # [B, L, ...] -> [c, B, Q, ...] in fp32
            a = jnp.pad(a.astype(_F32), [(0, 0), (0, pad)] + [(0, 0)] * (a.ndim - 2))
            return jnp.moveaxis(a.reshape(batch, n_chunks, chunk, *a.shape[2:]), 1, 0)

        Af = A.astype(_F32)

        @jax.checkpoint
        def run_chunk(h, inputs):  # h: [B, C, N]
            uq, dq, bq, cq = inputs  # [B, Q, C], [B, Q, C], [B, Q, G, N], [B, Q, G, N]
            decay = jnp.exp(dq[..., None] * Af)  # [B, Q, C, N]
            push = (dq * uq)[..., None] * _per_channel(bq, channels)  # [B, Q, C, N]
            a_cum, b_cum = jax.lax.associative_scan(_combine, (decay, push), axis=1)
            hs = a_cum * h[:, None] + b_cum  # [B, Q, C, N]
            y = jnp.einsum("BQCN,BQCN->BQC", hs, _per_channel(cq, channels))
            return hs[:, -1], y

        h_last, ys = jax.lax.scan(run_chunk, h0, tuple(split(a) for a in (um, df, B, C)))
        y = jnp.moveaxis(ys, 0, 1).reshape(batch, n_chunks * chunk, channels)[:, :length]
        if D is not None:
            y = y + D.astype(_F32) * um.astype(_F32)
        return y.astype(u.dtype), h_last
