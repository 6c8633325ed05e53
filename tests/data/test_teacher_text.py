"""Rows the teacher writes (l2m_jax.data.teacher_text) and their place in the stage-1 mix."""
import jax
import numpy as np
import pytest

from l2m_jax.data.chat import DataError
from l2m_jax.data.teacher_text import cached_teacher_text_rows, teacher_text_rows
from l2m_jax.infer.generate import generate
from l2m_jax.ops.sampling import GREEDY, Sampling


def _config(**data):
    from l2m_jax.recipe import RecipeConfig
    from l2m_jax.recipe.config import DataConfig

    return RecipeConfig(teacher="tiny-random", data=DataConfig(**{"seq_len": 24, **data}))


@pytest.fixture(scope="module")
def teacher():
    from l2m_jax.recipe.data import load_teacher

    cfg, params, tok = load_teacher(_config())
    return (cfg, params), tok


def test_rows_open_with_start_and_prefix_and_the_teacher_continues_them(teacher):
    model, _ = teacher
    prefixes = [[5, 6, 7], [8, 9, 10]]
    got = teacher_text_rows(model, prefixes, 12, rows=5, sampling=GREEDY, start_id=2, batch_size=2)
    assert got["tokens"].shape == (5, 12) and got["tokens"].dtype == np.int32 and got["loss_mask"].all()
    for i, row in enumerate(got["tokens"]):
        prompt = [2, *prefixes[i % 2]]
        assert list(row[:4]) == prompt
        assert list(row[4:]) == list(generate(*model, [prompt], 8)[0])      # greedy: the teacher's own choice
    sampled = teacher_text_rows(model, [[]], 12, rows=4, sampling=Sampling(1.0), start_id=2, batch_size=4, seed=1)
    again = teacher_text_rows(model, [[]], 12, rows=4, sampling=Sampling(1.0), start_id=2, batch_size=4, seed=1)
    np.testing.assert_array_equal(sampled["tokens"], again["tokens"])       # seeded
    assert (sampled["tokens"][:, 0] == 2).all() and len({tuple(r) for r in sampled["tokens"]}) > 1


def test_bad_sizes_are_named(teacher):
    model, _ = teacher
    with pytest.raises(DataError, match="leaves no room"):
        teacher_text_rows(model, [[1] * 11], 12, rows=2, sampling=GREEDY, start_id=2)
    with pytest.raises(DataError, match="rows=0"):
        teacher_text_rows(model, [[1]], 12, rows=0, sampling=GREEDY, start_id=2)


def test_cache_reads_back_rows_made_with_the_same_settings(tmp_path):
    calls = []

    def make():
        calls.append(1)
        return {"tokens": np.full((2, 4), len(calls), np.int32), "loss_mask": np.ones((2, 4), bool)}

    first = cached_teacher_text_rows(tmp_path, {"rows": 2, "top_p": 0.95}, make)
    second = cached_teacher_text_rows(tmp_path, {"rows": 2, "top_p": 0.95}, make)
    assert len(calls) == 1 and (second["tokens"] == first["tokens"]).all()
    third = cached_teacher_text_rows(tmp_path, {"rows": 2, "top_p": 0.9}, make)
    assert len(calls) == 2 and (third["tokens"] == 2).all()


def test_stage1_mix_takes_teacher_rows_opened_by_text_rows(tmp_path, teacher):
    from l2m_jax.recipe import UsageError, check_config
    from l2m_jax.recipe.data import distill_rows, special_ids

    model, tok = teacher
    (tmp_path / "a.txt").write_text("".join(f"line {i} of a plain text file.\n" for i in range(100)))
    c = _config(text=[str(tmp_path / "a.txt")], mix={"text": 1.0, "teacher_text": 1.0}, teacher_text_rows=6,
                teacher_text_prefix=4)
    check_config(c)
    text_only = distill_rows(_config(text=[str(tmp_path / "a.txt")], mix={"text": 1.0}), [], tok)
    got = distill_rows(c, [], tok, teacher=model, out=tmp_path / "run")
    _, eos = special_ids(tok)
    made = np.load(tmp_path / "run" / "teacher_text" / "rows.npz")["tokens"]
    assert made.shape == (6, 24) and (made[:, 0] == eos).all()
    starts = {tuple(r[:4]) for r in text_only["tokens"]}
    assert all(tuple(r[1:5]) in starts for r in made)                       # each opens with a text row's start
    mixed = {tuple(r) for r in got["tokens"]}
    assert {tuple(r) for r in made} & mixed and {tuple(r) for r in text_only["tokens"]} & mixed
    with pytest.raises(UsageError, match="needs the teacher"):
        distill_rows(c, [], tok)
    with pytest.raises(UsageError, match="data.teacher_text_prefix > 0 opens the teacher's rows with data.text"):
        check_config(_config(mix={"chat": 1.0, "teacher_text": 1.0}))
    check_config(_config(mix={"chat": 1.0, "teacher_text": 1.0}, teacher_text_prefix=0))
    with pytest.raises(UsageError, match="data.teacher_text_prefix=23 must lie in"):
        check_config(_config(text=["prose"], mix={"chat": 1.0, "teacher_text": 1.0}, teacher_text_prefix=23))


def test_teacher_rows_sharing_a_heldout_span_are_dropped(tmp_path, teacher, monkeypatch):
    from l2m_jax.assets import heldout_texts
    from l2m_jax.data import teacher_text
    from l2m_jax.recipe.data import distill_rows

    _, tok = teacher
    span = tok.encode(heldout_texts()["kjv-john"][:13], add_special_tokens=False)   # "In the beginn"
    assert len(span) == 13

    def written(model, prefixes, seq_len, *, rows, start_id, **kw):        # the teacher recites John 1:1 once
        tokens = np.full((rows, seq_len), ord("~"), np.int32)
        tokens[:, 0] = start_id
        tokens[1, 3:16] = span
        return {"tokens": tokens, "loss_mask": np.ones_like(tokens, bool)}

    monkeypatch.setattr(teacher_text, "teacher_text_rows", written)
    notes: dict = {}
    c = _config(mix={"teacher_text": 1.0}, teacher_text_rows=4, teacher_text_prefix=0)
    got = distill_rows(c, [], tok, notes=notes, teacher=teacher[0])
    assert len(got["tokens"]) == 3 and not any(span == list(r[3:16]) for r in got["tokens"])
    assert notes["decontamination"]["stage-1 teacher text rows"]["dropped"] == 1


def test_teacher_rows_quoting_the_heldout_texts_books_are_screened(tmp_path, teacher, monkeypatch, capsys):
    """A row quoting the KJV outside the held-out chapters shares no span with the held-out excerpt, so only the
    screening against the books (data.screen_books, the books beside the prose) drops it; the report says so,
    and says when the books were not there."""
    from l2m_jax.data import teacher_text
    from l2m_jax.recipe.data import distill_rows
    from l2m_jax.recipe.run import data_notes

    _, tok = teacher
    quote = "For God so loved the world, that he gave his only begotten Son"      # John 3:16: not in the excerpt
    other = "Answer a fool according to his folly, lest he be wise in his own conceit."   # Proverbs 26:5
    books = tmp_path / "cache" / "texts-v2" / "books"
    monkeypatch.setenv("L2M_CACHE", str(tmp_path / "cache"))

    def written(model, prefixes, seq_len, *, rows, start_id, **kw):        # row 2 quotes Proverbs
        tokens = np.full((rows, seq_len), ord("~"), np.int32)
        tokens[:, 0] = start_id
        q = tok.encode(other.upper(), add_special_tokens=False)            # case does not hide a quotation
        tokens[2, 1:1 + len(q)] = q
        return {"tokens": tokens, "loss_mask": np.ones_like(tokens, bool)}

    monkeypatch.setattr(teacher_text, "teacher_text_rows", written)
    c = _config(mix={"teacher_text": 1.0}, teacher_text_rows=4, teacher_text_prefix=0, seq_len=96)
    notes: dict = {}
    assert len(distill_rows(c, [], tok, notes=notes, teacher=teacher[0])["tokens"]) == 4     # no books: kept
    assert notes["screening"]["books"] is None
    assert "only the held-out excerpts were screened" in " ".join(data_notes(notes))

    books.mkdir(parents=True)
    (books / "kjv.txt").write_text(f"{quote}.\n\n{other}\n")
    (books / "austen.txt").write_text("It is a truth universally acknowledged.\n")
    notes = {}
    got = distill_rows(c, [], tok, notes=notes, teacher=teacher[0], out=tmp_path / "o")
    assert len(got["tokens"]) == 3 and not any(ord("A") in r for r in got["tokens"])
    assert notes["decontamination"]["stage-1 teacher text rows"]["dropped"] == 0
    assert notes["screening"]["stage-1 teacher text rows"] == {"dropped": 1, "of": 4}
    assert notes["screening"]["books"] == ["kjv", "austen"]
    assert capsys.readouterr().out.count("teacher text rows: screening dropped") == 1     # the rows screened once
    assert ("screening: dropped what shares 10 words in a row with the held-out texts' books (kjv, austen), "
            "beyond decontamination: 1 of 4 stage-1 teacher text rows") in data_notes(notes)
    from l2m_jax.recipe.data import heldout_filter                          # a second builder adds its counts
    rows = [np.asarray(tok.encode(t, add_special_tokens=False)) for t in ("plain words here", other.lower())]
    assert list(heldout_filter(c, tok, notes)("sft conversations", rows)) == [True, False]
    assert notes["screening"]["stage-1 teacher text rows"] == {"dropped": 1, "of": 4}
    assert notes["screening"]["sft conversations"] == {"dropped": 1, "of": 2}
    assert data_notes(notes)[-1].endswith("1 of 4 stage-1 teacher text rows; 1 of 2 sft conversations")
    c_off = _config(mix={"teacher_text": 1.0}, teacher_text_rows=4, teacher_text_prefix=0, seq_len=96, screen_books=False)
    notes = {}
    assert len(distill_rows(c_off, [], tok, notes=notes, teacher=teacher[0])["tokens"]) == 4
    assert "screening" not in notes


def test_screening_fetches_the_prose_first_where_data_text_asks_for_it(tmp_path, monkeypatch):
    """The first data builder to screen may run before the prose is fetched: with data.text=prose it fetches it
    (which brings the books) instead of screening against nothing."""
    from l2m_jax.data import prose
    from l2m_jax.recipe.data import heldout_filter

    monkeypatch.setenv("L2M_CACHE", str(tmp_path / "cache"))
    fetched = []

    def fake_ensure_prose(*a, **kw):
        fetched.append(True)
        books = prose.prose_dir() / "books"
        books.mkdir(parents=True, exist_ok=True)
        for b in prose.BOOKS:
            (books / f"{b}.txt").write_text("the whole book of " + b + "\n")
        return []

    monkeypatch.setattr(prose, "ensure_prose", fake_ensure_prose)
    notes: dict = {}
    assert heldout_filter(_config(text=["prose"], decontaminate=None), None, notes) is not None and fetched
    assert notes["screening"]["books"] == list(prose.BOOKS)
    notes = {}
    heldout_filter(_config(text=["/some/dir"], decontaminate=None), None, notes)
    assert notes["screening"]["books"] == list(prose.BOOKS) and len(fetched) == 1     # there now: not fetched
