"""Plain-text rows the teacher writes: more distinct text for word-level KL than the text sources hold.

    rows = teacher_text_rows(teacher, prefixes, seq_len=256, rows=2048, sampling=Sampling(1.0, top_p=0.95),
                             start_id=eos_id, batch_size=512, seed=0)

Every row opens with `start_id` (the end-of-document token, which is how a document starts in packed text),
then a prefix (e.g. the first 16 tokens of a text row, or nothing), and the teacher's sampled continuation fills
it to `seq_len` tokens. The teacher's own samples cover whatever it puts probability on, not only what the text
sources hold, so a student distilled on them meets more of its teacher's distribution; rows can be made in any
number at the cost of generation. `cached_teacher_text_rows` keeps them in a folder with their settings, so a
resumed or repeated run reuses them.
"""
from __future__ import annotations

import json
import os
import time
from pathlib import Path
from typing import Sequence

import numpy as np

from l2m_jax.data.chat import DataError

__all__ = ["teacher_text_rows", "cached_teacher_text_rows"]


def teacher_text_rows(teacher, prefixes: Sequence[Sequence[int]], seq_len: int, *, rows: int, sampling,
                      start_id: int, batch_size: int = 256, seed: int = 0, say=None) -> dict[str, np.ndarray]:
    """{"tokens" int32 [rows, seq_len], "loss_mask" bool (all true)}: row i is [start_id, *prefixes[i % P]]
    continued by the teacher (`infer.generate` with `sampling`, a key folded from `seed` per batch) to
    `seq_len` tokens. Every prefix must leave room for at least one new token; `say`, if given, hears the
    progress."""
    import jax

    from l2m_jax.infer.generate import generate

    cfg, params = teacher
    if rows < 1:
        raise DataError(f"teacher_text_rows: rows={rows} must be >= 1")
    if batch_size < 1:
        raise DataError(f"teacher_text_rows: batch_size={batch_size} must be >= 1")
    prefixes = [list(map(int, p)) for p in prefixes] or [[]]
    longest = max(len(p) for p in prefixes)
    if 1 + longest >= seq_len:
        raise DataError(f"teacher_text_rows: a prefix of {longest} tokens (plus the start token) leaves no room "
                        f"in rows of seq_len={seq_len}; use shorter prefixes")
    if seq_len > cfg.max_position_embeddings:
        raise DataError(f"teacher_text_rows: seq_len={seq_len} is longer than the teacher's context "
                        f"({cfg.max_position_embeddings})")
    prompts = [[int(start_id), *prefixes[i % len(prefixes)]] for i in range(rows)]
    out = np.zeros((rows, seq_len), np.int32)
    t0, key = time.perf_counter(), jax.random.key(seed)
    for b, s in enumerate(range(0, rows, batch_size)):
        batch = prompts[s:s + batch_size]
        new = generate(cfg, params, batch, seq_len - min(len(p) for p in batch), sampling,
                       key=jax.random.fold_in(key, b))
        for i, (p, n) in enumerate(zip(batch, new)):
            out[s + i] = np.asarray((p + list(n))[:seq_len], np.int32)
        if say:
            done = min(s + batch_size, rows)
            say(f"teacher text: {done}/{rows} rows ({done * seq_len / (time.perf_counter() - t0):,.0f} tokens/s)")
    return {"tokens": out, "loss_mask": np.ones_like(out, bool)}


def cached_teacher_text_rows(folder: str | os.PathLike, settings: dict, make, say=None) -> dict[str, np.ndarray]:
    """`make()`'s rows, kept in folder/rows.npz beside folder/settings.json: rows made with the same `settings`
    (a JSON-able dict: the teacher, sizes, sampling, seed) are read back instead of made again; other settings
    make them anew."""
    folder = Path(folder)
    rows_path, settings_path = folder / "rows.npz", folder / "settings.json"
    settings = json.loads(json.dumps(settings))
    if rows_path.exists() and settings_path.exists() and json.loads(settings_path.read_text()) == settings:
        with np.load(rows_path) as f:
            if say:
                say(f"teacher text: {len(f['tokens'])} rows read back from {folder}")
            return {"tokens": f["tokens"], "loss_mask": f["loss_mask"]}
    arrays = make()
    folder.mkdir(parents=True, exist_ok=True)
    settings_path.unlink(missing_ok=True)          # no moment where old settings describe new rows
    tmp = folder / "rows.tmp.npz"
    np.savez(tmp, **arrays)
    os.replace(tmp, rows_path)
    settings_path.write_text(json.dumps(settings, indent=1))
    return arrays
