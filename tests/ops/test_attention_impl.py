"""Full-sequence attention implementations ("xla" through jax.nn.dot_product_attention) against the reference."""
import zlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from l2m_jax.ops import attention as attn_ops
from l2m_jax.ops.attention import (attention_impl, attention_mask, causal_attention, gqa_attention, right_padding,
                                   set_attention)

# relative to the reference's largest entry. fp32: another summation order. bf16: both take fp32 scores and a
# softmax in fp32 and round the probabilities to bf16 before the PV product; measured equal on CPU, the bound
# leaves room for a different accumulation order of the PV product
TOL = {"float32": 2e-5, "bfloat16": 1e-2}

CASES = {  # name: (sliding_window, kv_lengths)
    "causal": (None, None),
    "window": (5, None),
    "padding": (None, [24, 13, 0]),            # a full row, a padded row, an all-pad row
    "window+padding": (4, [24, 3, 1]),         # pad queries 4+ past the last real key see nothing
}


def _rel(a, b) -> float:
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(np.max(np.abs(a - b)) / max(np.max(np.abs(b)), 1e-30))


def _inputs(seed, dtype, *, b=3, l=24, h=8, g=2, p=64):
    rng = np.random.default_rng(seed)
    dt = jnp.dtype(dtype)
    q, cot = (jnp.asarray(rng.standard_normal((b, l, h, p)), dt) for _ in range(2))
    k, v = (jnp.asarray(rng.standard_normal((b, l, g, p)), dt) for _ in range(2))
    return q, k, v, cot


def _out_and_grads(impl, q, k, v, cot, **kw):
    def loss(q, k, v):  # every position, pads included: the implementations agree on pad queries too
        return jnp.sum(causal_attention(q, k, v, impl=impl, **kw).astype(jnp.float32) * cot.astype(jnp.float32))
    return (causal_attention(q, k, v, impl=impl, **kw),) + jax.grad(loss, argnums=(0, 1, 2))(q, k, v)


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
@pytest.mark.parametrize("case", list(CASES))
def test_xla_equals_reference(dtype, case):
    """Outputs and gradients (q, k, v) with GQA 8 query heads over 2 kv heads, head_dim 64."""
    window, lens = CASES[case]
    q, k, v, cot = _inputs(zlib.crc32(repr((dtype, case)).encode()), dtype)
    kw = dict(sliding_window=window, kv_lengths=None if lens is None else jnp.asarray(lens, jnp.int32))
    # fp32 at full fp32 precision: on GPUs XLA's default rounds fp32 matmul inputs to TF32, and the two
    # implementations round different intermediates (measured 5.9e-5 apart on an H200 under the default)
    with jax.default_matmul_precision("highest" if dtype == "float32" else "default"):
        got = jax.jit(lambda *a: _out_and_grads("xla", *a, **kw))(q, k, v, cot)
        ref = jax.jit(lambda *a: _out_and_grads("reference", *a, **kw))(q, k, v, cot)
    for name, x, r in zip(("out", "dq", "dk", "dv"), got, ref):
        assert x.dtype == r.dtype == jnp.dtype(dtype), name
        assert _rel(x, r) <= TOL[dtype], (name, _rel(x, r))


@pytest.mark.parametrize("case", list(CASES))
def test_reference_is_attention_mask(case):
    """impl="reference" is gqa_attention on attention_mask with positions 0..L-1 and the lengths' valid keys."""
    window, lens = CASES[case]
    q, k, v, _ = _inputs(1, "float32")
    b, l = q.shape[:2]
    pos = jnp.broadcast_to(jnp.arange(l, dtype=jnp.int32), (b, l))
    valid = jnp.ones((b, l), bool) if lens is None else pos < jnp.asarray(lens)[:, None]
    ref = gqa_attention(q, k, v, attention_mask(pos, pos, valid, sliding_window=window))
    got = causal_attention(q, k, v, sliding_window=window, impl="reference",
                           kv_lengths=None if lens is None else jnp.asarray(lens, jnp.int32))
    np.testing.assert_array_equal(np.asarray(got), np.asarray(ref))


def test_default_is_reference_and_switch_restores():
    assert attn_ops.ATTN_IMPL == "reference"
    with attention_impl("xla"):
        assert attn_ops.ATTN_IMPL == "xla"
        with attention_impl("cudnn"):
            assert attn_ops.ATTN_IMPL == "cudnn"
        assert attn_ops.ATTN_IMPL == "xla"
    assert attn_ops.ATTN_IMPL == "reference"
    with pytest.raises(ValueError, match="flash"):
        set_attention("flash")
    with pytest.raises(ValueError, match="expected one of"):
        causal_attention(*_inputs(0, "float32")[:3], impl="triton")
    assert attn_ops.ATTN_IMPL == "reference"


@pytest.mark.skipif(jax.default_backend() == "gpu", reason="the error of a machine without a GPU")
@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_cudnn_without_gpu_raises_one_clear_error(dtype):
    q, k, v, _ = _inputs(0, dtype, l=8)
    with pytest.raises(ValueError, match="cudnn") as e:
        causal_attention(q, k, v, impl="cudnn")
    msg = str(e.value)
    assert "GPU" in msg and "set_attention('xla')" in msg and "set_attention('reference')" in msg
    assert ("dtype='bfloat16'" in msg) == (dtype == "float32")


def test_gqa_heads_checked():
    q, k, v, _ = _inputs(0, "float32", h=6, g=4)
    with pytest.raises(ValueError, match="6 query heads are not a multiple of 4"):
        causal_attention(q, k, v, impl="xla")


def test_right_padding():
    mask = jnp.asarray([[1, 1, 1, 0], [1, 1, 1, 1], [0, 0, 0, 0]], bool)
    lengths, ok = right_padding(mask)
    assert lengths.tolist() == [3, 4, 0] and bool(ok)
    for bad in ([0, 1, 1, 1], [1, 0, 1, 0]):  # left padding, a hole
        assert not bool(right_padding(mask.at[0].set(jnp.asarray(bad, bool)))[1])


@pytest.mark.skipif(jax.default_backend() != "gpu", reason="cuDNN flash attention runs on a GPU only")
@pytest.mark.parametrize("case", list(CASES))
def test_cudnn_equals_reference_on_gpu(case):
    """bf16 outputs and gradients at the real queries (cudnn returns zeros for pad queries by design)."""
    window, lens = CASES[case]
    q, k, v, cot = _inputs(zlib.crc32(repr(("cudnn", case)).encode()), "bfloat16", l=128)
    b, l = q.shape[:2]
    lens = None if lens is None else [l if n == 24 else n * 5 for n in lens]  # CASES' rows stretched to L=128
    kl = None if lens is None else jnp.asarray(lens, jnp.int32)
    real = np.ones((b, l), bool) if lens is None else np.arange(l)[None] < np.asarray(lens)[:, None]
    cot = jnp.where(jnp.asarray(real)[:, :, None, None], cot, jnp.zeros((), cot.dtype))  # no gradient from pads
    kw = dict(sliding_window=window, kv_lengths=kl)
    got = jax.jit(lambda *a: _out_and_grads("cudnn", *a, **kw))(q, k, v, cot)
    ref = jax.jit(lambda *a: _out_and_grads("reference", *a, **kw))(q, k, v, cot)
    assert _rel(np.asarray(got[0])[real], np.asarray(ref[0])[real]) <= TOL["bfloat16"]
    assert not np.asarray(got[0])[~real].any()
    for name, x, r in zip(("dq", "dk", "dv"), got[1:], ref[1:]):
        assert _rel(x, r) <= TOL["bfloat16"], (name, _rel(x, r))


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_auto_is_cudnn_where_it_can_run_else_xla(dtype):
    """"auto": cuDNN for half-precision inputs on a GPU, XLA's call for everything else (here: all of it)."""
    q, k, v, _ = _inputs(3, dtype, l=16)
    lens = jnp.asarray([16, 9, 0], jnp.int32)
    got = causal_attention(q, k, v, kv_lengths=lens, impl="auto")
    cudnn = jax.default_backend() == "gpu" and dtype == "bfloat16"
    want = causal_attention(q, k, v, kv_lengths=lens, impl="cudnn" if cudnn else "xla")
    np.testing.assert_array_equal(np.asarray(got, np.float32), np.asarray(want, np.float32))
