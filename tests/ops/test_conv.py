"""causal_conv1d against its step-loop reference, an independent numpy formula, and masking rules."""

import zlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from l2m_jax.ops import conv

RTOL, ATOL = 1e-5, 1e-6

# jitted, and fed numpy inputs: eager jax ops would each compile on their own
causal_conv1d = jax.jit(conv.causal_conv1d)
causal_conv1d_ref = jax.jit(conv.causal_conv1d_ref)
conv_step = jax.jit(conv.conv_step)


@pytest.fixture
def rng(request):
    """Fresh draws per test, reproducible from the test's name."""
    return np.random.default_rng(zlib.crc32(request.node.name.encode()))


def _inputs(rng, batch=2, length=11, channels=6, width=4):
    draw = lambda *shape: rng.standard_normal(shape).astype(np.float32)  # noqa: E731
    return draw(batch, length, channels), draw(width, channels), draw(channels), draw(batch, width - 1, channels)


def _numpy_conv(x, w, b, state):
    """y_t = b + sum_k w[k] x_{t-(W-1)+k}, with the state standing in for negative times."""
    xp = np.concatenate([state, x], axis=1).astype(np.float64)
    width, length = w.shape[0], x.shape[1]
    y = np.stack([(xp[:, t : t + width] * w[None]).sum(axis=1) for t in range(length)], axis=1)
    return y + b, xp[:, length:]


def test_tap_order_impulse():
    # an impulse at t=0 must read the kernel backwards: y_t = w[W-1-t]
    w = np.arange(1.0, 5.0, dtype=np.float32)[:, None]  # [W=4, C=1]
    x = np.zeros((1, 6, 1), np.float32)
    x[0, 0, 0] = 1.0
    y, _ = causal_conv1d(x, w)
    np.testing.assert_allclose(np.asarray(y[0, :, 0]), [4.0, 3.0, 2.0, 1.0, 0.0, 0.0], rtol=0, atol=0)


@pytest.mark.parametrize("with_state", [False, True])
def test_matches_numpy_and_step_loop(rng, with_state):
    x, w, b, state = _inputs(rng)
    state = state if with_state else None
    y, new_state = causal_conv1d(x, w, b, state=state)
    y_np, s_np = _numpy_conv(x, w, b, state if with_state else np.zeros((2, 3, 6), np.float32))
    np.testing.assert_allclose(np.asarray(y), y_np, rtol=RTOL, atol=ATOL)
    np.testing.assert_allclose(np.asarray(new_state), s_np, rtol=0, atol=0)
    y_ref, s_ref = causal_conv1d_ref(x, w, b, state=state)
    np.testing.assert_allclose(np.asarray(y), np.asarray(y_ref), rtol=RTOL, atol=ATOL)
    np.testing.assert_allclose(np.asarray(new_state), np.asarray(s_ref), rtol=0, atol=0)


def test_split_sequence_carries_state(rng):
    x, w, b, _ = _inputs(rng, length=9)
    y_full, s_full = causal_conv1d(x, w, b)
    y1, s1 = causal_conv1d(x[:, :2], w, b)  # shorter than W-1: the state must still hold zeros + 2 inputs
    y2, s2 = causal_conv1d(x[:, 2:], w, b, state=s1)
    np.testing.assert_allclose(np.concatenate([y1, y2], 1), np.asarray(y_full), rtol=RTOL, atol=ATOL)
    np.testing.assert_allclose(np.asarray(s2), np.asarray(s_full), rtol=0, atol=0)
    y_step, s_step = conv_step(x[:, 0], w, b, np.zeros((2, 3, 6), np.float32))
    np.testing.assert_allclose(np.asarray(y_step), np.asarray(y_full[:, 0]), rtol=RTOL, atol=ATOL)


def test_random_mask_matches_reference(rng):
    x, w, b, state = _inputs(rng, batch=2, length=10)
    mask = rng.random((2, 10)) < 0.6
    y, s = causal_conv1d(x, w, b, state=state, mask=mask)
    y_ref, s_ref = causal_conv1d_ref(x, w, b, state=state, mask=mask)
    np.testing.assert_allclose(np.asarray(y), np.asarray(y_ref), rtol=RTOL, atol=ATOL)
    np.testing.assert_allclose(np.asarray(s), np.asarray(s_ref), rtol=0, atol=0)


def test_right_padded_rows_equal_rows_alone(rng):
    x, w, b, state = _inputs(rng, batch=2, length=9)
    lengths = [9, 2]  # the second row is shorter than W-1: part of its state comes from the old state
    mask = np.arange(9)[None, :] < np.asarray(lengths)[:, None]
    # pads carry garbage (even NaN) that must not leak anywhere
    x = np.where(mask[..., None], x, np.nan).astype(np.float32)
    y, s = causal_conv1d(x, w, b, state=state, mask=mask)
    for row, n in enumerate(lengths):
        y_alone, s_alone = causal_conv1d(x[row : row + 1, :n], w, b, state=state[row : row + 1])
        np.testing.assert_allclose(np.asarray(y[row, :n]), np.asarray(y_alone[0]), rtol=RTOL, atol=ATOL)
        np.testing.assert_allclose(np.asarray(s[row]), np.asarray(s_alone[0]), rtol=0, atol=0)
    assert np.isfinite(np.asarray(y)).all()


def test_bf16_keeps_dtype_and_accuracy(rng):
    x, w, b, _ = _inputs(rng)
    y16, s16 = causal_conv1d(x.astype(jnp.bfloat16), w.astype(jnp.bfloat16), b.astype(jnp.bfloat16))
    assert y16.dtype == jnp.bfloat16 and s16.dtype == jnp.bfloat16
    up = lambda a: a.astype(jnp.bfloat16).astype(np.float32)  # noqa: E731
    y32, _ = causal_conv1d(up(x), up(w), up(b))
    rel = np.linalg.norm(np.asarray(y16, np.float32) - np.asarray(y32)) / np.linalg.norm(np.asarray(y32))
    assert rel < 1e-2


def test_bad_shapes_raise(rng):
    x, w, b, state = _inputs(rng)
    with pytest.raises(ValueError, match="kernel w"):
        conv.causal_conv1d(x, w.T)
    with pytest.raises(ValueError, match="conv state"):
        conv.causal_conv1d(x, w, b, state=state[:, 1:])
    with pytest.raises(ValueError, match="conv mask"):
        conv.causal_conv1d(x, w, b, mask=np.ones((2, 11), np.int32))
    with pytest.raises(ValueError, match="conv_step input"):
        conv.conv_step(x, w, b, state)
