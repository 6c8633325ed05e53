"""Length-bounded blocked attention over a KV cache (decode / verification) against the full-cache reference."""
import zlib

import jax
import jax.extend
import jax.numpy as jnp
import numpy as np
import pytest

import l2m_jax
from l2m_jax.cache import init_state
from l2m_jax.config import ModelConfig
from l2m_jax.ops import attention as attn_ops
from l2m_jax.ops.attention import attention_mask, gqa_attention, gqa_attention_cached

# bf16: both paths round the probabilities to bf16 before the PV product, in different places
TOL = {"float32": 2e-5, "bfloat16": 3e-2}


def _case(seed, *, b=5, t=1, s=40, h=4, g=4, p=8, dtype="float32", fill=None):
    """A cache with per-row old lengths (row 0 empty before this call) and a call of t tokens, right-padded."""
    rng = np.random.default_rng(seed)
    old = rng.integers(0, s - t + 1, size=b)
    old[0] = 0
    n_real = rng.integers(0, t + 1, size=b)
    n_real[1 % b] = t  # at least one full row
    if b > 2:
        n_real[2] = 0  # a row whose call is all pads
    pos = old[:, None] + np.arange(t)[None]
    mask = np.arange(t)[None] < n_real[:, None]
    new_len = old + n_real
    dt = jnp.dtype(dtype)
    q = jnp.asarray(rng.standard_normal((b, t, h, p)), dt)
    k_new = jnp.asarray(rng.standard_normal((b, t, g, p)), dt)
    v_new = jnp.asarray(rng.standard_normal((b, t, g, p)), dt)
    kc = jnp.asarray(rng.standard_normal((b, s, g, p)), dt)
    vc = jnp.asarray(rng.standard_normal((b, s, g, p)), dt)
    rows = jnp.arange(b)[:, None]
    pos = jnp.asarray(pos, jnp.int32)
    kc = kc.at[rows, pos].set(k_new, mode="drop")
    vc = vc.at[rows, pos].set(v_new, mode="drop")
    return q, kc, vc, pos, jnp.asarray(mask), jnp.asarray(new_len, jnp.int32)


def _reference(q, kc, vc, pos, new_len, window):
    b, s = kc.shape[:2]
    k_pos = jnp.broadcast_to(jnp.arange(s, dtype=jnp.int32), (b, s))
    m = attention_mask(pos, k_pos, k_pos < new_len[:, None], sliding_window=window)
    return gqa_attention(q, kc, vc, m), jnp.any(m, axis=-1)  # [B, T]: the query sees a key


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
@pytest.mark.parametrize("t", [1, 5])
@pytest.mark.parametrize("block", [8, 7, 64])  # divides S=40 / does not / larger than S
@pytest.mark.parametrize("g", [4, 1])          # GQA ratio 1 and 4 (4 query heads)
@pytest.mark.parametrize("window", [None, 6])
def test_blocked_equals_full_cache(dtype, t, block, g, window):
    seed = zlib.crc32(repr((dtype, t, block, g, window)).encode())
    q, kc, vc, pos, mask, new_len = _case(seed, t=t, g=g, dtype=dtype)
    ref, sees = _reference(q, kc, vc, pos, new_len, window)
    sees = np.asarray(sees)
    out = jax.jit(gqa_attention_cached, static_argnames=("block", "sliding_window"))(
        q, kc, vc, pos, new_len, block=block, sliding_window=window)
    assert out.shape == q.shape and out.dtype == q.dtype
    out, ref = np.asarray(out, np.float32), np.asarray(ref, np.float32)
    assert np.all(np.isfinite(out))
    assert sees[np.asarray(mask)].all()          # every real token sees at least its own key
    np.testing.assert_allclose(out[sees], ref[sees], atol=TOL[dtype], rtol=TOL[dtype])
    assert np.all(out[~sees] == 0)               # a pad that sees nothing: zeros, never NaN


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
@pytest.mark.parametrize("block", [8, 7, 64])
@pytest.mark.parametrize("window", [None, 6])
def test_static_loop_equals_full_cache(dtype, block, window):
    """loop="static" (S/block trips, the ones past the longest row re-slice its last block) gives the same."""
    q, kc, vc, pos, mask, new_len = _case(zlib.crc32(repr(("static", dtype, block, window)).encode()), t=5, g=2,
                                          dtype=dtype)
    ref, sees = _reference(q, kc, vc, pos, new_len, window)
    sees = np.asarray(sees)
    out = gqa_attention_cached(q, kc, vc, pos, new_len, block=block, sliding_window=window, loop="static")
    out, ref = np.asarray(out, np.float32), np.asarray(ref, np.float32)
    assert np.all(np.isfinite(out)) and np.all(out[~sees] == 0)
    np.testing.assert_allclose(out[sees], ref[sees], atol=TOL[dtype], rtol=TOL[dtype])


def test_slots_past_the_longest_row_are_not_read():
    """NaN in every slot past the longest row poisons an einsum-then-mask attention (0 · NaN = NaN), but not
    the blocked path: it stops at ceil(max(lengths) / block) blocks and masks the tail of the last one."""
    q, kc, vc, pos, mask, new_len = _case(3, t=5, g=2, s=64)
    new_len = jnp.minimum(new_len, 37)
    ref, sees = _reference(q, kc, vc, pos, new_len, None)
    sees = np.asarray(sees)
    past = (jnp.arange(64) >= jnp.max(new_len))[None, :, None, None]
    kn, vn = jnp.where(past, jnp.nan, kc), jnp.where(past, jnp.nan, vc)
    poisoned_ref, _ = _reference(q, kn, vn, pos, new_len, None)
    assert np.isnan(np.asarray(poisoned_ref)).any()  # the check is meaningful: reading those slots shows
    for block, loop in ((8, "dynamic"), (10, "dynamic"), (64, "dynamic"), (10, "static"), (24, "static")):
        out = np.asarray(gqa_attention_cached(q, kn, vn, pos, new_len, block=block, loop=loop))
        assert np.all(np.isfinite(out))
        np.testing.assert_allclose(out[sees], np.asarray(ref)[sees], atol=2e-5, rtol=2e-5)


def test_no_intermediate_spans_the_cache():
    """Structural: apart from the cache inputs, no value of the program has the capacity S as a dimension
    (the full-cache reference materialises [.., S] scores); the loop is a while with a dynamic trip count."""
    s = 997
    q, kc, vc, pos, _, new_len = _case(0, t=5, g=2, s=s, b=3)
    jaxpr = jax.make_jaxpr(lambda *a: gqa_attention_cached(*a, block=64))(q, kc, vc, pos, new_len)
    shapes, prims = [], set()

    def walk(jp):
        for eqn in jp.eqns:
            prims.add(eqn.primitive.name)
            shapes.extend(tuple(v.aval.shape) for v in eqn.outvars if hasattr(v.aval, "shape"))
            for sub in jax.extend.core.jaxprs_in_params(eqn.params):
                walk(sub)

    walk(jaxpr.jaxpr)
    assert "while" in prims
    assert not [sh for sh in shapes if s in sh]
    ref_jaxpr = jax.make_jaxpr(lambda *a: _reference(*a, None)[0])(q, kc, vc, pos, new_len)
    assert any(s in tuple(v.aval.shape) for e in ref_jaxpr.jaxpr.eqns for v in e.outvars)


def test_switch_validates():
    with pytest.raises(ValueError, match="impl"):
        attn_ops.set_decode_attention("flash")
    if jax.default_backend() != "gpu":
        with pytest.raises(ValueError, match="'pallas' needs a GPU.*interpret=True"):
            attn_ops.set_decode_attention("pallas")
    with pytest.raises(ValueError, match="block"):
        attn_ops.set_decode_attention(block=0)
    with pytest.raises(ValueError, match="loop"):
        attn_ops.set_decode_attention(loop="unrolled")


@pytest.mark.parametrize("window", [None, 3])
def test_model_decode_blocked_equals_full(window):
    """A hybrid model's prefill + T=1 and T=5 cached calls (ragged rows, pads) give the same logits with the
    blocked path, the fused Pallas kernel and the full-cache fallback."""
    cfg = ModelConfig.tiny(vocab_size=48, n_layers=4, sliding_window=window)
    params = l2m_jax.init_params(cfg, 0)
    cfg, params = l2m_jax.hybridize(cfg, params, [1, 3], "mamba2", jax.random.key(1))
    rng = np.random.default_rng(0)
    prompt = jnp.asarray(rng.integers(0, 48, (3, 6)), jnp.int32)
    pmask = jnp.asarray(np.arange(6)[None] < np.array([6, 2, 4])[:, None])
    steps = [(jnp.asarray(rng.integers(0, 48, (3, 1)), jnp.int32), None),
             (jnp.asarray(rng.integers(0, 48, (3, 5)), jnp.int32),
              jnp.asarray(np.arange(5)[None] < np.array([5, 3, 1])[:, None])),
             (jnp.asarray(rng.integers(0, 48, (3, 1)), jnp.int32), None)]
    saved = (attn_ops.DECODE_IMPL, attn_ops.DECODE_BLOCK, attn_ops.DECODE_LOOP)

    def run(impl, loop="dynamic"):
        attn_ops.set_decode_attention(impl, block=4, loop=loop)
        # a new jitted function per setting: the setting is read while tracing, and jit's cache does not see it
        fwd = jax.jit(lambda p, t, s, m: l2m_jax.forward(cfg, p, t, s, mask=m))
        try:
            state = init_state(cfg, 3, 24)
            logits, state = fwd(params, prompt, state, pmask)
            outs = []
            for tok, m in steps:
                logits, state = fwd(params, tok, state, m)
                outs.append(np.asarray(logits) if m is None else np.asarray(logits)[np.asarray(m)])
            return outs
        finally:
            attn_ops.set_decode_attention(saved[0], block=saved[1], loop=saved[2])

    full = run("full")
    for loop in ("dynamic", "static"):
        for a, b in zip(run("blocked", loop), full):
            np.testing.assert_allclose(a, b, atol=1e-4, rtol=1e-4)
    if window is not None:
        return                                           # the Pallas kernel's windows: tests/kernels
    attn_ops.set_decode_attention(interpret=jax.default_backend() != "gpu")    # the fused Pallas kernel
    try:
        for a, b in zip(run("pallas"), full):
            np.testing.assert_allclose(a, b, atol=1e-4, rtol=1e-4)
    finally:
        attn_ops.set_decode_attention(interpret=False)


def _switches():
    from l2m_jax.kernels import pallas_ssm
    from l2m_jax.ops import ssm as ssm_ops

    return {  # name: (read the setting, set it to another value, set it back)
        "decode": (lambda: attn_ops.DECODE_IMPL, lambda: attn_ops.set_decode_attention("blocked"),
                   lambda: attn_ops.set_decode_attention("full")),
        "attention": (lambda: attn_ops.ATTN_IMPL, lambda: attn_ops.set_attention("xla"),
                      lambda: attn_ops.set_attention("reference")),
        "ssd": (lambda: ssm_ops.SSD_BACKEND, lambda: ssm_ops.set_ssd_backend("pallas", interpret=True),
                lambda: ssm_ops.set_ssd_backend("xla")),
        "verify form": (lambda: pallas_ssm.FORM, lambda: pallas_ssm.set_form("matrix"),
                        lambda: pallas_ssm.set_form("loop")),
    }


@pytest.mark.parametrize("switch", ["decode", "attention", "ssd", "verify form"])
def test_every_switch_is_part_of_the_key_of_the_jitted_entry_points(switch):
    from l2m_jax.ops import switches

    read, change, restore = _switches()[switch]
    before = switches()
    change()
    try:
        assert switches() != before and read() in switches()
    finally:
        restore()
    assert switches() == before


def test_generate_traces_anew_after_a_switch_and_finds_its_program_when_switched_back():
    """A changed switch gives `generate` a new program instead of the one traced before it; switching back
    reuses the first (the switches are a static argument of the jitted decode loop)."""
    from l2m_jax.infer.generate import _generate

    cfg = ModelConfig.tiny(vocab_size=48, n_layers=2)
    params = l2m_jax.init_params(cfg, 0)
    prompts = [[5, 6, 7], [8]]
    first = l2m_jax.generate(cfg, params, prompts, 3)
    size = _generate._cache_size()
    l2m_jax.generate(cfg, params, prompts, 3)
    assert _generate._cache_size() == size                   # the same settings: the same program
    attn_ops.set_decode_attention("blocked", block=4)
    try:
        assert l2m_jax.generate(cfg, params, prompts, 3) == first
        assert _generate._cache_size() == size + 1            # traced with the blocked path
    finally:
        attn_ops.set_decode_attention("full", block=256)
    l2m_jax.generate(cfg, params, prompts, 3)
    assert _generate._cache_size() == size + 1                # back to the first program


def test_keyed_jit_keys_programs_on_the_switches_and_keeps_jits_arguments():
    import jax.numpy as jnp

    from l2m_jax.ops import keyed_jit

    traced = []

    @keyed_jit(static_argnums=0, static_argnames=("n",))
    def scale(offset, x, *, n: int):
        traced.append(n)
        return x * n + offset

    x = jnp.ones(3)
    assert scale(1, x, n=2).tolist() == [3.0, 3.0, 3.0] and scale.__name__ == "scale"
    scale(1, x, n=2)
    assert traced == [2]                                     # static arguments as jax.jit has them
    attn_ops.set_decode_attention("blocked", block=4)
    try:
        scale(1, x, n=2)
        assert traced == [2, 2]                              # a switch changed: traced anew
    finally:
        attn_ops.set_decode_attention("full", block=256)
    scale(1, x, n=2)
    assert traced == [2, 2] and scale._cache_size() == 2     # switched back: the first program
    assert scale.lower(1, x, n=3).compile()(x).tolist() == [4.0, 4.0, 4.0]       # static arguments left out
    with pytest.raises(TypeError, match="has a parameter named 'switches'"):
        keyed_jit(lambda x, switches: x)
