"""Chunked SSD and the chunked selective scan against their sequential references, steps and properties."""

import functools
import zlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from l2m_jax.ops import ssm

TOL_F32 = 1e-5
TOL_BF16 = 2e-2


def rel_err(a, b):
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return np.linalg.norm(a - b) / np.linalg.norm(b)


# Inputs are numpy arrays and only jitted ops see them: every eager jax op (a draw, a slice) would compile
# on its own, which dominates a small test's time.
def normal(rng, shape, dtype=np.float32):
    return rng.standard_normal(shape).astype(dtype)


def softplus(rng, shape):
    return np.logaddexp(0.0, rng.standard_normal(shape) - 1.0).astype(np.float32)


def decay_rates(rng, shape):
    return (-np.exp(rng.uniform(-1.0, 1.5, shape))).astype(np.float32)


def mask_of(rng, shape, p=0.7):
    return rng.random(shape) < p


def ssd_inputs(rng, batch=2, length=37, heads=4, groups=2, hdim=8, dstate=8, dtype=np.float32):
    x = normal(rng, (batch, length, heads, hdim), dtype)
    dt = softplus(rng, (batch, length, heads))
    A = decay_rates(rng, (heads,))
    B = normal(rng, (batch, length, groups, dstate), dtype)
    C = normal(rng, (batch, length, groups, dstate), dtype)
    return x, dt, A, B, C, normal(rng, (heads,)), normal(rng, (batch, heads, hdim, dstate))


def sel_inputs(rng, batch=2, length=37, channels=8, groups=2, dstate=8):
    u = normal(rng, (batch, length, channels))
    delta = softplus(rng, (batch, length, channels))
    A = decay_rates(rng, (channels, dstate))
    B = normal(rng, (batch, length, groups, dstate))
    C = normal(rng, (batch, length, groups, dstate))
    return u, delta, A, B, C, normal(rng, (channels,)), normal(rng, (batch, channels, dstate))


@pytest.fixture
def rng(request):
    """Fresh draws per test, reproducible from the test's name."""
    return np.random.default_rng(zlib.crc32(request.node.name.encode()))


ssd_chunked = jax.jit(ssm.ssd_chunked, static_argnames="chunk")
ssd_sequential = jax.jit(ssm.ssd_sequential, static_argnames="chunk")
selective_scan = jax.jit(ssm.selective_scan, static_argnames="chunk")
selective_sequential = jax.jit(ssm.selective_scan_sequential, static_argnames="chunk")


# ------------------------------------------------------------------------------------------------ SSD


@pytest.mark.parametrize(
    "length, chunk, groups, with_h0, with_D, with_mask",
    [
        (37, 8, 2, True, True, False),  # L not a multiple of Q, G < H
        (40, 16, 4, False, False, True),  # G == H, masked
        (23, 5, 1, True, False, True),  # one group for all heads
        (13, 32, 2, False, True, False),  # a single padded chunk
    ],
)
def test_ssd_chunked_matches_sequential(rng, length, chunk, groups, with_h0, with_D, with_mask):
    x, dt, A, B, C, D, h0 = ssd_inputs(rng, length=length, groups=groups)
    mask = mask_of(rng, (2, length)) if with_mask else None
    kw = dict(D=D if with_D else None, h0=h0 if with_h0 else None, mask=mask)
    y, h = ssd_chunked(x, dt, A, B, C, chunk=chunk, **kw)
    y_ref, h_ref = ssd_sequential(x, dt, A, B, C, **kw)
    assert y.dtype == jnp.float32 and h.dtype == jnp.float32
    assert rel_err(y, y_ref) < TOL_F32
    assert rel_err(h, h_ref) < TOL_F32


def test_ssd_steps_continue_the_full_op(rng):
    x, dt, A, B, C, D, h0 = ssd_inputs(rng, length=20)
    prefix = 15
    y_full, h_full = ssd_chunked(x, dt, A, B, C, chunk=8, D=D, h0=h0)
    _, h = ssd_chunked(x[:, :prefix], dt[:, :prefix], A, B[:, :prefix], C[:, :prefix], chunk=8, D=D, h0=h0)
    step = jax.jit(ssm.ssd_step)
    for t in range(prefix, 20):
        y_t, h = step(h, x[:, t], dt[:, t], A, B[:, t], C[:, t], D)
        assert rel_err(y_t, y_full[:, t]) < TOL_F32
    assert rel_err(h, h_full) < TOL_F32


def test_ssd_masked_rows_equal_unpadded_rows(rng):
    x, dt, A, B, C, D, h0 = ssd_inputs(rng, length=30)
    pos = np.arange(30)
    # row 0 right-padded (real 0..21), row 1 left-padded (real 10..29); pads hold NaN garbage
    mask = np.stack([pos < 22, pos >= 10])
    x, B, C = (np.where(mask[..., None, None], a, np.nan).astype(np.float32) for a in (x, B, C))
    dt = np.where(mask[..., None], dt, np.nan).astype(np.float32)
    y, h = ssd_chunked(x, dt, A, B, C, chunk=8, D=D, h0=h0, mask=mask)
    assert np.isfinite(np.asarray(y)).all()
    for row, real in enumerate([slice(0, 22), slice(10, 30)]):
        one = lambda a: a[row : row + 1, real]  # noqa: E731
        y_alone, h_alone = ssd_chunked(one(x), one(dt), A, one(B), one(C), chunk=8, D=D, h0=h0[row : row + 1])
        assert rel_err(y[row, real], y_alone[0]) < TOL_F32
        assert rel_err(h[row], h_alone[0]) < TOL_F32


def test_ssd_without_decay_is_causal_linear_attention(rng):
    x, _, _, B, C, _, _ = ssd_inputs(rng, length=24, heads=4, groups=2)
    ones, zeros = np.ones(x.shape[:3], np.float32), np.zeros(4, np.float32)
    y, _ = ssd_chunked(x, ones, zeros, B, C, chunk=7, D=zeros)
    # y_t = sum_{s<=t} (C_t . B_s) x_s, written out in numpy with Q=C, K=B, V=x per head
    q = np.repeat(np.asarray(C, np.float64), 2, axis=2)  # head h reads group h // 2
    k = np.repeat(np.asarray(B, np.float64), 2, axis=2)
    v = np.asarray(x, np.float64)
    scores = np.einsum("blhn,bshn->bhls", q, k) * np.tril(np.ones((24, 24)))
    expected = np.einsum("bhls,bshp->blhp", scores, v)
    assert rel_err(y, expected) < TOL_F32


def test_ssd_matches_numpy_recurrence(rng):
    x, dt, A, B, C, D, h0 = ssd_inputs(rng, batch=1, length=6, heads=4, groups=2, hdim=3, dstate=5)
    y, h_last = ssd_chunked(x, dt, A, B, C, chunk=4, D=D, h0=h0)
    h = h0[0].astype(np.float64)  # [H, P, N]
    for t in range(6):
        for head in range(4):
            g = head // 2
            h[head] = np.exp(dt[0, t, head] * A[head]) * h[head] + dt[0, t, head] * np.outer(x[0, t, head], B[0, t, g])
            y_t = h[head] @ C[0, t, g] + D[head] * x[0, t, head]
            np.testing.assert_allclose(np.asarray(y[0, t, head]), y_t, rtol=1e-5, atol=1e-5)
    assert rel_err(h_last[0], h) < TOL_F32


def test_ssd_gradients_match_sequential(rng):
    x, dt, A, B, C, D, h0 = ssd_inputs(rng, batch=1, length=14, heads=2, groups=1, hdim=4, dstate=4)
    wy = normal(rng, x.shape)
    wh = normal(rng, h0.shape)

    def loss(fn, x, dt, B, C):
        y, h = fn(x, dt, A, B, C, D=D, h0=h0)
        return jnp.sum(y * wy) + jnp.sum(h * wh)

    args = (x, dt, B, C)
    grad = lambda fn: jax.jit(jax.grad(functools.partial(loss, fn), argnums=(0, 1, 2, 3)))(*args)  # noqa: E731
    grads, grads_ref = grad(functools.partial(ssm.ssd_chunked, chunk=4)), grad(ssm.ssd_sequential)
    for name, g, g_ref in zip("x dt B C".split(), grads, grads_ref):
        assert np.isfinite(np.asarray(g)).all(), name
        assert rel_err(g, g_ref) < TOL_F32, name


def test_ssd_bf16_close_to_fp32_reference(rng):
    x, dt, A, B, C, D, h0 = ssd_inputs(rng, length=33, dtype=jnp.bfloat16)
    y, h = ssd_chunked(x, dt, A, B, C, chunk=16, D=D, h0=h0)
    assert y.dtype == jnp.bfloat16 and h.dtype == jnp.float32
    f32 = lambda a: a.astype(np.float32)  # noqa: E731
    y_ref, h_ref = ssd_sequential(f32(x), dt, A, f32(B), f32(C), D=D, h0=h0)
    assert rel_err(y.astype(jnp.float32), y_ref) < TOL_BF16
    assert rel_err(h, h_ref) < TOL_BF16


def test_ssd_bad_inputs_raise(rng):
    x, dt, A, B, C, D, h0 = ssd_inputs(rng, length=5, heads=4, groups=2)
    with pytest.raises(ValueError, match="must divide the head count"):
        ssm.ssd_chunked(x, dt, A, B[:, :, :1].repeat(3, axis=2), C[:, :, :1].repeat(3, axis=2))
    with pytest.raises(ValueError, match="float32"):
        ssm.ssd_chunked(x, dt, A, B, C, h0=h0.astype(jnp.bfloat16))
    with pytest.raises(ValueError, match="chunk"):
        ssm.ssd_chunked(x, dt, A, B, C, chunk=0)
    with pytest.raises(ValueError, match="dt"):
        ssm.ssd_chunked(x, dt[:, :4], A, B, C)


# ------------------------------------------------------------------------------------- selective scan


@pytest.mark.parametrize(
    "length, chunk, groups, with_extras",
    [(37, 8, 2, True), (19, 32, 8, False)],  # Q does not divide L; G == C; h0/D/mask on and off
)
def test_selective_scan_matches_sequential(rng, length, chunk, groups, with_extras):
    u, delta, A, B, C, D, h0 = sel_inputs(rng, length=length, groups=groups)
    mask = mask_of(rng, (2, length))
    kw = dict(D=D, h0=h0, mask=mask) if with_extras else {}
    y, h = selective_scan(u, delta, A, B, C, chunk=chunk, **kw)
    y_ref, h_ref = selective_sequential(u, delta, A, B, C, **kw)
    assert rel_err(y, y_ref) < TOL_F32
    assert rel_err(h, h_ref) < TOL_F32


def test_selective_scan_matches_numpy_recurrence(rng):
    u, delta, A, B, C, D, h0 = sel_inputs(rng, batch=1, length=6, channels=8, groups=2, dstate=3)
    y, h_last = selective_scan(u, delta, A, B, C, D=D, h0=h0, chunk=4)
    h = h0[0].astype(np.float64)  # [C, N]
    for t in range(6):
        for c in range(8):
            g = c // 4  # block-contiguous: channels 0..3 read group 0
            h[c] = np.exp(delta[0, t, c] * A[c]) * h[c] + delta[0, t, c] * B[0, t, g] * u[0, t, c]
            y_c = C[0, t, g] @ h[c] + D[c] * u[0, t, c]
            np.testing.assert_allclose(np.asarray(y[0, t, c]), y_c, rtol=1e-5, atol=1e-5)
    assert rel_err(h_last[0], h) < TOL_F32


def test_selective_steps_continue_the_full_op(rng):
    u, delta, A, B, C, D, h0 = sel_inputs(rng, length=20)
    prefix = 16
    y_full, h_full = selective_scan(u, delta, A, B, C, D=D, h0=h0, chunk=8)
    cut = lambda a: a[:, :prefix]  # noqa: E731
    _, h = selective_scan(cut(u), cut(delta), A, cut(B), cut(C), D=D, h0=h0, chunk=8)
    step = jax.jit(ssm.selective_step)
    for t in range(prefix, 20):
        y_t, h = step(h, u[:, t], delta[:, t], A, B[:, t], C[:, t], D)
        assert rel_err(y_t, y_full[:, t]) < TOL_F32
    assert rel_err(h, h_full) < TOL_F32


def test_selective_masked_row_equals_unpadded_row(rng):
    u, delta, A, B, C, D, _ = sel_inputs(rng, length=21)
    mask = np.stack([np.arange(21) < 13, np.ones(21, bool)])
    u, delta = (np.where(mask[..., None], a, np.nan).astype(np.float32) for a in (u, delta))  # pad garbage
    y, h = selective_scan(u, delta, A, B, C, D=D, mask=mask, chunk=8)
    one = lambda a: a[:1, :13]  # noqa: E731
    y_alone, h_alone = selective_scan(one(u), one(delta), A, one(B), one(C), D=D, chunk=8)
    assert rel_err(y[0, :13], y_alone[0]) < TOL_F32
    assert rel_err(h[0], h_alone[0]) < TOL_F32


def test_selective_gradients_match_sequential(rng):
    u, delta, A, B, C, D, h0 = sel_inputs(rng, batch=1, length=12, channels=4, groups=2, dstate=4)
    wy = normal(rng, u.shape)

    def loss(fn, u, delta, B, C):
        y, h = fn(u, delta, A, B, C, D=D, h0=h0)
        return jnp.sum(y * wy) + jnp.sum(h)

    args = (u, delta, B, C)
    grad = lambda fn: jax.jit(jax.grad(functools.partial(loss, fn), argnums=(0, 1, 2, 3)))(*args)  # noqa: E731
    grads, grads_ref = grad(functools.partial(ssm.selective_scan, chunk=5)), grad(ssm.selective_scan_sequential)
    for name, g, g_ref in zip("u delta B C".split(), grads, grads_ref):
        assert rel_err(g, g_ref) < TOL_F32, name


def test_selective_bad_inputs_raise(rng):
    u, delta, A, B, C, _, _ = sel_inputs(rng, length=5, channels=8, groups=2)
    with pytest.raises(ValueError, match="must divide the channel count"):
        ssm.selective_scan(u, delta, A, B[:, :, :1].repeat(3, axis=2), C[:, :, :1].repeat(3, axis=2))
    with pytest.raises(ValueError, match="A's state size"):
        ssm.selective_scan(u, delta, A[:, :4], B, C)
