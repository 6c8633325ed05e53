"""Decoding is exact: step-by-step logits equal the full forward; batching never changes a row's tokens."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import l2m_jax
from l2m_jax.cache import init_state
from tests.conftest import rel_err

NAMES = ["teacher", "hybrid50-mamba2", "mamba2", "mamba1"]


@pytest.mark.parametrize("name", NAMES)
def test_prefill_then_steps_equal_full_forward(models, name):
    cfg, params = models[name]
    tokens = np.random.default_rng(0).integers(0, cfg.vocab_size, size=(2, 11))
    full, _ = l2m_jax.forward(cfg, params, tokens)
    fwd = jax.jit(l2m_jax.forward, static_argnums=0)
    state = init_state(cfg, 2, 16)
    got = []
    logits, state = fwd(cfg, params, tokens[:, :5], state)        # prefill: chunked scan
    got.append(logits)
    logits, state = fwd(cfg, params, tokens[:, 5:7], state)       # a second chunk continues it
    got.append(logits)
    for t in range(7, 11):                                        # single steps
        logits, state = fwd(cfg, params, tokens[:, t:t + 1], state)
        got.append(logits)
    assert rel_err(jnp.concatenate(got, axis=1), full) <= 1e-5
    assert np.array_equal(np.asarray(state.lengths), [11, 11])


@pytest.mark.parametrize("name", NAMES)
def test_mixed_length_batch_equals_each_prompt_alone(models, name):
    cfg, params = models[name]
    rng = np.random.default_rng(1)
    prompts = [list(rng.integers(0, cfg.vocab_size, size=n)) for n in (9, 2, 5, 1)]
    batched = l2m_jax.generate(cfg, params, prompts, 7)
    alone = [l2m_jax.generate(cfg, params, [p], 7)[0] for p in prompts]
    assert batched == alone
    assert all(len(r) == 7 for r in batched)


def test_greedy_generate_equals_argmax_of_forward(models):
    cfg, params = models["hybrid50-mamba2"]
    seq = [3, 1, 4, 1, 5]
    out = l2m_jax.generate(cfg, params, [seq], 5)[0]
    logits, _ = l2m_jax.forward(cfg, params, np.array([seq + out]))   # teacher forcing on its own output
    assert out == [int(t) for t in np.argmax(logits[0, len(seq) - 1:-1], axis=-1)]


def test_eos_stops_a_row(models):
    cfg, params = models["teacher"]
    free = l2m_jax.generate(cfg, params, [[1, 2, 3], [7, 8]], 6)
    eos = free[0][2]
    out = l2m_jax.generate(cfg, params, [[1, 2, 3], [7, 8]], 6, eos_id=eos)
    first = free[0].index(eos)
    assert out[0] == free[0][:first + 1]
    assert out[1] == (free[1][:free[1].index(eos) + 1] if eos in free[1] else free[1])


def test_sampling_is_reproducible_and_filters_work(models):
    cfg, params = models["teacher"]
    import jax
    from l2m_jax.ops.sampling import Sampling
    s = Sampling(temperature=1.0, top_k=3)
    a = l2m_jax.generate(cfg, params, [[1, 2]] * 4, 5, sampling=s, key=jax.random.key(7))
    b = l2m_jax.generate(cfg, params, [[1, 2]] * 4, 5, sampling=s, key=jax.random.key(7))
    assert a == b and len({tuple(r) for r in a}) > 1      # rows sample independently
    # top_k=1 is greedy
    assert l2m_jax.generate(cfg, params, [[1, 2]], 5, sampling=Sampling(temperature=1.0, top_k=1)) == \
        l2m_jax.generate(cfg, params, [[1, 2]], 5)


def test_bad_inputs(models):
    cfg, params = models["teacher"]
    with pytest.raises(ValueError, match="prompt 1 is empty"):
        l2m_jax.generate(cfg, params, [[1], []], 3)
    with pytest.raises(ValueError, match="outside"):
        l2m_jax.generate(cfg, params, [[1, cfg.vocab_size]], 3)
    with pytest.raises(ValueError, match="non-empty list"):
        l2m_jax.generate(cfg, params, [], 3)
    with pytest.raises(ValueError, match="max_new_tokens"):
        l2m_jax.generate(cfg, params, [[1]], 0)
    with pytest.raises(ValueError, match="max_position_embeddings"):
        l2m_jax.generate(cfg, params, [[1] * 10], cfg.max_position_embeddings)


def test_unavailable_backend_is_named_and_falls_back_only_when_asked(models):
    from l2m_jax.kernels.dispatch import available_backends
    if "triton" in available_backends():
        pytest.skip("triton runs here")
    cfg, params = models["hybrid50-mamba2"]
    with pytest.raises(ValueError, match="backend='triton' is unavailable here"):
        l2m_jax.generate(cfg, params, [[1, 2]], 3, backend="triton")
    with pytest.warns(RuntimeWarning, match="Falling back to backend='xla'"):
        out = l2m_jax.generate(cfg, params, [[1, 2]], 3, backend="triton", fallback=True)
    assert out == l2m_jax.generate(cfg, params, [[1, 2]], 3)


def test_precompiled_generate_program_is_loaded_not_compiled(models, tmp_path, caplog):
    """precompile_generate compiles the program a generate call of that batch, longest prompt and settings
    runs (from abstract params) into the persistent cache; the call loads it and gives the same tokens.
    Without the cache it does nothing."""
    from l2m_jax.infer.generate import precompile_generate
    from l2m_jax.models import shape_structs
    from l2m_jax.ops.sampling import Sampling
    from tests.train.test_compile_ahead import persistent_cache

    cfg, params = models["hybrid50-mamba2"]
    prompts = [[5, 6, 7], [8] * 10, [9, 3]]
    sampling = Sampling(temperature=0.8, top_p=0.9)
    kw = dict(eos_id=2, prompt_bucket=8, key=jax.random.key(4))
    want = l2m_jax.generate(cfg, params, prompts, 6, sampling, **kw)
    assert not precompile_generate(cfg, params, 3, 10, 6, sampling, 2, prompt_bucket=8)      # no cache here
    with persistent_cache(tmp_path / "xla") as cache:
        jax.clear_caches()
        assert precompile_generate(cfg, shape_structs(params), 3, 10, 6, sampling, 2, prompt_bucket=8)
        assert cache.count("jit__generate") == (0, 1)
        def compiled():   # programs compiled, whether or not they were written to the cache
            return sum("CACHE MISS for 'jit__generate'" in r.getMessage() for r in caplog.records)

        assert compiled() == 1
        assert l2m_jax.generate(cfg, params, prompts, 6, sampling, **kw) == want
        assert cache.count("jit__generate")[1] == 1 and compiled() == 1     # not compiled again
        # a longest prompt in another bucket is another program: compiled by the call itself
        l2m_jax.generate(cfg, params, [[5] * 17, [1], [2]], 6, sampling, **kw)
        assert cache.count("jit__generate")[1] == 2 and compiled() == 2
    with pytest.raises(ValueError, match="batch_size=0"):
        precompile_generate(cfg, params, 0, 10, 6)
