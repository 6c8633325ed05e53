"""forward's input checks: ids outside [0, V) fail under jit too, and one length rule for forward and generate."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import l2m_jax
from l2m_jax.cache import init_state
from l2m_jax.config import ModelConfig, default_ssm_config

CFG = ModelConfig.tiny(vocab_size=48, n_layers=2, max_position_embeddings=32)
OK = np.random.default_rng(0).integers(0, CFG.vocab_size, size=(2, 8))


@pytest.fixture(scope="module")
def params():
    return l2m_jax.init_params(CFG, 0)


@pytest.fixture(scope="module")
def jitted():
    return jax.jit(lambda p, t: l2m_jax.forward(CFG, p, t)[0])


def _with(tokens, pos, value):
    t = np.array(tokens)
    t[pos] = value
    return t


@pytest.mark.parametrize("bad", [CFG.vocab_size, -1])
def test_jitted_forward_refuses_ids_outside_the_vocab(params, jitted, bad):
    tokens = _with(OK, (1, 5), bad)
    with pytest.raises(jax.errors.JaxRuntimeError, match=rf"token ids must lie in \[0, {CFG.vocab_size}\)"):
        np.asarray(jitted(params, jnp.asarray(tokens)))   # not NaN logits (>= V) nor a wrapped id (< 0)
    with pytest.raises(ValueError, match=rf"token ids must lie in \[0, {CFG.vocab_size}\)"):
        l2m_jax.forward(CFG, params, tokens)               # eagerly: before any compute
    # the same program keeps working on good ids
    np.testing.assert_allclose(np.asarray(jitted(params, jnp.asarray(OK))),
                               np.asarray(l2m_jax.forward(CFG, params, OK)[0]), rtol=1e-6, atol=1e-6)


def test_unchecked_forward_adds_nothing_to_the_program(params):
    def program(checked):
        return str(jax.make_jaxpr(lambda p, t: l2m_jax.forward(CFG, p, t, checked=checked)[0])(params, OK))

    assert "debug_callback" in program(True)
    assert "debug_callback" not in program(False)


def test_too_long_is_one_rule_for_forward_and_generate(params):
    limit = CFG.max_position_embeddings
    with pytest.raises(ValueError) as fwd:
        l2m_jax.forward(CFG, params, np.zeros((1, limit + 1), np.int32))
    with pytest.raises(ValueError) as gen:
        l2m_jax.generate(CFG, params, [[1] * (limit - 2)], max_new_tokens=3)
    with pytest.raises(ValueError) as spec:
        l2m_jax.speculative_generate((CFG, params), (CFG, params), [[1] * (limit - 4)], max_new_tokens=2, k=2)
    msg = str(fwd.value)
    assert f"needs {limit + 1} positions" in msg and f"trained for {limit} (max_position_embeddings)" in msg
    assert "shorten it" in msg
    assert str(gen.value) == msg and str(spec.value) == msg
    with pytest.raises(ValueError, match="max_position_embeddings"):  # under jit: while tracing
        jax.jit(lambda p, t: l2m_jax.forward(CFG, p, t)[0])(params, jnp.zeros((1, limit + 1), jnp.int32))
    # exactly the limit runs
    assert l2m_jax.forward(CFG, params, np.zeros((1, limit), np.int32))[0].shape == (1, limit, CFG.vocab_size)


def test_stateful_forward_counts_the_positions_already_consumed(params):
    limit = CFG.max_position_embeddings
    state = init_state(CFG, 1, 48)
    state = state._replace(lengths=jnp.full((1,), limit - 2, jnp.int32))
    with pytest.raises(ValueError, match=f"needs {limit + 1} positions"):
        l2m_jax.forward(CFG, params, np.ones((1, 3), np.int32), state)
    step = jax.jit(lambda p, t, s: l2m_jax.forward(CFG, p, t, s)[0])
    with pytest.raises(jax.errors.JaxRuntimeError, match=f"needs {limit + 1} positions"):  # traced: at run time
        np.asarray(step(params, jnp.ones((1, 3), jnp.int32), state))
    assert np.isfinite(np.asarray(step(params, jnp.ones((1, 2), jnp.int32), state))).all()


def test_pure_mamba_has_no_length_limit():
    pure = CFG.replace(layer_mixers=("mamba2",) * CFG.n_layers, ssm=default_ssm_config(CFG, "mamba2"))
    l2m_jax.models.check_length(pure, 100 * CFG.max_position_embeddings)   # no attention, no RoPE limit
    with pytest.raises(ValueError, match="max_position_embeddings"):
        l2m_jax.models.check_length(CFG, CFG.max_position_embeddings + 1)
