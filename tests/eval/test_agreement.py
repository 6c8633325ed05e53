import numpy as np
import pytest

import l2m_jax
from l2m_jax.eval.agreement import top1_agreement, top1_predictions


def test_top1_predictions_are_the_forward_argmax_and_agreement_counts_matches():
    cfg = l2m_jax.ModelConfig.tiny(vocab_size=32, n_layers=2)
    params = l2m_jax.init_params(cfg, 0)
    tokens = np.random.default_rng(0).integers(0, 32, size=(2, 9))
    top1 = top1_predictions(cfg, params, tokens)
    assert np.array_equal(top1, np.argmax(l2m_jax.forward(cfg, params, tokens)[0], axis=-1))
    assert top1_agreement(top1, top1) == 1.0
    other = top1.copy()
    other[0, :3] = (other[0, :3] + 1) % 32
    assert top1_agreement(top1, other) == pytest.approx(1 - 3 / 18)
    with pytest.raises(ValueError, match="shapes differ"):
        top1_agreement(top1, top1[:1])
