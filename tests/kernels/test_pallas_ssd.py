"""The fused Pallas SSD forward (interpret=INTERPRET on CPU) against the XLA reference `ssd_chunked`: outputs and
final states for fp32 and bf16 inputs, h0, masks, L not a multiple of the chunk, several heads per group,
the fused backward's gradients of every input against the reference's VJP (fp32 and bf16), and the errors for
shapes the kernels cannot tile."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from l2m_jax.kernels import BackendUnavailableError
from l2m_jax.kernels.dispatch import ssd
from l2m_jax.kernels.pallas_ssd import pass_states, ssd_chunked_pallas
from l2m_jax.ops.ssm import ssd_chunked
from tests.kernels import INTERPRET

# B=2, L=40 (chunk 32: one full chunk and a padded one), H=4 heads in G=2 groups, P=32, N=16; block_rows=16
# gives two row blocks per chunk (so the causal loop runs over one and two column blocks) and two P blocks
DIMS = dict(batch=2, length=40, heads=4, groups=2, head_dim=32, dstate=16)
CHUNK, ROWS = 32, 16
# fp32: the kernels sum in another order than the reference (cumsum differences vs segment sums), nothing more.
# bf16: y is rounded to bf16 (as the reference's is), and the kernels also round the dot operands (decay- and
# dt-weighted B for the state, C·B weights for y, C and the entering state for the inter-chunk term) to bf16,
# the way mamba_ssm feeds its tensor cores; the reference keeps those products in fp32.
TOL = {
    jnp.float32: dict(y=dict(rtol=1e-5, atol=1e-5), h=dict(rtol=1e-5, atol=1e-5), rel=1e-6),
    jnp.bfloat16: dict(y=dict(rtol=2e-2, atol=5e-2), h=dict(rtol=2e-2, atol=2e-2), rel=1e-2),
}


def _problem(seed, dtype=jnp.float32, *, batch, length, heads, groups, head_dim, dstate):
    rng = np.random.default_rng(seed)
    normal = lambda *s: rng.standard_normal(s, np.float32)  # noqa: E731
    return dict(
        x=jnp.asarray(normal(batch, length, heads, head_dim), dtype),
        # softplus-ed step sizes from ~0.01 to ~2, decays -0.5..-4: chunk log-decays from ~-0.2 to ~-250
        dt=jnp.asarray(rng.uniform(0.01, 2.0, (batch, length, heads)).astype(np.float32)),
        A=jnp.asarray(-rng.uniform(0.5, 4.0, heads).astype(np.float32)),
        B=jnp.asarray(normal(batch, length, groups, dstate), dtype),
        C=jnp.asarray(normal(batch, length, groups, dstate), dtype),
        D=jnp.asarray(normal(heads)),
        h0=jnp.asarray(normal(batch, heads, head_dim, dstate)),
    )


def _mask(batch, length):
    mask = np.ones((batch, length), bool)
    mask[0, 5:9] = False  # a gap inside the first chunk
    mask[1, 30:] = False  # a tail across the chunk boundary
    return jnp.asarray(mask)


def _rel(got, want) -> float:
    got, want = np.asarray(got, np.float64), np.asarray(want, np.float64)
    return float(np.linalg.norm(got - want) / np.linalg.norm(want))


def _close(got, want, tol, rel):
    assert got.dtype == want.dtype and got.shape == want.shape
    np.testing.assert_allclose(np.asarray(got, np.float32), np.asarray(want, np.float32), **tol)
    assert _rel(got, want) < rel


CASES = {
    "plain": dict(),
    "h0": dict(h0=True),
    "mask": dict(mask=True),
    "h0-mask-noD": dict(h0=True, mask=True, D=False),
}


@pytest.mark.parametrize("case", list(CASES))
@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16], ids=["fp32", "bf16"])
def test_forward_matches_reference(dtype, case):
    flags = CASES[case]
    p = _problem(1, dtype, **DIMS)
    kw = dict(
        chunk=CHUNK,
        D=p["D"] if flags.get("D", True) else None,
        h0=p["h0"] if flags.get("h0") else None,
        mask=_mask(DIMS["batch"], DIMS["length"]) if flags.get("mask") else None,
    )
    args = tuple(p[k] for k in ("x", "dt", "A", "B", "C"))
    if kw["mask"] is not None:  # garbage at masked steps must not leak (the reference zeroes them too)
        x = np.array(args[0], np.float32)
        x[~np.asarray(kw["mask"])] = np.nan
        args = (jnp.asarray(x, dtype),) + args[1:]
    y_ref, h_ref = ssd_chunked(*args, **kw)
    D = kw.pop("D")
    y, h = ssd_chunked_pallas(*args, D, interpret=INTERPRET, block_rows=ROWS, **kw)
    assert y.dtype == dtype and h.dtype == jnp.float32
    tol = TOL[dtype]
    _close(y, y_ref, tol["y"], tol["rel"])
    _close(h, h_ref, tol["h"], tol["rel"])


@pytest.mark.parametrize("reverse", [False, True])
def test_pass_states_is_the_linear_recurrence(reverse):
    """The state-passing kernel against a lax.scan of the same recurrence, with 5 chunks (not a power of 2)
    and a P block smaller than P (several programs per head)."""
    rng = np.random.default_rng(3)
    b, n, h, p, d = 2, 5, 3, 32, 16
    add = jnp.asarray(rng.standard_normal((b, n, h, p, d)), jnp.float32)
    decay = jnp.asarray(rng.uniform(0.2, 1.0, (b, h, n)), jnp.float32)
    init = jnp.asarray(rng.standard_normal((b, h, p, d)), jnp.float32)

    def step(carry, xs):
        a, dec = xs
        return dec[..., None, None] * carry + a, carry

    want_final, want = jax.lax.scan(step, init, (jnp.moveaxis(add, 1, 0), jnp.moveaxis(decay, 2, 0)),
                                    reverse=reverse)
    got, final = pass_states(add, decay, init, reverse=reverse, interpret=INTERPRET)
    np.testing.assert_allclose(np.asarray(got), np.asarray(jnp.moveaxis(want, 0, 1)), rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(np.asarray(final), np.asarray(want_final), rtol=1e-6, atol=1e-6)
    first = 0 if not reverse else n - 1                 # the carry entering the first step is init itself
    np.testing.assert_array_equal(np.asarray(got[:, first]), np.asarray(init))
    with pytest.raises(ValueError, match="do not fit"):
        pass_states(add, decay[:, :, 1:], init, interpret=INTERPRET)


def test_default_tiles_and_one_head_per_group():
    """chunk 16 with the default block (one row block), G = H, through the dispatch and under jit."""
    dims = dict(DIMS, groups=DIMS["heads"], head_dim=16)
    p = _problem(2, **dims)
    args = tuple(p[k] for k in ("x", "dt", "A", "B", "C", "D"))
    run = jax.jit(lambda *a: ssd(*a, chunk=16, h0=p["h0"], backend="pallas", interpret=INTERPRET))
    y, h = run(*args)
    y_ref, h_ref = ssd(*args, chunk=16, h0=p["h0"], backend="xla")
    _close(y, y_ref, TOL[jnp.float32]["y"], TOL[jnp.float32]["rel"])
    _close(h, h_ref, TOL[jnp.float32]["h"], TOL[jnp.float32]["rel"])


# the fused backward against the reference's VJP, as relative errors ‖g − ref‖ / ‖ref‖ per input. fp32: other
# summation orders only (dA, a sum over every step of every chunk, drifts most); bf16: the dot operands of the
# intra-chunk kernels (x, B, C, dy and the decay-weighted tiles) are rounded to bf16, as in the forward
GRAD_REL = {jnp.float32: dict(default=1e-5, A=5e-5), jnp.bfloat16: dict(default=3e-2, A=3e-2)}
GRAD_CASES = {"all": dict(mask=False), "mask": dict(mask=True), "noD-noh0": dict(mask=True, D=False, h0=False)}


@pytest.mark.parametrize("case", list(GRAD_CASES))
@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16], ids=["fp32", "bf16"])
def test_fused_backward_equals_the_reference_vjp(dtype, case):
    flags = GRAD_CASES[case]
    p = _problem(3, dtype, **DIMS)
    mask = _mask(DIMS["batch"], DIMS["length"]) if flags["mask"] else None
    names = ["x", "dt", "A", "B", "C"] + ["D"] * flags.get("D", True) + ["h0"] * flags.get("h0", True)
    primals = tuple(p[k] for k in names)
    rng = np.random.default_rng(4)
    y_ct = jnp.asarray(rng.standard_normal(p["x"].shape, np.float32))
    h_ct = jnp.asarray(rng.standard_normal(p["h0"].shape, np.float32))

    def loss(fn):
        def f(*args):
            kw = dict(zip(names, args))
            y, h = fn(kw["x"], kw["dt"], kw["A"], kw["B"], kw["C"], kw.get("D"), kw.get("h0"))
            return jnp.sum(y.astype(jnp.float32) * y_ct) + jnp.sum(h * h_ct)

        return f

    def fused(backward):
        return lambda x, dt, A, B, C, D, h0: ssd_chunked_pallas(
            x, dt, A, B, C, D, chunk=CHUNK, h0=h0, mask=mask, interpret=INTERPRET, block_rows=ROWS, backward=backward)

    def reference(x, dt, A, B, C, D, h0):
        return ssd_chunked(x, dt, A, B, C, chunk=CHUNK, D=D, h0=h0, mask=mask)

    argnums = tuple(range(len(names)))
    want = jax.grad(loss(reference), argnums=argnums)(*primals)
    got = jax.grad(loss(fused("pallas")), argnums=argnums)(*primals)
    slow = jax.grad(loss(fused("xla")), argnums=argnums)(*primals)
    for name, g, w, r in zip(names, got, want, slow):
        assert g.shape == w.shape and g.dtype == w.dtype, name
        assert np.abs(np.asarray(w, np.float32)).max() > 0, name  # every input really gets a gradient
        limit = GRAD_REL[dtype].get(name, GRAD_REL[dtype]["default"])
        assert _rel(g, w) < limit, f"{name}: relative error {_rel(g, w):.2e} >= {limit}"
        np.testing.assert_allclose(np.asarray(r, np.float32), np.asarray(w, np.float32), rtol=1e-6, atol=1e-6,
                                   err_msg=name)  # backward="xla" is the reference's VJP itself
        if mask is not None and name in ("x", "dt", "B", "C"):  # nothing reaches a masked step's inputs
            assert not np.asarray(g, np.float32)[~np.asarray(mask)].any(), name


def test_fused_backward_under_jit_with_one_row_block():
    """The default tiles (chunk 16 = one row block), G = H, jitted value_and_grad."""
    dims = dict(DIMS, groups=DIMS["heads"], head_dim=16)
    p = _problem(7, **dims)
    args = tuple(p[k] for k in ("x", "dt", "A", "B", "C", "D"))

    def loss(fn):
        return lambda *a: jnp.sum(jnp.sin(fn(*a)[0]))

    fused = jax.jit(jax.value_and_grad(loss(lambda *a: ssd_chunked_pallas(*a, chunk=16, interpret=INTERPRET)),
                                       argnums=tuple(range(6))))
    ref = jax.value_and_grad(loss(lambda x, dt, A, B, C, D: ssd_chunked(x, dt, A, B, C, chunk=16, D=D)),
                             argnums=tuple(range(6)))
    (v, g), (vr, gr) = fused(*args), ref(*args)
    np.testing.assert_allclose(float(v), float(vr), rtol=1e-5)
    for name, a, b in zip("x dt A B C D".split(), g, gr):
        assert _rel(a, b) < GRAD_REL[jnp.float32].get(name, 1e-5), name


def test_unknown_backward_is_refused():
    p = _problem(8, **dict(DIMS, length=8))
    with pytest.raises(ValueError, match="backward='cuda': choose 'pallas'"):
        ssd_chunked_pallas(*(p[k] for k in ("x", "dt", "A", "B", "C")), chunk=CHUNK, interpret=INTERPRET,
                           backward="cuda")


@pytest.mark.parametrize(
    "change, match",
    [
        (dict(chunk=24), r"chunk to be a power of two >= 16.*got chunk=24; pass chunk=64"),
        (dict(chunk=8), r"chunk to be a power of two >= 16.*or use backend='xla'"),
        (dict(block_rows=8), r"block_rows must be a power of two in \[16, chunk=32\]"),
        (dict(block_rows=64), r"block_rows must be a power of two in \[16, chunk=32\]"),
        (dict(head_dim=12), r"P \(head dim of x\) to be a power of two >= 16 .* got 12; use backend='xla'"),
        (dict(dstate=8), r"N \(state size of B/C\) to be a power of two >= 16"),
        (dict(groups=3), "the group count G=3 of B/C must divide the head count H=4"),
    ],
)
def test_bad_inputs_name_the_fix(change, match):
    change = dict(change)
    kw = dict(chunk=change.pop("chunk", CHUNK), block_rows=change.pop("block_rows", None))
    p = _problem(5, **dict(DIMS, length=8, **change))
    args = tuple(p[k] for k in ("x", "dt", "A", "B", "C"))
    with pytest.raises(ValueError, match=match):
        ssd_chunked_pallas(*args, interpret=INTERPRET, **kw)
    if kw["block_rows"] is None:  # the dispatch raises the same errors
        with pytest.raises(ValueError, match=match):
            ssd(*args, chunk=kw["chunk"], backend="pallas", interpret=INTERPRET)


def test_dispatch_backends():
    p = _problem(6, **dict(DIMS, length=8))
    args = tuple(p[k] for k in ("x", "dt", "A", "B", "C"))
    with pytest.raises(BackendUnavailableError, match="only 'xla' and 'pallas' exist for ssd"):
        ssd(*args, chunk=CHUNK, backend="triton")
    with pytest.raises(ValueError, match="backend must be one of"):
        ssd(*args, chunk=CHUNK, backend="cuda")
    with pytest.raises(ValueError, match="interpret=True applies to backend='pallas' only"):
        ssd(*args, chunk=CHUNK, backend="triton", interpret=True)
    with pytest.warns(RuntimeWarning, match="Falling back to backend='xla'"):
        got = ssd(*args, chunk=CHUNK, backend="triton", fallback=True)
    want = ssd_chunked(*args, chunk=CHUNK)
    for g, w in zip(got, want):
        np.testing.assert_array_equal(np.asarray(g), np.asarray(w))
    if jax.default_backend() == "cpu":
        with pytest.raises(BackendUnavailableError, match="pallas needs a CUDA GPU .* or interpret=True"):
            ssd(*args, chunk=CHUNK, backend="pallas")
