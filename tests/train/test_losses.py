"""Losses against independent NumPy (float64) computations."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from l2m_jax.train import losses


def _log_softmax(x):
    x = np.asarray(x, np.float64)
    m = x.max(-1, keepdims=True)
    return x - m - np.log(np.exp(x - m).sum(-1, keepdims=True))


@pytest.fixture(scope="module")
def data():
    rng = np.random.default_rng(0)
    B, L, V = 3, 7, 11
    student = rng.normal(size=(B, L, V)).astype(np.float32) * 2
    teacher = rng.normal(size=(B, L, V)).astype(np.float32) * 2
    tokens = rng.integers(0, V, (B, L)).astype(np.int32)
    mask = rng.random((B, L)) < 0.6
    mask[:, 1] = True
    return student, teacher, tokens, mask


def _kl_per_pos(student, teacher, temperature=1.0):
    ls, lt = _log_softmax(student / temperature), _log_softmax(teacher / temperature)
    return (np.exp(lt) * (lt - ls)).sum(-1)                      # [B, L]


def test_kl_reductions_match_numpy(data):
    student, teacher, _, mask = data
    per_pos = _kl_per_pos(student, teacher)
    # "mil" is torch's batchmean: everything summed, divided by B, the mask ignored
    got = losses.kl_divergence(student, teacher, mask=mask, reduction="mil")
    np.testing.assert_allclose(got, per_pos.sum() / student.shape[0], rtol=1e-5, atol=0)
    got = losses.kl_divergence(student, teacher, mask=mask, reduction="token_mean")
    np.testing.assert_allclose(got, per_pos[mask].mean(), rtol=1e-5, atol=0)
    got = losses.kl_divergence(student, teacher)
    np.testing.assert_allclose(got, per_pos.mean(), rtol=1e-5, atol=0)
    got = losses.kl_divergence(student, teacher, mask=mask, temperature=2.0)
    np.testing.assert_allclose(got, _kl_per_pos(student, teacher, 2.0)[mask].mean(), rtol=1e-5, atol=0)


def test_kl_is_zero_for_equal_logits_and_handles_zero_teacher_probs(data):
    student, _, _, _ = data
    np.testing.assert_allclose(losses.kl_divergence(student, student), 0.0, rtol=0, atol=1e-6)
    teacher = np.array(student)
    teacher[..., 0] = -np.inf                                     # p_teacher = 0 contributes 0
    got = losses.kl_divergence(student, teacher, reduction="mil")
    ls, lt = _log_softmax(student), _log_softmax(teacher)
    pt = np.exp(lt)
    want = np.where(pt > 0, pt * (np.where(pt > 0, lt, 0) - ls), 0).sum() / student.shape[0]
    assert np.isfinite(float(got))
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=0)
    g = jax.grad(lambda s: losses.kl_divergence(s, teacher))(jnp.asarray(student))
    assert bool(jnp.all(jnp.isfinite(g)))


def test_kl_accepts_bf16_and_computes_in_fp32(data):
    student, teacher, _, _ = data
    s16, t16 = jnp.asarray(student, jnp.bfloat16), jnp.asarray(teacher, jnp.bfloat16)
    got = losses.kl_divergence(s16, t16, reduction="mil")
    assert got.dtype == jnp.float32
    want = _kl_per_pos(np.asarray(s16, np.float32), np.asarray(t16, np.float32)).sum() / student.shape[0]
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=0)


def test_cross_entropy_shift_and_sequence_logprobs(data):
    student, _, tokens, mask = data
    lp = _log_softmax(student)
    nll = -np.take_along_axis(lp[:, :-1], tokens[:, 1:, None], -1)[..., 0]     # [B, L-1]
    targets, tmask = losses.shift_for_next_token(tokens, mask)
    np.testing.assert_array_equal(targets[:, :-1], tokens[:, 1:])
    np.testing.assert_array_equal(tmask, np.concatenate([mask[:, 1:], np.zeros((3, 1), bool)], 1))
    got = losses.cross_entropy(student, targets, tmask)
    np.testing.assert_allclose(got, nll[mask[:, 1:]].mean(), rtol=1e-5, atol=0)
    loss, metrics = losses.sft_loss(student, tokens, mask)
    np.testing.assert_allclose(loss, nll[mask[:, 1:]].mean(), rtol=1e-5, atol=0)
    assert float(metrics["tokens"]) == mask[:, 1:].sum()
    seq = losses.sequence_logprobs(student, tokens, mask)
    np.testing.assert_allclose(seq, -(nll * mask[:, 1:]).sum(-1), rtol=1e-5, atol=1e-6)
    # mask None: every next token counts; an all-false mask gives 0, not NaN
    np.testing.assert_allclose(losses.sft_loss(student, tokens, None)[0], nll.mean(), rtol=1e-5, atol=0)
    np.testing.assert_allclose(losses.cross_entropy(student, targets, np.zeros_like(mask)), 0.0, rtol=0, atol=0)


def test_stage1_loss_is_alpha_ce_plus_beta_kl(data):
    student, teacher, tokens, mask = data
    targets, tmask = losses.shift_for_next_token(tokens, mask)
    per_pos = _kl_per_pos(student, teacher)
    lp = _log_softmax(student)
    ce = -np.take_along_axis(lp, np.asarray(targets)[..., None], -1)[..., 0][np.asarray(tmask)].mean()
    for reduction, kl in (("mil", per_pos.sum() / 3), ("token_mean", per_pos[np.asarray(tmask)].mean())):
        loss, m = losses.stage1_loss(student, teacher, targets, tmask, alpha=0.7, beta=0.1, kl_reduction=reduction)
        np.testing.assert_allclose(m["ce"], ce, rtol=1e-5, atol=0)
        np.testing.assert_allclose(m["kl"], kl, rtol=1e-5, atol=0)
        np.testing.assert_allclose(loss, 0.7 * ce + 0.1 * kl, rtol=1e-5, atol=0)


def test_dpo_loss_with_teacher_reference(data):
    student, teacher, tokens, _ = data
    rng = np.random.default_rng(1)
    chosen_mask = np.zeros((3, 7), bool)
    chosen_mask[:, 3:] = True                                     # prompt = first 3 tokens
    rejected = rng.integers(0, 11, tokens.shape).astype(np.int32)
    rejected[:, :3] = tokens[:, :3]
    student_rej = rng.normal(size=student.shape).astype(np.float32)
    teacher_rej = rng.normal(size=student.shape).astype(np.float32)

    def np_seq(logits, toks):
        lp = np.take_along_axis(_log_softmax(logits)[:, :-1], toks[:, 1:, None], -1)[..., 0]
        return (lp * chosen_mask[:, 1:]).sum(-1)

    pc, pr = np_seq(student, tokens), np_seq(student_rej, rejected)
    rc, rr = np_seq(teacher, tokens), np_seq(teacher_rej, rejected)
    beta = 0.1
    margin = beta * ((pc - rc) - (pr - rr))
    seq = lambda lg, t: losses.sequence_logprobs(lg, t, chosen_mask)
    loss, m = losses.dpo_loss(seq(student, tokens), seq(student_rej, rejected), seq(teacher, tokens),
                              seq(teacher_rej, rejected), beta=beta)
    np.testing.assert_allclose(loss, np.mean(np.log1p(np.exp(-margin))), rtol=1e-5, atol=0)
    np.testing.assert_allclose(m["reward_margin"], margin.mean(), rtol=1e-5, atol=1e-7)
    np.testing.assert_allclose(m["reward_chosen"], (beta * (pc - rc)).mean(), rtol=1e-5, atol=1e-7)
    np.testing.assert_allclose(m["reward_accuracy"], np.mean(margin > 0), rtol=1e-6, atol=0)
    assert 0 < np.mean(margin > 0) < 1                           # the accuracy check is not vacuous
    # the reference gets no gradient
    g = jax.grad(lambda r: losses.dpo_loss(jnp.asarray(pc), jnp.asarray(pr), r, jnp.asarray(rr), beta=beta)[0])(
        jnp.asarray(rc, jnp.float32))
    np.testing.assert_array_equal(g, np.zeros(3))


@pytest.mark.parametrize("call, match", [
    (lambda: losses.kl_divergence(np.zeros((2, 3, 4)), np.zeros((2, 3, 5))), "same"),
    (lambda: losses.kl_divergence(np.zeros((2, 3, 4)), np.zeros((2, 3, 4)), reduction="sum"), "reduction"),
    (lambda: losses.kl_divergence(np.zeros((2, 3, 4)), np.zeros((2, 3, 4)), mask=np.ones((2, 4))), "mask"),
    (lambda: losses.cross_entropy(np.zeros((2, 3, 4)), np.zeros((2, 4), np.int32)), "targets"),
    (lambda: losses.dpo_loss(np.zeros(2), np.zeros(2), np.zeros(3), np.zeros(2), beta=0.1), "same B"),
])
def test_bad_inputs_raise(call, match):
    with pytest.raises(ValueError, match=match):
        call()
