"""Dispatch rules of l2m_jax.kernels: input validation, unavailable backends, fallback, jit."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from l2m_jax.kernels import BackendUnavailableError, available_backends, ssm_update, ssm_verify
from l2m_jax.kernels.inputs import random_problem, step_args

T = 2
MAMBA2 = dict(heads=4, head_dim=3, dstate=5, groups=(2, 1, 4))
MAMBA = dict(channels=8, dstate=3, groups=(2, 4))


@pytest.fixture(scope="module")
def m2():
    return random_problem(0, "mamba2", batch=3, tokens=T, **MAMBA2)


@pytest.fixture(scope="module")
def m1():
    return random_problem(1, "mamba", batch=3, tokens=T, **MAMBA)


def _update(p, variant="mamba2", **over):
    args = dict(zip(("h", "x", "dt", "B", "C"), step_args(p)), A=p["A"], D=p["D"], dt_bias=p["dt_bias"])
    args.update(over)
    kw = {k: args.pop(k) for k in ("A", "D", "dt_bias")}
    return ssm_update(*args.values(), variant=variant, **kw)


def _verify(p, variant="mamba2", **over):
    args = {k: p[k] for k in ("h", "cache", "n_replay", "x", "dt", "B", "C", "A", "D", "dt_bias")}
    args.update(over)
    kw = {k: args.pop(k) for k in ("A", "D", "dt_bias", "backend", "interpret", "fallback") if k in args}
    return ssm_verify(*args.values(), variant=variant, **kw)


@pytest.mark.parametrize(
    "change, match",
    [
        (lambda p: dict(h=p["h"].astype(jnp.bfloat16)), "h must be float32"),
        (lambda p: dict(h=p["h"][0]), r"h must have shape \[B, H, P, N\]"),
        (lambda p: dict(x=jnp.ones((3, 3, 3))), "group count G=3 of x must divide the head count 4"),
        (lambda p: dict(B=p["B"][:, 0, :, :4]), r"B must have shape \[B, Gb, N\]"),
        (lambda p: dict(dt=p["dt"][:, 0, :2]), r"dt must have shape \[B, H\] = \[3, 4\]"),
        (lambda p: dict(A=p["A"][:2]), r"A must have shape \[H\]"),
        (lambda p: dict(x=p["x"][:, 0].astype(jnp.int32)), "x must have a floating dtype"),
        (lambda p: dict(C=[1.0, 2.0]), "C must be an array"),
    ],
)
def test_update_rejects_bad_inputs(m2, change, match):
    with pytest.raises(ValueError, match=match):
        _update(m2, **change(m2))


def test_mamba_update_rejects_bad_inputs(m1):
    with pytest.raises(ValueError, match=r"A must have shape \[C, N\] = \[8, 3\]"):
        _update(m1, "mamba", A=m1["A"][:, 0])
    with pytest.raises(ValueError, match="group count G=3 of C must divide the channel count 8"):
        _update(m1, "mamba", C=jnp.ones((3, 3, 3)))
    with pytest.raises(ValueError, match=r"h must have shape \[B, H, P, N\] for variant='mamba2'"):
        _update(m1, "mamba2")  # a Mamba-1 problem given to the Mamba-2 variant is caught by the state's rank


@pytest.mark.parametrize(
    "change, match",
    [
        (lambda p: dict(cache=p["cache"][:2]), r"cache must be a tuple \(x, dt, B\)"),
        (
            lambda p: dict(cache=(p["cache"][0][:, :1], *p["cache"][1:])),
            r"cache\[0\] \(x\) must have the new inputs' shape",
        ),
        (lambda p: dict(n_replay=p["n_replay"][:2]), r"n_replay must be an integer array of shape \[B\] = \[3\]"),
        (lambda p: dict(n_replay=p["n_replay"].astype(jnp.float32)), "n_replay must be an integer array"),
        (lambda p: dict(n_replay=jnp.array([0, T + 1, 0])), r"n_replay values must lie in \[0, T\] = \[0, 2\]"),
        (lambda p: dict(n_replay=np.array([0, -1, 0])), r"n_replay values must lie in \[0, T\]"),
        (lambda p: dict(C=p["C"][:, :1]), r"C must have shape \[B, T, Gc, N\]"),
        (lambda p: dict(h=p["h"].astype(jnp.float16)), "h_ckpt must be float32"),
    ],
)
def test_verify_rejects_bad_inputs(m2, change, match):
    with pytest.raises(ValueError, match=match):
        _verify(m2, **change(m2))


def test_unknown_variant_and_backend(m2):
    with pytest.raises(ValueError, match="variant must be one of"):
        _update(m2, "mamba3")
    with pytest.raises(ValueError, match="backend must be one of"):
        _verify(m2, backend="cuda")
    with pytest.raises(ValueError, match="interpret=True applies to backend='pallas' only"):
        _verify(m2, backend="triton", interpret=True)


@pytest.mark.skipif(jax.default_backend() != "cpu", reason="checks what a machine without a GPU says")
def test_unavailable_backends_name_what_they_need(m2):
    assert available_backends() == ("xla",)
    assert available_backends(interpret=True) == ("xla", "pallas")
    needs = r"triton needs a CUDA GPU and jax-triton 0\.3\.1.*Available: \('xla',\)"
    with pytest.raises(BackendUnavailableError, match=needs):
        _verify(m2, backend="triton")
    with pytest.raises(BackendUnavailableError, match="pallas needs a CUDA GPU .* or interpret=True"):
        _verify(m2, backend="pallas")


@pytest.mark.skipif(jax.default_backend() != "cpu", reason="needs a backend that is unavailable here")
def test_fallback_warns_and_runs_the_reference(m2):
    want = _verify(m2)
    with pytest.warns(RuntimeWarning, match="Falling back to backend='xla'"):
        got = _verify(m2, backend="triton", fallback=True)
    for g, w in zip(got[:3], want[:3]):
        np.testing.assert_array_equal(np.asarray(g), np.asarray(w))


def test_jitted_replay_counts_are_clamped_to_the_cache(m1):
    """Under jit n_replay cannot be checked, so it is clamped: -1 acts as 0 and T + 5 as T."""
    verify = jax.jit(lambda n: _verify(m1, "mamba", n_replay=n))
    got = verify(jnp.array([-1, T + 5, 1], jnp.int32))
    want = _verify(m1, "mamba", n_replay=jnp.array([0, T, 1], jnp.int32))
    for g, w in zip(got[:3], want[:3]):
        np.testing.assert_allclose(np.asarray(g), np.asarray(w), rtol=1e-6, atol=1e-6)
