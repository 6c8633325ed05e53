"""The GGUF tokenizer rebuilt by l2m_jax against transformers' GGUF tokenizer (ids, decoding, chat template),
the saved HF directory's tokenizer, and errors. The real file is fetched once into the l2m_jax cache."""
import numpy as np
import pytest

gguf = pytest.importorskip("gguf")

from l2m_jax import assets  # noqa: E402
from l2m_jax.data.tokenizer import TokenizerError, load_tokenizer, tokenizer_from_gguf  # noqa: E402

TEXTS = [
    "Hello world",
    "The year 2024 had 366 days; x=12345678, 3.14159 and (42).",
    "  leading, inner   and trailing spaces  ",
    "tabs\tand\nnewlines\n\n\r\n end\n",
    "def f(x):\n    return x**2  # square\n\nprint(f(3))",
    "naïve café — 日本語のテキスト, Ελληνικά, emoji 🤖🎉",
    "I'm sure they'll say we've done what you'd've done",
    "<|im_start|>user\nHi!<|im_end|>\n<|endoftext|>",
    "inline<|im_end|>special<repo_name>tokens",
    "",
]
CONVERSATION = [
    {"role": "system", "content": "You answer briefly."},
    {"role": "user", "content": "What is 2+2?"},
    {"role": "assistant", "content": "4."},
    {"role": "user", "content": "And 3*3?\nShow the digits: 0123456789"},
]


@pytest.fixture(scope="module")
def teacher_gguf():
    return assets.smollm2_gguf_path()


@pytest.fixture(scope="module")
def ours(teacher_gguf):
    return tokenizer_from_gguf(teacher_gguf)


@pytest.fixture(scope="module")
def reference(teacher_gguf):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(teacher_gguf.parent), gguf_file=teacher_gguf.name)


def test_ids_and_decoding_match_transformers(ours, reference):
    for text in TEXTS:
        ids = ours.encode(text)
        assert ids == reference.encode(text), repr(text)
        assert ids == ours.encode(text, add_special_tokens=False), "SmolLM2 adds no BOS"
        assert ours.decode(ids) == text == reference.decode(ids)
    assert (ours.bos_token_id, ours.eos_token_id, ours.pad_token_id, ours.unk_token_id) == (1, 2, 2, 0)
    assert ours.encode("<|im_start|><|im_end|><|endoftext|>") == [1, 2, 0]
    assert len(ours) == len(reference) == 49152


def test_digits_are_split_like_llama_cpp(ours):
    # pre-tokenizer "smollm": every numeric character is its own piece before the GPT-2 split, so a space
    # never merges into a number. transformers' GGUF loader skips this step and differs on " ²".
    assert ours.convert_ids_to_tokens(ours.encode("in 1815, x ²")) == [
        "in", "Ġ", "1", "8", "1", "5", ",", "Ġx", "Ġ", "Â²"]


def test_chat_template_matches_transformers(ours, reference):
    for messages in (CONVERSATION, CONVERSATION[1:]):
        text = ours.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        assert text == reference.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        assert text.endswith("<|im_end|>\n<|im_start|>assistant\n")
        ids = ours.apply_chat_template(messages, add_generation_prompt=True, return_dict=False)
        assert ids == ours.encode(text)
    default = ours.apply_chat_template(CONVERSATION[1:], tokenize=False)
    assert default.startswith("<|im_start|>system\nYou are a helpful AI assistant named SmolLM")


def test_saved_hf_directory_tokenizer_is_the_same(ours):
    saved = load_tokenizer(assets.smollm2_hf_dir())
    for text in TEXTS + ["x ²"]:
        assert saved.encode(text) == ours.encode(text), repr(text)
    assert (saved.apply_chat_template(CONVERSATION, tokenize=False, add_generation_prompt=True)
            == ours.apply_chat_template(CONVERSATION, tokenize=False, add_generation_prompt=True))
    assert (saved.bos_token, saved.eos_token, saved.pad_token) == ("<|im_start|>", "<|im_end|>", "<|im_end|>")


# ------------------------------------------------------------------------------------------ tiny files
def write_tokenizer_gguf(path, *, model="gpt2", pre="smollm", add_bos=False):
    from tokenizers import pre_tokenizers

    tokens = ["<s>", "</s>"] + sorted(pre_tokenizers.ByteLevel.alphabet()) + ["he", "Ġt"]
    w = gguf.GGUFWriter(str(path), "llama")
    w.add_tokenizer_model(model)
    w.add_tokenizer_pre(pre)
    w.add_token_list(tokens)
    w.add_token_merges(["h e", "Ġ t"])
    w.add_token_types([3, 3] + [1] * (len(tokens) - 2))
    w.add_bos_token_id(0)
    w.add_eos_token_id(1)
    w.add_add_bos_token(add_bos)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path, tokens


def test_tiny_gguf_tokenizer_and_add_bos(tmp_path):
    path, tokens = write_tokenizer_gguf(tmp_path / "plain.gguf")
    tok = tokenizer_from_gguf(path)
    ids = tok.encode("he the 42</s>")
    assert tok.convert_ids_to_tokens(ids) == ["he", "Ġt", "he", "Ġ", "4", "2", "</s>"]
    assert tok.decode(ids) == "he the 42</s>"

    path, _ = write_tokenizer_gguf(tmp_path / "bos.gguf", add_bos=True)
    tok_bos = tokenizer_from_gguf(path)
    assert tok_bos.encode("he the 42") == [0] + ids[:-1]
    assert tok_bos.encode("he the 42", add_special_tokens=False) == ids[:-1]
    np.testing.assert_array_equal(tok_bos("he", return_tensors="np")["input_ids"], [[0, tokens.index("he")]])


def test_bad_sources_raise_clear_errors(tmp_path):
    with pytest.raises(TokenizerError, match="does not exist"):
        load_tokenizer(tmp_path / "nowhere")
    (tmp_path / "empty").mkdir()
    with pytest.raises(TokenizerError, match="has no tokenizer files"):
        load_tokenizer(tmp_path / "empty")
    (tmp_path / "weights.bin").write_bytes(b"\0" * 16)
    with pytest.raises(TokenizerError, match="is not a GGUF file"):
        load_tokenizer(tmp_path / "weights.bin")
    path, _ = write_tokenizer_gguf(tmp_path / "spm.gguf", model="llama")
    with pytest.raises(TokenizerError, match=r"tokenizer model 'llama' .* byte-level BPE \('gpt2'\)"):
        load_tokenizer(path)
    path, _ = write_tokenizer_gguf(tmp_path / "qwen.gguf", pre="qwen2")
    with pytest.raises(TokenizerError, match="pre-tokenizer 'qwen2'"):
        tokenizer_from_gguf(path)
