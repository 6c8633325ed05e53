"""The fused Pallas attention decode (kernels/pallas_attention.py; interpret mode on a CPU, compiled on a GPU)
against the full-cache reference: GQA ratios, T = 1 and 5 queries with pads, sliding windows, blocks that do and
do not divide the cache, one and several splits, stale NaN slots, and the shapes it refuses."""
import zlib

import jax.numpy as jnp
import numpy as np
import pytest

from l2m_jax.kernels.pallas_attention import decode_attention, decode_tiles
from tests.ops.test_attention_decode import TOL, _case, _reference
from tests.kernels import INTERPRET


def _check(out, ref, sees, dtype):
    sees = np.asarray(sees)
    out, ref = np.asarray(out, np.float32), np.asarray(ref, np.float32)
    assert np.all(np.isfinite(out)) and np.all(out[~sees] == 0)   # a query that sees nothing: zeros
    np.testing.assert_allclose(out[sees], ref[sees], atol=TOL[dtype], rtol=TOL[dtype])


# (dtype, T, KV groups of 4 query heads, sliding window): every value of each twice, not the whole product
CASES = [("float32", 1, 4, None), ("float32", 5, 1, 6), ("float32", 5, 4, 6), ("bfloat16", 1, 1, 6),
         ("bfloat16", 5, 4, None), ("bfloat16", 1, 4, None)]


@pytest.mark.parametrize("dtype,t,g,window", CASES)
def test_decode_kernel_equals_full_cache(dtype, t, g, window):
    q, kc, vc, pos, mask, new_len = _case(zlib.crc32(repr((dtype, t, g, window)).encode()), t=t, g=g, p=16,
                                          dtype=dtype)
    ref, sees = _reference(q, kc, vc, pos, new_len, window)
    assert np.asarray(sees)[np.asarray(mask)].all()
    out = decode_attention(q, kc, vc, pos, new_len, sliding_window=window, interpret=INTERPRET)
    assert out.shape == q.shape and out.dtype == q.dtype
    _check(out, ref, sees, dtype)


@pytest.mark.parametrize("block,splits", [(16, 1), (16, 2), (32, 3), (32, 8)])   # S = 40: 32 does not divide it
def test_blocks_and_splits(block, splits):
    q, kc, vc, pos, _, new_len = _case(5, t=5, g=2, p=16)
    ref, sees = _reference(q, kc, vc, pos, new_len, None)
    _check(decode_attention(q, kc, vc, pos, new_len, block=block, splits=splits, interpret=INTERPRET), ref, sees,
           "float32")


def test_slots_past_each_row_are_not_read():
    """NaN in every slot past each row's length (stale cache) leaves the output finite and equal."""
    q, kc, vc, pos, _, new_len = _case(3, t=5, g=2, s=64, p=16)
    ref, sees = _reference(q, kc, vc, pos, new_len, None)
    past = (jnp.arange(64)[None, :] >= new_len[:, None])[:, :, None, None]
    kn, vn = jnp.where(past, jnp.nan, kc), jnp.where(past, jnp.nan, vc)
    for block, splits in ((16, 1), (32, 2), (64, 1)):
        _check(decode_attention(q, kn, vn, pos, new_len, block=block, splits=splits, interpret=INTERPRET), ref, sees,
               "float32")


def test_default_tiles_fill_the_gpu_but_not_past_the_cache():
    assert decode_tiles(1, 8, 1052) == (64, 16)        # 8B shapes at batch 1: 17 blocks of 64 slots, 16 splits
    assert decode_tiles(64, 8, 1052) == (64, 1)        # 512 (row, group) programs fill the GPU already
    assert decode_tiles(1, 1, 24) == (16, 2)           # a 24-slot cache: 16-slot blocks (one shifted back)
    assert decode_tiles(1, 1, 40, block=32) == (32, 2)


@pytest.mark.parametrize("change,match", [
    (dict(p=8), "head_dim to be a power of two >= 16"),
    (dict(s=12, t=1), "at least 16 slots"),
])
def test_refuses_what_it_cannot_tile(change, match):
    q, kc, vc, pos, _, new_len = _case(1, **{"p": 16, **change})
    with pytest.raises(ValueError, match=match):
        decode_attention(q, kc, vc, pos, new_len, interpret=INTERPRET)
    q, kc, vc, pos, _, new_len = _case(1, p=16)
    with pytest.raises(ValueError, match="block must be a power of two"):
        decode_attention(q, kc, vc, pos, new_len, block=48, interpret=INTERPRET)
