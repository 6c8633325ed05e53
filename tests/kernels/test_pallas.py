"""Pallas kernels (interpret=INTERPRET on CPU) against the pure-JAX reference: both variants, both jobs,
fp32 and bf16 inputs, tiles spread over several programs and replay counts 0..T."""

import jax.numpy as jnp
import numpy as np
import pytest

from l2m_jax.kernels import pallas_ssm, ssm_update, ssm_verify, tiling
from l2m_jax.kernels.inputs import random_problem, step_args
from tests.kernels import INTERPRET

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


@pytest.fixture
def form(request):
    """pallas_ssm.set_form for one test, back to "loop" after it."""
    pallas_ssm.set_form(request.param)
    yield request.param
    pallas_ssm.set_form("loop")


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("variant", ["mamba2", "mamba"])
@pytest.mark.parametrize("form", ["loop", "unrolled"], indirect=True)
def test_pallas_matches_reference(variant, dtype, form):
    p = random_problem(7, variant, batch=3, tokens=3, dtype=dtype, **DIMS[variant])
    kw = dict(variant=variant, **_params(p))

    want = ssm_update(*step_args(p), backend="xla", **kw)
    got = ssm_update(*step_args(p), backend="pallas", interpret=INTERPRET, **kw)
    _close(got[0], want[0], Y_TOL[dtype])
    _close(got[1], want[1], STATE_TOL)

    args = (p["h"], p["cache"], p["n_replay"], p["x"], p["dt"], p["B"], p["C"])
    want = ssm_verify(*args, backend="xla", **kw)
    got = ssm_verify(*args, backend="pallas", interpret=INTERPRET, **kw)
    _close(got[0], want[0], Y_TOL[dtype])
    for g, w in zip(got[1:3], want[1:3]):
        _close(g, w, STATE_TOL)
    # the replay really ran: rows replaying nothing keep the checkpoint, rows replaying T moved it
    np.testing.assert_array_equal(np.asarray(got[1][0]), np.asarray(p["h"][0]))
    assert np.abs(np.asarray(got[1][1]) - np.asarray(p["h"][1])).max() > 1e-3


@pytest.mark.parametrize("variant,form", [("mamba2", "loop"), ("mamba2", "unrolled"), ("mamba2", "matrix"),
                                          ("mamba", "loop"), ("mamba", "unrolled")], indirect=["form"])
def test_verify_without_the_final_state_writes_one_state(variant, form):
    """final_state=False (what the models' verifier asks for): the same y and checkpoint, no final state, and
    the kernel has one state output fewer."""
    import jax

    dims = MATRIX_DIMS if form == "matrix" else DIMS[variant]
    p = random_problem(5, variant, batch=3, tokens=4, **dims)
    kw = dict(variant=variant, **_params(p))
    args = (p["h"], p["cache"], p["n_replay"], p["x"], p["dt"], p["B"], p["C"])
    full = ssm_verify(*args, backend="pallas", interpret=INTERPRET, **kw)
    lean = ssm_verify(*args, backend="pallas", interpret=INTERPRET, final_state=False, **kw)
    want = ssm_verify(*args, backend="xla", final_state=False, **kw)
    assert lean[2] is None and want[2] is None and full[2] is not None
    for got in (lean, want):
        _close(got[0], full[0], Y_TOL[jnp.float32])
        _close(got[1], full[1], STATE_TOL)
    fn = pallas_ssm.mamba2_verify if variant == "mamba2" else pallas_ssm.mamba_verify

    def kernel_state_outputs(flag):
        jaxpr = jax.make_jaxpr(lambda *a: fn(*a, interpret=INTERPRET, final_state=flag, **_params(p)))(*args)
        calls = [e for e in jaxpr.eqns if e.primitive.name == "pallas_call"]
        assert len(calls) == 1
        return sum(v.aval.shape == p["h"].shape for v in calls[0].outvars)

    assert (kernel_state_outputs(True), kernel_state_outputs(False)) == (2, 1)


def _verify_both(p, variant):
    kw = dict(variant=variant, **_params(p))
    args = (p["h"], p["cache"], p["n_replay"], p["x"], p["dt"], p["B"], p["C"])
    return ssm_verify(*args, backend="pallas", interpret=INTERPRET, **kw), ssm_verify(*args, backend="xla", **kw)


# the matrix form's dots need P, N >= 16; N = 128 gives 16-row blocks, so P = 32 makes two of them
MATRIX_DIMS = dict(heads=4, head_dim=32, dstate=128, groups=(2, 1, 4))


@pytest.mark.parametrize("dtype,tokens", [(jnp.float32, 3), (jnp.float32, 16), (jnp.float32, 17), (jnp.bfloat16, 5)],
                         ids=["fp32-T3-padded", "fp32-T16-one-tile", "fp32-T17-two-tiles", "bf16-T5"])
@pytest.mark.parametrize("form", ["matrix"], indirect=True)
def test_matrix_form_matches_reference(dtype, tokens, form):
    """The SSD-form Mamba-2 verification (module docstring of pallas_ssm): every output against the reference,
    T padded to a tile and not, with replay counts 0..T."""
    p = random_problem(11, "mamba2", batch=3, tokens=tokens, dtype=dtype, **MATRIX_DIMS)
    got, want = _verify_both(p, "mamba2")
    _close(got[0], want[0], Y_TOL[dtype])
    for g, w in zip(got[1:3], want[1:3]):
        _close(g, w, STATE_TOL)
    np.testing.assert_array_equal(np.asarray(got[1][0]), np.asarray(p["h"][0]))   # row 0 replays nothing


@pytest.mark.parametrize("form", ["matrix"], indirect=True)
def test_matrix_form_loops_over_row_blocks(form, monkeypatch):
    """Where the batch is large a program takes several blocks of P rows (tiling.mamba2_matrix_tiles); forced
    here by asking for a single program's worth of parallelism."""
    monkeypatch.setattr(tiling, "_TARGET_PROGRAMS", 1)
    assert tiling.mamba2_matrix_tiles(3, 4, 32, 128) == (16, 2)
    got, want = _verify_both(random_problem(12, "mamba2", batch=3, tokens=5, **MATRIX_DIMS), "mamba2")
    for g, w in zip(got[:3], want[:3]):
        _close(g, w, STATE_TOL)


@pytest.mark.parametrize("form", ["matrix"], indirect=True)
def test_matrix_form_leaves_mamba1_and_steps_to_their_loops(form):
    p = random_problem(13, "mamba", batch=3, tokens=3, **DIMS["mamba"])
    got, want = _verify_both(p, "mamba")
    for g, w in zip(got[:3], want[:3]):
        _close(g, w, STATE_TOL)
    q = random_problem(13, "mamba2", batch=3, tokens=3, **DIMS["mamba2"])    # P = 8: a step has no dot to tile
    kw = dict(variant="mamba2", **_params(q))
    _close(ssm_update(*step_args(q), backend="pallas", interpret=INTERPRET, **kw)[1],
           ssm_update(*step_args(q), backend="xla", **kw)[1], STATE_TOL)


@pytest.mark.parametrize("form", ["matrix"], indirect=True)
def test_matrix_form_refuses_what_it_cannot_tile(form):
    p = random_problem(14, "mamba2", batch=2, tokens=3, **DIMS["mamba2"])    # P = 8 < 16
    with pytest.raises(ValueError, match=r"P \(head dim\) to be a power of two >= 16.*set_form\('loop'\)"):
        _verify_both(p, "mamba2")


def test_set_form_names_the_forms():
    with pytest.raises(ValueError, match="loop.*unrolled.*matrix"):
        pallas_ssm.set_form("fast")


def test_backend_form_sets_the_form_while_inside():
    with pallas_ssm.backend_form("pallas-matrix") as backend:
        assert (backend, pallas_ssm.FORM) == ("pallas", "matrix")
    assert pallas_ssm.FORM == "loop"
    with pallas_ssm.backend_form("triton") as backend:
        assert (backend, pallas_ssm.FORM) == ("triton", "loop")
    with pytest.raises(ValueError, match="set_form takes one of"):
        with pallas_ssm.backend_form("pallas-fast"):
            pass
