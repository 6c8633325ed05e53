"""Plain-text sources for word-level KL distillation: documents -> token ids -> full packed rows -> mixtures.

A *text spec* names where documents come from:

  a .txt file        one document; a long file is split into documents of at most `MAX_DOC_CHARS`
                     characters at blank-line (paragraph) boundaries, in order, so tokenising stays fast
  a folder           every *.txt file below it (recursively, sorted by path), each read as above
  a datasets source  a local .json / .jsonl / .parquet file or a folder of them, or a hub dataset written
                     "hf:NAME" or "hf:NAME:SPLIT" (default split "train"); each row's string column `field`
                     (default "text") is one document

Files are read as UTF-8 (a leading byte-order mark is dropped, CRLF becomes LF). Every document is tokenised
without special tokens and followed by the EOS id, and *every* token — the EOS included — is a target: this
is distillation on raw text, there is no prompt to mask.

`text_rows` packs the token stream into rows of exactly `seq_len` real tokens (no padding anywhere: the
incomplete last row is dropped); `segment_ids` number the documents within each row and the EOS token marks
where one ends. `repeat_rows` makes rows that repeat a span of text, so the teacher's copying (its induction
heads) has something to be distilled from. `mix_rows` mixes the rows of several sources by weight.
`ngram_overlap` finds the token sequences that share an n-token span with reference texts (decontamination
against held-out evaluation text).
"""
from __future__ import annotations

import dataclasses
import math
import os
import re
from pathlib import Path
from typing import Any, Callable, Iterable, Mapping, Sequence

import numpy as np

from l2m_jax.data.chat import DataError
from l2m_jax.data.packing import PackStats, pack_sequences

__all__ = ["MAX_DOC_CHARS", "read_documents", "split_paragraphs", "tokenize_documents", "text_rows", "repeat_rows",
           "mix_rows", "ngram_overlap", "ngram_index", "NgramIndex"]

MAX_DOC_CHARS = 20_000          # documents cut from a long .txt file are at most this long (when possible)
_DATA_SUFFIXES = (".json", ".jsonl", ".parquet")
_TOKENIZE_BATCH = 64            # documents per tokenizer call


# ------------------------------------------------------------------------------------------------ reading
def _read_txt(path: Path) -> str:
    """The text of a UTF-8 file, CRLF normalised; DataError for bad encodings and empty files."""
    data = path.read_bytes()
    try:
        text = data.decode("utf-8-sig")
    except UnicodeDecodeError as e:
        raise DataError(f"text file {str(path)!r} is not UTF-8 (byte {e.start}: {data[e.start:e.start + 1]!r}); "
                        "convert it, e.g. `iconv -f latin1 -t utf-8`") from None
    text = text.replace("\r\n", "\n").replace("\r", "\n")
    if not text.strip():
        raise DataError(f"text file {str(path)!r} is empty (or only whitespace); remove it or give it text")
    return text


def _split_long(piece: str, max_chars: int, seps: tuple[str, ...]) -> list[str]:
    """Cut `piece` into parts of at most `max_chars` at the separator pattern `seps[0]`.

    Parts are greedy runs of whole units (the text between separators); a part still longer than
    `max_chars` (a single long unit) is cut at the next, finer separator, and without one hard. The
    separators at the cuts are dropped; everything else is kept, in order.
    """
    if len(piece) <= max_chars:
        return [piece]
    if not seps:
        return [piece[i:i + max_chars] for i in range(0, len(piece), max_chars)]
    sep, finer = seps[0], seps[1:]
    spans, pos = [], 0
    for m in re.finditer(sep, piece):
        spans.append((pos, m.start()))
        pos = m.end()
    spans.append((pos, len(piece)))
    spans = [(a, b) for a, b in spans if b > a]
    if len(spans) <= 1:
        return _split_long(piece, max_chars, finer)
    parts = []
    start, end = spans[0]
    for a, b in spans[1:]:
        if b - start > max_chars:
            parts.append(piece[start:end])
            start = a
        end = b
    parts.append(piece[start:end])
    return [q for p in parts for q in _split_long(p, max_chars, finer)]


def split_paragraphs(text: str, max_chars: int = MAX_DOC_CHARS) -> list[str]:
    """`text` as consecutive documents of at most `max_chars` characters, cut at blank lines where possible.

    A paragraph longer than `max_chars` is cut at line breaks, a line at spaces. The documents, in order,
    hold all of the text: only the whitespace at each cut (and around the whole) is left out.
    """
    if max_chars <= 0:
        raise DataError(f"max_chars={max_chars} must be positive")
    text = text.strip()
    if not text:
        return []
    parts = _split_long(text, max_chars, (r"\n[ \t]*\n\s*", r"\n\s*", r"\s+"))
    return [p.strip() for p in parts if p.strip()]


def _txt_documents(path: Path, max_chars: int) -> list[str]:
    return split_paragraphs(_read_txt(path), max_chars)


def _is_data_file(p: Path) -> bool:
    return p.is_file() and p.suffix in _DATA_SUFFIXES


def _dataset_documents(name: str, split: str | None, field: str, limit: int | None, label: str) -> list[str]:
    from l2m_jax.data.sources import DatasetSpec, _load_dataset

    spec = DatasetSpec(name, split or "train")
    ds = _load_dataset(spec, None)
    if field not in ds.column_names:
        raise DataError(f"{label}: no column {field!r}; its columns are {ds.column_names}; pass field= one of "
                        "them")
    docs = []
    for i, row in enumerate(ds.select_columns([field])):
        value = row[field]
        if value is None:
            continue
        if not isinstance(value, str):
            raise DataError(f"{label} row {i}: column {field!r} must hold strings, got {type(value).__name__}; "
                            "pass field= a text column")
        value = value.replace("\r\n", "\n")
        if value.strip():
            docs.append(value)
            if limit is not None and len(docs) >= limit:
                break
    return docs


def read_documents(spec: "str | os.PathLike[str]", *, field: str = "text", limit: int | None = None,
                   max_chars: int = MAX_DOC_CHARS) -> list[str]:
    """The documents of one text spec (see the module docstring), at most the first `limit` of them.

    Raises DataError, naming the input, for: a path that does not exist; a folder without .txt (or data)
    files; an empty or whitespace-only .txt file; a .txt file that is not UTF-8; a dataset without `field`;
    and a source whose documents are all empty.
    """
    if limit is not None and int(limit) <= 0:
        raise DataError(f"limit={limit} must be positive (or None for every document)")
    if isinstance(spec, os.PathLike):
        spec = os.fspath(spec)
    if not isinstance(spec, str) or not spec:
        raise DataError(f"text spec must be a non-empty path or 'hf:NAME[:SPLIT]', got {spec!r}")
    if spec.startswith("hf:"):
        name, _, split = spec[3:].partition(":")
        if not name:
            raise DataError(f"text spec {spec!r}: write a hub dataset as 'hf:NAME' or 'hf:NAME:SPLIT'")
        docs = _dataset_documents(name, split or None, field, limit, f"dataset {spec!r}")
    else:
        path = Path(spec)
        if not path.exists():
            raise DataError(f"text source {spec!r} does not exist; give a .txt file, a folder of .txt files, a "
                            ".json/.jsonl/.parquet file (or folder) or 'hf:NAME[:SPLIT]'")
        if path.is_file() and path.suffix in _DATA_SUFFIXES:
            docs = _dataset_documents(spec, None, field, limit, f"dataset {spec!r}")
        elif path.is_file():
            docs = _txt_documents(path, max_chars)
        else:
            txts = sorted(p for p in path.rglob("*.txt") if p.is_file())
            data = sorted(p for p in path.rglob("*") if _is_data_file(p))
            if txts and data:
                raise DataError(f"text folder {spec!r} holds both .txt files and data files "
                                f"({data[0].name}, ...); point at a folder of one kind")
            if data:
                docs = _dataset_documents(spec, None, field, limit, f"dataset folder {spec!r}")
            elif not txts:
                raise DataError(f"text folder {spec!r} has no .txt files (searched recursively); put the text "
                                "in .txt files or point at a file")
            else:
                docs = []
                for p in txts:
                    docs.extend(_txt_documents(p, max_chars))
                    if limit is not None and len(docs) >= limit:
                        break
    if not docs:
        raise DataError(f"text source {spec!r}: every document is empty; check field={field!r} and the files")
    return docs[:limit] if limit is not None else docs


# --------------------------------------------------------------------------------------------- tokenising
def tokenize_documents(tokenizer, docs: Sequence[str], *, eos_id: int) -> list[tuple[np.ndarray, np.ndarray]]:
    """(ids int32 [L], mask bool [L]) per document: its tokens (no special tokens added) then `eos_id`.

    Every position is a target, the EOS too, so that packed documents stay separated and the model learns
    where text ends. The tokenizer is called on batches of documents.
    """
    if isinstance(docs, str):
        raise DataError("tokenize_documents: docs must be a list of strings, not one string")
    if isinstance(eos_id, bool) or not isinstance(eos_id, (int, np.integer)) or eos_id < 0:
        raise DataError(f"tokenize_documents: eos_id={eos_id!r} must be a non-negative token id")
    size = len(tokenizer) if hasattr(tokenizer, "__len__") else None
    if size is not None and eos_id >= size:
        raise DataError(f"tokenize_documents: eos_id={eos_id} is outside the tokenizer's vocabulary of {size}")
    docs = list(docs)
    for i, d in enumerate(docs):
        if not isinstance(d, str):
            raise DataError(f"tokenize_documents: document {i} is a {type(d).__name__}, not a string")
    out = []
    eos = np.asarray([eos_id], np.int32)
    for b in range(0, len(docs), _TOKENIZE_BATCH):
        batch = docs[b:b + _TOKENIZE_BATCH]
        # verbose=False: documents are longer than the model's context on purpose, packing cuts them
        enc = tokenizer(batch, add_special_tokens=False, verbose=False)["input_ids"]
        for ids in enc:
            ids = np.concatenate([np.asarray(ids, np.int32).reshape(-1), eos])
            out.append((ids, np.ones(ids.size, bool)))
    return out


# ------------------------------------------------------------------------------------------------ packing
def text_rows(tokenizer, specs: "str | os.PathLike[str] | Iterable[str | os.PathLike[str]]", seq_len: int, *,
              eos_id: int, pad_id: int, max_tokens: int | None = None, seed: int | None = 0,
              field: str = "text", doc_filter: Callable[[list[np.ndarray]], Any] | None = None
              ) -> tuple[dict[str, np.ndarray], PackStats]:
    """Rows of exactly `seq_len` real tokens from the documents of every spec.

    `doc_filter`, given the token ids (int32 [L], ending in EOS) of every document, returns a bool keep mask
    [number of documents]; the documents it rejects are left out before anything is shuffled, cut or packed
    (e.g. `lambda docs: ~ngram_overlap(docs, heldout)`).
    All documents (each followed by EOS) are put in one order — shuffled with `seed`, or as read when
    seed=None — concatenated and, when `max_tokens` is given, cut after the first `max_tokens` tokens; the
    stream is then packed into rows with `pack_sequences(drop_last=True)`, so the incomplete last row is
    dropped (counted in `PackStats.dropped_tokens`) and no row has a pad position. Returns the
    `pack_sequences` arrays — tokens int32, loss_mask bool (all true), segment_ids int32 (documents within a
    row, from 1), attention_mask bool (all true), each [N, seq_len] — and its PackStats.
    """
    if isinstance(specs, (str, os.PathLike)):
        specs = [specs]
    specs = list(specs)
    if not specs:
        raise DataError("text_rows: no text specs given")
    if int(seq_len) <= 0:
        raise DataError(f"text_rows: seq_len={seq_len} must be positive")
    if max_tokens is not None and int(max_tokens) < seq_len:
        raise DataError(f"text_rows: max_tokens={max_tokens} is less than one row of seq_len={seq_len}; raise "
                        "max_tokens or lower seq_len")
    examples = []
    for spec in specs:
        examples.extend(tokenize_documents(tokenizer, read_documents(spec, field=field), eos_id=eos_id))
    if doc_filter is not None:
        keep = np.asarray(doc_filter([ids for ids, _ in examples]))
        if keep.shape != (len(examples),) or keep.dtype != bool:
            raise DataError(f"text_rows: doc_filter returned {keep.dtype} {keep.shape}, not a bool mask of the "
                            f"{len(examples)} documents")
        examples = [ex for ex, k in zip(examples, keep) if k]
    if seed is not None:
        order = np.random.default_rng(seed).permutation(len(examples))
        examples = [examples[i] for i in order]
    total = sum(ids.size for ids, _ in examples)
    names = ", ".join(repr(os.fspath(s)) for s in specs)
    if total < seq_len:
        raise DataError(f"text_rows: {names} give {total} tokens, less than one row of seq_len={seq_len}; "
                        "add text or lower seq_len")
    if max_tokens is not None and total > max_tokens:
        kept, n = [], 0
        for ids, mask in examples:
            take = min(ids.size, int(max_tokens) - n)
            kept.append((ids[:take], mask[:take]))
            n += take
            if n >= max_tokens:
                break
        examples = kept
    arrays, stats = pack_sequences(examples, seq_len, pad_id, drop_last=True)
    if not (arrays["attention_mask"].all() and arrays["loss_mask"].all() and stats.pad_tokens == 0):
        raise AssertionError("text_rows: a packed row has a pad position")
    if max_tokens is not None and total > max_tokens:   # what the cut left out counts as dropped
        stats = dataclasses.replace(stats, dropped_tokens=total - stats.tokens)
    return arrays, stats


def repeat_rows(rows: Mapping[str, np.ndarray], period: int, *, seed: int = 0) -> dict[str, np.ndarray]:
    """Rows that copy text: the first `period` tokens of each row of `rows`, tiled to the row length.

    `rows` holds "tokens" [N, L] (e.g. `text_rows`' arrays); the rows are taken in a permutation drawn with
    `seed`, and row i of the result is tokens[perm[i], :period] repeated ceil(L / period) times and cut to L.
    From the second copy on, every next token is in the context `period` positions back, so the teacher
    predicts it by copying; a student distilled on these rows learns to copy as its teacher does. Every
    position is a target. Returns {"tokens" int32 [N, L], "loss_mask" bool [N, L] (all true)}.
    """
    tokens = np.asarray(rows["tokens"])
    if tokens.ndim != 2 or tokens.shape[0] == 0:
        raise DataError(f"repeat_rows: tokens must be a non-empty [N, L] array, got shape {tokens.shape}")
    n, length = tokens.shape
    if isinstance(period, bool) or not isinstance(period, (int, np.integer)) or not 0 < period < length:
        raise DataError(f"repeat_rows: period={period!r} must be an integer in [1, {length - 1}] (the row length "
                        f"is {length}), so that a row holds a span and at least part of its copy; e.g. "
                        f"period={length // 2}")
    order = np.random.default_rng(seed).permutation(n)
    span = tokens[order, :period]
    tiled = np.tile(span, (1, -(-length // period)))[:, :length]
    return {"tokens": tiled.astype(np.int32), "loss_mask": np.ones((n, length), bool)}


# ------------------------------------------------------------------------------------------------- mixing
def _shares(rows: int, probs: dict[str, float]) -> dict[str, int]:
    """Integer shares summing to `rows`, proportional to `probs` (largest remainder, ties by name order)."""
    exact = {k: rows * p for k, p in probs.items()}
    counts = {k: int(math.floor(v + 1e-9)) for k, v in exact.items()}
    left = rows - sum(counts.values())
    by_remainder = sorted(probs, key=lambda k: (-(exact[k] - counts[k]), list(probs).index(k)))
    for k in by_remainder[:left]:
        counts[k] += 1
    return counts


def mix_rows(sources: Mapping[str, Mapping[str, np.ndarray]], weights: Mapping[str, float], *,
             rows: int | None = None, seed: int = 0, keys: Sequence[str] = ("tokens", "loss_mask")
             ) -> tuple[dict[str, np.ndarray], dict[str, Any]]:
    """Mix the row arrays of several sources by weight, shuffled together.

    Every source is a dict of arrays [N_i, L] (the same L for all) holding at least `keys`. Source i gets a
    share p_i = w_i / sum(w) of the output rows (integer counts by largest remainder, so they sum to `rows`).
    `rows` defaults to the most rows for which no source needs to be repeated: floor(min_i N_i / p_i) over
    the sources with w_i > 0 (the scarcest source, relative to its weight, is used whole).

    A source's rows are drawn without replacement; when its share exceeds N_i it is taken in whole passes of
    a fresh permutation plus a partial one (each row used ⌊share/N_i⌋ or ⌈share/N_i⌉ times), and the rows
    beyond the first N_i count as `repeats`. A zero-weight source is left out (and not checked). The same
    inputs and seed give the same output; sources are drawn in sorted name order.

    Returns ({key: array [rows, L]}, info) where info = {"rows", "seq_len", "names", "row_source" (int32 [rows],
    index into names per output row), "sources": {name: {"weight", "share" (p_i), "rows", "available",
    "repeats", "tokens"}}}; "tokens" counts attention_mask true positions when the source has that array,
    rows x L otherwise (repeats included).
    """
    if not isinstance(sources, Mapping) or not sources:
        raise DataError("mix_rows: sources must be a non-empty mapping of name -> row arrays")
    if not isinstance(weights, Mapping):
        raise DataError(f"mix_rows: weights must be a mapping of source name -> weight, got {type(weights).__name__}")
    unknown = sorted(set(weights) - set(sources))
    missing = sorted(set(sources) - set(weights))
    if unknown:
        raise DataError(f"mix_rows: weights {dict(weights)} name unknown sources {unknown}; the sources are "
                        f"{sorted(sources)}")
    if missing:
        raise DataError(f"mix_rows: sources {missing} have no weight in {dict(weights)}; give every source a "
                        "weight (0 leaves it out)")
    w: dict[str, float] = {}
    for name in sorted(sources):
        value = weights[name]
        try:
            value = float(value)
        except (TypeError, ValueError):
            raise DataError(f"mix_rows: weight {value!r} of source {name!r} is not a number; weights "
                            f"{dict(weights)} must be finite numbers >= 0") from None
        if not math.isfinite(value) or value < 0:
            raise DataError(f"mix_rows: weight {weights[name]!r} of source {name!r} is negative or not finite; "
                            f"weights {dict(weights)} must be finite numbers >= 0, at least one positive")
        w[name] = value
    total_w = sum(w.values())
    if total_w <= 0:
        raise DataError(f"mix_rows: all weights are zero ({dict(weights)}); give at least one source a positive "
                        "weight")
    used = [k for k in w if w[k] > 0]
    keys = tuple(keys)
    if not keys:
        raise DataError("mix_rows: keys is empty; name the arrays to mix, e.g. ('tokens', 'loss_mask')")
    seq_len = None
    avail: dict[str, int] = {}
    for name in used:
        src = sources[name]
        absent = [k for k in keys if k not in src]
        if absent:
            raise DataError(f"mix_rows: source {name!r} has no arrays {absent}; it has {sorted(src)}; pass keys= "
                            "arrays that every source has")
        shapes = {k: np.shape(src[k]) for k in keys}
        for k, shape in shapes.items():
            if len(shape) != 2:
                raise DataError(f"mix_rows: source {name!r} array {k!r} has shape {shape}, not [rows, seq_len]")
        if len({s for s in shapes.values()}) != 1:
            raise DataError(f"mix_rows: source {name!r} arrays disagree in shape: {shapes}")
        n, length = next(iter(shapes.values()))
        if seq_len is None:
            seq_len, first = length, name
        elif length != seq_len:
            raise DataError(f"mix_rows: source {name!r} has rows of {length} tokens but {first!r} has {seq_len}; "
                            "pack every source with the same seq_len")
        if n == 0:
            raise DataError(f"mix_rows: source {name!r} has no rows but weight {w[name]}; give it rows or weight 0")
        avail[name] = n
    probs = {k: w[k] / total_w for k in used}
    if rows is None:
        rows = min(int(math.floor(avail[k] / probs[k] + 1e-9)) for k in used)
        while rows > 0 and any(c > avail[k] for k, c in _shares(rows, probs).items()):
            rows -= 1   # guard against float rounding
    elif isinstance(rows, bool) or int(rows) != rows or rows <= 0:
        raise DataError(f"mix_rows: rows={rows!r} must be a positive integer (or None)")
    rows = int(rows)
    if rows <= 0:
        raise DataError(f"mix_rows: the weights {dict(weights)} and row counts {avail} give no rows; pass rows=")
    counts = _shares(rows, probs)
    rng = np.random.default_rng(seed)
    picks, owner = [], []
    names = sorted(sources)
    info_sources: dict[str, dict[str, Any]] = {}
    for name in names:
        c = counts.get(name, 0)
        n = avail.get(name, 0)
        if c:
            passes = [rng.permutation(n) for _ in range(c // n)]
            if c % n:
                passes.append(rng.permutation(n)[: c % n])
            idx = np.concatenate(passes)
            picks.append((name, idx))
            owner.append(np.full(c, names.index(name), np.int32))
            src = sources[name]
            tokens = int(np.asarray(src["attention_mask"])[idx].sum()) if "attention_mask" in src else c * seq_len
        else:
            tokens = 0
        if name not in avail:   # zero weight: left out, only counted
            n = len(next(iter(sources[name].values()), ()))
        info_sources[name] = {"weight": w[name], "share": probs.get(name, 0.0), "rows": c, "available": n,
                              "repeats": max(0, c - n), "tokens": tokens}
    perm = rng.permutation(rows)
    out = {k: np.concatenate([np.asarray(sources[name][k])[idx] for name, idx in picks])[perm] for k in keys}
    info = {"rows": rows, "seq_len": seq_len, "names": names, "row_source": np.concatenate(owner)[perm],
            "sources": info_sources}
    return out, info


# ------------------------------------------------------------------------------------------ decontamination
_MIX = np.uint64(0x9E3779B97F4A7C15)       # odd constants of splitmix64 / a 64-bit polynomial base
_BASE = np.uint64(0xBF58476D1CE4E5B9)


def _flat(seqs: Sequence[np.ndarray], what: str) -> tuple[np.ndarray, np.ndarray]:
    """(all tokens int64 [T], start offset of each sequence int64 [S + 1])."""
    arrays = []
    for i, s in enumerate(seqs):
        a = np.asarray(s)
        if a.ndim != 1 or not (a.size == 0 or np.issubdtype(a.dtype, np.integer)):
            raise DataError(f"ngram_overlap: {what} {i} must be a 1-D array of token ids, got {a.dtype} {a.shape}")
        arrays.append(a.astype(np.int64))
    lengths = np.asarray([a.size for a in arrays], np.int64)
    flat = np.concatenate(arrays) if arrays else np.zeros(0, np.int64)
    return flat, np.concatenate([[0], np.cumsum(lengths)])


def _windows(flat: np.ndarray, starts: np.ndarray, n: int) -> tuple[np.ndarray, np.ndarray]:
    """(hash uint64 [M], start position int64 [M]) of every n-token window lying inside one sequence."""
    seq_len = np.diff(starts)
    last = starts[1:] - n                                      # the last window start of each sequence
    ok = seq_len >= n
    # window starts: starts[s] .. last[s] for each sequence long enough
    counts = np.where(ok, last - starts[:-1] + 1, 0)
    pos = np.repeat(starts[:-1] - np.cumsum(counts) + counts, counts) + np.arange(counts.sum())
    if pos.size == 0:
        return np.zeros(0, np.uint64), pos.astype(np.int64)
    with np.errstate(over="ignore"):                           # uint64 arithmetic wraps: a hash mod 2^64
        v = flat.view(np.uint64) * _MIX
        v ^= v >> np.uint64(29)
        h = np.zeros(pos.size, np.uint64)
        for j in range(n):                                     # over the window's offsets, not its positions
            h = h * _BASE + v[pos + j]
    return h, pos


@dataclasses.dataclass(frozen=True)
class NgramIndex:
    """The distinct n-token windows of reference sequences, sorted by their hash: the reference side of
    `ngram_overlap`, built once by `ngram_index` where many batches are checked against the same references."""
    n: int
    hashes: np.ndarray          # int64 [M], sorted
    windows: np.ndarray         # int64 [M, n], the window of each hash (equal hashes of different windows apart)

    def __len__(self) -> int:
        return int(self.hashes.size)


def _check_n(n) -> int:
    if isinstance(n, bool) or not isinstance(n, (int, np.integer)) or n < 1:
        raise DataError(f"ngram_overlap: n={n!r} must be a positive number of tokens")
    return int(n)


def ngram_index(references: Sequence[np.ndarray], n: int = 13) -> NgramIndex:
    """The `NgramIndex` of every n-token window lying inside one of `references` (1-D token id arrays)."""
    n = _check_n(n)
    rflat, rstarts = _flat(references, "reference")
    r_hash, r_pos = _windows(rflat, rstarts, n)
    if r_hash.size == 0:
        return NgramIndex(n, np.zeros(0, np.int64), np.zeros((0, n), np.int64))
    r_hash = r_hash.view(np.int64)
    order = np.argsort(r_hash, kind="stable")
    hashes, windows = r_hash[order], rflat[r_pos[order][:, None] + np.arange(n)]
    # repeats of a window are adjacent (same hash); under a hash collision one may stay twice, which only costs a
    # comparison
    keep = np.ones(hashes.size, bool)
    keep[1:] = (hashes[1:] != hashes[:-1]) | (windows[1:] != windows[:-1]).any(axis=1)
    return NgramIndex(n, hashes[keep], windows[keep])


def ngram_overlap(sequences: Sequence[np.ndarray], references: Sequence[np.ndarray] | NgramIndex,
                  n: int = 13) -> np.ndarray:
    """bool [S]: True for each token sequence sharing some n-token window with any reference sequence.

    Exact: the windows of `references` are hashed (a 64-bit polynomial of mixed token ids) and every
    sequence window whose hash is one of theirs is compared token for token with each reference window of
    that hash. A window never spans two sequences (or two references); a sequence shorter than n matches
    nothing. Vectorised over all positions at once: Python loops run only over the n offsets of a window
    (and over the reference windows of one hash, one unless 64-bit hashes collide). `references` may be an
    `ngram_index` of them, built once for many calls (its n must be this n).
    """
    n = _check_n(n)
    flat, starts = _flat(sequences, "sequence")
    out = np.zeros(len(starts) - 1, bool)
    index = references if isinstance(references, NgramIndex) else ngram_index(references, n)
    if index.n != n:
        raise DataError(f"ngram_overlap: the reference index holds {index.n}-token windows, not {n}-token ones; "
                        f"build it with ngram_index(references, n={n})")
    if not len(index) or out.size == 0:
        return out
    offsets = np.arange(n)
    r_hash, r_windows = index.hashes, index.windows               # [M], [M, n]
    h, pos = _windows(flat, starts, n)
    h = h.view(np.int64)
    lo = np.searchsorted(r_hash, h, side="left")
    hi = np.searchsorted(r_hash, h, side="right")
    cand = hi > lo
    pos, lo, hi = pos[cand], lo[cand], hi[cand]
    seq_windows = flat[pos[:, None] + offsets]                  # [C, n]
    found = np.zeros(pos.size, bool)
    for k in range(int((hi - lo).max(initial=0))):             # 1 unless two distinct windows share a hash
        live = (lo + k < hi) & ~found
        ref = r_windows[np.minimum(lo + k, len(r_hash) - 1)]
        found |= live & (seq_windows == ref).all(axis=1)
    owner = np.searchsorted(starts, pos[found], side="right") - 1
    out[owner] = True
    return out
