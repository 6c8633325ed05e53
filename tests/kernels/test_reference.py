"""The pure-JAX reference of the SSM decode kernels: its step against an independent float64 loop, its
MultiStep against single steps, chaining of verification calls, and the recurrences in l2m_jax.ops.ssm."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from l2m_jax.kernels import reference, ssm_update, ssm_verify
from l2m_jax.kernels.inputs import random_problem, step_args
from l2m_jax.ops import ssm

MAMBA2 = dict(heads=4, head_dim=3, dstate=5, groups=(2, 1, 4))
MAMBA = dict(channels=8, dstate=3, groups=(2, 4))
DIMS = {"mamba2": MAMBA2, "mamba": MAMBA}
RTOL, ATOL = 1e-5, 1e-5  # fp32 against fp32 / float64, a handful of roundings apart


def _problem(variant, tokens, batch=4, seed=0, dtype=jnp.float32):
    return random_problem(seed, variant, batch=batch, tokens=tokens, dtype=dtype, **DIMS[variant])


def _params(p):
    return dict(A=p["A"], D=p["D"], dt_bias=p["dt_bias"])


def _softplus64(v):
    return np.logaddexp(v, 0.0)


def _numpy_step(variant, h, x, dt, B, C, A, D, dt_bias):
    """Float64, one head / channel at a time, with the group mapping i // (count // G) spelled out."""
    h, x, dt, B, C, A, D, dt_bias = (np.asarray(a, np.float64) for a in (h, x, dt, B, C, A, D, dt_bias))
    h = h.copy()
    y = np.zeros(h.shape[:-1])
    for b in range(h.shape[0]):
        for i in range(h.shape[1]):
            delta = _softplus64(dt[b, i] + dt_bias[i])
            gb, gc = i // (h.shape[1] // B.shape[1]), i // (h.shape[1] // C.shape[1])
            if variant == "mamba2":
                xi = x[b, i // (h.shape[1] // x.shape[1])]  # [P]
                h[b, i] = np.exp(delta * A[i]) * h[b, i] + delta * np.outer(xi, B[b, gb])
                y[b, i] = h[b, i] @ C[b, gc] + D[i] * xi
            else:
                h[b, i] = np.exp(delta * A[i]) * h[b, i] + delta * x[b, i] * B[b, gb]
                y[b, i] = h[b, i] @ C[b, gc] + D[i] * x[b, i]
    return y, h


@pytest.mark.parametrize("variant", ["mamba2", "mamba"])
def test_step_matches_float64_loop(variant):
    p = _problem(variant, tokens=1)
    y, h = reference.ssm_update_ref(*step_args(p), variant=variant, **_params(p))
    y64, h64 = _numpy_step(variant, *step_args(p), p["A"], p["D"], p["dt_bias"])
    np.testing.assert_allclose(np.asarray(y), y64, rtol=RTOL, atol=ATOL)
    np.testing.assert_allclose(np.asarray(h), h64, rtol=RTOL, atol=ATOL)
    assert y.dtype == p["x"].dtype and h.dtype == jnp.float32


@pytest.mark.parametrize("variant", ["mamba2", "mamba"])
def test_verify_equals_single_steps(variant):
    step = jax.jit(reference.ssm_update_ref, static_argnames="variant")
    verify = jax.jit(ssm_verify, static_argnames="variant")
    for tokens in range(1, 6):
        p = _problem(variant, tokens, seed=tokens)
        outs = verify(p["h"], p["cache"], p["n_replay"], p["x"], p["dt"], p["B"], p["C"], variant=variant, **_params(p))
        y, h_ckpt, h_run = map(np.asarray, outs[:3])
        q = {k: np.asarray(v) for k, v in p.items() if k != "cache"}  # numpy slicing compiles nothing
        cache = tuple(map(np.asarray, p["cache"]))
        n = q["n_replay"]
        assert n[0] == 0 and n[1] == tokens  # both ends of the replay range are exercised
        for b in range(n.shape[0]):
            h = q["h"][b : b + 1]
            for t in range(n[b]):  # replay: cached x, dt, B; C is not needed, any value works
                _, h = step(h, *(a[b : b + 1, t] for a in cache), q["C"][b : b + 1, 0], variant=variant, **_params(p))
            np.testing.assert_allclose(h_ckpt[b : b + 1], np.asarray(h), rtol=RTOL, atol=ATOL)
            for t in range(tokens):
                y_t, h = step(h, *(q[k][b : b + 1, t] for k in "x dt B C".split()), variant=variant, **_params(p))
                np.testing.assert_allclose(y[b : b + 1, t], np.asarray(y_t), rtol=RTOL, atol=ATOL)
            np.testing.assert_allclose(h_run[b : b + 1], np.asarray(h), rtol=RTOL, atol=ATOL)


def test_verify_returns_new_inputs_as_cache():
    p = _problem("mamba", 2)
    args = (p["h"], p["cache"], p["n_replay"], p["x"], p["dt"], p["B"], p["C"])
    *_, cache = ssm_verify(*args, variant="mamba", **_params(p))
    assert all(new is old for new, old in zip(cache, (p["x"], p["dt"], p["B"])))


@pytest.mark.parametrize("variant", ["mamba2", "mamba"])
def test_update_equals_verify_of_one_token(variant):
    p = _problem(variant, tokens=1)
    y, h = ssm_update(*step_args(p), variant=variant, **_params(p))
    yv, h_ckpt, h_run, _ = ssm_verify(
        p["h"], p["cache"], jnp.zeros(4, jnp.int32), p["x"], p["dt"], p["B"], p["C"], variant=variant, **_params(p)
    )
    np.testing.assert_allclose(np.asarray(yv[:, 0]), np.asarray(y), rtol=RTOL, atol=ATOL)
    np.testing.assert_allclose(np.asarray(h_run), np.asarray(h), rtol=RTOL, atol=ATOL)
    np.testing.assert_array_equal(np.asarray(h_ckpt), np.asarray(p["h"]))  # nothing replayed


@pytest.mark.parametrize("variant", ["mamba2", "mamba"])
def test_chained_calls_replay_accepted_tokens(variant):
    """Call 2 replaying all of call 1's tokens checkpoints call 1's final state; replaying k of them
    checkpoints the state after k tokens."""
    p, q = _problem(variant, 3, seed=1), _problem(variant, 3, seed=2)
    jitted = jax.jit(ssm_verify, static_argnames="variant")
    verify = lambda h, cache, n, src: jitted(  # noqa: E731
        h, cache, n, src["x"], src["dt"], src["B"], src["C"], variant=variant, **_params(p)
    )
    _, _, h_run1, cache1 = verify(p["h"], p["cache"], jnp.zeros(4, jnp.int32), p)
    _, h_ckpt2, _, _ = verify(p["h"], cache1, jnp.full(4, 3, jnp.int32), q)
    np.testing.assert_allclose(np.asarray(h_ckpt2), np.asarray(h_run1), rtol=RTOL, atol=ATOL)

    two_tokens = {k: p[k][:, :2] for k in ("x", "dt", "B", "C")}
    _, _, h_after_two, _ = verify(p["h"], tuple(a[:, :2] for a in p["cache"]), jnp.zeros(4, jnp.int32), two_tokens)
    _, h_ckpt2, _, _ = verify(p["h"], cache1, jnp.full(4, 2, jnp.int32), q)
    np.testing.assert_allclose(np.asarray(h_ckpt2), np.asarray(h_after_two), rtol=RTOL, atol=ATOL)


def test_reference_step_matches_ops_ssd_step():
    p = random_problem(3, "mamba2", batch=2, tokens=1, heads=4, head_dim=3, dstate=5, groups=(2, 2, 2))
    h, x, dt, B, C = step_args(p)
    y, h_new = reference.ssm_update_ref(h, x, dt, B, C, variant="mamba2", **_params(p))
    delta = jax.nn.softplus(dt + p["dt_bias"])  # ops take Δ already softplus-ed and x per head
    y_ops, h_ops = ssm.ssd_step(h, jnp.repeat(x, 2, axis=1), delta, p["A"], B, C, p["D"])
    np.testing.assert_allclose(np.asarray(y), np.asarray(y_ops), rtol=RTOL, atol=ATOL)
    np.testing.assert_allclose(np.asarray(h_new), np.asarray(h_ops), rtol=RTOL, atol=ATOL)


def test_reference_step_matches_ops_selective_step():
    p = random_problem(4, "mamba", batch=2, tokens=1, channels=8, dstate=3, groups=(4, 4))
    h, x, dt, B, C = step_args(p)
    y, h_new = reference.ssm_update_ref(h, x, dt, B, C, variant="mamba", **_params(p))
    y_ops, h_ops = ssm.selective_step(h, x, jax.nn.softplus(dt + p["dt_bias"]), p["A"], B, C, p["D"])
    np.testing.assert_allclose(np.asarray(y), np.asarray(y_ops), rtol=RTOL, atol=ATOL)
    np.testing.assert_allclose(np.asarray(h_new), np.asarray(h_ops), rtol=RTOL, atol=ATOL)
