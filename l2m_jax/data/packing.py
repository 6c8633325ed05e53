"""Fixed-shape training rows from tokenized examples, and a resumable shuffled batch iterator.

An example is a pair `(token_ids, loss_mask)` of equal length: int ids [L] and a bool mask [L] saying which
tokens are targets (aligned with the ids; the loss shifts). Two ways to make rows of `seq_len` tokens:

  pack_sequences   concatenate every example and cut the stream into blocks (TRL `packing=True`, what MiL's
                   SFT and end-to-end KD stages do); documents run across block and document boundaries,
                   `segment_ids` tell them apart for whoever wants to.
  pad_batch        one example per row, right-padded. An example longer than `seq_len` is dropped (or cut
                   with truncate=True) and counted in the returned `PackStats`: nothing vanishes silently.

Both return a dict of numpy arrays [N, seq_len] — tokens int32, attention_mask bool (real tokens),
loss_mask bool, segment_ids int32 (1, 2, ... per document in a row, 0 on padding) — plus `index` int32 [N]
for pad_batch (the example each row came from) — and a `PackStats`.
"""
from __future__ import annotations

import dataclasses
from typing import Any, Iterable, Sequence

import numpy as np

from l2m_jax.data.chat import DataError

Example = tuple[Sequence[int], Sequence[bool]]


@dataclasses.dataclass(frozen=True)
class PackStats:
    examples: int          # examples given
    dropped: int           # longer than seq_len, left out (pad_batch)
    truncated: int         # longer than seq_len, cut to seq_len (pad_batch, truncate=True)
    rows: int
    tokens: int            # real tokens placed in rows
    pad_tokens: int
    dropped_tokens: int    # tokens of dropped examples, of cut tails, or of a dropped last block
    seq_len: int

    def summary(self) -> str:
        parts = [f"{self.rows} rows of {self.seq_len} tokens from {self.examples} examples",
                 f"{self.pad_tokens / max(1, self.rows * self.seq_len):.1%} padding"]
        if self.dropped:
            parts.append(f"dropped {self.dropped} of {self.examples} examples longer than {self.seq_len} tokens")
        if self.truncated:
            parts.append(f"truncated {self.truncated} of {self.examples} examples to {self.seq_len} tokens")
        if self.dropped_tokens:
            parts.append(f"{self.dropped_tokens} tokens left out")
        return "; ".join(parts)


def _check_example(ex: Any, i: int) -> tuple[np.ndarray, np.ndarray]:
    try:
        ids, mask = ex
    except (TypeError, ValueError):
        raise DataError(f"example {i}: expected a (token_ids, loss_mask) pair, got {type(ex).__name__}") from None
    ids = np.asarray(ids)
    mask = np.asarray(mask)
    if ids.ndim != 1 or mask.shape != ids.shape:
        raise DataError(f"example {i}: token_ids {ids.shape} and loss_mask {mask.shape} must be 1-D and "
                        "of the same length")
    if ids.size == 0:
        raise DataError(f"example {i}: it has no tokens")
    if not np.issubdtype(ids.dtype, np.integer) or ids.min() < 0:
        raise DataError(f"example {i}: token_ids must be non-negative integers")
    return ids.astype(np.int32), mask.astype(bool)


def _check_sizes(seq_len: int, pad_id: int) -> None:
    if int(seq_len) <= 0:
        raise DataError(f"seq_len={seq_len} must be positive")
    if int(pad_id) < 0:
        raise DataError(f"pad_id={pad_id} must be a non-negative token id")


def pack_sequences(examples: Iterable[Example], seq_len: int, pad_id: int, *, sep_id: int | None = None,
                   drop_last: bool = False) -> tuple[dict[str, np.ndarray], PackStats]:
    """Concatenate examples (with `sep_id` after each when given, as a target) and cut into rows.

    The last, partial block is padded (attention and loss false there); drop_last=True drops it instead,
    like TRL, counting its tokens in `dropped_tokens`.
    """
    _check_sizes(seq_len, pad_id)
    ids_parts, mask_parts, seg_parts = [], [], []
    n = 0
    for i, ex in enumerate(examples):
        ids, mask = _check_example(ex, i)
        if sep_id is not None:
            ids = np.append(ids, np.int32(sep_id))
            mask = np.append(mask, True)
        ids_parts.append(ids)
        mask_parts.append(mask)
        seg_parts.append(np.full(ids.size, i, np.int64))
        n += 1
    if n == 0:
        raise DataError("pack_sequences: no examples")
    ids = np.concatenate(ids_parts)
    mask = np.concatenate(mask_parts)
    doc = np.concatenate(seg_parts)
    total = ids.size
    rows = -(-total // seq_len)
    dropped_tokens = 0
    if drop_last and total % seq_len:
        rows = total // seq_len
        if rows == 0:
            raise DataError(f"pack_sequences: all {total} tokens fit in less than one row of {seq_len}; "
                            "use drop_last=False or a smaller seq_len")
        dropped_tokens = total - rows * seq_len
        total = rows * seq_len
    size = rows * seq_len
    tokens = np.full(size, pad_id, np.int32)
    tokens[:total] = ids[:total]
    loss = np.zeros(size, bool)
    loss[:total] = mask[:total]
    attn = np.zeros(size, bool)
    attn[:total] = True
    docs = np.full(size, -1, np.int64)
    docs[:total] = doc[:total]
    docs = docs.reshape(rows, seq_len)
    # number documents 1, 2, ... within each row; padding stays 0
    starts = np.concatenate([np.ones((rows, 1), bool), docs[:, 1:] != docs[:, :-1]], axis=1)
    segments = np.where(docs >= 0, np.cumsum(starts, axis=1), 0).astype(np.int32)
    out = {"tokens": tokens.reshape(rows, seq_len), "attention_mask": attn.reshape(rows, seq_len),
           "loss_mask": loss.reshape(rows, seq_len), "segment_ids": segments}
    stats = PackStats(examples=n, dropped=0, truncated=0, rows=rows, tokens=total, pad_tokens=size - total,
                      dropped_tokens=dropped_tokens, seq_len=seq_len)
    return out, stats


def pad_batch(examples: Iterable[Example], seq_len: int, pad_id: int, *, truncate: bool = False
              ) -> tuple[dict[str, np.ndarray], PackStats]:
    """One example per row, right-padded to `seq_len`.

    Examples longer than `seq_len` are dropped (truncate=False) or cut to their first `seq_len` tokens
    (truncate=True); either way `PackStats` counts them and `index` maps rows back to examples.
    """
    _check_sizes(seq_len, pad_id)
    kept, index = [], []
    n = dropped = truncated = dropped_tokens = 0
    for i, ex in enumerate(examples):
        ids, mask = _check_example(ex, i)
        n += 1
        if ids.size > seq_len:
            dropped_tokens += ids.size - seq_len if truncate else ids.size
            if not truncate:
                dropped += 1
                continue
            truncated += 1
            ids, mask = ids[:seq_len], mask[:seq_len]
        kept.append((ids, mask))
        index.append(i)
    if n == 0:
        raise DataError("pad_batch: no examples")
    if not kept:
        raise DataError(f"pad_batch: all {n} examples are longer than seq_len={seq_len}; raise seq_len or "
                        "pass truncate=True")
    rows = len(kept)
    tokens = np.full((rows, seq_len), pad_id, np.int32)
    loss = np.zeros((rows, seq_len), bool)
    attn = np.zeros((rows, seq_len), bool)
    for r, (ids, mask) in enumerate(kept):
        tokens[r, : ids.size] = ids
        loss[r, : ids.size] = mask
        attn[r, : ids.size] = True
    real = int(attn.sum())
    out = {"tokens": tokens, "attention_mask": attn, "loss_mask": loss, "segment_ids": attn.astype(np.int32),
           "index": np.asarray(index, np.int32)}
    stats = PackStats(examples=n, dropped=dropped, truncated=truncated, rows=rows, tokens=real,
                      pad_tokens=rows * seq_len - real, dropped_tokens=dropped_tokens, seq_len=seq_len)
    return out, stats


class BatchIterator:
    """Shuffled batches over epochs, resumable exactly from `state()`.

    Each epoch visits a fresh permutation of the rows, drawn from (seed, epoch) alone, so a restored
    iterator continues with the very batches an uninterrupted one would produce. The last
    `num_rows % batch_size` rows of a permutation are not used in that epoch (fixed batch shapes); a
    different permutation next epoch covers them. Yields dicts of arrays [batch_size, ...].
    """

    def __init__(self, data: dict[str, np.ndarray], batch_size: int, *, seed: int = 0, shuffle: bool = True,
                 num_epochs: int | None = None):
        if not data:
            raise DataError("BatchIterator: no arrays given")
        sizes = {k: len(v) for k, v in data.items()}
        if len(set(sizes.values())) != 1:
            raise DataError(f"BatchIterator: arrays disagree on the number of rows: {sizes}")
        self.num_rows = next(iter(sizes.values()))
        if batch_size <= 0 or batch_size > self.num_rows:
            raise DataError(f"BatchIterator: batch_size={batch_size} must be between 1 and the number of "
                            f"rows ({self.num_rows})")
        if num_epochs is not None and num_epochs <= 0:
            raise DataError(f"BatchIterator: num_epochs={num_epochs} must be positive or None (endless)")
        self.data = data
        self.batch_size = int(batch_size)
        self.seed = int(seed)
        self.shuffle = bool(shuffle)
        self.num_epochs = num_epochs
        self.steps_per_epoch = self.num_rows // self.batch_size
        self.epoch = 0
        self.position = 0          # batches already taken from the current epoch
        self._order: tuple[int, np.ndarray] | None = None

    def _permutation(self) -> np.ndarray:
        if self._order is None or self._order[0] != self.epoch:
            order = (np.random.default_rng([self.seed, self.epoch]).permutation(self.num_rows) if self.shuffle
                     else np.arange(self.num_rows))
            self._order = (self.epoch, order)
        return self._order[1]

    def __iter__(self) -> "BatchIterator":
        return self

    def __next__(self) -> dict[str, np.ndarray]:
        if self.num_epochs is not None and self.epoch >= self.num_epochs:
            raise StopIteration
        idx = self._permutation()[self.position * self.batch_size:(self.position + 1) * self.batch_size]
        self.position += 1
        if self.position == self.steps_per_epoch:
            self.epoch, self.position = self.epoch + 1, 0
        return {k: v[idx] for k, v in self.data.items()}

    def state(self) -> dict[str, int | bool]:
        """Where the iterator is: JSON-serialisable, for checkpoints."""
        return {"epoch": self.epoch, "position": self.position, "seed": self.seed, "shuffle": self.shuffle,
                "num_rows": self.num_rows, "batch_size": self.batch_size}

    def restore(self, state: dict[str, Any]) -> "BatchIterator":
        """Continue from a `state()`; the data, batch size, seed and shuffle flag must be the same."""
        for key in ("seed", "shuffle", "num_rows", "batch_size"):
            if key in state and state[key] != getattr(self, key):
                raise DataError(f"BatchIterator.restore: saved {key}={state[key]!r} but this iterator has "
                                f"{key}={getattr(self, key)!r}; resume with the same data and settings")
        epoch, position = int(state["epoch"]), int(state["position"])
        if epoch < 0 or not 0 <= position < self.steps_per_epoch:
            raise DataError(f"BatchIterator.restore: epoch={epoch}, position={position} is outside "
                            f"0 <= position < {self.steps_per_epoch}")
        self.epoch, self.position = epoch, position
        return self
