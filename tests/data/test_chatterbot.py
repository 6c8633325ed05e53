import pytest

from l2m_jax.data.chatterbot import DataError, corpus_wheel, load_chatterbot, parse_corpus


def test_english_corpus_counts_and_shape():
    # downloads the 345 kB wheel into the l2m cache once
    corpus = load_chatterbot("english")
    s = corpus.stats
    assert (s.files, s.entries, s.conversations, s.skipped_not_list, s.turns, s.prompts) == (
        21, 2026, 2025, 1, 4331, 748)
    assert len(corpus.conversations) == 2025 and len(corpus.prompts) == 748
    assert len(set(corpus.prompts)) == len(corpus.prompts)
    # ai.yml is the first file: deterministic order
    assert corpus.conversations[0][0] == {"role": "user", "content": "What is AI?"}
    assert corpus.prompts[0] == "What is AI?"
    for conv in corpus.conversations:
        assert len(conv) % 2 == 0
        assert [m["role"] for m in conv] == ["user", "assistant"] * (len(conv) // 2)
        assert all(isinstance(m["content"], str) and m["content"] for m in conv)
    assert corpus.prompts == load_chatterbot("english").prompts


def test_quirks_are_tolerated_and_counted():
    files = {
        "b.yml": b"conversations:\n- - Hello\n  - Hi\n- just a string\n- - 42\n  - 7.5\n- - Odd\n  - one\n  - three\n",
        "a.yml": b"categories: [x]\nconversations:\n- - Hello\n  - Hey\n- - Lonely\n- - Q\n  - null\n- - ''\n  - x\n",
    }
    c = parse_corpus(files, "test")
    s = c.stats
    assert (s.entries, s.skipped_not_list, s.skipped_bad_turn, s.single_turn, s.numeric_turns) == (8, 1, 2, 1, 2)
    assert c.prompts == ["Hello", "Lonely", "42", "Odd"]   # a.yml first, duplicates removed
    assert c.conversations == [
        [{"role": "user", "content": "Hello"}, {"role": "assistant", "content": "Hey"}],
        [{"role": "user", "content": "Hello"}, {"role": "assistant", "content": "Hi"}],
        [{"role": "user", "content": "42"}, {"role": "assistant", "content": "7.5"}],
        [{"role": "user", "content": "Odd"}, {"role": "assistant", "content": "one"}],
    ]
    assert "8 entries -> 4 conversations" in str(s)


def test_bad_inputs(tmp_path):
    with pytest.raises(DataError, match="no language 'klingon'"):
        load_chatterbot("klingon")
    with pytest.raises(DataError, match="does not exist"):
        corpus_wheel(tmp_path, download=False)
    (tmp_path / "chatterbot_corpus-1.3.3-py2.py3-none-any.whl").write_bytes(b"not the wheel")
    with pytest.raises(DataError, match="sha256"):
        corpus_wheel(tmp_path)
    with pytest.raises(DataError, match="x.yml: expected a mapping"):
        parse_corpus({"x.yml": b"- a\n- b\n"})
