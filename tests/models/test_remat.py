"""Rematerialisation changes memory, not math: gradients with remat equal those without."""
import jax
import jax.numpy as jnp
import numpy as np

import l2m_jax


def test_remat_gradients_equal_plain_gradients():
    cfg = l2m_jax.ModelConfig.tiny(vocab_size=40, n_layers=2)
    s_cfg, params = l2m_jax.hybridize(cfg, l2m_jax.init_params(cfg, 0), [1], "mamba2", jax.random.key(1))
    tokens = np.random.default_rng(0).integers(0, 40, size=(2, 7))

    def loss(p, remat):
        return jnp.mean(l2m_jax.forward(s_cfg, p, tokens, remat=remat)[0] ** 2)
    plain, remat = jax.grad(loss)(params, False), jax.grad(loss)(params, True)
    for a, b in zip(jax.tree.leaves(plain), jax.tree.leaves(remat)):
        np.testing.assert_allclose(np.asarray(b), np.asarray(a), rtol=1e-6, atol=1e-7)
