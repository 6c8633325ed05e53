"""Speculative decoding: greedy output is the target's greedy output; sampled output has the target's law."""
import math

import jax
import numpy as np
import pytest

import l2m_jax
from l2m_jax.infer.speculative import shrink
from l2m_jax.ops.sampling import Sampling, adjusted_probs

PROMPTS = [[5, 6, 7, 8, 9, 10, 11], [3, 4], [9]]


@pytest.mark.parametrize("target", ["teacher", "hybrid50-mamba2", "mamba2", "mamba1"])
def test_greedy_speculative_equals_greedy(models, target):
    cfg, params = models[target]
    ref = l2m_jax.generate(cfg, params, PROMPTS, 13)
    drafts = {"shrunk": shrink(cfg, params, [0, 2]),        # agrees often
              "unrelated": models["mamba1" if target != "mamba1" else "teacher"]}  # disagrees almost always
    for dname, k in (("shrunk", 4), ("unrelated", 2)):
        out, stats = l2m_jax.speculative_generate((cfg, params), drafts[dname], PROMPTS, 13, k=k)
        assert out == ref, (dname, k)
        assert 0.0 <= stats.acceptance_rate <= 1.0 and 1.0 <= stats.tokens_per_call <= k + 1


def test_greedy_speculative_equals_greedy_with_the_fused_decode_attention(models):
    """The attention layers' decode and verification calls through the Pallas decode kernel
    (set_decode_attention("pallas"); interpret mode on a CPU) give the full-cache path's greedy tokens."""
    from l2m_jax.ops import attention as attn_ops

    cfg, params = models["hybrid50-mamba2"]
    ref = l2m_jax.generate(cfg, params, PROMPTS, 10)
    attn_ops.set_decode_attention("pallas", interpret=jax.default_backend() != "gpu")   # generate retraces
    try:
        assert l2m_jax.generate(cfg, params, PROMPTS, 10) == ref
        out, _ = l2m_jax.speculative_generate((cfg, params), shrink(cfg, params, [0, 2]), PROMPTS, 10, k=3)
        assert out == ref
    finally:
        attn_ops.set_decode_attention("full", interpret=False)


def test_self_draft_accepts_everything(models):
    cfg, params = models["hybrid50-mamba2"]
    out, stats = l2m_jax.speculative_generate((cfg, params), (cfg, params), PROMPTS, 12, k=3)
    assert out == l2m_jax.generate(cfg, params, PROMPTS, 12)
    assert stats.acceptance_rate == 1.0 and stats.tokens_per_call == 4.0


def _chi2_critical(dof: int, z: float = 3.09) -> float:
    """Wilson–Hilferty approximation of the chi-square quantile (z = 3.09: p = 0.001)."""
    return dof * (1 - 2 / (9 * dof) + z * math.sqrt(2 / (9 * dof))) ** 3


def test_sampled_speculative_output_has_the_target_distribution():
    cfg = l2m_jax.ModelConfig.tiny(vocab_size=6, n_layers=2)
    t_cfg, t_params = l2m_jax.hybridize(cfg, l2m_jax.init_params(cfg, 0), [1], "mamba2", jax.random.key(0))
    d_cfg, d_params = cfg, l2m_jax.init_params(cfg, 9)
    # sharpen both models so the two laws differ clearly and are far from uniform
    t_params = dict(t_params, embed={"embedding": t_params["embed"]["embedding"] * 40})
    d_params = dict(d_params, embed={"embedding": d_params["embed"]["embedding"] * 40})
    sampling = Sampling(temperature=1.0, top_p=0.95)
    prompt, n = [1, 2, 3], 3000
    out, _ = l2m_jax.speculative_generate((t_cfg, t_params), (d_cfg, d_params), [prompt] * n, 2, k=2,
                                          sampling=sampling, key=jax.random.key(123))
    counts = np.zeros((6, 6))
    for a, b in out:
        counts[a, b] += 1

    def joint(c, p):  # exact law of the first two tokens under model (c, p)
        first = np.asarray(adjusted_probs(l2m_jax.forward(c, p, np.array([prompt]))[0][0, -1], sampling))
        nxt = np.asarray(adjusted_probs(l2m_jax.forward(c, p, np.array([prompt + [t] for t in range(6)]))[0][:, -1],
                                        sampling))
        return first[:, None] * nxt

    def chi2(law):
        keep = law.ravel() > 0
        if counts.ravel()[~keep].sum():  # a pair the law gives probability 0
            return math.inf, int(keep.sum()) - 1
        exp = n * law.ravel()[keep]
        return float(np.sum((counts.ravel()[keep] - exp) ** 2 / exp)), int(keep.sum()) - 1

    stat, dof = chi2(joint(t_cfg, t_params))
    assert stat < _chi2_critical(dof), (stat, dof)
    # the same test rejects the draft's law: it can fail
    stat, dof = chi2(joint(d_cfg, d_params))
    assert stat > _chi2_critical(dof), (stat, dof)


def test_bad_inputs(models):
    cfg, params = models["teacher"]
    other = l2m_jax.ModelConfig.tiny(vocab_size=50)
    with pytest.raises(ValueError, match="k=0"):
        l2m_jax.speculative_generate((cfg, params), (cfg, params), PROMPTS, 4, k=0)
    with pytest.raises(ValueError, match="disagree on the vocabulary"):
        l2m_jax.speculative_generate((cfg, params), (other, l2m_jax.init_params(other, 0)), PROMPTS, 4)
    with pytest.raises(ValueError, match="prompt 0 is empty"):
        l2m_jax.speculative_generate((cfg, params), (cfg, params), [[]], 4)


def test_k_past_the_context_names_the_model_and_the_largest_k(models):
    from l2m_jax.infer.speculative import check_speculative_fits

    cfg, params = models["teacher"]
    limit, new, k = cfg.max_position_embeddings, 8, 4
    fits = limit - new - k - 1                       # the longest prompt this k and max_new_tokens leave room for
    check_speculative_fits(cfg, fits, new, k)
    with pytest.raises(ValueError, match=rf"k=4 does not fit the context of the draft: .* needs {limit + 1} "
                                         rf"positions .* run {limit} \(max_position_embeddings\); use k <= 3"):
        check_speculative_fits(cfg, fits + 1, new, k, model="the draft")
    # speculative_generate refuses the same prompt (with the one length rule's message), before compiling
    with pytest.raises(ValueError, match="max_position_embeddings"):
        l2m_jax.speculative_generate((cfg, params), (cfg, params), [[1] * (fits + 1)], new, k=k)
    check_speculative_fits(models["mamba2"][0], limit, new, k)     # a pure-Mamba model has no limit


def test_precompiled_speculative_programs_are_loaded_not_compiled(models, tmp_path):
    """precompile_speculative compiles every K's program (in threads) into the persistent cache; the calls
    after it compile nothing, and give the same tokens. Without the cache it does nothing."""
    from l2m_jax.infer.speculative import precompile_speculative
    from tests.train.test_compile_ahead import persistent_cache

    cfg, params = models["hybrid50-mamba2"]
    draft = shrink(cfg, params, [0, 2])
    want = {k: l2m_jax.speculative_generate((cfg, params), draft, PROMPTS, 5, k=k)[0] for k in (2, 3)}
    assert not precompile_speculative((cfg, params), draft, PROMPTS, 5, [2, 3])      # no cache here
    with persistent_cache(tmp_path / "xla") as cache:
        jax.clear_caches()
        assert precompile_speculative((cfg, params), draft, PROMPTS, 5, [2, 3])
        assert cache.count("jit__speculate") == (0, 2)                               # one program per K
        for k in (2, 3):
            assert l2m_jax.speculative_generate((cfg, params), draft, PROMPTS, 5, k=k)[0] == want[k]
        assert cache.count("jit__speculate")[1] == 2                                 # nothing compiled again
