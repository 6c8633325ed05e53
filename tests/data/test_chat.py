import numpy as np
import pytest

from l2m_jax.data.chat import (DataError, TemplateError, encode_chat_prompt, encode_prompt_response,
                               end_of_turn_id, render_chat, validate_messages)
from tests.data import tiny_chatml_tokenizer

IM_END = 2

CONV = [
    {"role": "system", "content": "Be brief."},
    {"role": "user", "content": "hello there"},
    {"role": "assistant", "content": "hell yes\n\nthe end"},
    {"role": "user", "content": "more?"},
    {"role": "assistant", "content": " ok "},
]


@pytest.fixture(scope="module")
def tok():
    return tiny_chatml_tokenizer()


def _runs(mask):
    """[start, stop) of each run of True."""
    edges = np.diff(np.concatenate([[0], mask.astype(int), [0]]))
    return list(zip(np.flatnonzero(edges == 1), np.flatnonzero(edges == -1)))


def test_render_is_chatml(tok):
    text = render_chat(tok, CONV[:2], add_generation_prompt=True)
    assert text == ("<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nhello there<|im_end|>\n"
                    "<|im_start|>assistant\n")


def test_mask_is_exactly_assistant_content_plus_end_token(tok):
    ids, mask = encode_prompt_response(tok, CONV)
    assert ids.dtype == np.int32 and mask.dtype == bool and ids.shape == mask.shape
    assert tok.decode(ids) == render_chat(tok, CONV, add_generation_prompt=False)
    runs = _runs(mask)
    assert len(runs) == 2
    for (start, stop), msg in zip(runs, [CONV[2], CONV[4]]):
        assert ids[stop - 1] == IM_END
        assert tok.decode(ids[start:stop - 1]) == msg["content"]
        # the generation prompt ends right before the response
        assert tok.decode(ids[:start]).endswith("<|im_start|>assistant\n")
        assert tok.decode(ids[stop:stop + 1]) == "\n"
    n_expected = sum(len(tok.encode(m["content"], add_special_tokens=False)) + 1 for m in (CONV[2], CONV[4]))
    assert int(mask.sum()) == n_expected


def test_prompt_ids_are_prefix_of_conversation(tok):
    p = encode_chat_prompt(tok, CONV[:2])
    ids, mask = encode_prompt_response(tok, CONV[:3])
    np.testing.assert_array_equal(ids[: p.size], p)
    assert not mask[: p.size].any() and mask[p.size]
    assert end_of_turn_id(tok) == IM_END


ZEPHYR_LIKE = ("{% for m in messages %}{{ '<|' + m['role'] + '|>\\n' + m['content'] + eos_token + '\\n' }}"
               "{% endfor %}{% if add_generation_prompt %}{{ '<|assistant|>' }}{% endif %}")


def test_zephyr_like_template_masks_newline_after_generation_prompt():
    # Zephyr's generation prompt stops before the newline that starts the turn: the model generates it
    tok = tiny_chatml_tokenizer(ZEPHYR_LIKE)
    ids, mask = encode_prompt_response(tok, CONV[1:3])
    (start, stop), = _runs(mask)
    assert tok.decode(ids[:start]).endswith("<|assistant|>")
    assert tok.decode(ids[start:stop]) == "\n" + CONV[2]["content"] + "<|im_end|>"
    assert end_of_turn_id(tok) == IM_END


def test_not_prefix_stable_template_raises(tok):
    # marks only the final turn: earlier renderings are not prefixes of later ones
    bad = ("{% for m in messages %}{% if loop.last %}[LAST]{% endif %}"
           "{{ '<|im_start|>' + m['role'] + '\\n' + m['content'] + '<|im_end|>\\n' }}{% endfor %}"
           "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}")
    with pytest.raises(TemplateError, match="not prefix-stable"):
        encode_prompt_response(tiny_chatml_tokenizer(bad), CONV[1:3])


def test_generation_prompt_must_end_at_content(tok):
    # the header is written with the turn, not by add_generation_prompt
    bad = "{% for m in messages %}{{ '<|im_start|>' + m['role'] + '\\n' + m['content'] + '<|im_end|>\\n' }}{% endfor %}"
    with pytest.raises(TemplateError, match="generation prompt"):
        encode_prompt_response(tiny_chatml_tokenizer(bad), CONV[1:3])


def test_missing_template_raises(tok):
    t = tiny_chatml_tokenizer()
    t.chat_template = None
    with pytest.raises(TemplateError, match="no chat template"):
        render_chat(t, CONV, add_generation_prompt=False)


@pytest.mark.parametrize("messages, match", [
    ([{"role": "user", "content": "a"}, {"role": "bot", "content": "b"}], r"row 7\[1\]: role 'bot'"),
    ([{"role": "user"}], r"row 7\[0\]: message is missing \['content'\]"),
    ([{"role": "user", "content": 3}], r"row 7\[0\]: content must be a string"),
    ("hello", "expected a list"),
    ([], "no messages"),
])
def test_bad_messages_name_the_row(messages, match):
    with pytest.raises(DataError, match=match):
        validate_messages(messages, where="row 7")


def test_conversation_must_not_start_with_assistant(tok):
    with pytest.raises(DataError, match="starts with an assistant turn"):
        encode_prompt_response(tok, [{"role": "assistant", "content": "hi"}])
    with pytest.raises(DataError, match="last message is an assistant turn"):
        encode_chat_prompt(tok, CONV[:3])


def test_real_smollm2_template():
    import l2m_jax
    from l2m_jax.assets import smollm2_hf_dir

    tok = l2m_jax.load_tokenizer(str(smollm2_hf_dir()))
    conv = [{"role": "user", "content": "What is the capital of France?"},
            {"role": "assistant", "content": "Paris."},
            {"role": "user", "content": "And of Germany, in 1990?"},
            {"role": "assistant", "content": "Berlin, since 3 October 1990."}]
    ids, mask = encode_prompt_response(tok, conv)
    assert tok.decode(ids).startswith("<|im_start|>system\n")      # the template's default system turn
    runs = _runs(mask)
    assert [tok.decode(ids[a:b]) for a, b in runs] == ["Paris.<|im_end|>", "Berlin, since 3 October 1990.<|im_end|>"]
    assert end_of_turn_id(tok) == tok.convert_tokens_to_ids("<|im_end|>") == IM_END
