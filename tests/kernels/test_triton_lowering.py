"""Every Pallas kernel lowers through Pallas' Triton backend for a CUDA GPU, here on the CPU.

`jax.export(..., platforms=["cuda"])` runs the same lowering a GPU run does (jaxpr -> Triton IR, embedded as the
`__gpu$xla.gpu.triton` custom call) without a GPU, so a kernel that uses an operation the Triton lowering lacks,
or a tile it refuses, fails here instead of on the device. What only the device does (Triton's own compilation to
PTX: register and shared-memory limits) is not covered. Inputs are abstract, so the 8B shapes cost nothing."""
import jax
import jax.numpy as jnp
import pytest
from jax import export

from l2m_jax.kernels import pallas_attention, pallas_ssd, pallas_ssm, tiling

# On a GPU the other kernel tests compile and run every kernel for real; exporting for "cuda" there takes the
# device's own path, which asks for an abstract device this test does not give.
pytestmark = pytest.mark.skipif(jax.default_backend() == "gpu", reason="the GPU compiles the kernels themselves")

_TRITON = "__gpu$xla.gpu.triton"
F32, BF16 = jnp.float32, jnp.bfloat16


def _spec(*shape, dtype=BF16):
    return jax.ShapeDtypeStruct(shape, dtype)


def _lower(fn, *args) -> str:
    exported = export.export(jax.jit(fn), platforms=["cuda"],
                             disabled_checks=[export.DisabledSafetyCheck.custom_call(_TRITON)])(*args)
    text = exported.mlir_module()
    assert _TRITON in text
    return text


# (batch, heads, P, N, (Gx, Gb, Gc)): Llama-3-8B's Mamba-2 layers at batch 1 and 64; SmolLM2-135M's
MAMBA2 = {"8b-b1": (1, 32, 128, 128, (8, 8, 32)), "8b-b64": (64, 32, 128, 128, (8, 8, 32)),
          "smollm2": (1, 9, 64, 64, (3, 3, 9))}


def _mamba2_args(batch, heads, hdim, dstate, groups, tokens):
    gx, gb, gc = groups
    x, dt, b = _spec(batch, tokens, gx, hdim), _spec(batch, tokens, heads), _spec(batch, tokens, gb, dstate)
    return (_spec(batch, heads, hdim, dstate, dtype=F32), (x, dt, b), _spec(batch, dtype=jnp.int32), x, dt, b,
            _spec(batch, tokens, gc, dstate), *[_spec(heads, dtype=F32)] * 3)


@pytest.fixture
def form(request):
    pallas_ssm.set_form(request.param)
    yield request.param
    pallas_ssm.set_form("loop")


@pytest.mark.parametrize("shape", list(MAMBA2))
@pytest.mark.parametrize("form", list(pallas_ssm.FORMS), indirect=True)
def test_mamba2_verify_lowers(form, shape):
    args = _mamba2_args(*MAMBA2[shape], tokens=5)
    _lower(lambda h, c, n, x, dt, b, cc, a, d, bias: pallas_ssm.mamba2_verify(h, c, n, x, dt, b, cc, A=a, D=d,
                                                                              dt_bias=bias), *args)


def test_matrix_form_at_8b_batch_64_loops_over_row_blocks():
    assert tiling.mamba2_matrix_tiles(64, 32, 128, 128)[1] > 1     # so the test above lowered the fori_loop


@pytest.mark.parametrize("shape", list(MAMBA2))
def test_mamba2_step_lowers(shape):
    h, _, _, x, dt, b, c, *params = _mamba2_args(*MAMBA2[shape], tokens=1)
    x, dt, b, c = (_spec(*a.shape[:1], *a.shape[2:], dtype=a.dtype) for a in (x, dt, b, c))
    _lower(lambda h, x, dt, b, c, a, d, bias: pallas_ssm.mamba2_update(h, x, dt, b, c, A=a, D=d, dt_bias=bias),
           h, x, dt, b, c, *params)


@pytest.mark.parametrize("form", ["loop", "unrolled"], indirect=True)
def test_mamba1_kernels_lower(form):
    batch, channels, dstate, gb, gc, tokens = 64, 4096, 16, 64, 256, 5
    h = _spec(batch, channels, dstate, dtype=F32)
    x, b, c = _spec(batch, tokens, channels), _spec(batch, tokens, gb, dstate), _spec(batch, tokens, gc, dstate)
    params = (_spec(channels, dstate, dtype=F32), _spec(channels, dtype=F32), _spec(channels, dtype=F32))
    _lower(lambda h, cache, n, x, dt, b, c, a, d, bias: pallas_ssm.mamba_verify(h, cache, n, x, dt, b, c, A=a, D=d,
                                                                                dt_bias=bias),
           h, (x, x, b), _spec(batch, dtype=jnp.int32), x, x, b, c, *params)


@pytest.mark.parametrize("tokens,window", [(1, None), (5, None), (5, 4096)])
def test_attention_decode_lowers(tokens, window):
    batch, capacity = 1, 1052                                       # 8B attention: 32 heads over 8 KV heads
    args = (_spec(batch, tokens, 32, 128), _spec(batch, capacity, 8, 128), _spec(batch, capacity, 8, 128),
            _spec(batch, tokens, dtype=jnp.int32), _spec(batch, dtype=jnp.int32))
    _lower(lambda q, k, v, p, n: pallas_attention.decode_attention(q, k, v, p, n, sliding_window=window), *args)


def test_ssd_forward_and_backward_lower():
    """The fused SSD forward, and its backward (the intra-chunk kernels and the reversed state passing)."""
    b, length, heads, hdim, dstate = 1, 1024, 4, 64, 128
    args = (_spec(b, length, heads, hdim), _spec(b, length, heads, dtype=F32), _spec(heads, dtype=F32),
            _spec(b, length, heads, dstate), _spec(b, length, heads, dstate), _spec(heads, dtype=F32))

    def loss(*a):
        return jnp.sum(pallas_ssd.ssd_chunked_pallas(*a, chunk=256)[0].astype(F32))

    forward = _lower(lambda *a: pallas_ssd.ssd_chunked_pallas(*a, chunk=256), *args)
    both = _lower(jax.grad(loss, argnums=tuple(range(6))), *args)
    assert both.count(_TRITON) > forward.count(_TRITON)             # the backward's kernels are there too
