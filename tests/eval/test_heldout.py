"""score_texts: the perplexity and top-1 predictions of several texts from one batched forward equal the
per-window `perplexity` and `top1_predictions` they replace."""
import jax
import numpy as np
import pytest

import l2m_jax
from l2m_jax.eval.agreement import top1_predictions
from l2m_jax.eval.heldout import context_groups, score_texts
from l2m_jax.eval.perplexity import _window_nll, perplexity


@pytest.fixture(scope="module")
def model():
    cfg = l2m_jax.ModelConfig.tiny(vocab_size=97, max_position_embeddings=64)
    return cfg, l2m_jax.init_params(cfg, jax.random.key(3))


def test_equals_per_window_perplexity_and_top1(model):
    cfg, params = model
    rng = np.random.default_rng(0)
    texts = {"long": rng.integers(0, 97, 150).astype(np.int32),     # several windows, a ragged last one
             "exact": rng.integers(0, 97, 64).astype(np.int32),     # 64 = 2 windows of 32 at stride 31 + 2
             "short": rng.integers(0, 97, 20).astype(np.int32)}     # shorter than the window: w = 20
    got = score_texts(cfg, params, texts, window=32, batch_rows=4)
    for name, ids in texts.items():
        w = min(32, ids.size)
        n, ppl = perplexity(cfg, params, ids, window=w)
        rows = ids.size // w
        want_top1 = top1_predictions(cfg, params, ids[:rows * w].reshape(rows, w))
        assert got[name]["tokens"] == n == ids.size - 1
        np.testing.assert_allclose(got[name]["perplexity"], ppl, rtol=1e-5)
        assert got[name]["top1"].shape == want_top1.shape
        np.testing.assert_array_equal(got[name]["top1"], want_top1)


def test_window_is_clamped_to_the_context_and_bad_input_is_named(model):
    cfg, params = model
    ids = np.arange(100, dtype=np.int32) % 97
    got = score_texts(cfg, params, {"t": ids}, window=1000)
    n, ppl = perplexity(cfg, params, ids, window=64)
    np.testing.assert_allclose(got["t"]["perplexity"], ppl, rtol=1e-5)
    with pytest.raises(ValueError, match="text 'bad'.*vocab"):
        score_texts(cfg, params, {"bad": np.array([1, 200], np.int32)}, window=32)
    with pytest.raises(ValueError, match="window=1 must be >= 2"):
        score_texts(cfg, params, {"t": ids}, window=1)
    with pytest.raises(ValueError, match="at least 2 ids"):
        score_texts(cfg, params, {"one": np.array([5], np.int32)}, window=32)


def test_context_nll_groups_every_scored_token_by_its_context_length(model):
    cfg, params = model
    ids = np.random.default_rng(1).integers(0, 97, 150).astype(np.int32)
    w = 40
    got = score_texts(cfg, params, {"t": ids}, window=w, batch_rows=4)["t"]["context_nll"]
    assert context_groups(w) == [("1-15", 1, 15), ("16-39", 16, 39)]
    assert context_groups(200)[-1] == ("128-199", 128, 199) and context_groups(10) == [("1-9", 1, 9)]
    by_len = {}
    for s in range(0, ids.size - 1, w - 1):          # the windows `perplexity` scores, token by token
        window = ids[s:s + w]
        nll = np.asarray(_window_nll(cfg, params, window[None], window.size))[:window.size - 1]
        for j, v in enumerate(nll, 1):
            by_len.setdefault(j, []).append(v)
    for label, a, b in context_groups(w):
        values = [v for j in range(a, b + 1) for v in by_len.get(j, [])]
        np.testing.assert_allclose(got[label], np.mean(values), rtol=1e-5)


def test_token_nll_and_entropy_are_every_scored_token_in_text_order_and_group_by_confidence(model):
    from l2m_jax.eval.heldout import confidence_groups
    from l2m_jax.train.report import confidence_ratio, confidence_shares

    cfg, params = model
    ids = np.random.default_rng(2).integers(0, 97, 150).astype(np.int32)
    w = 40
    r = score_texts(cfg, params, {"t": ids}, window=w, batch_rows=4)["t"]
    want = np.concatenate([np.asarray(_window_nll(cfg, params, ids[s:s + w][None], ids[s:s + w].size))
                           [:ids[s:s + w].size - 1] for s in range(0, ids.size - 1, w - 1)])
    assert r["token_nll"].shape == (r["tokens"],) == want.shape
    np.testing.assert_allclose(r["token_nll"], want, rtol=1e-5)
    np.testing.assert_allclose(np.exp(r["token_nll"].astype(np.float64).mean()), r["perplexity"], rtol=1e-5)
    # the entropy of each of those predictions, from the full distribution in float64
    want_ent = []
    for s in range(0, ids.size - 1, w - 1):
        window = ids[s:s + w]
        logits = np.asarray(l2m_jax.forward(cfg, params, window[None])[0][0, :window.size - 1], np.float64)
        logp = logits - logits.max(-1, keepdims=True)
        logp -= np.log(np.exp(logp).sum(-1, keepdims=True))
        want_ent.append(-(np.exp(logp) * logp).sum(-1))
    np.testing.assert_allclose(r["token_entropy"], np.concatenate(want_ent), rtol=1e-4)
    assert r["token_entropy"].shape == r["token_nll"].shape and (r["token_entropy"] > 0).all()

    entropy = np.array([0.05, 0.5, 2.0, 5.0, 0.01, 3.0])                 # the teacher's, at six positions
    groups = confidence_groups(entropy)
    assert list(groups) == ["<0.1", "0.1-1", "1-3", ">=3"]
    assert [m.tolist() for m in groups.values()] == [[1, 0, 0, 0, 1, 0], [0, 1, 0, 0, 0, 0], [0, 0, 1, 0, 0, 0],
                                                     [0, 0, 0, 1, 0, 1]]
    teacher_nll = np.array([4.0, 0.3, 1.0, 6.0, 0.0, 2.0])               # the groups follow the entropy, not these
    teacher = {"token_nll": teacher_nll.tolist(), "token_entropy": entropy.tolist()}
    student = teacher_nll + np.array([1.0, 0.0, 0.5, 0.0, 0.0, 0.2])
    ratio = confidence_ratio({"token_nll": student.tolist()}, teacher)
    assert ratio == pytest.approx({"<0.1": np.exp(0.5), "0.1-1": 1.0, "1-3": np.exp(0.5), ">=3": np.exp(0.1)})
    assert confidence_shares(teacher) == pytest.approx({"<0.1": 2 / 6, "0.1-1": 1 / 6, "1-3": 1 / 6, ">=3": 2 / 6})
    assert confidence_ratio({"token_nll": student[:3].tolist()}, teacher) is None
    assert confidence_ratio({}, teacher) is None
    assert confidence_ratio({"token_nll": student.tolist()}, {"token_nll": teacher_nll.tolist()}) is None
