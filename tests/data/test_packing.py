import json

import numpy as np
import pytest

from l2m_jax.data.packing import BatchIterator, DataError, pack_sequences, pad_batch

PAD = 0


def _examples(lengths, seed=0):
    rng = np.random.default_rng(seed)
    return [(rng.integers(1, 100, n), rng.random(n) < 0.5) for n in lengths]


@pytest.mark.parametrize("drop_last", [False, True])
def test_pack_keeps_every_token_in_order(drop_last):
    exs = _examples([5, 17, 3, 9, 11])
    out, stats = pack_sequences(exs, 8, PAD, drop_last=drop_last)
    flat_ids = np.concatenate([e[0] for e in exs])
    flat_mask = np.concatenate([e[1] for e in exs])
    total = flat_ids.size                       # 45 tokens -> 5 full rows + 5 in a sixth
    rows = 5 if drop_last else 6
    assert out["tokens"].shape == (rows, 8) and out["tokens"].dtype == np.int32
    assert stats.rows == rows and stats.examples == 5
    kept = 40 if drop_last else total
    attn = out["attention_mask"].reshape(-1)
    np.testing.assert_array_equal(out["tokens"].reshape(-1)[attn], flat_ids[:kept])
    np.testing.assert_array_equal(out["loss_mask"].reshape(-1)[attn], flat_mask[:kept])
    assert not out["loss_mask"].reshape(-1)[~attn].any()
    assert (out["tokens"].reshape(-1)[~attn] == PAD).all()
    assert stats.tokens == kept and stats.pad_tokens == rows * 8 - kept
    assert stats.dropped_tokens == total - kept


def test_pack_segments_and_separator():
    exs = [(np.array([5, 6, 7]), np.array([0, 1, 1], bool)), (np.array([8, 9]), np.array([1, 1], bool))]
    out, stats = pack_sequences(exs, 4, PAD, sep_id=2)
    np.testing.assert_array_equal(out["tokens"], [[5, 6, 7, 2], [8, 9, 2, PAD]])
    np.testing.assert_array_equal(out["loss_mask"], [[0, 1, 1, 1], [1, 1, 1, 0]])
    np.testing.assert_array_equal(out["segment_ids"], [[1, 1, 1, 1], [1, 1, 1, 0]])
    out, _ = pack_sequences(exs * 2, 6, PAD)
    np.testing.assert_array_equal(out["segment_ids"], [[1, 1, 1, 2, 2, 3], [1, 1, 2, 2, 0, 0]])


def test_pad_batch_drops_long_examples_and_counts_them():
    exs = _examples([3, 9, 6, 12, 8])
    out, stats = pad_batch(exs, 8, PAD)
    assert (stats.examples, stats.dropped, stats.truncated, stats.rows) == (5, 2, 0, 3)
    assert stats.dropped_tokens == 9 + 12
    assert "dropped 2 of 5 examples longer than 8 tokens" in stats.summary()
    np.testing.assert_array_equal(out["index"], [0, 2, 4])
    for r, i in enumerate(out["index"]):
        n = exs[i][0].size
        np.testing.assert_array_equal(out["tokens"][r, :n], exs[i][0])
        np.testing.assert_array_equal(out["loss_mask"][r, :n], exs[i][1])
        assert out["attention_mask"][r].sum() == n and not out["loss_mask"][r, n:].any()
        assert (out["tokens"][r, n:] == PAD).all()


def test_pad_batch_truncate_counts():
    exs = _examples([3, 9, 12])
    out, stats = pad_batch(exs, 8, PAD, truncate=True)
    assert (stats.dropped, stats.truncated, stats.rows, stats.dropped_tokens) == (0, 2, 3, 1 + 4)
    np.testing.assert_array_equal(out["tokens"][2], exs[2][0][:8])
    assert "truncated 2 of 3" in stats.summary()


def test_bad_examples_raise():
    with pytest.raises(DataError, match="all 2 examples are longer"):
        pad_batch(_examples([9, 10]), 8, PAD)
    with pytest.raises(DataError, match="example 1: token_ids .* same length"):
        pad_batch([(np.arange(3), np.ones(3, bool)), (np.arange(3), np.ones(2, bool))], 8, PAD)
    with pytest.raises(DataError, match="no examples"):
        pack_sequences([], 8, PAD)


def test_iterator_resume_equals_uninterrupted():
    data = {"tokens": np.arange(10 * 3).reshape(10, 3), "id": np.arange(10)}
    full = [b["id"] for _, b in zip(range(11), BatchIterator(data, 3, seed=7))]
    it = BatchIterator(data, 3, seed=7)
    first = [next(it)["id"] for _ in range(4)]
    saved = json.loads(json.dumps(it.state()))     # survives a checkpoint file
    assert saved["epoch"] == 1 and saved["position"] == 1
    resumed = BatchIterator(data, 3, seed=7).restore(saved)
    rest = [next(resumed)["id"] for _ in range(7)]
    for a, b in zip(full, first + rest):
        np.testing.assert_array_equal(a, b)
    # each epoch is a permutation: its 3 batches are 9 distinct rows; epochs differ
    e0, e1 = np.concatenate(full[0:3]), np.concatenate(full[3:6])
    assert len(set(e0)) == 9 and len(set(e1)) == 9 and not np.array_equal(e0, e1)
    b = next(BatchIterator(data, 3, seed=7))      # arrays stay row-aligned
    np.testing.assert_array_equal(b["tokens"][:, 0] // 3, b["id"])


def test_iterator_epochs_and_state_checks():
    data = {"x": np.arange(6)}
    batches = list(BatchIterator(data, 2, shuffle=False, num_epochs=2))
    assert [b["x"].tolist() for b in batches] == [[0, 1], [2, 3], [4, 5]] * 2
    it = BatchIterator(data, 2, seed=1)
    with pytest.raises(DataError, match="saved seed=2"):
        it.restore({**it.state(), "seed": 2})
    with pytest.raises(DataError, match="batch_size=7"):
        BatchIterator(data, 7)
