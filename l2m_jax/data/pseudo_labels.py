"""Teacher pseudo-labels (SeqKD data, MIL_SPEC §2.2): the teacher answers seed prompts, results on disk.

`generate_pseudo_labels` chat-templates every prompt, generates batch by batch and appends one JSON line
per prompt to shards `shard-00000.jsonl`, ... (`shard_size` prompts each, by prompt index):

  {"index": 17, "prompt": "...", "prompt_ids": [...], "response": "...", "response_ids": [...],
   "finished": true}

`response_ids` are the generated tokens up to and including the end-of-turn token (`finished` false when
`max_new_tokens` ran out first); `response` is their text without special tokens. Each batch is flushed and
fsynced before the next starts, so a crash loses at most the batch in flight. Running again with the same
arguments skips every prompt already written (a half-written last line, the trace of a crash, is cut off)
and refuses to continue a run made with other prompts or settings (`meta.json` records them).

Greedy runs give the same labels however often they are interrupted. Sampled runs draw one key per batch
from (seed, first prompt index of the batch), so they repeat exactly when interruptions fall between batches.
"""
from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np

from l2m_jax.data.chat import DataError, encode_chat_prompt, end_of_turn_id, validate_messages
from l2m_jax.data.jsonl import append_jsonl, check_settings, read_jsonl

SHARD = "shard-{:05d}.jsonl"
META = "meta.json"


def _prompt_messages(prompt: Any, i: int) -> list[dict[str, str]]:
    if isinstance(prompt, str):
        if not prompt.strip():
            raise DataError(f"prompts[{i}] is empty")
        return [{"role": "user", "content": prompt}]
    return validate_messages(prompt, where=f"prompts[{i}]")


def _read_shard(path: Path, *, repair: bool) -> list[dict[str, Any]]:
    """Complete lines of a shard; a partial last line is ignored (and cut off the file when repair)."""
    return read_jsonl(path, repair=repair, fix="delete it to regenerate its prompts")


def _shards(out_dir: Path) -> list[Path]:
    return sorted(out_dir.glob("shard-*.jsonl"))


def _trim(tokens: Sequence[int], eos_id: int) -> tuple[list[int], bool]:
    """Generated tokens up to and including the first end-of-turn token."""
    tokens = [int(t) for t in tokens]
    if eos_id in tokens:
        return tokens[: tokens.index(eos_id) + 1], True
    return tokens, False


def _default_generate():
    import l2m_jax
    return l2m_jax.generate


def generate_pseudo_labels(cfg, params, tokenizer, prompts: Sequence[str | list[dict[str, str]]],
                           out_dir: str | os.PathLike, *, max_new_tokens: int, batch_size: int,
                           sampling=None, seed: int = 0, eos_id: int | None = None, shard_size: int = 10_000,
                           generate_fn: Callable | None = None, progress: bool = True,
                           prompt_bucket: int = 16) -> dict[str, int]:
    """Answer `prompts` (user strings or message lists) with the model; resumable (module docstring).

    `generate_fn(cfg, params, prompt_ids, max_new_tokens, sampling=, eos_id=, key=)` -> new token lists;
    default `l2m_jax.generate`. `eos_id` defaults to the chat template's end-of-turn token.
    `prompt_bucket` goes to the default `l2m_jax.generate` (batches whose longest prompts round up to the same
    multiple of it share one compiled program); a custom `generate_fn` does not receive it.
    Returns {"total", "skipped" (already on disk), "generated"}.
    """
    import jax
    from tqdm.auto import tqdm

    if max_new_tokens <= 0 or batch_size <= 0 or shard_size <= 0:
        raise DataError(f"max_new_tokens={max_new_tokens}, batch_size={batch_size} and shard_size={shard_size} "
                        "must be positive")
    if len(prompts) == 0:
        raise DataError("generate_pseudo_labels: no prompts")
    extra = {"prompt_bucket": int(prompt_bucket)} if generate_fn is None else {}
    generate_fn = generate_fn or _default_generate()
    eos = end_of_turn_id(tokenizer) if eos_id is None else int(eos_id)
    messages = [_prompt_messages(p, i) for i, p in enumerate(prompts)]
    out_dir = Path(out_dir)
    check_settings(out_dir, {"num_prompts": len(prompts), "max_new_tokens": int(max_new_tokens),
                             "sampling": repr(sampling), "seed": int(seed), "eos_id": eos,
                             "shard_size": int(shard_size)}, "pseudo-labels")
    stored = [p if isinstance(p, str) else m for p, m in zip(prompts, messages)]
    done = set()
    for path in _shards(out_dir):
        for row in _read_shard(path, repair=True):
            i = row.get("index")
            if not isinstance(i, int) or not 0 <= i < len(prompts) or row.get("prompt") != stored[i]:
                raise DataError(f"{path}: a row for prompt {i!r} does not match the prompts given; this "
                                "directory belongs to another prompt list")
            done.add(i)
    todo = [i for i in range(len(prompts)) if i not in done]
    prompt_ids = {i: encode_chat_prompt(tokenizer, messages[i], where=f"prompts[{i}]").tolist() for i in todo}
    limit = getattr(cfg, "max_position_embeddings", None)
    too_long = [i for i in todo if limit is not None and len(prompt_ids[i]) + max_new_tokens > limit]
    if too_long:
        raise DataError(f"{len(too_long)} prompts (indices {too_long[:10]}...) with max_new_tokens="
                        f"{max_new_tokens} exceed the model's {limit} positions; drop or shorten them")
    bar = tqdm(total=len(prompts), initial=len(done), desc="pseudo-labels", unit="prompt",
               disable=not progress)
    base_key = jax.random.key(seed)
    try:
        for b in range(0, len(todo), batch_size):
            batch = todo[b: b + batch_size]
            ids = [prompt_ids[i] for i in batch]
            # the last, short batch of several runs at the full batch size (the extra rows repeat its first
            # prompt and are dropped): it reuses the full batches' compiled program instead of compiling one
            pad = batch_size - len(batch) if len(todo) > batch_size else 0
            outs = generate_fn(cfg, params, ids + [ids[0]] * pad, max_new_tokens, sampling=sampling, eos_id=eos,
                               key=jax.random.fold_in(base_key, batch[0]), **extra)
            if len(outs) != len(batch) + pad:
                raise DataError(f"generate_fn returned {len(outs)} sequences for {len(batch) + pad} prompts")
            outs = outs[:len(batch)]
            lines: dict[int, list[dict]] = {}
            for i, p_ids, out in zip(batch, ids, outs):
                if len(out) > max_new_tokens:
                    raise DataError(f"generate_fn returned {len(out)} tokens for prompt {i} with max_new_tokens="
                                    f"{max_new_tokens}; it must return only the new tokens")
                resp, finished = _trim(out, eos)
                row = {"index": i, "prompt": stored[i], "prompt_ids": p_ids,
                       "response": tokenizer.decode(resp, skip_special_tokens=True),
                       "response_ids": resp, "finished": finished}
                lines.setdefault(i // shard_size, []).append(row)
            for shard, rows in lines.items():
                append_jsonl(out_dir / SHARD.format(shard), rows)
            bar.update(len(batch))
    finally:
        bar.close()
    return {"total": len(prompts), "skipped": len(done), "generated": len(todo)}


def load_pseudo_labels(out_dir: str | os.PathLike, *, require_complete: bool = True) -> list[dict[str, Any]]:
    """Rows `{"messages": [..prompt, assistant], "prompt_ids", "response_ids", "finished", "index"}` by index.

    `prompt_ids + response_ids` are exactly the tokens the teacher saw and wrote: train on those rather
    than re-tokenizing the text. require_complete=True raises if a run stopped before every prompt was done.
    """
    out_dir = Path(out_dir)
    if not (out_dir / META).exists():
        raise DataError(f"{out_dir} has no {META}: it is not a pseudo-label directory")
    meta = json.loads((out_dir / META).read_text())
    rows: dict[int, dict[str, Any]] = {}
    for path in _shards(out_dir):
        for row in _read_shard(path, repair=False):
            prompt = row["prompt"]
            msgs = [{"role": "user", "content": prompt}] if isinstance(prompt, str) else list(prompt)
            rows[row["index"]] = {"messages": msgs + [{"role": "assistant", "content": row["response"]}],
                                  "prompt_ids": np.asarray(row["prompt_ids"], np.int32),
                                  "response_ids": np.asarray(row["response_ids"], np.int32),
                                  "finished": row["finished"], "index": row["index"]}
    missing = meta["num_prompts"] - len(rows)
    if require_complete and missing:
        raise DataError(f"{out_dir}: {missing} of {meta['num_prompts']} prompts have no label yet; run "
                        "generate_pseudo_labels again to finish (or pass require_complete=False)")
    return [rows[i] for i in sorted(rows)]
