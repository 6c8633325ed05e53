"""Chat messages, chat templates and response masks.

A conversation is a list of messages `{"role": "system" | "user" | "assistant", "content": str}`. The
model sees exactly the text the tokenizer's chat template renders, tokenized without extra special tokens
(the template writes BOS itself where the model expects one).

`encode_prompt_response` marks the tokens the model is trained to produce: for every assistant turn,
everything after the generation prompt up to and including the template's end-of-turn token, i.e. the
content (with any whitespace the template puts before it, like Zephyr's newline) and `<|im_end|>` for
ChatML, `</s>` for Zephyr, `<|eot_id|>` for Llama-3. Text the template adds after that token (ChatML's
trailing newline) and every header (`<|im_start|>assistant\\n`) stay unmasked: the model never has to
predict a header, because the generation prompt supplies it at inference time.

Masks are computed by rendering the conversation prefix before each assistant turn (with the generation
prompt) and up to the end of that turn, checking that these texts are prefixes of the whole conversation's
text, and marking the tokens of the single whole-conversation tokenization that fall on the turn's
characters (fast tokenizers' offsets). A template for which the prefixes do not hold (one that re-renders
earlier turns depending on later ones) raises `TemplateError` instead of producing a wrong mask.
"""
from __future__ import annotations

from typing import Any, Sequence

import numpy as np

ROLES = ("system", "user", "assistant")


class DataError(ValueError):
    """A dataset, row, prompt or message that l2m_jax cannot use as given."""


class TemplateError(DataError):
    """A tokenizer without a chat template, or one whose rendering is unusable for response masks."""


def validate_messages(messages: Any, *, where: str = "messages") -> list[dict[str, str]]:
    """Check a conversation and return it as fresh `{"role", "content"}` dicts (other keys dropped).

    `where` names the conversation in error messages (e.g. "dataset x.jsonl row 17").
    """
    if isinstance(messages, (str, bytes)) or not isinstance(messages, Sequence):
        raise DataError(f"{where}: expected a list of {{role, content}} messages, got {type(messages).__name__}")
    if len(messages) == 0:
        raise DataError(f"{where}: the conversation has no messages")
    out = []
    for i, m in enumerate(messages):
        if not isinstance(m, dict):
            raise DataError(f"{where}[{i}]: a message must be a dict with 'role' and 'content', "
                            f"got {type(m).__name__}")
        missing = [k for k in ("role", "content") if k not in m]
        if missing:
            raise DataError(f"{where}[{i}]: message is missing {missing}; it has keys {sorted(m)}")
        role, content = m["role"], m["content"]
        if role not in ROLES:
            raise DataError(f"{where}[{i}]: role {role!r} is not one of {ROLES}")
        if not isinstance(content, str):
            raise DataError(f"{where}[{i}]: content must be a string, got {type(content).__name__}")
        out.append({"role": role, "content": content})
    return out


def _check_template(tokenizer) -> None:
    if not getattr(tokenizer, "chat_template", None):
        raise TemplateError(f"{type(tokenizer).__name__} has no chat template; load the tokenizer with "
                            "l2m_jax.load_tokenizer(...) or set tokenizer.chat_template to a Jinja template")


def render_chat(tokenizer, messages, *, add_generation_prompt: bool, where: str = "messages") -> str:
    """The text the chat template makes of `messages` (generation prompt appended when asked)."""
    _check_template(tokenizer)
    msgs = validate_messages(messages, where=where)
    try:
        text = tokenizer.apply_chat_template(msgs, tokenize=False, add_generation_prompt=add_generation_prompt)
    except Exception as e:  # jinja raises its own types (e.g. raise_exception in a template)
        raise TemplateError(f"{where}: the chat template failed to render: {e}") from e
    if not isinstance(text, str):
        raise TemplateError(f"{where}: apply_chat_template(tokenize=False) returned {type(text).__name__}, "
                            "not a string")
    return text


def encode_text(tokenizer, text: str) -> list[int]:
    """Token ids of already-rendered text, adding no BOS/EOS (the template wrote what the model needs)."""
    return list(tokenizer.encode(text, add_special_tokens=False))


def special_token_ids(tokenizer) -> frozenset[int]:
    """Ids of every special token (named specials and added tokens flagged special)."""
    ids = set(getattr(tokenizer, "all_special_ids", ()) or ())
    decoder = getattr(tokenizer, "added_tokens_decoder", None) or {}
    ids.update(i for i, tok in decoder.items() if getattr(tok, "special", False))
    return frozenset(int(i) for i in ids)


def encode_chat_prompt(tokenizer, messages, *, where: str = "messages") -> np.ndarray:   # int32 [L]
    """Token ids of `messages` followed by the assistant generation prompt: the input for generation."""
    msgs = validate_messages(messages, where=where)
    if msgs[-1]["role"] == "assistant":
        raise DataError(f"{where}: the last message is an assistant turn; a generation prompt must end "
                        "with a user (or system) message")
    text = render_chat(tokenizer, msgs, add_generation_prompt=True, where=where)
    return np.asarray(encode_text(tokenizer, text), dtype=np.int32)


def _encode_with_offsets(tokenizer, text: str) -> tuple[list[int], list[tuple[int, int]]]:
    if not getattr(tokenizer, "is_fast", False):
        raise TemplateError(f"{type(tokenizer).__name__} is a slow tokenizer; response masks need character "
                            "offsets, which only fast (tokenizers-backed) tokenizers provide")
    enc = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
    return list(enc["input_ids"]), [tuple(o) for o in enc["offset_mapping"]]


def _turn_chars(tokenizer, msgs: list[dict[str, str]], i: int, full_text: str, where: str
                ) -> tuple[int, int, int]:
    """Character positions of assistant turn i in the full rendering: response start, content end, turn end."""
    prompt_text = render_chat(tokenizer, msgs[:i], add_generation_prompt=True, where=where)
    turn_text = render_chat(tokenizer, msgs[: i + 1], add_generation_prompt=False, where=where)
    if not (turn_text.startswith(prompt_text) and full_text.startswith(turn_text)):
        raise TemplateError(
            f"{where}[{i}]: the chat template is not prefix-stable: the rendering of the turns before this "
            "assistant turn (plus the generation prompt), of the conversation up to it, and of the whole "
            "conversation are not prefixes of one another, so the assistant tokens cannot be located; use a "
            "template that renders each turn independently of later ones")
    content = msgs[i]["content"].strip()
    body = turn_text[len(prompt_text):]
    lead = len(body) - len(body.lstrip())
    if not body[lead:].startswith(content):
        raise TemplateError(
            f"{where}[{i}]: after the generation prompt the template writes {body[:40]!r} before the "
            "assistant content; the template's add_generation_prompt output must end where the assistant's "
            "content begins")
    # the response starts where the generation prompt ends: whitespace before the content is generated too
    return len(prompt_text), len(prompt_text) + lead + len(content), len(turn_text)


def encode_prompt_response(tokenizer, messages, *, where: str = "messages"
                           ) -> tuple[np.ndarray, np.ndarray]:   # int32 [L], bool [L]
    """Token ids of the whole conversation and a mask that is true on the assistant tokens.

    The mask is aligned with the ids (mask[t] says whether token t is a target); it covers each assistant
    turn's content and end-of-turn token. The conversation is tokenized once; turns are located by the
    characters the template renders for them. Raises DataError for malformed messages and TemplateError
    when the template is missing or not prefix-stable.
    """
    msgs = validate_messages(messages, where=where)
    full_text = render_chat(tokenizer, msgs, add_generation_prompt=False, where=where)
    ids, offsets = _encode_with_offsets(tokenizer, full_text)
    specials = special_token_ids(tokenizer)
    mask = np.zeros(len(ids), dtype=bool)
    for i, m in enumerate(msgs):
        if m["role"] != "assistant":
            continue
        if i == 0:
            raise DataError(f"{where}[0]: the conversation starts with an assistant turn; it needs a user "
                            "message before the first answer")
        c_start, c_stop, turn_stop = _turn_chars(tokenizer, msgs, i, full_text, where)
        closing = False
        for t, (a, b) in enumerate(offsets):
            if a < c_stop and b > c_start:      # overlaps the content
                mask[t] = True
            elif c_stop <= a < turn_stop and not closing:
                # what follows the content up to and including the end-of-turn token
                mask[t] = True
                closing = ids[t] in specials
    return np.asarray(ids, dtype=np.int32), mask


def end_of_turn_id(tokenizer) -> int:
    """The token the template closes an assistant turn with (generation stops on it)."""
    probe = [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello"}]
    ids, mask = encode_prompt_response(tokenizer, probe, where="end-of-turn probe")
    last = int(ids[np.flatnonzero(mask)[-1]])
    if last not in special_token_ids(tokenizer):
        raise TemplateError("the chat template closes assistant turns without a special token; pass the "
                            "end-of-turn id explicitly (eos_id=...)")
    return last
