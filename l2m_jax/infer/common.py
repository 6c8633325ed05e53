"""Prompt validation and padding shared by plain and speculative generation."""
from __future__ import annotations

import numpy as np

from ..config import ModelConfig
from ..models.causal_lm import check_length


def _round_up(n: int, m: int) -> int:
    return -(-n // m) * m


def pad_prompts(cfg: ModelConfig, prompts, *, bucket: int = 16) -> tuple[np.ndarray, np.ndarray]:
    """prompts: list of non-empty token-id lists -> (tokens int32 [B, Lp] right-padded with 0, lengths int32 [B]).

    Lp is rounded up to `bucket` so that nearby prompt lengths share one compiled program.
    """
    if int(bucket) < 1:
        raise ValueError(f"bucket={bucket} must be >= 1 (the padded prompt length is a multiple of it)")
    if isinstance(prompts, np.ndarray) or not isinstance(prompts, (list, tuple)) or not prompts:
        raise ValueError("prompts must be a non-empty list of token-id lists (one list per prompt)")
    rows = []
    for i, p in enumerate(prompts):
        a = np.asarray(p)
        if a.ndim != 1 or a.size == 0:
            raise ValueError(f"prompt {i} is empty or not a flat list of token ids; every prompt needs >= 1 token")
        if not np.issubdtype(a.dtype, np.integer):
            raise ValueError(f"prompt {i} holds {a.dtype} values; pass integer token ids")
        if a.min() < 0 or a.max() >= cfg.vocab_size:
            raise ValueError(f"prompt {i} has token ids outside [0, {cfg.vocab_size}) (the model's vocab)")
        rows.append(a.astype(np.int32))
    lens = np.array([len(r) for r in rows], np.int32)
    tokens = np.zeros((len(rows), _round_up(int(lens.max()), bucket)), np.int32)
    for i, r in enumerate(rows):
        tokens[i, :len(r)] = r
    return tokens, lens


# the length rule `forward` applies too (one function, one message)
check_context = check_length


def trim(out: np.ndarray, n: np.ndarray, eos_id: int | None) -> list[list[int]]:
    """Rows of new tokens cut to their count and after the first EOS (which is kept)."""
    result = []
    for row, k in zip(out, n):
        row = [int(t) for t in row[:k]]
        if eos_id is not None and eos_id in row:
            row = row[:row.index(eos_id) + 1]
        result.append(row)
    return result
