"""Preference triples for DPO: synthetic ones when no real dataset exists, and their tokenization.

Synthetic triples (`synthetic_preferences`) start from chat rows whose last message is the teacher's
answer (pseudo-labels). chosen = that answer; rejected is one of:

  "mismatch"  the answer to another prompt, picked with a seeded generator (never an identical text):
              fluent and well-formed but off-topic, so the pair teaches relevance to the prompt;
  "truncate"  the first `truncate_fraction` of the answer's words: on-topic but unfinished (and missing
              the end of turn), so the pair teaches completeness.

The default "mixed" draws one of the two per row (seeded, half each), so neither "longer is better" nor
"on-topic is enough" alone separates chosen from rejected. A one-word answer cannot be truncated and gets a
mismatched rejection. Every triple records `rejected_kind`. Same rows and seed → same triples.

`encode_preference` tokenizes a triple like TRL's DPOTrainer (MiL stage 3, MIL_SPEC §2.5): when prompt +
the longer response exceed `max_len`, the prompt keeps its last `max_prompt_len` tokens (left truncation);
if still too long, responses keep their first `max_len - max_prompt_len` tokens. One difference: the
response ends with the chat template's end-of-turn token instead of an extra EOS appended after it.
"""
from __future__ import annotations

import re
from typing import Any

import numpy as np

from l2m_jax.data.chat import DataError, encode_chat_prompt, encode_prompt_response, validate_messages

MODES = ("mixed", "mismatch", "truncate")


def _prompt_and_answer(row: Any, i: int) -> tuple[list[dict[str, str]], str]:
    where = f"row {i}"
    if not isinstance(row, dict) or "messages" not in row:
        raise DataError(f"{where}: expected a chat row {{'messages': [...]}} ending with the teacher's answer")
    msgs = validate_messages(row["messages"], where=f"{where} messages")
    if len(msgs) < 2 or msgs[-1]["role"] != "assistant":
        raise DataError(f"{where}: the last message must be the assistant's answer after a prompt")
    if not msgs[-1]["content"].strip():
        raise DataError(f"{where}: the assistant's answer is empty")
    return msgs[:-1], msgs[-1]["content"]


def _truncated(answer: str, fraction: float) -> str | None:
    """The first `fraction` of the words of `answer` (original spacing kept), or None if that is all of it."""
    ends = [m.end() for m in re.finditer(r"\S+", answer)]
    keep = max(1, int(len(ends) * fraction))
    return answer[: ends[keep - 1]] if keep < len(ends) else None


def synthetic_preferences(rows: list[dict[str, Any]], *, seed: int, mode: str = "mixed",
                          truncate_fraction: float = 0.5) -> list[dict[str, Any]]:
    """Deterministic `{"prompt", "chosen", "rejected", "rejected_kind"}` triples from teacher chat rows."""
    if mode not in MODES:
        raise DataError(f"mode={mode!r}; choose one of {MODES}")
    if not 0.0 < truncate_fraction < 1.0:
        raise DataError(f"truncate_fraction={truncate_fraction} must be strictly between 0 and 1")
    pairs = [_prompt_and_answer(r, i) for i, r in enumerate(rows)]
    n = len(pairs)
    answers = [a for _, a in pairs]
    if mode != "truncate" and len(set(answers)) < 2:
        raise DataError(f"synthetic_preferences: {n} rows with fewer than two distinct answers cannot give "
                        "mismatched rejections; use mode='truncate' or more rows")
    rng = np.random.default_rng(seed)
    out = []
    for i, (prompt, chosen) in enumerate(pairs):
        # draw both numbers for every row so a row's choice does not depend on the others' kinds
        coin, pick = rng.random(), int(rng.integers(n))
        want = mode if mode != "mixed" else ("truncate" if coin < 0.5 else "mismatch")
        rejected = _truncated(chosen, truncate_fraction) if want == "truncate" else None
        kind = "truncate"
        if rejected is None:
            if mode == "truncate":
                raise DataError(f"row {i}: the answer {chosen!r} has one word and cannot be truncated; "
                                "use mode='mixed' or 'mismatch'")
            kind = "mismatch"
            j = pick
            while answers[j] == chosen:   # terminates: some answer differs (checked above)
                j = (j + 1) % n
            rejected = answers[j]
        out.append({"prompt": prompt, "chosen": chosen, "rejected": rejected, "rejected_kind": kind})
    return out


def _as_messages(prompt: Any) -> list[dict[str, str]]:
    if isinstance(prompt, str):
        if not prompt.strip():
            raise DataError("prompt is empty")
        return [{"role": "user", "content": prompt}]
    return validate_messages(prompt, where="prompt")


def _split(tokenizer, prompt: list[dict[str, str]], answer: str, prompt_ids: np.ndarray, name: str
           ) -> tuple[np.ndarray, np.ndarray]:   # prompt int32 [P], response int32 [R]
    """The conversation's tokens up to the answer's end-of-turn token, split into prompt and response.

    The split is where the conversation's tokens stop agreeing with the generation prompt's: usually the
    prompt's end, one token earlier when the answer's first characters merge with the prompt's last token
    (TRL does the same).
    """
    if not isinstance(answer, str):
        raise DataError(f"{name} must be a string, got {type(answer).__name__}")
    ids, mask = encode_prompt_response(tokenizer, prompt + [{"role": "assistant", "content": answer}],
                                       where=name)
    stop = int(np.flatnonzero(mask)[-1]) + 1
    n = min(prompt_ids.size, stop)
    differ = np.flatnonzero(ids[:n] != prompt_ids[:n])
    k = int(differ[0]) if differ.size else n
    return ids[:k], ids[k:stop]


def encode_preference(tokenizer, prompt: str | list[dict[str, str]], chosen: str, rejected: str, *,
                      max_len: int = 1024, max_prompt_len: int = 512) -> dict[str, Any]:
    """Token ids and response masks of the chosen and rejected sequences (prompt + answer).

    Returns {"chosen_ids": int32 [Lc], "chosen_mask": bool [Lc], "rejected_ids": int32 [Lr],
    "rejected_mask": bool [Lr], "truncated_prompt": bool, "truncated_response": bool}; masks are true on
    the response tokens (the answer and its end-of-turn token), both lengths are at most `max_len`.
    """
    if not 0 < max_prompt_len < max_len:
        raise DataError(f"max_prompt_len={max_prompt_len} must be positive and below max_len={max_len}")
    msgs = _as_messages(prompt)
    prompt_ids = encode_chat_prompt(tokenizer, msgs, where="prompt")
    parts = [_split(tokenizer, msgs, chosen, prompt_ids, "chosen"),
             _split(tokenizer, msgs, rejected, prompt_ids, "rejected")]
    longer = max(r.size for _, r in parts)
    cut_prompt = any(p.size + longer > max_len for p, _ in parts)
    parts = [(p[-max_prompt_len:] if p.size + longer > max_len else p, r) for p, r in parts]
    cut_response = any(p.size + longer > max_len for p, _ in parts)
    parts = [(p, r[: max_len - max_prompt_len] if p.size + longer > max_len else r) for p, r in parts]
    out: dict[str, Any] = {"truncated_prompt": cut_prompt, "truncated_response": cut_response}
    for name, (p, r) in zip(("chosen", "rejected"), parts):
        out[f"{name}_ids"] = np.concatenate([p, r]).astype(np.int32)
        out[f"{name}_mask"] = np.concatenate([np.zeros(p.size, bool), np.ones(r.size, bool)])
    return out
