"""Rematerialisation changes memory, not math: gradients with remat equal those without, for every policy."""
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import l2m_jax
from l2m_jax.models import REMAT_POLICIES, remat_policy

_CFG = l2m_jax.ModelConfig.tiny(vocab_size=40, n_layers=2)
_S_CFG, _PARAMS = l2m_jax.hybridize(_CFG, l2m_jax.init_params(_CFG, 0), [1], "mamba2", jax.random.key(1))
_TOKENS = np.random.default_rng(0).integers(0, 40, size=(2, 7))


def _loss(p, remat):
    return jnp.mean(l2m_jax.forward(_S_CFG, p, _TOKENS, remat=remat)[0] ** 2)


_GRAD = jax.jit(jax.grad(_loss), static_argnums=1)      # one compile per policy; the plain one is shared


def _dots_in_grad(remat) -> int:
    """dot_generals in the gradient's jaxpr (sub-jaxprs printed inline): recomputed matmuls add to the count."""
    return len(re.findall(r"\bdot_general\[", str(jax.make_jaxpr(jax.grad(_loss), static_argnums=1)(_PARAMS, remat))))


def test_tiny_hybrid_has_both_mixers():
    assert set(_S_CFG.layer_mixers) == {"attention", "mamba2"} and _S_CFG.param_dtype == "float32"


@pytest.mark.parametrize("remat", [True, *REMAT_POLICIES])
def test_remat_gradients_equal_plain_gradients(remat):
    plain, rem = _GRAD(_PARAMS, False), _GRAD(_PARAMS, remat)
    assert jax.tree.structure(plain) == jax.tree.structure(rem)
    for a, b in zip(jax.tree.leaves(plain), jax.tree.leaves(rem)):
        np.testing.assert_allclose(np.asarray(b), np.asarray(a), rtol=1e-6, atol=1e-7)


def test_policies_change_what_is_recomputed():
    """No remat and "dots_all" recompute no matmul; "dots" recomputes only the batched einsums (attention
    scores, SSD); "full" (= True) recomputes every matmul of every layer."""
    n = {r: _dots_in_grad(r) for r in (False, True, "full", "dots", "dots_all")}
    assert n[True] == n["full"]
    assert n[False] == n["dots_all"] < n["dots"] < n["full"], n


@pytest.mark.parametrize("off", [False, None, "none"])
def test_off_values_add_no_remat(off):
    assert remat_policy(off) == (False, None)
    assert "remat" not in str(jax.make_jaxpr(jax.grad(_loss), static_argnums=1)(_PARAMS, off))


@pytest.mark.parametrize("bad", ["dot", "Full", "", 1, 0.5])
def test_unknown_policy_is_a_clear_error(bad):
    with pytest.raises(ValueError, match="unknown remat policy") as e:
        l2m_jax.forward(_S_CFG, _PARAMS, _TOKENS, remat=bad)
    for name in REMAT_POLICIES:
        assert f'"{name}"' in str(e.value)
