"""Teacher-synthesised instruction data by the Magpie method (Xu et al. 2024, "Magpie: Alignment Data Synthesis
from Scratch by Prompting Aligned LLMs with Nothing").

An aligned chat model that is given only what its chat template writes before a user message (the opening of a
user turn, with any default system prompt the template adds) continues it with a plausible user request and
closes the turn with its end-of-turn token. Sampling that opening many times gives a varied set of requests
drawn from the model's own idea of what users ask; filters drop the unfinished, degenerate and duplicated
ones; then the same teacher answers the requests (`pseudo_labels.generate_pseudo_labels`), which gives
instruction data in the teacher's distribution with no dataset at all.

Phase 1, `synthesize_requests(..., out_dir)`, writes

  meta.json        the settings (num_requests, max_new_tokens, sampling, seed, filter, batch_size, prefix ids,
                   end-of-turn id); a later run with other settings is refused (DataError)
  requests.jsonl   one line per kept request: {"index": 0, "request": "...", "batch": 3, "finished": true}
  batches.jsonl    one line per sampled batch: {"batch", "sampled", "kept", "surplus", "finished", "rejected":
                   {filter: count}, "tokens", "seconds", "first_in_run"}

Batch b samples `batch_size` continuations of the prefix with key fold_in(key(seed), b), so every batch is
reproducible on its own. A batch's requests are appended (flushed, fsynced) before its batches.jsonl line,
which marks the batch complete. A crash therefore loses at most the batch in flight: running again cuts off a
torn last line, drops requests of a batch without its batches.jsonl line, rebuilds the dedupe keys from the
saved requests and continues with the next batch. An interrupted run and an uninterrupted one end with the
same requests.

Phase 2, `synthesize_chat(..., out_dir)`, runs phase 1 into out_dir/requests, has the teacher answer the seed
prompts and the requests into out_dir/answers (resumable pseudo-labels; the prompts are sorted by length so
batches pad little and few prompt lengths need their own compiled program) and writes a `datasets` dataset
to out_dir/dataset (written elsewhere, then renamed into place) with `l2m_synth.json` next to its files:
every generation setting and the throughput of both phases. Rows:

  {"messages": [{"role": "user", ...}, {"role": "assistant", ...}], "prompt_ids": int32 [L],
   "response_ids": int32 [L], "finished": bool, "source": "synthesized" | "seed", "request_index": int,
   "index": int}

`prompt_ids + response_ids` are the exact tokens the teacher saw and wrote. Shapes use B batch, L length.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import os
import re
import shutil
import time
import unicodedata
import warnings
from collections import Counter
from pathlib import Path
from typing import Any, Callable, Iterable, Sequence

import numpy as np

from l2m_jax.data.chat import (DataError, TemplateError, encode_chat_prompt, encode_text, end_of_turn_id,
                               render_chat, special_token_ids)
from l2m_jax.data.jsonl import append_jsonl, check_settings, read_jsonl, write_json
from l2m_jax.data.pseudo_labels import _trim, generate_pseudo_labels, load_pseudo_labels
from l2m_jax.ops.sampling import Sampling

REQUESTS = "requests.jsonl"
BATCHES = "batches.jsonl"
META = "meta.json"
SYNTH_JSON = "l2m_synth.json"
FORMAT = "l2m_synth/1"
# unlikely to occur in any template, and free of whitespace so that templates which trim content keep it whole
SENTINEL = "L2mSynthSentinel7q"
# template markers of the <|...|> family (ChatML, Llama-3, Zephyr, Phi): a request that writes one is the model
# running on into the next turn's header, not a request
_MARKER_RE = re.compile(r"<\|[^<>|\s]{1,40}\|>")
# a unit of 1-4 characters repeated back to back ("!!!!", "hahaha", "abcabc")
_RUN_RE = re.compile(r"(.{1,4}?)\1+", re.S)
FILTERS = ("unfinished", "empty", "marker", "too_short", "too_long", "repetitive", "duplicate", "near_duplicate")
_ADVICE = {
    "unfinished": "raise max_new_tokens (request_tokens) or set RequestFilter(require_end_of_turn=False)",
    "empty": "the teacher closes the turn at once: check the prefix (user_turn_prefix) and the sampling",
    "marker": "the teacher writes chat-template markers: check that the tokenizer belongs to the teacher",
    "too_short": "lower RequestFilter.min_chars",
    "too_long": "raise RequestFilter.max_chars",
    "repetitive": "raise RequestFilter.max_repeat_fraction / max_char_repeat or sample at a higher temperature",
    "duplicate": "sample at a higher temperature / top_p (the teacher repeats itself)",
    "near_duplicate": "set RequestFilter(near_dedupe=False) or near_prefix_words=0, or sample more diversely",
}


# ------------------------------------------------------------------------------------------------ template
def _split_user_turn(tokenizer) -> tuple[str, str]:
    """The text a template writes before and after a lone user message's content."""
    text = render_chat(tokenizer, [{"role": "user", "content": SENTINEL}], add_generation_prompt=False,
                       where="user-turn probe")
    if text.count(SENTINEL) != 1:
        raise TemplateError(f"the chat template does not write a user message's content verbatim (the probe "
                            f"{SENTINEL!r} appears {text.count(SENTINEL)} times in {text[:200]!r}); Magpie "
                            "synthesis needs a template that renders the user content as given")
    before, after = text.split(SENTINEL)
    return before, after


def user_turn_prefix(tokenizer) -> np.ndarray:   # int32 [L]
    """Token ids the chat template writes before a user message's content (with any default system prompt).

    These ids alone are the Magpie prompt: the model continues them with a user request.
    """
    before, _ = _split_user_turn(tokenizer)
    ids = encode_text(tokenizer, before)
    if not ids:
        raise TemplateError("the chat template writes nothing before a user message, so there is no prompt to "
                            "make the teacher write a request; Magpie needs a template with a user-turn header")
    return np.asarray(ids, dtype=np.int32)


def user_turn_end_id(tokenizer) -> int:
    """The special token that closes a user turn (the first one after its content); generation stops on it."""
    _, after = _split_user_turn(tokenizer)
    specials = special_token_ids(tokenizer)
    for t in encode_text(tokenizer, after):
        if t in specials:
            return int(t)
    return end_of_turn_id(tokenizer)    # templates closing user turns with plain text: the assistant's token


def template_markers(tokenizer) -> tuple[str, ...]:
    """Text of the tokenizer's special tokens (what decoding shows when the model writes one)."""
    ids = sorted(special_token_ids(tokenizer))
    texts = {tokenizer.convert_ids_to_tokens(i) for i in ids}
    return tuple(sorted(t for t in texts if isinstance(t, str) and len(t) >= 2))


# ------------------------------------------------------------------------------------------------ filters
@dataclasses.dataclass(frozen=True)
class RequestFilter:
    """Which sampled requests to keep. A request is rejected by the first filter (FILTERS order) it fails:

    unfinished      require_end_of_turn and the model did not close the turn within max_new_tokens
    empty           nothing but whitespace (the model closed the turn at once)
    marker          contains a chat-template marker: any `<|name|>` token text, one of `markers`, or (added by
                    synthesize_requests) the text of a tokenizer special token: the model ran into the next turn
    too_short       fewer than min_chars characters (after strip)
    too_long        more than max_chars characters
    repetitive      degenerate repetition, by two measures: the occurrences of the most frequent word 3-gram
                    cover more than max_repeat_fraction of the words (texts of >= 6 words, the 3-gram seen
                    at least twice; 1.0 switches this off), or a unit of 1-4 characters (not whitespace) repeats
                    back to back over more than max_char_repeat characters ("!!!!!!...", "hahaha...")
    duplicate       dedupe: same text as an earlier kept request after normalising (lowercase, punctuation to
                    spaces, whitespace collapsed)
    near_duplicate  near_dedupe: shares a key with an earlier kept request: its first near_prefix_words
                    normalised words (0: no prefix key; catches the teacher's stock openings "Can you help me
                    write a ...") or its sorted set of normalised words (catches reorderings and repeats)
    """
    min_chars: int = 12
    max_chars: int = 600
    require_end_of_turn: bool = True
    dedupe: bool = True
    near_dedupe: bool = True
    near_prefix_words: int = 8
    max_repeat_fraction: float = 0.3
    max_char_repeat: int = 16
    markers: tuple[str, ...] = ("<s>", "</s>", "[INST]", "[/INST]", "<<SYS>>")

    def __post_init__(self):
        if not 0 <= self.min_chars <= self.max_chars:
            raise DataError(f"RequestFilter: need 0 <= min_chars ({self.min_chars}) <= max_chars ({self.max_chars})")
        if not 0 < self.max_repeat_fraction <= 1:
            raise DataError(f"RequestFilter: max_repeat_fraction={self.max_repeat_fraction} must be in (0, 1]")
        if self.max_char_repeat < 1 or self.near_prefix_words < 0:
            raise DataError(f"RequestFilter: max_char_repeat={self.max_char_repeat} must be >= 1 and "
                            f"near_prefix_words={self.near_prefix_words} >= 0")
        if isinstance(self.markers, str) or not all(isinstance(m, str) and m for m in self.markers):
            raise DataError(f"RequestFilter: markers={self.markers!r} must be a tuple of non-empty strings")
        object.__setattr__(self, "markers", tuple(self.markers))


def normalize_text(text: str) -> str:
    """Lowercase, punctuation and symbols to spaces, whitespace collapsed: the key exact dedupe compares."""
    text = unicodedata.normalize("NFKC", text).lower()
    text = "".join(" " if unicodedata.category(c)[0] in "PS" else c for c in text)
    return " ".join(text.split())


def repeat_fraction(text: str) -> float:
    """Share of the words covered by the occurrences of the most frequent word 3-gram (0 if none repeats)."""
    words = normalize_text(text).split()
    if len(words) < 6:
        return 0.0
    grams = [tuple(words[i:i + 3]) for i in range(len(words) - 2)]
    top, count = Counter(grams).most_common(1)[0]
    if count < 2:
        return 0.0
    covered = set()
    for i, g in enumerate(grams):
        if g == top:
            covered.update((i, i + 1, i + 2))
    return len(covered) / len(words)


def longest_char_run(text: str) -> int:
    """Length of the longest stretch where a unit of 1-4 characters (not all whitespace) repeats back to back."""
    best = 0
    for m in _RUN_RE.finditer(text):
        if not m.group(1).isspace():
            best = max(best, m.end() - m.start())
    return best


def dedupe_keys(text: str, filt: RequestFilter) -> tuple[list[tuple], list[tuple]]:
    """(exact keys, near keys) of a request under `filt` (empty lists for switched-off filters)."""
    norm = normalize_text(text)
    words = norm.split()
    exact = [("exact", norm)] if filt.dedupe else []
    near = []
    if filt.near_dedupe:
        if filt.near_prefix_words:
            near.append(("prefix", " ".join(words[:filt.near_prefix_words])))
        near.append(("bag", " ".join(sorted(set(words)))))
    return exact, near


def _has_marker(text: str, markers: Iterable[str]) -> bool:
    return bool(_MARKER_RE.search(text)) or any(m in text for m in markers)


def filter_requests(texts: Sequence[str], finished: Sequence[bool], filt: RequestFilter,
                    seen: set | None = None) -> tuple[list[int], dict[str, int]]:
    """Indices of the texts to keep, in order, and how many each filter rejected (every name in FILTERS).

    Deterministic: texts are judged in order, each by the first filter it fails (RequestFilter docstring).
    `seen` holds the dedupe keys of requests kept earlier (e.g. previous batches) and gains those of the
    texts kept here; without it texts are deduplicated only among themselves.
    """
    if len(texts) != len(finished):
        raise DataError(f"filter_requests: {len(texts)} texts but {len(finished)} finished flags")
    seen = set() if seen is None else seen
    counts = dict.fromkeys(FILTERS, 0)
    kept = []
    for i, (raw, done) in enumerate(zip(texts, finished)):
        text = raw.strip()
        exact, near = dedupe_keys(text, filt)
        if filt.require_end_of_turn and not done:
            reason = "unfinished"
        elif not text:
            reason = "empty"
        elif _has_marker(text, filt.markers):
            reason = "marker"
        elif len(text) < filt.min_chars:
            reason = "too_short"
        elif len(text) > filt.max_chars:
            reason = "too_long"
        elif (repeat_fraction(text) > filt.max_repeat_fraction
              or longest_char_run(text) > filt.max_char_repeat):
            reason = "repetitive"
        elif any(k in seen for k in exact):
            reason = "duplicate"
        elif any(k in seen for k in near):
            reason = "near_duplicate"
        else:
            reason = None
        if reason is None:
            kept.append(i)
            seen.update(exact + near)
        else:
            counts[reason] += 1
    return kept, counts


def _advice(rejected: dict[str, int]) -> str:
    ranked = sorted((n, k) for k, n in rejected.items() if n)[::-1]
    return "; ".join(f"{k}: {_ADVICE[k]}" for _, k in ranked[:3]) or "no filter rejected anything"


# ------------------------------------------------------------------------------------------------ files
def _read_jsonl(path: Path, *, repair: bool) -> list[dict[str, Any]]:
    return read_jsonl(path, repair=repair, fix="delete the directory to synthesize again")


def _sampling_dict(s: Sampling | None) -> dict[str, Any] | None:
    return None if s is None else dataclasses.asdict(s)


def _default_generate():
    import l2m_jax
    return l2m_jax.generate


def _resume(out_dir: Path) -> tuple[list[dict], list[dict]]:
    """(complete batch lines, their requests), the files repaired to exactly those."""
    batches = _read_jsonl(out_dir / BATCHES, repair=True)
    if [b.get("batch") for b in batches] != list(range(len(batches))):
        raise DataError(f"{out_dir / BATCHES} does not list batches 0, 1, ... in order; the directory is "
                        "corrupt: delete it to synthesize again")
    rows = _read_jsonl(out_dir / REQUESTS, repair=True)
    done = [r for r in rows if isinstance(r.get("batch"), int) and r["batch"] < len(batches)]
    if len(done) < len(rows):    # requests of the batch in flight when the last run stopped
        tmp = out_dir / (REQUESTS + ".tmp")
        with open(tmp, "w", encoding="utf-8") as f:
            f.writelines(json.dumps(r, ensure_ascii=False) + "\n" for r in done)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, out_dir / REQUESTS)
    if [r.get("index") for r in done] != list(range(len(done))) or len(done) != sum(b["kept"] for b in batches):
        raise DataError(f"{out_dir}: {REQUESTS} does not match {BATCHES} (indices not 0, 1, ... or kept counts "
                        "differ); the directory is corrupt: delete it to synthesize again")
    return batches, done


def _request_stats(batches: list[dict], num_requests: int, new_batches: int) -> dict[str, Any]:
    rejected = dict.fromkeys(FILTERS, 0)
    for b in batches:
        for k, n in b["rejected"].items():
            rejected[k] = rejected.get(k, 0) + n
    tokens = sum(b["tokens"] for b in batches)
    seconds = sum(b["seconds"] for b in batches)
    warm = [b for b in batches if not b["first_in_run"]]     # the first batch of a run includes compilation
    warm_s = sum(b["seconds"] for b in warm)
    kept = sum(b["kept"] for b in batches)
    sampled = sum(b["sampled"] for b in batches)
    return {"requests": kept, "num_requests": num_requests, "complete": kept >= num_requests,
            "batches": len(batches), "new_batches": new_batches, "sampled": sampled,
            "finished": sum(b["finished"] for b in batches), "surplus": sum(b["surplus"] for b in batches),
            "rejected": rejected, "keep_rate": kept / sampled if sampled else 0.0,
            "tokens_generated": tokens, "seconds": seconds, "tokens_per_s": tokens / seconds if seconds else 0.0,
            "tokens_per_s_warm": sum(b["tokens"] for b in warm) / warm_s if warm_s else None}


# ------------------------------------------------------------------------------------------------ phase 1
def synthesize_requests(cfg, params, tokenizer, out_dir: str | os.PathLike, *, num_requests: int,
                        max_new_tokens: int = 64, batch_size: int = 256,
                        sampling: Sampling = Sampling(temperature=1.0, top_p=0.95), seed: int = 0,
                        filt: RequestFilter = RequestFilter(), max_batches: int | None = None,
                        progress: bool = True, generate_fn: Callable | None = None) -> dict[str, Any]:
    """Sample user requests from the teacher's user-turn prefix until `num_requests` pass `filt`; resumable.

    Each batch runs `batch_size` copies of the prefix (int32 [B, L], one shape for every batch, so the default
    `l2m_jax.generate` compiles once) for up to `max_new_tokens`, stopping rows at the user turn's end-of-turn
    token. `generate_fn(cfg, params, prompt_ids, max_new_tokens, sampling=, eos_id=, key=)` -> new token lists
    replaces it (tests). At most `max_batches` batches are drawn in all (default 20 * num_requests /
    batch_size + 5). Files and resume: module docstring. Returns totals over all batches on disk: requests,
    complete, batches, new_batches (this call), sampled, rejected {filter: n}, keep_rate, tokens_generated,
    seconds, tokens_per_s, tokens_per_s_warm (without each run's first, compiling batch).
    """
    import jax
    from tqdm.auto import tqdm

    if num_requests <= 0 or max_new_tokens <= 0 or batch_size <= 0:
        raise DataError(f"num_requests={num_requests}, max_new_tokens={max_new_tokens} and batch_size="
                        f"{batch_size} must be positive")
    if sampling is None or sampling.greedy:
        raise DataError(f"sampling={sampling} is greedy: every row would write the same request; Magpie needs "
                        "sampling, e.g. Sampling(temperature=1.0, top_p=0.95)")
    max_batches = math.ceil(20 * num_requests / batch_size) + 5 if max_batches is None else int(max_batches)
    if max_batches < 1:
        raise DataError(f"max_batches={max_batches} must be >= 1")
    prefix = user_turn_prefix(tokenizer).tolist()
    eos = user_turn_end_id(tokenizer)
    limit = getattr(cfg, "max_position_embeddings", None)
    if limit is not None and len(prefix) + max_new_tokens > limit:
        raise DataError(f"the user-turn prefix ({len(prefix)} tokens) plus max_new_tokens={max_new_tokens} "
                        f"exceeds the model's {limit} positions; lower max_new_tokens")
    # the tokenizer's special tokens are markers too; fixed per tokenizer, so recorded with the settings
    filt = dataclasses.replace(filt, markers=tuple(dict.fromkeys(filt.markers + template_markers(tokenizer))))
    out_dir = Path(out_dir)
    meta = {"num_requests": int(num_requests), "max_new_tokens": int(max_new_tokens),
            "sampling": _sampling_dict(sampling), "seed": int(seed), "filter": dataclasses.asdict(filt),
            "batch_size": int(batch_size), "prefix_ids": prefix, "eos_id": eos}
    check_settings(out_dir, json.loads(json.dumps(meta)), "synthesized requests")
    generate_fn = generate_fn or _default_generate()

    batches, saved = _resume(out_dir)
    seen: set = set()
    for r in saved:
        exact, near = dedupe_keys(r["request"], filt)
        seen.update(exact + near)
    total, new_batches = len(saved), 0
    base_key = jax.random.key(seed)
    bar = tqdm(total=num_requests, initial=total, desc="requests", unit="req", disable=not progress)
    try:
        while total < num_requests and len(batches) < max_batches:
            b = len(batches)
            t0 = time.perf_counter()
            outs = generate_fn(cfg, params, [prefix] * batch_size, max_new_tokens, sampling=sampling, eos_id=eos,
                               key=jax.random.fold_in(base_key, b))
            seconds = time.perf_counter() - t0
            if len(outs) != batch_size:
                raise DataError(f"generate_fn returned {len(outs)} sequences for {batch_size} prompts")
            texts, finished = [], []
            for out in outs:
                if len(out) > max_new_tokens:
                    raise DataError(f"generate_fn returned {len(out)} tokens with max_new_tokens={max_new_tokens}; "
                                    "it must return only the new tokens")
                ids, done = _trim(out, eos)
                # specials stay in the text so that the marker filter sees a model running into the next turn
                texts.append(tokenizer.decode(ids[:-1] if done else ids, skip_special_tokens=False,
                                              clean_up_tokenization_spaces=False).strip())
                finished.append(done)
            kept, rejected = filter_requests(texts, finished, filt, seen)
            surplus = max(0, total + len(kept) - num_requests)
            kept = kept[:len(kept) - surplus]
            append_jsonl(out_dir / REQUESTS, [{"index": total + j, "request": texts[i], "batch": b,
                                                "finished": finished[i]} for j, i in enumerate(kept)])
            line = {"batch": b, "sampled": batch_size, "kept": len(kept), "surplus": surplus,
                    "finished": sum(finished), "rejected": rejected, "tokens": sum(len(o) for o in outs),
                    "seconds": seconds, "first_in_run": new_batches == 0}
            append_jsonl(out_dir / BATCHES, [line])      # the batch is complete once this line is down
            batches.append(line)
            total += len(kept)
            new_batches += 1
            bar.update(len(kept))
            bar.set_postfix(batch=b, kept=f"{len(kept)}/{batch_size}")
    finally:
        bar.close()
    stats = _request_stats(batches, num_requests, new_batches)
    if total == 0:
        raise DataError(f"no request survived the filters in {len(batches)} batches of {batch_size} "
                        f"(max_batches={max_batches}); rejected per filter: {stats['rejected']}. To change: "
                        f"{_advice(stats['rejected'])}")
    if total < num_requests:
        warnings.warn(f"{out_dir}: only {total} of {num_requests} requests after max_batches={max_batches} "
                      f"batches; rejected per filter: {stats['rejected']}. Raise max_batches or: "
                      f"{_advice(stats['rejected'])}", stacklevel=2)
    return stats


def load_requests(out_dir: str | os.PathLike) -> list[dict[str, Any]]:
    """The requests of complete batches in `out_dir`: [{"index", "request", "batch", "finished"}] by index."""
    out_dir = Path(out_dir)
    if not (out_dir / META).exists():
        raise DataError(f"{out_dir} has no {META}: it is not a synthesize_requests directory")
    n_batches = len(_read_jsonl(out_dir / BATCHES, repair=False))
    return [r for r in _read_jsonl(out_dir / REQUESTS, repair=False) if r["batch"] < n_batches]


# ------------------------------------------------------------------------------------------------ phase 2
def _features():
    import datasets as hfd

    ids = hfd.List(hfd.Value("int32"))
    return hfd.Features({"messages": hfd.List({"role": hfd.Value("string"), "content": hfd.Value("string")}),
                         "prompt_ids": ids, "response_ids": ids, "finished": hfd.Value("bool"),
                         "source": hfd.Value("string"), "request_index": hfd.Value("int64"),
                         "index": hfd.Value("int64")})


def _dataset_dir(path: Path) -> Path:
    return path / "dataset" if (path / "dataset" / SYNTH_JSON).exists() else path


def _save_dataset(rows: list[dict[str, Any]], final: Path, info: dict[str, Any], *, progress: bool) -> None:
    """Write the dataset next to `final` and rename it into place: a crash never leaves half a dataset there."""
    from datasets.utils import are_progress_bars_disabled, disable_progress_bars, enable_progress_bars

    quiet = not progress and not are_progress_bars_disabled()
    if quiet:      # datasets' bars are global switches: off for this write only, as the caller asked
        disable_progress_bars()
    try:
        _write_dataset(rows, final, info)
    finally:
        if quiet:
            enable_progress_bars()


def _write_dataset(rows: list[dict[str, Any]], final: Path, info: dict[str, Any]) -> None:
    import datasets as hfd

    for stale in final.parent.glob(f".{final.name}.tmp-*"):     # left by a crash during an earlier write
        shutil.rmtree(stale, ignore_errors=True)
    tmp = final.parent / f".{final.name}.tmp-{os.getpid()}"
    records = [{**r, "prompt_ids": r["prompt_ids"].tolist(), "response_ids": r["response_ids"].tolist()}
               for r in rows]
    hfd.Dataset.from_list(records, features=_features()).save_to_disk(str(tmp))
    write_json(tmp / SYNTH_JSON, info)
    os.replace(tmp, final)


def synthesize_chat(cfg, params, tokenizer, out_dir: str | os.PathLike, *, num_requests: int,
                    request_tokens: int = 64, answer_tokens: int = 128, batch_size: int = 256,
                    request_sampling: Sampling = Sampling(temperature=1.0, top_p=0.95),
                    answer_sampling: Sampling | None = None, answers_per_request: int = 1,
                    seed_prompts: Sequence[str] = (), filt: RequestFilter = RequestFilter(), seed: int = 0,
                    progress: bool = True, max_batches: int | None = None, prompt_bucket: int = 16,
                    generate_fn: Callable | None = None,
                    before_answers: Callable[[], None] | None = None) -> list[dict[str, Any]]:
    """Magpie requests + teacher answers -> a saved chat dataset (module docstring); every phase resumes.

    Prompts answered: `seed_prompts` (source "seed", request_index = position in seed_prompts), then the
    synthesized requests (source "synthesized", request_index = the request's index), each repeated
    `answers_per_request` times (which needs a sampling `answer_sampling`; None is greedy). Answers are
    sampled with seed + 1, so that their keys differ from the requests'. `prompt_bucket` goes to the default
    `l2m_jax.generate` for the answers. A finished dataset with the same settings is loaded, not regenerated.
    Returns rows {"messages", "prompt_ids" int32 [L], "response_ids" int32 [L], "finished", "index",
    "source", "request_index"} by index (the order above), as `load_synthesized` reads them back.
    `before_answers()` is called once the requests are in, before the answers are generated (the recipe waits
    there for the answers' program, compiled in a background thread while the requests were sampled).
    """
    if answers_per_request < 1:
        raise DataError(f"answers_per_request={answers_per_request} must be >= 1")
    if answers_per_request > 1 and (answer_sampling is None or answer_sampling.greedy):
        raise DataError(f"answers_per_request={answers_per_request} with greedy answers would repeat one answer; "
                        "pass answer_sampling=Sampling(temperature=..., ...) or answers_per_request=1")
    if isinstance(seed_prompts, str):
        raise DataError("seed_prompts must be a list of prompt strings, not one string")
    seeds = list(seed_prompts)
    for i, p in enumerate(seeds):
        if not isinstance(p, str) or not p.strip():
            raise DataError(f"seed_prompts[{i}] is {p!r}: every seed prompt must be a non-empty string")
    out_dir = Path(out_dir)
    final = out_dir / "dataset"
    settings = json.loads(json.dumps({
        "num_requests": int(num_requests), "request_tokens": int(request_tokens),
        "answer_tokens": int(answer_tokens), "batch_size": int(batch_size),
        "request_sampling": _sampling_dict(request_sampling), "answer_sampling": _sampling_dict(answer_sampling),
        "answers_per_request": int(answers_per_request), "seed": int(seed), "filter": dataclasses.asdict(filt),
        "max_batches": max_batches, "num_seed_prompts": len(seeds),
        "seed_prompts_sha256": hashlib.sha256(json.dumps(seeds).encode()).hexdigest(),
        "prefix_ids": user_turn_prefix(tokenizer).tolist()}))
    if final.exists():
        if not (final / SYNTH_JSON).exists():
            raise DataError(f"{final} exists but has no {SYNTH_JSON}: it is not a synthesize_chat dataset; "
                            "move it away or use another out_dir")
        old = json.loads((final / SYNTH_JSON).read_text()).get("settings", {})
        diff = sorted(k for k in set(old) | set(settings) if old.get(k) != settings.get(k))
        if diff:
            raise DataError(f"{final} was made with different {diff} ({ {k: old.get(k) for k in diff} } vs "
                            f"{ {k: settings.get(k) for k in diff} }); use a fresh out_dir or the original settings")
        return load_synthesized(final)

    req_stats = synthesize_requests(cfg, params, tokenizer, out_dir / "requests", num_requests=num_requests,
                                    max_new_tokens=request_tokens, batch_size=batch_size, sampling=request_sampling,
                                    seed=seed, filt=filt, max_batches=max_batches, progress=progress,
                                    generate_fn=generate_fn)
    requests = load_requests(out_dir / "requests")
    items = [("seed", i, p) for i, p in enumerate(seeds)] + [("synthesized", r["index"], r["request"])
                                                             for r in requests]
    items = [it for it in items for _ in range(answers_per_request)]
    # sorted by prompt length, batches pad little and share few prompt-length buckets (fewer compilations)
    lengths = [len(encode_chat_prompt(tokenizer, [{"role": "user", "content": t}], where=f"{s} prompt {i}"))
               for s, i, t in items]
    order = sorted(range(len(items)), key=lambda k: (lengths[k], k))
    answers_dir = out_dir / "answers"
    before = ({r["index"] for r in load_pseudo_labels(answers_dir, require_complete=False)}
              if (answers_dir / "meta.json").exists() else set())
    if before_answers is not None:
        before_answers()
    t0 = time.perf_counter()
    ans = generate_pseudo_labels(cfg, params, tokenizer, [items[k][2] for k in order], answers_dir,
                                 max_new_tokens=answer_tokens, batch_size=batch_size, sampling=answer_sampling,
                                 seed=seed + 1, generate_fn=generate_fn, progress=progress,
                                 prompt_bucket=prompt_bucket)
    seconds = time.perf_counter() - t0
    labels = load_pseudo_labels(answers_dir)
    new_tokens = sum(int(r["response_ids"].size) for r in labels if r["index"] not in before)
    rows: list[dict[str, Any]] = [{}] * len(items)
    for r in labels:
        k = order[r["index"]]
        source, request_index, _ = items[k]
        rows[k] = {**r, "index": k, "source": source, "request_index": request_index}
    info = {"format": FORMAT, "settings": settings, "prompt_bucket": int(prompt_bucket),
            "request_eos_id": user_turn_end_id(tokenizer), "answer_eos_id": end_of_turn_id(tokenizer),
            "answer_seed": int(seed) + 1,
            "stats": {"requests": req_stats,
                      "answers": {**ans, "rows": len(rows), "finished": sum(r["finished"] for r in rows),
                                  "tokens_generated_this_run": new_tokens, "seconds_this_run": seconds,
                                  "tokens_per_s": new_tokens / seconds if new_tokens else None}}}
    _save_dataset(rows, final, info, progress=progress)
    return rows


def load_synthesized(path: str | os.PathLike) -> list[dict[str, Any]]:
    """Rows of a synthesize_chat dataset (its out_dir or out_dir/dataset), as synthesize_chat returns them."""
    import datasets as hfd

    d = _dataset_dir(Path(path))
    if not (d / SYNTH_JSON).exists():
        raise DataError(f"{path} is not a synthesize_chat dataset (no {SYNTH_JSON} in it or in its dataset/); "
                        "make one with synthesize_chat")
    try:
        ds = hfd.load_from_disk(str(d))
    except Exception as e:      # datasets raises FileNotFoundError / its own errors for broken directories
        raise DataError(f"{d}: datasets.load_from_disk failed ({e}); the dataset is incomplete: delete "
                        f"{d} and run synthesize_chat again to rebuild it from the saved answers") from e
    need = set(_features())
    if not isinstance(ds, hfd.Dataset) or not need <= set(ds.column_names):
        have = ds.column_names if isinstance(ds, hfd.Dataset) else type(ds).__name__
        raise DataError(f"{d} is not a synthesize_chat dataset: expected columns {sorted(need)}, got {have}")
    rows = [{"messages": [{"role": m["role"], "content": m["content"]} for m in r["messages"]],
             "prompt_ids": np.asarray(r["prompt_ids"], np.int32),
             "response_ids": np.asarray(r["response_ids"], np.int32),
             "finished": bool(r["finished"]), "index": int(r["index"]), "source": r["source"],
             "request_index": int(r["request_index"])} for r in ds]
    return sorted(rows, key=lambda r: r["index"])
