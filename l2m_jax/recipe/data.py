"""The recipe's data: the teacher, its chat data (seed prompts + synthesised requests, answered), plain text,
the stage-0/1, SFT and DPO rows, and the held-out evaluation texts.

    teacher_cfg, teacher_params, tok = load_teacher(c)
    rows = chat_rows(c, out, (teacher_cfg, teacher_params), tok)      # resumable, on disk under out/chat
    distill = distill_rows(c, rows, tok)                               # stage 0 and stage 1
    sft = sft_rows(c, rows, tok); train_pairs, heldout_pairs = preference_rows(c, rows, tok)
    texts = heldout_ids(c, tok)                                        # {name: int32 [T]}

`c` is a `RecipeConfig` (or an OmegaConf view of one). Every function logs what it built through `say`; the
row builders also record what the report should show (text sources unavailable, decontamination counts) in
the dict `notes=` when one is given.

With data.decontaminate = n (default 13), every text document, chat conversation and preference pair that
shares an n-token span with a held-out evaluation text (the whole text, `heldout_references`) is dropped
before packing.
"""
from __future__ import annotations

import functools
import hashlib
import time
from pathlib import Path
from typing import Callable

import numpy as np

from .config import UsageError

_T0 = time.perf_counter()


def say(msg: str) -> None:
    """One progress line with the seconds since start-up."""
    print(f"[{time.perf_counter() - _T0:7.1f}s] {msg}", flush=True)


# ------------------------------------------------------------------------------------------------ teacher
CHATML = ("{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + "
          "'<|im_end|>' + '\\n' }}{% endfor %}"
          "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}")


def byte_chatml_tokenizer(specials=("<|endoftext|>", "<|im_start|>", "<|im_end|>")):
    """Byte-level tokenizer (3 ChatML specials, ids 0-2 in this order, + 256 bytes, no merges) for the tiny
    random teacher."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    specials = list(specials)
    vocab = {t: i for i, t in enumerate(specials + sorted(pre_tokenizers.ByteLevel.alphabet()))}
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.add_special_tokens(specials)
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<|im_start|>", eos_token="<|im_end|>",
                                   pad_token="<|endoftext|>", chat_template=CHATML)


def load_teacher(c):
    """(cfg, params, tokenizer); the tokenizer must fit the teacher's vocabulary."""
    import jax

    import l2m_jax

    if c.teacher == "tiny-random":
        tok = byte_chatml_tokenizer() if c.tokenizer is None else l2m_jax.load_tokenizer(c.tokenizer)
        cfg = l2m_jax.ModelConfig.tiny(vocab_size=len(tok), bos_token_id=1, eos_token_id=2, pad_token_id=0,
                                       max_position_embeddings=max(c.data.seq_len, c.eval.window, 256))
        return cfg, l2m_jax.init_params(cfg, jax.random.key(c.seed)), tok
    cfg, params = l2m_jax.load(c.teacher, dtype=c.dtype)
    source = c.tokenizer or c.teacher
    tok = l2m_jax.load_tokenizer(source)
    if len(tok) > cfg.vocab_size:
        raise UsageError(f"tokenizer {source!r} has {len(tok)} tokens but teacher {c.teacher!r} has a vocabulary "
                         f"of {cfg.vocab_size}: they do not belong together; use the teacher's own tokenizer")
    return cfg, params, tok


def special_ids(tok) -> tuple[int, int]:
    """(pad id, end-of-turn id) of the tokenizer's chat format."""
    from l2m_jax.data.chat import end_of_turn_id

    eos = end_of_turn_id(tok)
    return (tok.pad_token_id if tok.pad_token_id is not None else eos), eos


# ------------------------------------------------------------------------------------------------ chat data
def seed_prompts(c, tok) -> list:
    """Seed prompts that leave room for the answer (the ones dropped for length are counted)."""
    from l2m_jax.data.chat import encode_chat_prompt
    from l2m_jax.data.chatterbot import chatterbot_prompts
    from l2m_jax.data.sources import load_rows

    prompts: list = []
    for src in c.data.prompts:
        if src == "chatterbot":
            prompts += chatterbot_prompts()
        else:
            prompts += [r["prompt"] for r in load_rows(src, kind="prompt", limit=c.data.max_prompts)]
    prompts = prompts[:c.data.max_prompts] if c.data.max_prompts else prompts
    if not prompts:
        if c.synth.num_requests:
            return []
        raise UsageError(f"data.prompts {list(c.data.prompts)} gave no prompts")
    limit = c.data.max_prompt_len or c.data.seq_len - c.pseudo_labels.max_new_tokens
    if limit < 1:
        raise UsageError(f"data.seq_len={c.data.seq_len} leaves no room for prompts next to "
                         f"pseudo_labels.max_new_tokens={c.pseudo_labels.max_new_tokens}; set data.max_prompt_len")
    keep = [p for i, p in enumerate(prompts)
            if len(encode_chat_prompt(tok, [{"role": "user", "content": p}], where=f"prompt {i}")) <= limit]
    if len(keep) < len(prompts):
        say(f"chat data: dropped {len(prompts) - len(keep)} of {len(prompts)} seed prompts longer than {limit} "
            "tokens (data.max_prompt_len)")
    if not keep and not c.synth.num_requests:
        raise UsageError(f"every one of the {len(prompts)} prompts is longer than {limit} tokens; raise "
                         "data.max_prompt_len / data.seq_len")
    return keep


def _sampling(temperature: float, top_p: float):
    from l2m_jax.ops.sampling import Sampling

    return None if temperature == 0 else Sampling(temperature=temperature, top_p=top_p)


def chat_rows(c, out: Path, teacher, tok) -> list[dict]:
    """The teacher's chat data: seed prompts and (synth.num_requests > 0) requests it wrote itself, answered.

    Rows {"messages", "prompt_ids", "response_ids", "finished", "index"}; generated once into out/chat
    (resumable) and read back on later runs.
    """
    from l2m_jax.data.pseudo_labels import generate_pseudo_labels, load_pseudo_labels

    prompts = seed_prompts(c, tok)
    pl, sy = c.pseudo_labels, c.synth
    t0 = time.perf_counter()
    if sy.num_requests:
        from l2m_jax.data.synth import RequestFilter, synthesize_chat

        say(f"chat data: the teacher writes {sy.num_requests} requests (Magpie, T={sy.temperature}, "
            f"top-p {sy.top_p}, <= {sy.max_new_tokens} tokens) and answers them and {len(prompts)} seed prompts "
            f"(<= {pl.max_new_tokens} tokens, {pl.answers_per_request} per request)")
        filt = RequestFilter(min_chars=sy.min_chars, max_chars=sy.max_chars,
                             require_end_of_turn=sy.require_end_of_turn)
        ahead = AnswersAhead.start(c, out, teacher, tok, prompts)
        rows = synthesize_chat(teacher[0], teacher[1], tok, out / "chat", num_requests=sy.num_requests,
                               request_tokens=sy.max_new_tokens, answer_tokens=pl.max_new_tokens,
                               batch_size=sy.batch_size, request_sampling=_sampling(sy.temperature, sy.top_p),
                               answer_sampling=_sampling(pl.temperature, pl.top_p),
                               answers_per_request=pl.answers_per_request, seed_prompts=prompts, filt=filt,
                               seed=c.seed, progress=c.progress, prompt_bucket=pl.prompt_bucket,
                               before_answers=None if ahead is None else ahead.join)
        stats = synthesis_stats(out)
        req, ans = stats["requests"], stats["answers"]
        say(f"chat data: {req['requests']} requests kept of {req['sampled']} sampled ({100 * req['keep_rate']:.0f}%; "
            f"rejected {dict((k, v) for k, v in req['rejected'].items() if v)}); teacher tokens/s: requests {req['tokens_per_s']:.0f} "
            f"({req['tokens_per_s_warm'] or 0:.0f} after compiling), answers {ans['tokens_per_s'] or 0:.0f}")
    else:
        if pl.answers_per_request > 1:
            prompts = [p for p in prompts for _ in range(pl.answers_per_request)]
        say(f"chat data: the teacher answers {len(prompts)} seed prompts (<= {pl.max_new_tokens} tokens each)")
        stats = generate_pseudo_labels(teacher[0], teacher[1], tok, prompts, out / "chat" / "answers",
                                       max_new_tokens=pl.max_new_tokens, batch_size=pl.batch_size,
                                       sampling=_sampling(pl.temperature, pl.top_p), seed=c.seed,
                                       progress=c.progress, prompt_bucket=pl.prompt_bucket)
        say(f"chat data: {stats['generated']} answers generated, {stats['skipped']} already on disk")
        rows = load_pseudo_labels(out / "chat" / "answers")
    tokens = sum(r["prompt_ids"].size + r["response_ids"].size for r in rows)
    unfinished = sum(not r["finished"] for r in rows)
    say(f"chat data: {len(rows)} conversations, {tokens} tokens ({unfinished} answers hit max_new_tokens) in "
        f"{time.perf_counter() - t0:.0f}s")
    return rows


class AnswersAhead:
    """Compiles the program that answers the synthesised requests (`l2m_jax.generate` at the answers' batch,
    prompt bucket and length) in a daemon thread while the requests are sampled, into JAX's persistent
    compilation cache; `join` waits for it before the answers start, so they load it instead of compiling.
    The longest prompt is estimated from the seed prompts and the chat template around a request of
    synth.max_new_tokens tokens; a guess off by a bucket only costs the compile it would have saved. The
    tokenizer is used here, before the thread starts, never beside the requests' decoding."""

    def __init__(self, c, teacher, batch: int, longest: int, eos_id: int):
        import threading

        self._thread = threading.Thread(target=self._work, args=(c, teacher, batch, longest, eos_id),
                                        name="compile-ahead-answers", daemon=True)
        self._thread.start()

    @classmethod
    def start(cls, c, out: Path, teacher, tok, prompts) -> "AnswersAhead | None":
        """One started, or None where compiling ahead is off, the cache is off or the answers are on disk."""
        import jax

        from l2m_jax.data.chat import encode_chat_prompt, end_of_turn_id

        done = (Path(out) / "chat" / "dataset").exists()
        if not getattr(c, "compile_ahead", True) or not jax.config.jax_compilation_cache_dir or done:
            return None
        pl, sy = c.pseudo_labels, c.synth
        around = len(encode_chat_prompt(tok, [{"role": "user", "content": "x"}])) - 1
        longest = max([around + sy.max_new_tokens]
                      + [len(encode_chat_prompt(tok, [{"role": "user", "content": p}])) for p in prompts])
        n = (len(prompts) + sy.num_requests) * pl.answers_per_request
        return cls(c, teacher, min(sy.batch_size, n), longest, end_of_turn_id(tok))

    def _work(self, c, teacher, batch: int, longest: int, eos_id: int) -> None:
        from l2m_jax.infer.generate import precompile_generate

        t0 = time.perf_counter()
        try:
            pl = c.pseudo_labels
            precompile_generate(*teacher, batch, longest, pl.max_new_tokens, _sampling(pl.temperature, pl.top_p),
                                eos_id, prompt_bucket=pl.prompt_bucket)
            say(f"compile ahead: the answers' generation compiled in {time.perf_counter() - t0:.1f}s")
        except Exception as e:                               # never fails the run
            say(f"compile ahead: the answers' generation not compiled ahead ({type(e).__name__}: {e})")

    def join(self) -> None:
        t0 = time.perf_counter()
        self._thread.join()
        if time.perf_counter() - t0 > 1.0:
            say(f"chat data: waited {time.perf_counter() - t0:.0f}s for the answers' program to finish compiling")


def synthesis_stats(out: Path) -> dict | None:
    """The synthesis run's own statistics (out/chat/dataset/l2m_synth.json), or None without synthesis."""
    import json

    path = Path(out) / "chat" / "dataset" / "l2m_synth.json"
    return json.loads(path.read_text())["stats"] if path.exists() else None


def label_examples(rows: list[dict], *, loss_on_prompts: bool) -> list:
    """(ids, target mask) per conversation: the teacher's exact tokens; the prompt too if loss_on_prompts."""
    return [(np.concatenate([r["prompt_ids"], r["response_ids"]]),
             np.concatenate([np.full(r["prompt_ids"].size, loss_on_prompts), np.ones(r["response_ids"].size, bool)]))
            for r in rows]


def _rows(c, what: str, examples: list, pad_id: int) -> dict:
    from l2m_jax.data.packing import pack_sequences, pad_batch

    if c.data.packing:
        # the end-of-turn that closes every conversation already separates it from the next
        arrays, stats = pack_sequences(examples, c.data.seq_len, pad_id, drop_last=len(examples) > 1)
    else:
        arrays, stats = pad_batch(examples, c.data.seq_len, pad_id, truncate=c.data.truncate)
    say(f"{what} data: {stats.summary()}")
    return {k: arrays[k] for k in ("tokens", "loss_mask")}


# ------------------------------------------------------------------------------------------ decontamination
def heldout_references(tok) -> list[np.ndarray]:
    """int32 [T] token ids of every bundled held-out text, whole (not only the eval.tokens scored)."""
    from l2m_jax.assets import heldout_texts

    return [np.asarray(tok.encode(t, add_special_tokens=False), np.int32) for t in heldout_texts().values()]


def heldout_filter(c, tok, notes: dict | None = None) -> Callable[[str, list], np.ndarray] | None:
    """`keep(what, items) -> bool [len(items)]` dropping the items (token arrays, or tuples of arrays) that share
    a data.decontaminate-token span with a held-out text and, with data.screen_books, those sharing
    prose.SCREEN_WORDS words in a row with the books the held-out texts come from (the whole KJV, Austen's
    novels: `prose.screen_books()`, kept beside the prose when it is fetched; where they are not there, that is
    said and noted); logging and noting the counts; None when both are off."""
    from l2m_jax.data.text import ngram_overlap

    n = c.data.decontaminate
    books = _screen_refs(c, notes) if c.data.screen_books else None
    if not n and books is None:
        return None
    refs = heldout_references(tok) if n else None

    def keep(what: str, items: list) -> np.ndarray:
        parts = [x if isinstance(x, tuple) else (x,) for x in items]
        flat = [np.asarray(a) for p in parts for a in p]
        owner = np.repeat(np.arange(len(parts)), [len(p) for p in parts])
        bad = np.zeros(len(parts), bool)
        if n:
            np.logical_or.at(bad, owner, ngram_overlap(flat, refs, n))
            tokens = int(sum(a.size for a, o in zip(flat, owner) if bad[o]))
            say(f"{what}: decontamination dropped {int(bad.sum())} of {len(parts)} that share a {n}-token span "
                f"with a held-out text ({tokens} tokens)")
            if notes is not None:
                notes.setdefault("decontamination", {"ngram": int(n)})[what] = {
                    "dropped": int(bad.sum()), "of": len(parts), "tokens": tokens}
        if books is not None:
            from l2m_jax.data.prose import SCREEN_WORDS, screen_records

            texts = [tok.decode(a.tolist()) for a in flat]
            hit = ~np.asarray(screen_records(texts, books), bool)
            screened = np.zeros(len(parts), bool)
            np.logical_or.at(screened, owner, hit)
            screened &= ~bad
            bad |= screened
            say(f"{what}: screening dropped {int(screened.sum())} more of {len(parts)} that share "
                f"{SCREEN_WORDS} words in a row with the KJV or an Austen novel")
            if notes is not None:
                notes["screening"][what] = {"dropped": int(screened.sum()), "of": len(parts)}
        return ~bad

    return keep


def _screen_refs(c, notes: dict | None):
    """The held-out texts' books as `prose.book_word_ids` (read once per process), or None (noted) where they
    are not beside the prose; with data.text=prose, the prose (and with it the books) is fetched first."""
    from l2m_jax.data import prose

    paths = prose.screen_books()
    if paths is None and "prose" in [str(t) for t in c.data.text]:
        try:
            prose.ensure_prose()                   # fetching the prose brings the books
            paths = prose.ensure_books()           # a cache of the prose without them
        except prose.FetchError:
            pass                                   # text_specs says why, once, when it asks for the prose
    if notes is not None:       # one entry for the run: every data builder adds its counts to it
        notes.setdefault("screening", {}).update(words=prose.SCREEN_WORDS,
                                                 books=[p.stem for p in paths] if paths else None)
    if paths is None:
        say("screening against the held-out texts' books: they are not there (they come with data.text=prose, "
            "or `python -m experiments.fetch_texts`); only the held-out excerpts are screened")
        return None
    return _book_refs(tuple(str(p) for p in paths), tuple(p.stat().st_mtime_ns for p in paths))


@functools.lru_cache(maxsize=2)
def _book_refs(paths: tuple[str, ...], mtimes: tuple[int, ...]):
    from l2m_jax.data.prose import book_word_ids

    return book_word_ids([Path(p).read_text(encoding="utf-8") for p in paths])


def _kept(examples: list, keep: np.ndarray) -> list:
    return [e for e, k in zip(examples, keep) if k]


# ------------------------------------------------------------------------------------------------ rows
PROSE_FIX = ("run `python -m experiments.fetch_texts --out DIR` and pass data.text=[DIR], or data.text=[] to "
             "train on chat only")


def text_specs(c, notes: dict | None = None) -> list[str]:
    """data.text with the entry `prose` replaced by `ensure_prose()`'s files; without them (a FetchError) the
    entry is left out with one logged line, and notes["text_unavailable"] says why."""
    from l2m_jax.data.prose import FetchError, ensure_prose

    if notes is not None:
        notes.pop("text_unavailable", None)    # a note of an earlier build
    specs = []
    for spec in c.data.text:
        if str(spec) != "prose":
            specs.append(str(spec))
            continue
        try:
            specs += [str(p) for p in ensure_prose()]
        except FetchError as e:
            why = " ".join(str(e).split())
            rest = "the other data.text sources" if len(c.data.text) > 1 else "chat data only"
            say(f"stage-1 text data: data.text=prose is unavailable ({why}); to fix: {PROSE_FIX}; continuing with "
                f"{rest}")
            if notes is not None:
                notes["text_unavailable"] = {"spec": "prose", "error": why, "fix": PROSE_FIX}
    return specs


def distill_rows(c, rows: list[dict], tok, notes: dict | None = None, *, teacher=None, out=None) -> dict:
    """Stage-0/1 rows {"tokens", "loss_mask"} [N, seq_len]: chat data and plain text mixed by data.mix.

    data.text's entry `prose` is `ensure_prose()`'s files; when they cannot be fetched the run goes on without
    them (`text_specs`). Conversations and documents overlapping a held-out text are dropped (`heldout_filter`),
    and so are rows the teacher wrote (data.mix.teacher_text, which needs `teacher` and keeps them in
    out/teacher_text: `teacher_rows`).
    """
    from l2m_jax.data.text import mix_rows, repeat_rows, text_rows

    pad_id, eos_id = special_ids(tok)
    keep = heldout_filter(c, tok, notes)
    sources = {}
    if c.data.mix.get("chat", 0) > 0:
        examples = label_examples(rows, loss_on_prompts=c.data.loss_on_prompts)
        if keep:
            examples = _kept(examples, keep("stage-1 chat conversations", [ids for ids, _ in examples]))
        sources["chat"] = _rows(c, "stage-1 chat", examples, pad_id)
    wants_teacher = c.data.mix.get("teacher_text", 0) > 0
    wants_text = (c.data.mix.get("text", 0) > 0 or c.data.mix.get("repeat", 0) > 0
                  or (wants_teacher and c.data.teacher_text_prefix > 0))
    specs = text_specs(c, notes) if c.data.text and wants_text else []
    text = None
    if specs:
        doc_filter = (lambda docs: keep("stage-1 text documents", docs)) if keep else None
        arrays, stats = text_rows(tok, specs, c.data.seq_len, eos_id=eos_id, pad_id=pad_id,
                                  max_tokens=c.data.text_max_tokens, seed=c.seed, doc_filter=doc_filter)
        say(f"stage-1 text data ({', '.join(specs)}): {stats.summary()}")
        text = {k: arrays[k] for k in ("tokens", "loss_mask")}
        if c.data.mix.get("text", 0) > 0:
            sources["text"] = text
        if c.data.mix.get("repeat", 0) > 0:
            period = c.data.repeat_period or c.data.seq_len // 2
            sources["repeat"] = repeat_rows(text, period, seed=c.seed + 1)
            say(f"stage-1 repeat data: {len(text['tokens'])} rows, each a {period}-token span of the text repeated")
    if wants_teacher:
        made = teacher_rows(c, teacher, text, eos_id, out)
        if keep:
            kept = keep("stage-1 teacher text rows", list(made["tokens"]))       # once, not once per key
            made = {k: v[kept] for k, v in made.items()}
        if len(made["tokens"]):
            sources["teacher_text"] = made
    if not sources:
        raise UsageError(f"stage 1 has no data: data.mix={dict(c.data.mix)} weighs only text, and data.text "
                         f"{list(c.data.text)} gave none; run `python -m experiments.fetch_texts --out DIR` and "
                         "pass data.text=[DIR], or give chat a weight (data.mix.chat=1)")
    if len(sources) == 1:
        return next(iter(sources.values()))
    mixed, info = mix_rows(sources, {k: float(c.data.mix[k]) for k in sources}, seed=c.seed)
    parts = [f"{k} {v['rows']} rows ({v['repeats']} repeated)" for k, v in info["sources"].items()]
    say(f"stage-1 data: {len(mixed['tokens'])} rows mixed by {dict(c.data.mix)}: {', '.join(parts)}")
    return mixed


def teacher_rows(c, teacher, text: dict | None, start_id: int, out=None) -> dict:
    """data.teacher_text_rows rows the teacher writes (`data.teacher_text.teacher_text_rows`), each opening with
    the first data.teacher_text_prefix tokens of a row of `text` (in a permutation drawn with the seed), sampled
    with synth.temperature / synth.top_p in batches of pseudo_labels.batch_size; kept in out/teacher_text when
    `out` is given, and read back from there by a run with the same settings."""
    from l2m_jax.data.teacher_text import cached_teacher_text_rows, teacher_text_rows
    from l2m_jax.ops.sampling import Sampling

    d = c.data
    if teacher is None:
        raise UsageError("data.mix.teacher_text > 0 needs the teacher to write rows; pass teacher= to distill_rows")
    prefix = d.teacher_text_prefix
    if prefix and text is None:
        raise UsageError("data.teacher_text_prefix > 0 opens the teacher's rows with data.text rows, and data.text "
                         f"{list(d.text)} gave none; set data.teacher_text_prefix=0 or give a text source")
    prefixes = [[]]
    if prefix:
        order = np.random.default_rng(c.seed + 2).permutation(len(text["tokens"]))
        prefixes = [text["tokens"][i, :prefix].tolist() for i in order[:d.teacher_text_rows]]
    sampling = Sampling(temperature=c.synth.temperature, top_p=c.synth.top_p)
    # what the rows depend on: the prefixes themselves (not the text settings that made them) and the batches,
    # which fold the key
    digest = hashlib.sha256(np.asarray([t for p in prefixes for t in p] + [len(prefixes)], np.int64)).hexdigest()
    settings = {"teacher": str(c.teacher), "rows": d.teacher_text_rows, "seq_len": d.seq_len, "prefixes": digest,
                "temperature": sampling.temperature, "top_p": sampling.top_p, "seed": c.seed,
                "batch_size": c.pseudo_labels.batch_size, "start_id": int(start_id)}

    def make():
        t0 = time.perf_counter()
        rows = teacher_text_rows(teacher, prefixes, d.seq_len, rows=d.teacher_text_rows, sampling=sampling,
                                 start_id=start_id, batch_size=c.pseudo_labels.batch_size, seed=c.seed, say=say)
        say(f"teacher text: {d.teacher_text_rows} rows of {d.seq_len} tokens in {time.perf_counter() - t0:.0f}s")
        return rows

    if out is None:
        return make()
    return cached_teacher_text_rows(Path(out) / "teacher_text", settings, make, say=say)


def sft_rows(c, rows: list[dict], tok, notes: dict | None = None) -> dict:
    """SFT rows: the teacher's answers (response tokens are targets) and any chat datasets named."""
    from l2m_jax.data.chat import encode_prompt_response
    from l2m_jax.data.chatterbot import chatterbot_rows
    from l2m_jax.data.sources import load_rows

    pad_id, _ = special_ids(tok)
    examples = []
    for src in c.data.sft:
        if src == "pseudo_labels":
            examples += label_examples(rows, loss_on_prompts=False)
            continue
        data = chatterbot_rows() if src == "chatterbot" else load_rows(src, kind="chat", limit=c.data.max_sft_rows)
        data = data[:c.data.max_sft_rows] if c.data.max_sft_rows else data
        examples += [encode_prompt_response(tok, r["messages"], where=f"{src} row {i}") for i, r in enumerate(data)]
    if not examples:
        raise UsageError(f"data.sft {list(c.data.sft)} gave no conversations")
    keep = heldout_filter(c, tok, notes)
    if keep:
        examples = _kept(examples, keep("SFT conversations", [ids for ids, _ in examples]))
        if not examples:
            raise UsageError(f"data.sft {list(c.data.sft)}: every conversation overlaps a held-out text")
    return _rows(c, "SFT", examples, pad_id)


def preference_rows(c, rows: list[dict], tok, notes: dict | None = None) -> tuple[dict, dict | None]:
    """(DPO arrays, held-out DPO arrays or None): data.heldout_preferences of the pairs never train."""
    from l2m_jax.data.chat import DataError
    from l2m_jax.data.preference import encode_preference, synthetic_preferences
    from l2m_jax.data.sources import load_rows
    from l2m_jax.train.stages import preference_arrays

    pad_id, _ = special_ids(tok)
    triples = []
    for src in c.data.preferences:
        if src == "synthetic":
            answered = [r for r in rows if r["messages"][-1]["content"].strip()]
            if len(answered) < len(rows):
                say(f"DPO data: {len(rows) - len(answered)} conversations with an empty answer left out")
            data = synthetic_preferences(answered, seed=c.seed, mode=c.data.synthetic_mode)
        else:
            data = load_rows(src, kind="preference", limit=c.data.max_preference_rows)
        triples += [(src, i, r) for i, r in enumerate(data[:c.data.max_preference_rows or None])]
    max_len = c.dpo.max_len or c.data.seq_len
    max_prompt = c.dpo.max_prompt_len or max_len // 2
    encoded, cut = [], 0
    for src, i, t in triples:
        try:
            e = encode_preference(tok, t["prompt"], t["chosen"], t["rejected"], max_len=max_len,
                                  max_prompt_len=max_prompt)
        except DataError as err:
            raise DataError(f"{src} preference row {i}: {err}") from err
        cut += e["truncated_prompt"] or e["truncated_response"]
        encoded.append(e)
    keep = heldout_filter(c, tok, notes)
    if keep:
        encoded = _kept(encoded, keep("DPO preference pairs", [(e["chosen_ids"], e["rejected_ids"]) for e in encoded]))
    order = np.random.default_rng([c.seed, 7]).permutation(len(encoded))
    n_held = int(round(c.data.heldout_preferences * len(encoded)))
    if n_held and len(encoded) - n_held < c.dpo.batch_size:
        n_held = max(0, len(encoded) - c.dpo.batch_size)
    held = [encoded[i] for i in order[:n_held]]
    train = [encoded[i] for i in order[n_held:]]
    say(f"DPO data: {len(train)} preference pairs to train on, {len(held)} held out, of at most {max_len} tokens "
        f"({cut} truncated, TRL-style)")
    return (preference_arrays(train, max_len, pad_id),
            preference_arrays(held, max_len, pad_id) if held else None)


# ------------------------------------------------------------------------------------------------ evaluation
def heldout_ids(c, tok) -> dict[str, np.ndarray]:
    """{name: int32 [T]}: the first eval.tokens tokens of each held-out text (names of assets.heldout_texts)."""
    from l2m_jax.assets import heldout_texts

    known = heldout_texts()
    out = {}
    for name in c.eval.texts:
        if name not in known:
            raise UsageError(f"eval.texts: no held-out text {name!r}; choose from {sorted(known)}")
        ids = np.asarray(tok.encode(known[name], add_special_tokens=False), np.int32)[:c.eval.tokens]
        if ids.size < 2:
            raise UsageError(f"the held-out text {name!r} gave fewer than 2 tokens")
        out[name] = ids
    return out


def calibration_tokens(c, distill: dict) -> np.ndarray:
    """The first calibration_rows stage-1 rows (training data, never held-out text): int32 [B, L]."""
    return np.asarray(distill["tokens"][:c.calibration_rows])


