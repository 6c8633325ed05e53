"""The whole model with attention impl "xla" against "reference": logits and parameter gradients, full-sequence
calls (no mask, right padding, other masks), prefill into an empty cache and into a filled one."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import l2m_jax
from l2m_jax.cache import init_state
from l2m_jax.ops import attention as attn_ops
from l2m_jax.ops.attention import attention_impl

# relative to the reference's largest entry (tests/conftest.rel_err); bf16 compute: the two paths round the
# attention output to bf16 in different places, and every later layer sees that rounding
TOL = {"float32": 2e-5, "bfloat16": 3e-2}
V, L = 48, 12


def _cfg(kind: str, dtype: str = "float32"):
    if kind == "llama":
        cfg = l2m_jax.ModelConfig.tiny(vocab_size=V, n_layers=2, n_heads=8, n_kv_heads=2, head_dim=64, d_model=128)
    else:  # Mistral-style: a sliding window shorter than the sequence, so it masks something
        cfg = l2m_jax.ModelConfig.tiny(vocab_size=V, n_layers=2, sliding_window=3, model_type="mistral")
    cfg = cfg.replace(dtype=dtype)
    params = l2m_jax.init_params(cfg, 0)
    if kind == "hybrid":
        cfg, params = l2m_jax.hybridize(cfg, params, [1], "mamba2", jax.random.key(1))
    return cfg, params


def _rel(a, b) -> float:
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(np.max(np.abs(a - b)) / max(np.max(np.abs(b)), 1e-30))


_TOKENS = jnp.asarray(np.random.default_rng(0).integers(0, V, (3, L)), jnp.int32)
_RIGHT = jnp.asarray(np.arange(L)[None] < np.array([L, 7, 1])[:, None])
_LEFT = jnp.asarray(np.arange(L)[None] >= np.array([0, 5, 2])[:, None])


def _logits_and_grads(impl, cfg, params, mask, remat):
    cot = jax.random.normal(jax.random.key(2), (3, L, cfg.vocab_size))

    def loss(p):
        return jnp.sum(l2m_jax.forward(cfg, p, _TOKENS, mask=mask, remat=remat, checked=False)[0] * cot)
    with attention_impl(impl):  # a fresh jit per impl: the switch is read while tracing
        logits = jax.jit(lambda p: l2m_jax.forward(cfg, p, _TOKENS, mask=mask, checked=False)[0])(params)
        grads = jax.jit(jax.grad(loss))(params)
    return logits, grads


@pytest.mark.parametrize("kind,dtype,mask,remat", [
    ("llama", "float32", None, False),
    ("mistral", "float32", None, True),
    ("hybrid", "float32", None, False),
    ("llama", "bfloat16", None, False),
    ("mistral", "bfloat16", None, False),
    ("llama", "float32", "right", False),     # right padding: kv lengths through the chosen implementation
    ("mistral", "float32", "right", False),
    ("mistral", "float32", "left", False),    # not expressible: falls back to the reference at run time
])
def test_forward_and_gradients_xla_equal_reference(kind, dtype, mask, remat):
    cfg, params = _cfg(kind, dtype)
    m = {None: None, "right": _RIGHT, "left": _LEFT}[mask]
    got_l, got_g = _logits_and_grads("xla", cfg, params, m, remat)
    ref_l, ref_g = _logits_and_grads("reference", cfg, params, m, remat)
    assert _rel(got_l, ref_l) <= TOL[dtype]
    assert jax.tree.structure(got_g) == jax.tree.structure(ref_g)
    for (path, a), b in zip(jax.tree_util.tree_leaves_with_path(got_g), jax.tree.leaves(ref_g)):
        assert _rel(a, b) <= TOL[dtype], (jax.tree_util.keystr(path), _rel(a, b))


def _scope_in_program(impl, cfg, params, mask) -> bool:
    with attention_impl(impl):
        text = jax.jit(lambda p: l2m_jax.forward(cfg, p, _TOKENS, mask=mask, checked=False)[0]).lower(
            params).as_text(debug_info=True)
    return "causal_attention_xla" in text


def test_switch_reaches_the_model():
    """The equality above is not vacuous: "xla" puts jax.nn.dot_product_attention into the program."""
    cfg, params = _cfg("mistral")
    assert _scope_in_program("xla", cfg, params, None) and _scope_in_program("xla", cfg, params, _RIGHT)
    assert not _scope_in_program("reference", cfg, params, None)


@pytest.mark.parametrize("kind", ["mistral", "hybrid"])
def test_prefill_and_decode_xla_equal_reference(kind):
    """Prefill (L > DECODE_MAX_QUERIES) into empty rows takes the chosen implementation, a second prefill into
    filled rows the reference; logits at real positions and the decode step after them agree."""
    cfg, params = _cfg(kind)
    saved = attn_ops.DECODE_MAX_QUERIES
    nxt = jnp.asarray(np.random.default_rng(3).integers(0, V, (3, 1)), jnp.int32)

    def run(impl):
        attn_ops.set_decode_attention(max_queries=4)
        try:
            with attention_impl(impl):
                fwd = jax.jit(lambda p, t, s, m: l2m_jax.forward(cfg, p, t, s, mask=m, checked=False))
                state = init_state(cfg, 3, 2 * L + 2)
                first, state = fwd(params, _TOKENS, state, _RIGHT)
                second, state = fwd(params, _TOKENS[:, ::-1], state, _RIGHT)   # rows continue: lengths > 0
                step, _ = fwd(params, nxt, state, None)
        finally:
            attn_ops.set_decode_attention(max_queries=saved)
        real = np.asarray(_RIGHT)
        return np.asarray(first)[real], np.asarray(second)[real], np.asarray(step), np.asarray(first)[~real]

    *got, got_pads = run("xla")
    *ref, ref_pads = run("reference")
    for a, b in zip(got, ref):
        assert _rel(a, b) <= TOL["float32"]
    if cfg.sliding_window is not None:
        # not vacuous: pads past the window see no key, and such a row averages this call's L values in the
        # fast branch but the cache's S slots in the reference, so the first prefill did take the fast branch
        assert _rel(got_pads, ref_pads) > 1e-3


def test_model_cudnn_without_gpu_raises():
    if jax.default_backend() == "gpu":
        pytest.skip("the error of a machine without a GPU")
    cfg, params = _cfg("llama")
    with attention_impl("cudnn"), pytest.raises(ValueError, match="runs on a GPU only.*dtype='bfloat16'"):
        l2m_jax.forward(cfg, params, _TOKENS)
