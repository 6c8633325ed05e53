"""Prose from Debian packages: the fortune-file and dictd parsers on small files in the packages' on-disk
formats, and ensure_prose's cache (fetching only what is missing, one clear error when it cannot)."""
import gzip

import pytest

from l2m_jax.data import prose
from l2m_jax.data.prose import FetchError, devil_entries, dictd_number, ensure_prose, fortune_records, parse_fortunes


# --------------------------------------------------------------------------------------------- fortunes
def test_parse_fortunes_records_are_trimmed_paragraphs():
    text = ("\tA first record,\n\t\t-- Someone\n%\n%\n  \n%\nTwo lines\n\nwith a blank line   \n%\n"
            "my client is *___\b\b\bnot* guilty\n%\n")
    assert parse_fortunes(text) == ["A first record,\n-- Someone", "Two lines\nwith a blank line",
                                    "my client is *not* guilty"]
    assert parse_fortunes("no trailing percent") == ["no trailing percent"]
    assert parse_fortunes("50% off\n %\n") == ["50% off\n%"]     # only a line that is exactly "%" separates


def test_fortune_records_skip_indexes_links_pictures_and_offensive(tmp_path):
    d = tmp_path / "usr/share/games/fortunes"
    (d / "off").mkdir(parents=True)
    (d / "zippy").write_text("Yow!\n%\nAre we having FUN yet?\n%\n")
    (d / "art").write_text("A critic creates nothing.\n\t\t-- Heinlein\n%\n")
    (d / "art.dat").write_bytes(b"\x00\x00\x00\x02\x00\x00\x00\x01\x00\x00\x00\x1d")   # strfile index
    (d / "art.u8").symlink_to("art")
    (d / "ascii-art").write_text("  /\\_/\\\n ( o.o )\n%\n")
    (d / "off" / "rude").write_text("not this\n%\n")
    assert fortune_records(d) == ["A critic creates nothing.\n-- Heinlein", "Yow!", "Are we having FUN yet?"]
    with pytest.raises(FetchError, match="no folder"):
        fortune_records(tmp_path / "absent")



def test_fortunes_quoting_the_sources_of_the_heldout_texts_are_left_out(tmp_path):
    d = tmp_path / "fortunes"
    d.mkdir()
    (d / "mixed").write_text("There is no fear in love.\n\t\t-- 1 John 4:18\n%\n"
                             "Pride goes before a fall.\n-- Proverbs 16\n%\n"
                             "A lady's imagination is very rapid.\n\t-- Jane Austen\n%\n"
                             "Dear John, the program runs.\n-- Anonymous\n%\n"
                             "Genesis of an idea.\n-- Austen Briggs\n%\n")
    assert fortune_records(d) == ["Dear John, the program runs.\n-- Anonymous",
                                  "Genesis of an idea.\n-- Austen Briggs"]

# ---------------------------------------------------------------------------------- The Devil's Dictionary
B64 = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/"


def _b64(n: int) -> str:
    digits = ""
    while True:
        digits = B64[n % 64] + digits
        n //= 64
        if not n:
            return digits


def test_dictd_numbers():
    assert [dictd_number(s) for s in ("A", "b", "/", "BA", "BdqM", "CP")] == [0, 27, 63, 64, 383628, 143]
    assert all(dictd_number(_b64(n)) == n for n in (0, 1, 63, 64, 4095, 4096, 383_656))
    with pytest.raises(FetchError, match="not a dictd base-64 number"):
        dictd_number("a=b")


def test_devil_entries_from_a_dictzip_body_and_index(tmp_path):
    meta = "00-database-info\nThe Devil's Dictionary, a preface of many lines.\n" + "filler " * 20 + "\n"
    entries = {
        "abasement": "ABASEMENT, n.  A decent and customary mental attitude in the presence\nof wealth.\n\n",
        "babe": "BABE or BABY, n.  A misshapen creature of no particular age.\n\n"
                "    Poor babe, quoth he.\n                                G.J.\n\n",
        "zoology": "ZOOLOGY, n.  The science and history of the animal kingdom.\n\n",
    }
    body, index, offsets = meta, [], {}
    for head, text in entries.items():
        offsets[head] = (len(body.encode()), len(text.encode()))
        body += text
    index.append(f"00databaseinfo\t{_b64(0)}\t{_b64(len(meta))}")
    index.append(f"00-database-short\t{_b64(0)}\t{_b64(16)}")
    for head in ("abasement", "babe", "baby", "zoology"):
        off, n = offsets["babe" if head == "baby" else head]     # two headwords, one definition
        index.append(f"{head}\t{_b64(off)}\t{_b64(n)}")
    assert offsets["zoology"][0] >= 64                           # offsets of more than one digit
    dz, idx = tmp_path / "devil.dict.dz", tmp_path / "devil.index"
    dz.write_bytes(gzip.compress(body.encode(), compresslevel=9))
    idx.write_text("\n".join(sorted(index)) + "\n")
    assert devil_entries(dz, idx) == [
        "ABASEMENT, n.  A decent and customary mental attitude in the presence\nof wealth.",
        "BABE or BABY, n.  A misshapen creature of no particular age.\nPoor babe, quoth he.\nG.J.",
        "ZOOLOGY, n.  The science and history of the animal kingdom."]
    idx.write_text(f"zoology\t{_b64(len(body) - 3)}\t{_b64(10)}\n")
    with pytest.raises(FetchError, match="past the"):
        devil_entries(dz, idx)
    idx.write_text("zoology 12 3\n")
    with pytest.raises(FetchError, match="headword TAB offset TAB length"):
        devil_entries(dz, idx)


# ------------------------------------------------------------------------------------- screening
BOOK = ("In the beginning was the Word, and the Word was with God, and the Word was God. The same was in the "
        "beginning with God.")


def test_screen_records_drops_only_records_sharing_a_run_of_words_with_a_book():
    records = ['"And the Word was with God, and the Word was God." --JOHN.',        # 10 words of the book
               "THE word, was WITH god; and the word WAS god -- case and punctuation ignored",
               "the Word was with God, and the Word was -- nine words only",
               "Nothing from the book at all, however long the record is made to be."]
    assert prose.screen_records(records, [BOOK]) == [False, False, True, True]
    assert prose.screen_records(records, [BOOK], n=9) == [False, False, False, True]
    assert prose.screen_records(records, []) == [True] * 4


def test_screen_text_keeps_the_record_separator():
    text = "a gloss\nthe Word was with God, and the Word was God. The same\nanother gloss\n"
    kept, dropped, of = prose._screen_text(text, [BOOK], "\n")
    assert (kept, dropped, of) == ("a gloss\nanother gloss\n", 1, 3)
    kept, dropped, of = prose._screen_text(text.replace("\n", "\n\n"), [BOOK], "\n\n")
    assert (kept, dropped, of) == ("a gloss\n\nanother gloss\n", 1, 3)


# ------------------------------------------------------------------------------------------ ensure_prose
def test_ensure_prose_fetches_only_missing_files(tmp_path, monkeypatch):
    asked = []

    def fake_build(names, **kw):
        asked.append(tuple(names))
        return prose.Fetched({n: f"text of {n}\n" for n in names}, {})

    monkeypatch.setattr(prose, "build_texts", fake_build)
    (tmp_path / "moby_dick.txt").write_text("already here\n")
    (tmp_path / "fortunes.txt").write_text("")                   # empty: as good as missing
    paths = ensure_prose(directory=tmp_path)
    assert [p.name for p in paths] == ["moby_dick.txt", "fortunes.txt", "devils_dictionary.txt",
                                       "wordnet_glosses.txt"]
    assert asked == [("fortunes", "devils_dictionary", "wordnet_glosses")]
    assert paths[0].read_text() == "already here\n" and paths[1].read_text() == "text of fortunes\n"
    assert ensure_prose(["fortunes"], directory=tmp_path) == [tmp_path / "fortunes.txt"] and len(asked) == 1
    with pytest.raises(ValueError, match="held-out"):
        ensure_prose(["kjv"], directory=tmp_path)


def test_ensure_prose_names_what_is_missing(tmp_path, monkeypatch):
    monkeypatch.setenv("L2M_CACHE", str(tmp_path / "cache"))
    monkeypatch.setattr(prose.shutil, "which", lambda tool: None)          # no apt-get, no dpkg-deb
    assert prose.prose_dir() == tmp_path / "cache" / "texts-v2"
    with pytest.raises(FetchError, match=r"cannot fetch the prose texts \['devils_dictionary'\] into .*texts-v2: "
                                         r"missing: apt-get, dpkg-deb"):
        ensure_prose(["devils_dictionary"])
    assert not (tmp_path / "cache" / "texts-v2" / "devils_dictionary.txt").exists()


def test_books_are_written_beside_the_texts_and_found_or_fetched(tmp_path, monkeypatch):
    def fake_build(names, **kw):
        return prose.Fetched({n: f"text of {n}\n" for n in names}, {}, books={"kjv": "K\n", "austen": "A\n"})

    monkeypatch.setattr(prose, "build_texts", fake_build)
    assert prose.screen_books(tmp_path) is None
    ensure_prose(["fortunes"], directory=tmp_path)
    assert prose.screen_books(tmp_path) == [tmp_path / "books" / "kjv.txt", tmp_path / "books" / "austen.txt"]
    assert prose.ensure_books(tmp_path) == prose.screen_books(tmp_path)          # there: nothing fetched
    assert (tmp_path / "books" / "austen.txt").read_text() == "A\n"
    monkeypatch.setattr(prose.shutil, "which", lambda tool: None)
    with pytest.raises(FetchError, match="missing: apt-get, dpkg-deb"):
        prose.ensure_books(tmp_path / "elsewhere")
