"""The bundled held-out texts: each loads without its source note, is real prose of some length, and they differ."""
from importlib import resources

from l2m_jax import assets


def test_heldout_texts_load_and_differ():
    texts = assets.heldout_texts()
    assert set(texts) == set(assets.HELDOUT_SOURCES) == {"persuasion", "kjv-john"}
    assert texts["persuasion"] == assets.heldout_text()
    for name, text in texts.items():
        assert len(text) > 5000 and len(text.split()) > 1000, name
        assert not text.startswith("#") and "# " not in text, name
        assert text == text.strip() + "\n" or text == text.strip(), name
    kjv = texts["kjv-john"]
    assert kjv.startswith("In the beginning was the Word, and the Word was with God, and the Word was God.")
    assert kjv.count("\n\n") == 2                      # one paragraph per chapter, John 1-3
    assert not any(ch.isdigit() for ch in kjv)         # no verse numbers
    assert texts["persuasion"] != kjv and "Elliot" not in kjv
    note = resources.files("l2m_jax.data").joinpath("heldout_kjv.txt").read_text(encoding="utf-8").split("\n")[0]
    assert note.startswith("# ") and "King James" in note and "public domain" in note
