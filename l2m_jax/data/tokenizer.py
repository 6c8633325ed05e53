"""Tokenizers: from a GGUF file's metadata, an HF directory, or the bundled teacher's name.

A GGUF carries no `tokenizer.json`; llama.cpp stores the vocabulary, the merges, the token types and the
chat template as metadata. `tokenizer_from_gguf` rebuilds the byte-level BPE those describe with the
`tokenizers` library and wraps it in transformers' `PreTrainedTokenizerFast`, so every caller sees one
interface (`encode`, `decode`, `apply_chat_template`) whatever the source.
"""
from __future__ import annotations

import os

from l2m_jax.convert.gguf import CheckpointError, gguf_field, open_gguf
from l2m_jax.errors import missing_model

__all__ = ["TokenizerError", "tokenizer_from_gguf", "load_tokenizer"]

_CONTROL = 3  # llama.cpp token type of special tokens (<|im_start|>, <|endoftext|>, ...)
TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "vocab.json", "tokenizer_config.json")


def has_tokenizer(path: str | os.PathLike) -> bool:
    """Whether `path` is a directory holding tokenizer files (one of TOKENIZER_FILES)."""
    return os.path.isdir(path) and any(os.path.isfile(os.path.join(path, f)) for f in TOKENIZER_FILES)


class TokenizerError(ValueError):
    """A tokenizer source that l2m_jax cannot build a tokenizer from."""


def _pre_tokenizer(kind: str, add_prefix_space: bool, path: str):
    """The pre-tokenizer llama.cpp's `tokenizer.ggml.pre` names (how text is split before BPE)."""
    from tokenizers import pre_tokenizers

    byte_level = pre_tokenizers.ByteLevel(add_prefix_space=add_prefix_space, use_regex=True)
    if kind == "smollm":
        # merges never join digits: each digit is its own piece before the GPT-2 split
        return pre_tokenizers.Sequence([pre_tokenizers.Digits(individual_digits=True), byte_level])
    if kind == "gpt-2":
        return byte_level
    raise TokenizerError(f"{path!r}: GGUF pre-tokenizer {kind!r} (tokenizer.ggml.pre) is not supported; "
                         "supported: 'smollm', 'gpt-2'. Load the model's HF directory for its tokenizer instead")


def tokenizer_from_gguf(path: str | os.PathLike, reader=None):
    """A transformers fast tokenizer rebuilt from the byte-level BPE described in a GGUF file's metadata.

    Special tokens are those of llama.cpp type 3 (control); bos/eos/pad/unk come from the
    `tokenizer.ggml.*_token_id` keys, the chat template from `tokenizer.chat_template`. reader: the file's
    `open_gguf` reader, when the caller has it open already.
    """
    from tokenizers import AddedToken, Tokenizer, decoders, models, processors
    from transformers import PreTrainedTokenizerFast

    path = os.fspath(path)
    reader = open_gguf(path) if reader is None else reader
    kind = gguf_field(reader, "tokenizer.ggml.model", None)
    if kind != "gpt2":
        raise TokenizerError(f"{path!r}: GGUF tokenizer model {kind!r} (tokenizer.ggml.model) is not supported; "
                             "l2m_jax rebuilds byte-level BPE ('gpt2') tokenizers only. Load the model's HF "
                             "directory for its tokenizer instead")
    tokens = gguf_field(reader, "tokenizer.ggml.tokens")
    merges = gguf_field(reader, "tokenizer.ggml.merges")
    types = gguf_field(reader, "tokenizer.ggml.token_type", [1] * len(tokens))
    add_prefix_space = bool(gguf_field(reader, "tokenizer.ggml.add_space_prefix", False))

    # byte-level vocabularies spell a space as "Ġ", so a merge "a b" has exactly one real space
    bpe = models.BPE(vocab={t: i for i, t in enumerate(tokens)}, merges=[tuple(m.split(" ", 1)) for m in merges],
                     fuse_unk=False, byte_fallback=False)
    tok = Tokenizer(bpe)
    tok.pre_tokenizer = _pre_tokenizer(gguf_field(reader, "tokenizer.ggml.pre", None), add_prefix_space, path)
    tok.decoder = decoders.ByteLevel()
    tok.add_special_tokens([AddedToken(t, special=True, normalized=False)
                            for t, kind in zip(tokens, types) if kind == _CONTROL])

    def special_id(key):
        token_id = gguf_field(reader, f"tokenizer.ggml.{key}", None)
        if token_id is not None and not 0 <= int(token_id) < len(tokens):
            raise TokenizerError(f"{path!r}: tokenizer.ggml.{key}={token_id} is outside the vocabulary "
                                 f"of {len(tokens)} tokens")
        return None if token_id is None else int(token_id)

    def special(key):
        token_id = special_id(key)
        return None if token_id is None else tokens[token_id]

    bos_id, eos_id = special_id("bos_token_id"), special_id("eos_token_id")
    add_bos = bool(gguf_field(reader, "tokenizer.ggml.add_bos_token", False)) and bos_id is not None
    add_eos = bool(gguf_field(reader, "tokenizer.ggml.add_eos_token", False)) and eos_id is not None
    if add_bos or add_eos:
        pre = [f"{tokens[bos_id]}:0"] if add_bos else []
        post = [f"{tokens[eos_id]}:0"] if add_eos else []
        pieces = {tokens[i]: i for i in (bos_id, eos_id) if i is not None}
        tok.post_processor = processors.TemplateProcessing(
            single=pre + ["$A:0"] + post, pair=pre + ["$A:0"] + post + pre + ["$B:1"] + post,
            special_tokens=list(pieces.items()))
    else:
        tok.post_processor = processors.ByteLevel(trim_offsets=False)
    context = gguf_field(reader, f"{gguf_field(reader, 'general.architecture')}.context_length", None)
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token=special("bos_token_id"), eos_token=special("eos_token_id"),
        pad_token=special("padding_token_id"), unk_token=special("unknown_token_id"),
        chat_template=gguf_field(reader, "tokenizer.chat_template", None), clean_up_tokenization_spaces=False,
        model_max_length=int(context) if context else int(1e30))


def load_tokenizer(path: str | os.PathLike):
    """The tokenizer of a model: a `.gguf` file, an HF directory (local files only), or "smollm2".

    Returns a transformers fast tokenizer with the model's chat template.
    """
    spec = os.fspath(path)
    if spec == "smollm2" and not os.path.exists(spec):
        from l2m_jax.assets import smollm2_gguf_path

        return tokenizer_from_gguf(smollm2_gguf_path())
    if os.path.isdir(spec):
        if not has_tokenizer(spec):
            raise TokenizerError(f"directory {spec!r} has no tokenizer files (none of {list(TOKENIZER_FILES)}); "
                                 "save the tokenizer there (tokenizer.save_pretrained) or pass a .gguf file")
        from transformers import AutoTokenizer

        return AutoTokenizer.from_pretrained(spec, local_files_only=True)
    if os.path.isfile(spec):
        try:
            return tokenizer_from_gguf(spec)
        except CheckpointError as e:
            raise TokenizerError(f"cannot read a tokenizer from file {spec!r}: {e}") from e
    raise TokenizerError(missing_model(spec))
