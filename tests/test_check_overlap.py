"""experiments.check_overlap: rows sharing an n-token span with reference texts, counted per reference."""
import json

import numpy as np
import pytest

from experiments import check_overlap


@pytest.fixture(scope="module")
def tok_dir(tmp_path_factory):
    from l2m_jax.recipe.data import byte_chatml_tokenizer

    d = tmp_path_factory.mktemp("tok")
    byte_chatml_tokenizer().save_pretrained(str(d))
    return d


def test_counts_rows_sharing_a_span_per_reference_and_n(tmp_path, tok_dir, capsys):
    from l2m_jax.recipe.data import byte_chatml_tokenizer

    tok = byte_chatml_tokenizer()
    book = "In the beginning was the Word, and the Word was with God, and the Word was God."
    novel = "It is a truth universally acknowledged, that a single man in possession of a good fortune"
    refs = tmp_path / "refs"
    refs.mkdir()
    (refs / "book.txt").write_text(book)
    (refs / "novel.txt").write_text(novel)
    texts = ["xx the Word was with God, yy",                  # 23 bytes shared with book: hits at n=8 and n=16
             "qq universally ac zz",                           # 15 bytes shared with novel: n=8 only
             "nothing from either reference text here at all"]
    width = 64
    ids = np.zeros((len(texts), width), np.int32)
    for i, t in enumerate(texts):
        e = tok.encode(t, add_special_tokens=False)
        ids[i, :len(e)] = e
    np.savez(tmp_path / "rows.npz", tokens=ids)
    out = tmp_path / "o.json"
    rc = check_overlap.main(["--rows", str(tmp_path / "rows.npz"), "--ref", str(refs), "--n", "8", "16",
                             "--tokenizer", str(tok_dir), "--json", str(out)])
    assert rc == 0
    r = json.loads(out.read_text())
    assert r["n_rows"] == 3
    assert r["references"]["book"]["rows_sharing_8"] == 1 and r["references"]["book"]["rows_sharing_16"] == 1
    assert r["references"]["novel"]["rows_sharing_8"] == 1 and r["references"]["novel"]["rows_sharing_16"] == 0
    assert r["any"] == {"rows_sharing_8": 2, "rows_sharing_16": 1}
    assert "the Word was with God" in capsys.readouterr().out      # the hit is printed decoded

    # a .txt of documents and a .jsonl of texts are rows too, and give the same counts
    (tmp_path / "rows.txt").write_text("\n\n".join(texts))
    (tmp_path / "rows.jsonl").write_text("\n".join(json.dumps({"text": t}) for t in texts))
    for rows in ("rows.txt", "rows.jsonl"):
        assert check_overlap.main(["--rows", str(tmp_path / rows), "--ref", str(refs), "--n", "8", "16",
                                   "--tokenizer", str(tok_dir), "--json", str(out)]) == 0
        assert json.loads(out.read_text())["any"] == {"rows_sharing_8": 2, "rows_sharing_16": 1}


def test_bad_input_is_one_clear_error(tmp_path, tok_dir, capsys):
    (tmp_path / "r.jsonl").write_text('{"nope": 1}\n')
    (tmp_path / "ref.txt").write_text("some text")
    assert check_overlap.main(["--rows", str(tmp_path / "r.jsonl"), "--ref", str(tmp_path / "ref.txt"),
                               "--tokenizer", str(tok_dir)]) == 2
    assert "r.jsonl:1: not a JSON object with a 'text' field" in capsys.readouterr().err
    (tmp_path / "ok.jsonl").write_text('{"text": "fine"}\n')
    assert check_overlap.main(["--rows", str(tmp_path / "ok.jsonl"), "--ref", str(tmp_path / "missing"),
                               "--tokenizer", str(tok_dir)]) == 2
    assert "no such file or folder" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        check_overlap.main(["--rows", "x.npz", "--ref", "y", "--n", "3"])
