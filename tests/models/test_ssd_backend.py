"""The Mamba-2 mixer on the fused Pallas SSD (`set_ssd_backend("pallas")`, interpret mode on the CPU) against
its XLA scan: a hybrid's logits, prefill states and the gradients of a distillation-like loss."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import l2m_jax
from l2m_jax.config import ModelConfig
from l2m_jax.convert.hybridize import hybridize
from l2m_jax.models import forward
from l2m_jax.ops import ssm as ssm_ops

CFG = ModelConfig.tiny(head_dim=16)          # Mamba2 P = N = 16: tiles the fused kernels accept


@pytest.fixture(scope="module")
def hybrid():
    teacher = (CFG, l2m_jax.init_params(CFG, 0))
    return hybridize(*teacher, [1, 3], "mamba2", jax.random.key(1), init="random")


def _rel(a, b):
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(np.linalg.norm(a - b) / max(np.linalg.norm(b), 1e-30))


def test_logits_and_gradients_match_the_xla_scan(hybrid):
    cfg, params = hybrid
    rng = np.random.default_rng(0)
    tokens = jnp.asarray(rng.integers(0, cfg.vocab_size, (2, 40)), jnp.int32)   # 40: not a multiple of 16
    mask = jnp.asarray(np.arange(40)[None] < np.array([[40], [29]]))

    def loss(p):
        logits = forward(cfg, p, tokens, mask=mask)[0]
        return jnp.sum(jax.nn.log_softmax(logits)[..., 3] * mask), logits

    # each jitted anew, so each traces with its own backend
    (want, want_logits), want_grad = jax.jit(jax.value_and_grad(loss, has_aux=True))(params)
    with ssm_ops.ssd_backend("pallas", interpret=True):
        (got, got_logits), got_grad = jax.jit(jax.value_and_grad(loss, has_aux=True))(params)
    assert ssm_ops.SSD_BACKEND == ("xla", False)                   # restored
    real = np.asarray(mask)
    assert _rel(np.asarray(got_logits)[real], np.asarray(want_logits)[real]) < 1e-5
    np.testing.assert_allclose(float(got), float(want), rtol=1e-5)
    for (path, g), w in zip(jax.tree_util.tree_leaves_with_path(got_grad), jax.tree.leaves(want_grad)):
        if np.abs(np.asarray(w)).max() > 0:
            assert _rel(g, w) < 1e-4, jax.tree_util.keystr(path)


def test_bad_backend_names_are_refused():
    with pytest.raises(ValueError, match="choose 'xla'"):
        ssm_ops.set_ssd_backend("triton")
    with pytest.raises(ValueError, match="interpret=True applies to the 'pallas'"):
        ssm_ops.set_ssd_backend("xla", interpret=True)
    assert ssm_ops.SSD_BACKEND == ("xla", False)
