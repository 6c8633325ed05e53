"""Pallas kernels (interpret=True on CPU) against the pure-JAX reference: both variants, both jobs,
fp32 and bf16 inputs, tiles spread over several programs and replay counts 0..T."""

import jax.numpy as jnp
import numpy as np
import pytest

from l2m_jax.kernels import pallas_ssm, ssm_update, ssm_verify, tiling
from l2m_jax.kernels.inputs import random_problem, step_args

# B=3, T=3; dims chosen so the grid has several tiles per row (see tiling.py) and groups differ per input
DIMS = {
    "mamba2": dict(heads=4, head_dim=8, dstate=16, groups=(2, 1, 4)),
    "mamba": dict(channels=16, dstate=8, groups=(2, 4)),
}
# y is rounded to the input dtype; states are fp32 either way and differ only in the order of roundings
Y_TOL = {jnp.float32: dict(rtol=1e-5, atol=1e-5), jnp.bfloat16: dict(rtol=1e-2, atol=1e-2)}
STATE_TOL = dict(rtol=1e-5, atol=1e-5)


def _params(p):
    return dict(A=p["A"], D=p["D"], dt_bias=p["dt_bias"])


def _close(got, want, tol):
    assert got.dtype == want.dtype and got.shape == want.shape
    np.testing.assert_allclose(np.asarray(got, np.float32), np.asarray(want, np.float32), **tol)


def test_tiles_split_the_state():
    assert tiling.mamba2_block_p(3, 4, 8, 16) < 8  # several programs per head
    assert tiling.mamba_block_c(3, 16, 8, aligned_to=4) < 16


@pytest.fixture(params=[False, True], ids=["loops", "unrolled"])
def unroll(request):
    pallas_ssm.set_unroll(request.param)
    yield request.param
    pallas_ssm.set_unroll(False)


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("variant", ["mamba2", "mamba"])
def test_pallas_matches_reference(variant, dtype, unroll):
    p = random_problem(7, variant, batch=3, tokens=3, dtype=dtype, **DIMS[variant])
    kw = dict(variant=variant, **_params(p))

    want = ssm_update(*step_args(p), backend="xla", **kw)
    got = ssm_update(*step_args(p), backend="pallas", interpret=True, **kw)
    _close(got[0], want[0], Y_TOL[dtype])
    _close(got[1], want[1], STATE_TOL)

    args = (p["h"], p["cache"], p["n_replay"], p["x"], p["dt"], p["B"], p["C"])
    want = ssm_verify(*args, backend="xla", **kw)
    got = ssm_verify(*args, backend="pallas", interpret=True, **kw)
    _close(got[0], want[0], Y_TOL[dtype])
    for g, w in zip(got[1:3], want[1:3]):
        _close(g, w, STATE_TOL)
    # the replay really ran: rows replaying nothing keep the checkpoint, rows replaying T moved it
    np.testing.assert_array_equal(np.asarray(got[1][0]), np.asarray(p["h"][0]))
    assert np.abs(np.asarray(got[1][1]) - np.asarray(p["h"][1])).max() > 1e-3


def test_set_unroll_takes_a_bool():
    with pytest.raises(TypeError, match="True or False"):
        pallas_ssm.set_unroll(1)
