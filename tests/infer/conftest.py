import jax
import pytest

import l2m_jax
from l2m_jax.config import ModelConfig


def _models():
    cfg = ModelConfig.tiny(vocab_size=48, n_layers=4)
    p = l2m_jax.init_params(cfg, 0)
    return {
        "teacher": (cfg, p),
        "hybrid50-mamba2": l2m_jax.hybridize(cfg, p, [1, 3], "mamba2", jax.random.key(1)),
        "mamba2": l2m_jax.hybridize(cfg, p, [], "mamba2", jax.random.key(2)),
        "mamba1": l2m_jax.hybridize(cfg, p, [], "mamba", jax.random.key(3)),
    }


@pytest.fixture(scope="session")
def models():
    return _models()
