"""Plain-text sources: reading .txt files, folders and datasets, tokenising, full packed rows, weighted mixing."""
import json
import re

import numpy as np
import pytest

from l2m_jax.recipe.data import byte_chatml_tokenizer
from l2m_jax.data.chat import DataError
from l2m_jax.data.text import (mix_rows, repeat_rows, ngram_index, ngram_overlap, read_documents, split_paragraphs, text_rows,
                               tokenize_documents)

EOS, PAD = 2, 0


@pytest.fixture(scope="module")
def tok():
    t = byte_chatml_tokenizer()
    assert t.convert_tokens_to_ids("<|im_end|>") == EOS and t.pad_token_id == PAD
    return t


def _squash(s: str) -> str:
    return re.sub(r"\s+", " ", s).strip()


# ------------------------------------------------------------------------------------------ read_documents
def test_txt_file_folder_and_jsonl_round_trip(tmp_path):
    f = tmp_path / "one.txt"
    f.write_bytes("\ufeffFirst line.\r\nSecond line.\r\n\r\nNext paragraph.\n".encode())
    assert read_documents(f) == ["First line.\nSecond line.\n\nNext paragraph."]

    d = tmp_path / "corpus"
    (d / "sub").mkdir(parents=True)
    (d / "b.txt").write_text("bravo")
    (d / "a.txt").write_text("alpha")
    (d / "sub" / "c.txt").write_text("charlie")
    (d / "notes.md").write_text("not text")
    assert read_documents(d) == ["alpha", "bravo", "charlie"]     # sorted by path, recursive, .txt only
    assert read_documents(str(d), limit=2) == ["alpha", "bravo"]

    j = tmp_path / "rows.jsonl"
    rows = [{"text": "one doc", "id": 1}, {"text": "", "id": 2}, {"text": "two\ndocs", "id": 3}]
    j.write_text("".join(json.dumps(r) + "\n" for r in rows))
    assert read_documents(j) == ["one doc", "two\ndocs"]               # empty rows skipped
    j2 = tmp_path / "body.jsonl"
    j2.write_text(json.dumps({"body": "in another column"}) + "\n")
    assert read_documents(j2, field="body") == ["in another column"]
    jd = tmp_path / "jsonl_dir"
    jd.mkdir()
    (jd / "part.jsonl").write_text(j.read_text())
    assert read_documents(jd) == ["one doc", "two\ndocs"]              # a folder of data files: datasets
    (jd / "stray.txt").write_text("x")
    with pytest.raises(DataError, match=r"text folder '.*jsonl_dir' holds both \.txt files and data files"):
        read_documents(jd)
    with pytest.raises(DataError, match=r"write a hub dataset as 'hf:NAME'"):
        read_documents("hf:")


def test_long_file_split_at_paragraphs_in_order(tmp_path):
    paras = [f"Paragraph {i}: " + " ".join(f"w{i}_{k}" for k in range(40 + i % 17)) for i in range(300)]
    text = "\n\n".join(paras)
    f = tmp_path / "long.txt"
    f.write_text(text)
    docs = read_documents(f, max_chars=2000)
    assert len(docs) > 10 and all(len(d) <= 2000 for d in docs)
    assert "\n\n".join(docs) == text                 # cut only at paragraph boundaries, nothing lost or moved
    assert all(d.startswith("Paragraph ") for d in docs)
    # the default limit is 20k characters; a paragraph over the limit is cut at lines, then at spaces
    default = read_documents(f)
    assert len(text) > 40_000 and len(default) >= 3 and all(len(d) <= 20_000 for d in default)
    assert "\n\n".join(default) == text
    one_block = "\n".join(f"gloss number {i}" for i in range(500))
    parts = split_paragraphs(one_block, 1000)
    assert all(len(p) <= 1000 for p in parts) and "\n".join(parts) == one_block
    words = split_paragraphs("x" * 2500 + " tail", 1000)
    assert "".join(words[:3]) == "x" * 2500 and words[-1] == "tail"
    assert _squash(" ".join(split_paragraphs(text, 777))) == _squash(text)


@pytest.mark.parametrize("case, match", [
    ("missing", r"'.*nowhere\.txt' does not exist"),
    ("no_txt", r"text folder '.*empty_dir' has no \.txt files"),
    ("empty_file", r"text file '.*blank\.txt' is empty"),
    ("latin1", r"text file '.*latin1\.txt' is not UTF-8 \(byte 3"),
    ("no_field", r"dataset '.*rows\.jsonl': no column 'text'; its columns are \['body', 'id'\]"),
    ("all_empty", r"text source '.*empty_rows\.jsonl': every document is empty"),
    ("empty_in_folder", r"text file '.*two[/\\]b\.txt' is empty"),
])
def test_read_errors_name_the_input(tmp_path, case, match):
    if case == "missing":
        spec = tmp_path / "nowhere.txt"
    elif case == "no_txt":
        spec = tmp_path / "empty_dir"
        spec.mkdir()
        (spec / "readme.md").write_text("hi")
    elif case == "empty_file":
        spec = tmp_path / "blank.txt"
        spec.write_text("  \n\t\n")
    elif case == "latin1":
        spec = tmp_path / "latin1.txt"
        spec.write_bytes("caf\u00e9 au lait".encode("latin-1"))
    elif case == "no_field":
        spec = tmp_path / "rows.jsonl"
        spec.write_text(json.dumps({"body": "x", "id": 1}) + "\n")
    elif case == "all_empty":
        spec = tmp_path / "empty_rows.jsonl"
        spec.write_text(json.dumps({"text": " "}) + "\n" + json.dumps({"text": ""}) + "\n")
    else:
        spec = tmp_path / "two"
        spec.mkdir()
        (spec / "a.txt").write_text("fine")
        (spec / "b.txt").write_text("")
    with pytest.raises(DataError, match=match):
        read_documents(spec)


# ------------------------------------------------------------------------------------- tokenize, text_rows
def test_tokenize_documents_appends_eos_as_target(tok):
    out = tokenize_documents(tok, ["ab", "hello there"], eos_id=EOS)
    assert [ids.tolist() for ids, _ in out] == [tok("ab", add_special_tokens=False)["input_ids"] + [EOS],
                                                tok("hello there", add_special_tokens=False)["input_ids"] + [EOS]]
    assert all(ids.dtype == np.int32 and mask.dtype == bool and mask.all() for ids, mask in out)
    with pytest.raises(DataError, match="eos_id=999 is outside"):
        tokenize_documents(tok, ["x"], eos_id=999)


def test_text_rows_are_full_with_documents_separated(tmp_path, tok):
    d = tmp_path / "docs"
    d.mkdir()
    texts = [f"document {i} " + "lorem ipsum " * (3 + 2 * i) for i in range(12)]
    for i, t in enumerate(texts):
        (d / f"{i:02d}.txt").write_text(t)
    arrays, stats = text_rows(tok, [d], 32, eos_id=EOS, pad_id=PAD, seed=None)
    n = stats.rows
    assert set(arrays) == {"tokens", "loss_mask", "segment_ids", "attention_mask"}
    assert arrays["tokens"].shape == (n, 32) and arrays["tokens"].dtype == np.int32
    assert arrays["attention_mask"].all() and arrays["loss_mask"].all() and stats.pad_tokens == 0
    # the rows are the documents' tokens, each followed by EOS, in order (seed=None), cut after whole rows
    stream = np.concatenate([tok(t.strip(), add_special_tokens=False)["input_ids"] + [EOS] for t in texts])
    assert n == stream.size // 32 and stats.dropped_tokens == stream.size % 32
    np.testing.assert_array_equal(arrays["tokens"].reshape(-1), stream[: n * 32])
    # a segment ends with EOS: the id changes exactly at the position after an EOS
    tokens, seg = arrays["tokens"], arrays["segment_ids"]
    assert (seg >= 1).all() and (seg[:, 0] == 1).all()
    change = seg[:, 1:] != seg[:, :-1]
    np.testing.assert_array_equal(change, tokens[:, :-1] == EOS)
    assert (np.diff(seg, axis=1) >= 0).all()

    shuffled, _ = text_rows(tok, d, 32, eos_id=EOS, pad_id=PAD, seed=1)
    again, _ = text_rows(tok, d, 32, eos_id=EOS, pad_id=PAD, seed=1)
    np.testing.assert_array_equal(shuffled["tokens"], again["tokens"])
    assert not np.array_equal(shuffled["tokens"], arrays["tokens"][: len(shuffled["tokens"])])
    # max_tokens keeps the first tokens of the (shuffled) stream
    cut, cut_stats = text_rows(tok, d, 32, eos_id=EOS, pad_id=PAD, seed=1, max_tokens=100)
    assert cut_stats.rows == 3 and cut_stats.dropped_tokens == stream.size - 96
    np.testing.assert_array_equal(cut["tokens"], shuffled["tokens"][:3])


def test_text_rows_errors(tmp_path, tok):
    f = tmp_path / "short.txt"
    f.write_text("tiny")
    with pytest.raises(DataError, match=r"'.*short\.txt' give 5 tokens, less than one row of seq_len=64"):
        text_rows(tok, f, 64, eos_id=EOS, pad_id=PAD)
    with pytest.raises(DataError, match="max_tokens=10 is less than one row"):
        text_rows(tok, f, 64, eos_id=EOS, pad_id=PAD, max_tokens=10)
    with pytest.raises(DataError, match=r"'.*absent' does not exist"):
        text_rows(tok, [f, tmp_path / "absent"], 4, eos_id=EOS, pad_id=PAD)


def test_text_rows_doc_filter_drops_documents_before_packing(tmp_path, tok):
    d = tmp_path / "docs"
    d.mkdir()
    for i in range(6):
        (d / f"{i}.txt").write_text(f"doc{i} " + "words " * 10)
    seen = []

    def drop_odd(docs):
        seen.extend(docs)
        return np.asarray([i % 2 == 0 for i in range(len(docs))])

    arrays, stats = text_rows(tok, d, 16, eos_id=EOS, pad_id=PAD, seed=None, doc_filter=drop_odd)
    assert len(seen) == 6 and all(ids[-1] == EOS for ids in seen)          # every document, each ending in EOS
    stream = np.concatenate([seen[i] for i in (0, 2, 4)])
    np.testing.assert_array_equal(arrays["tokens"].reshape(-1), stream[: stats.rows * 16])
    with pytest.raises(DataError, match="doc_filter returned"):
        text_rows(tok, d, 16, eos_id=EOS, pad_id=PAD, doc_filter=lambda docs: [1] * len(docs))


# ------------------------------------------------------------------------------------------ ngram_overlap
def _overlap_brute(seqs, refs, n) -> list[bool]:
    grams = {tuple(r[i:i + n]) for r in map(list, refs) for i in range(len(r) - n + 1)}
    return [any(tuple(s[i:i + n]) in grams for i in range(len(s) - n + 1)) for s in map(list, seqs)]


def test_ngram_overlap_equals_brute_force_on_random_sequences():
    rng = np.random.default_rng(0)
    for trial in range(300):
        n, vocab = int(rng.integers(1, 9)), int(rng.integers(2, 6))     # small vocabularies: many matches
        refs = [rng.integers(0, vocab, int(rng.integers(0, 25))) for _ in range(int(rng.integers(0, 4)))]
        seqs = [rng.integers(0, vocab, int(rng.integers(0, 25))).astype(np.int32)
                for _ in range(int(rng.integers(0, 7)))]
        got = ngram_overlap(seqs, refs, n)
        assert got.dtype == bool and got.shape == (len(seqs),)
        assert got.tolist() == _overlap_brute(seqs, refs, n), trial
        index = ngram_index(refs, n)                                     # built once, reused: the same answer
        assert ngram_overlap(seqs, index, n).tolist() == got.tolist(), trial
        distinct = {tuple(r[i:i + n]) for r in map(list, refs) for i in range(len(r) - n + 1)}
        assert len(index) == len(distinct) and (index.hashes[1:] >= index.hashes[:-1]).all(), trial


def test_ngram_index_of_another_span_length_is_refused():
    index = ngram_index([np.arange(20)], 10)
    assert ngram_overlap([np.arange(5, 15)], index, 10).tolist() == [True]
    with pytest.raises(DataError, match="holds 10-token windows, not 13-token"):
        ngram_overlap([np.arange(20)], index, 13)
    assert len(ngram_index([], 4)) == 0 and not ngram_overlap([np.arange(9)], ngram_index([], 4), 4)[0]


def test_ngram_overlap_span_lengths_and_boundaries():
    rng = np.random.default_rng(1)
    ref = rng.integers(1000, 50_000, 300)

    def filler(k):                                                       # ids never in the reference
        return rng.integers(60_000, 70_000, k)

    exact = np.concatenate([filler(20), ref[100:113], filler(20)])      # 13 tokens of the reference
    short = np.concatenate([filler(20), ref[100:112], filler(20)])      # 12
    alone = ref[50:63]                                                   # the whole sequence is the window
    tiny = ref[:12]                                                      # shorter than n: never matches
    # the two halves of a window are the end of one sequence and the start of the next: no match
    split = [ref[200:207], ref[207:213]]
    got = ngram_overlap([exact, short, alone, tiny, *split, np.zeros(0, np.int32)], [ref], 13)
    assert got.tolist() == [True, False, True, False, False, False, False]
    # a window across two references does not count either
    assert not ngram_overlap([ref[10:23]], [ref[:16], ref[16:]], 13)[0]
    assert ngram_overlap([ref[10:23]], [ref[:16], ref[16:]], 6)[0]
    assert ngram_overlap([exact], [], 13).tolist() == [False] and ngram_overlap([], [ref]).shape == (0,)
    with pytest.raises(DataError, match="1-D array"):
        ngram_overlap([np.zeros((2, 2), np.int32)], [ref])
    with pytest.raises(DataError, match="n=0"):
        ngram_overlap([ref], [ref], 0)


# ------------------------------------------------------------------------------------------------ mix_rows
def _source(n: int, seq_len: int = 8, base: int = 0) -> dict[str, np.ndarray]:
    tokens = (base + np.arange(n, dtype=np.int32))[:, None] * np.ones((1, seq_len), np.int32)
    return {"tokens": tokens, "loss_mask": np.ones((n, seq_len), bool),
            "attention_mask": np.ones((n, seq_len), bool)}


def _origin(tokens: np.ndarray) -> np.ndarray:
    return tokens[:, 0] // 1000       # sources below use bases 0, 1000, 2000


def test_mix_rows_proportions_and_default_rows():
    sources = {"a": _source(100), "b": _source(50, base=1000), "c": _source(30, base=2000)}
    out, info = mix_rows(sources, {"a": 2, "b": 1, "c": 1}, seed=3)
    # the default: the most rows with no source repeated; c (30 rows at share 1/4) limits it to 120
    assert info["rows"] == 120 and out["tokens"].shape == (120, 8)
    assert {k: v["rows"] for k, v in info["sources"].items()} == {"a": 60, "b": 30, "c": 30}
    assert all(v["repeats"] == 0 for v in info["sources"].values())
    assert np.bincount(_origin(out["tokens"]), minlength=3).tolist() == [60, 30, 30]
    assert set(out) == {"tokens", "loss_mask"}
    np.testing.assert_array_equal(np.asarray(info["names"])[info["row_source"]],
                                  np.array(["a", "b", "c"])[_origin(out["tokens"])])
    assert len(np.unique(out["tokens"][:, 0])) == 120                 # without replacement
    assert info["sources"]["a"]["tokens"] == 60 * 8
    # exact shares for an explicit row count (largest remainder), shuffled together
    out, info = mix_rows(sources, {"a": 1, "b": 1, "c": 1}, rows=10, seed=0)
    assert sorted(v["rows"] for v in info["sources"].values()) == [3, 3, 4]
    assert not (np.diff(_origin(out["tokens"])) >= 0).all()           # not in source order


def test_mix_rows_seeded_zero_weight_and_repeats():
    sources = {"a": _source(10), "b": _source(4, base=1000), "c": _source(6, base=2000)}
    one, info1 = mix_rows(sources, {"a": 1, "b": 1, "c": 0}, rows=20, seed=7)
    two, info2 = mix_rows(sources, {"a": 1, "b": 1, "c": 0}, rows=20, seed=7)
    other, _ = mix_rows(sources, {"a": 1, "b": 1, "c": 0}, rows=20, seed=8)
    np.testing.assert_array_equal(one["tokens"], two["tokens"])
    assert not np.array_equal(one["tokens"], other["tokens"])
    assert 2 not in _origin(one["tokens"]) and info1["sources"]["c"]["rows"] == 0   # zero weight: left out
    assert info1["sources"]["a"] == {"weight": 1.0, "share": 0.5, "rows": 10, "available": 10, "repeats": 0,
                                     "tokens": 80}
    b = info1["sources"]["b"]
    assert b["rows"] == 10 and b["repeats"] == 6
    counts = np.bincount(one["tokens"][_origin(one["tokens"]) == 1, 0] - 1000, minlength=4)
    assert sorted(counts.tolist()) == [2, 2, 3, 3]                    # whole passes, each row 2 or 3 times
    # a zero-weight source is not checked: other length, other keys
    mix_rows({"a": _source(4), "z": {"x": np.zeros((2, 3))}}, {"a": 1, "z": 0})


@pytest.mark.parametrize("weights, match", [
    ({"a": -1, "b": 1}, r"weight -1 of source 'a' is negative or not finite; weights \{'a': -1, 'b': 1\}"),
    ({"a": float("nan"), "b": 1}, r"weight nan of source 'a' is negative or not finite"),
    ({"a": 0, "b": 0.0}, r"all weights are zero \(\{'a': 0, 'b': 0.0\}\); give at least one"),
    ({"a": 1, "b": 1, "c": 1}, r"name unknown sources \['c'\]"),
    ({"a": 1}, r"sources \['b'\] have no weight"),
    ({"a": "x", "b": 1}, r"weight 'x' of source 'a' is not a number"),
])
def test_mix_rows_bad_weights(weights, match):
    with pytest.raises(DataError, match=match):
        mix_rows({"a": _source(4), "b": _source(4)}, weights)


def test_mix_rows_bad_sources():
    with pytest.raises(DataError, match=r"source 'b' has rows of 16 tokens but 'a' has 8"):
        mix_rows({"a": _source(4), "b": _source(4, seq_len=16)}, {"a": 1, "b": 1})
    with pytest.raises(DataError, match=r"source 'b' has no arrays \['loss_mask'\]"):
        mix_rows({"a": _source(4), "b": {"tokens": np.zeros((4, 8), np.int32)}}, {"a": 1, "b": 1})
    with pytest.raises(DataError, match="rows=0 must be a positive integer"):
        mix_rows({"a": _source(4)}, {"a": 1}, rows=0)


def test_repeat_rows_tiles_a_span_of_each_row():
    tokens = np.arange(5 * 10, dtype=np.int32).reshape(5, 10)
    got = repeat_rows({"tokens": tokens}, 4, seed=3)
    order = np.random.default_rng(3).permutation(5)
    for i, j in enumerate(order):
        span = tokens[j, :4]
        np.testing.assert_array_equal(got["tokens"][i], np.concatenate([span, span, span[:2]]))
    assert got["tokens"].dtype == np.int32 and got["loss_mask"].all() and got["loss_mask"].shape == (5, 10)
    # each row is its own first `period` tokens shifted by `period` from there on
    np.testing.assert_array_equal(got["tokens"][:, 4:], got["tokens"][:, :-4])


@pytest.mark.parametrize("period", [0, 10, 2.5, True])
def test_repeat_rows_bad_period(period):
    with pytest.raises(DataError, match="period"):
        repeat_rows({"tokens": np.zeros((2, 10), np.int32)}, period)
