import numpy as np
import pytest

from l2m_jax.data.preference import DataError, encode_preference, synthetic_preferences
from tests.data import tiny_chatml_tokenizer

ROWS = [{"messages": [{"role": "user", "content": f"question {i}"},
                      {"role": "assistant", "content": f"answer number {i} has several words in it"}]}
        for i in range(12)]


@pytest.fixture(scope="module")
def tok():
    return tiny_chatml_tokenizer()


def test_synthetic_preferences_deterministic_and_valid():
    a = synthetic_preferences(ROWS, seed=3)
    assert a == synthetic_preferences(ROWS, seed=3)
    assert a != synthetic_preferences(ROWS, seed=4)
    kinds = {t["rejected_kind"] for t in a}
    assert kinds == {"mismatch", "truncate"}
    answers = [r["messages"][1]["content"] for r in ROWS]
    for row, t in zip(ROWS, a):
        assert t["prompt"] == row["messages"][:1] and t["chosen"] == row["messages"][1]["content"]
        assert t["rejected"] != t["chosen"]
        if t["rejected_kind"] == "mismatch":
            assert t["rejected"] in answers
        else:
            assert t["chosen"].startswith(t["rejected"]) and len(t["rejected"].split()) == 4   # half of 8 words


def test_synthetic_modes():
    mism = synthetic_preferences(ROWS, seed=0, mode="mismatch")
    assert all(t["rejected_kind"] == "mismatch" for t in mism)
    trunc = synthetic_preferences(ROWS, seed=0, mode="truncate", truncate_fraction=0.4)
    assert [t["rejected"] for t in trunc] == [f"answer number {i}" for i in range(12)]   # 3 of 8 words
    one_word = [{"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": w}]}
                for w in ("yes", "no")]
    assert [t["rejected"] for t in synthetic_preferences(one_word, seed=0)] == ["no", "yes"]
    with pytest.raises(DataError, match="one word"):
        synthetic_preferences(one_word, seed=0, mode="truncate")
    with pytest.raises(DataError, match="fewer than two distinct answers"):
        synthetic_preferences(ROWS[:1], seed=0)
    with pytest.raises(DataError, match="row 0: the last message must be the assistant"):
        synthetic_preferences([{"messages": ROWS[0]["messages"][:1]}], seed=0)


def test_encode_preference_masks(tok):
    enc = encode_preference(tok, "Why?", "Because it is.", "No.")
    prompt = tok.apply_chat_template([{"role": "user", "content": "Why?"}], tokenize=False,
                                     add_generation_prompt=True)
    for name, answer in (("chosen", "Because it is."), ("rejected", "No.")):
        ids, mask = enc[f"{name}_ids"], enc[f"{name}_mask"]
        assert tok.decode(ids) == prompt + answer + "<|im_end|>"
        assert tok.decode(ids[mask]) == answer + "<|im_end|>"
        assert not mask[: int(np.argmax(mask))].any() and mask[int(np.argmax(mask)):].all()
    assert not enc["truncated_prompt"] and not enc["truncated_response"]


def test_encode_preference_truncates_like_trl(tok):
    long_prompt = "x" * 60                     # one token per byte in the tiny tokenizer
    enc = encode_preference(tok, long_prompt, "a" * 10, "b" * 30, max_len=64, max_prompt_len=24)
    assert enc["truncated_prompt"] and not enc["truncated_response"]
    full = tok.encode(tok.apply_chat_template([{"role": "user", "content": long_prompt}], tokenize=False,
                                              add_generation_prompt=True), add_special_tokens=False)
    for name, n_resp in (("chosen", 11), ("rejected", 31)):
        ids, mask = enc[f"{name}_ids"], enc[f"{name}_mask"]
        np.testing.assert_array_equal(ids[:24], full[-24:])    # the prompt keeps its end
        assert int(mask.sum()) == n_resp and ids.size == 24 + n_resp
    enc = encode_preference(tok, long_prompt, "a" * 50, "b", max_len=64, max_prompt_len=24)
    assert enc["truncated_prompt"] and enc["truncated_response"]
    assert enc["chosen_ids"].size == 64 and int(enc["chosen_mask"].sum()) == 40
    with pytest.raises(DataError, match="max_prompt_len=64"):
        encode_preference(tok, "p", "a", "b", max_len=64, max_prompt_len=64)
