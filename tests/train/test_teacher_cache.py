"""The stage-1 / KD step with the teacher's hidden states computed once per row (`teacher_cached`): the same
loss and gradients as running the teacher inside the step, whole logits and chunked, and the same training."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import l2m_jax
from l2m_jax.config import ModelConfig
from l2m_jax.train import optim
from l2m_jax.train.stages import (TEACHER_HIDDEN, StageError, StageSettings, distill_loss_fn, distill_stage,
                                  teacher_hidden_states)
from tests.conftest import rel_err

L, N = 24, 5


@pytest.fixture(scope="module")
def models():
    cfg = ModelConfig.tiny(vocab_size=64, n_layers=4, max_position_embeddings=64)
    teacher = (cfg, l2m_jax.init_params(cfg, jax.random.key(0)))
    student = l2m_jax.hybridize(*teacher, [1, 3], "mamba2", jax.random.key(1), init="random")
    r = np.random.default_rng(0)
    data = {"tokens": r.integers(3, 64, (N, L)).astype(np.int32), "loss_mask": r.random((N, L)) < 0.8}
    return teacher, student, data


def test_hidden_states_are_the_teachers_own_for_every_row(models):
    teacher, _, data = models
    got = teacher_hidden_states(teacher, data["tokens"], batch_size=2)    # 5 rows: the last batch filled up
    assert got.shape == (N, L, teacher[0].d_model) and got.dtype == np.float32
    from l2m_jax.train.chunked import hidden_and_head
    want = np.asarray(hidden_and_head(*teacher, jnp.asarray(data["tokens"]))[0])
    assert rel_err(got, want) <= 1e-6
    half = teacher_hidden_states(teacher, data["tokens"][:3], batch_size=8, compute_dtype="bfloat16")
    assert half.dtype == jnp.bfloat16 and rel_err(half.astype(np.float32), want[:3]) <= 2e-2
    with pytest.raises(StageError, match="token rows int"):
        teacher_hidden_states(teacher, data["tokens"][0])


@pytest.mark.parametrize("loss_chunk", [None, 7])
def test_cached_teacher_gives_the_same_loss_and_gradients(models, loss_chunk):
    teacher, student, data = models
    batch = {k: jnp.asarray(v[:4]) for k, v in data.items()}
    cached = dict(batch, **{TEACHER_HIDDEN: jnp.asarray(teacher_hidden_states(teacher, data["tokens"][:4]))})
    kw = dict(alpha=0.5, beta=1.0, loss_chunk=loss_chunk)
    live = distill_loss_fn(student[0], teacher[0], **kw)
    fast = distill_loss_fn(student[0], teacher[0], teacher_cached=True, **kw)

    def grads(fn, b):
        (loss, m), g = jax.value_and_grad(lambda p: fn({"student": p, "teacher": teacher[1]}, b, None),
                                          has_aux=True)(student[1])
        return loss, m, g

    l1, m1, g1 = grads(live, batch)
    l2, m2, g2 = grads(fast, cached)
    assert abs(float(l1) - float(l2)) <= 1e-5 * abs(float(l1)) and float(m1["kl"]) > 0
    for a, b in zip(jax.tree.leaves(g1), jax.tree.leaves(g2)):
        assert rel_err(b, a) <= 1e-4
    # the cached step never reads the teacher's layers: zeroing them changes nothing
    zeroed = dict(teacher[1], layers=jax.tree.map(jnp.zeros_like, teacher[1]["layers"]))
    l3, _ = fast({"student": student[1], "teacher": zeroed}, cached, None)
    assert float(l3) == float(l2)


def test_stage_with_the_cache_trains_as_without_it(models):
    teacher, student, data = models
    s = StageSettings(steps=3, batch_size=2, progress=False,
                      preset=optim.STAGE1.replace(lr=1e-2, warmup_steps=0, kl_weight=1.0))
    plain = distill_stage(student, teacher, data, s)
    cached = distill_stage(student, teacher, dict(data, **{TEACHER_HIDDEN: teacher_hidden_states(teacher,
                                                                                               data["tokens"])}),
                           s, teacher_cached=True)
    assert np.allclose([h["loss"] for h in plain.history], [h["loss"] for h in cached.history], rtol=1e-5)
    for a, b in zip(jax.tree.leaves(plain.params), jax.tree.leaves(cached.params)):
        assert rel_err(b, a) <= 1e-4
    with pytest.raises(StageError, match="the data lacks \\['teacher_hidden'\\]"):
        distill_stage(student, teacher, data, s, teacher_cached=True)
    bad = dict(data, **{TEACHER_HIDDEN: np.zeros((N, L - 1, teacher[0].d_model), np.float32)})
    with pytest.raises(StageError, match="teacher's float hidden states"):
        distill_stage(student, teacher, bad, s, teacher_cached=True)


def test_precompiled_cache_program_is_not_compiled_again(models, tmp_path, caplog):
    from l2m_jax.models import shape_structs
    from l2m_jax.train.stages import precompile_teacher_hidden
    from tests.train.test_compile_ahead import persistent_cache

    teacher, _, data = models

    def compiled():
        return sum("CACHE MISS for 'jit__final_hidden'" in r.getMessage() for r in caplog.records)

    with persistent_cache(tmp_path / "xla"):
        jax.clear_caches()
        precompile_teacher_hidden((teacher[0], shape_structs(teacher[1])), 3, L, compute_dtype="bfloat16")
        assert compiled() == 1
        teacher_hidden_states(teacher, data["tokens"], batch_size=3, compute_dtype="bfloat16")   # 2 batches
        assert compiled() == 1
