import json

import jax
import numpy as np
import pytest

import l2m_jax
from l2m_jax.recipe.data import byte_chatml_tokenizer
from l2m_jax.data.chat import DataError, TemplateError, encode_chat_prompt, encode_text, render_chat
from l2m_jax.data.synth import (FILTERS, RequestFilter, filter_requests, load_requests, load_synthesized,
                                longest_char_run, repeat_fraction, synthesize_chat, synthesize_requests,
                                user_turn_end_id, user_turn_prefix)
from l2m_jax.ops.sampling import Sampling

EOS = 2   # <|im_end|>
SAMPLING = Sampling(temperature=1.0, top_p=0.95)


@pytest.fixture(scope="module")
def tok():
    return byte_chatml_tokenizer()


@pytest.fixture(scope="module")
def teacher(tok):
    cfg = l2m_jax.ModelConfig.tiny(vocab_size=len(tok), bos_token_id=1, eos_token_id=2, pad_token_id=0,
                                   max_position_embeddings=256)
    return cfg, l2m_jax.init_params(cfg, jax.random.key(0))


# ------------------------------------------------------------------------------------------------ prefix
def test_prefix_is_the_start_of_a_rendered_conversation(tok):
    prefix = user_turn_prefix(tok)
    assert prefix.dtype == np.int32 and tok.decode(prefix.tolist()) == "<|im_start|>user\n"
    conv = [{"role": "user", "content": "Hello there"}, {"role": "assistant", "content": "Hi"}]
    ids = encode_text(tok, render_chat(tok, conv, add_generation_prompt=False))
    assert ids[:len(prefix)] == prefix.tolist() and len(ids) > len(prefix)
    assert user_turn_end_id(tok) == EOS


def test_prefix_keeps_the_default_system_prompt_and_refuses_odd_templates():
    tok = byte_chatml_tokenizer()
    tok.chat_template = ("{% if messages[0]['role'] != 'system' %}"
                         "{{ '<|im_start|>system\\nYou are kind.<|im_end|>\\n' }}{% endif %}" + tok.chat_template)
    prefix = tok.decode(user_turn_prefix(tok).tolist())
    assert prefix == "<|im_start|>system\nYou are kind.<|im_end|>\n<|im_start|>user\n"
    assert render_chat(tok, [{"role": "user", "content": "Q"}], add_generation_prompt=True).startswith(prefix)
    tok.chat_template = "{% for m in messages %}<|im_start|>{{ m['role'] }}\nhidden<|im_end|>\n{% endfor %}"
    with pytest.raises(TemplateError, match="verbatim"):
        user_turn_prefix(tok)


# ------------------------------------------------------------------------------------------------ filters
def _reasons(texts, finished=None, filt=RequestFilter(), seen=None):
    """The filter that rejected each text (None: kept), recovered from single-text calls sharing `seen`."""
    finished = [True] * len(texts) if finished is None else finished
    seen = set() if seen is None else seen
    out = []
    for t, f in zip(texts, finished):
        kept, counts = filter_requests([t], [f], filt, seen)
        assert sum(counts.values()) + len(kept) == 1
        out.append(None if kept else next(k for k, n in counts.items() if n))
    return out


def test_each_filter_rejects_its_case():
    ok = "Please explain how photosynthesis works."
    cases = {
        "too_short": "Hi there",
        "too_long": "Tell me " + "about many things, " * 40,
        "empty": "   \n ",
        "marker": "Write a poem.<|im_start|>assistant",
        "repetitive": "the cat sat on the cat sat on the cat sat on the mat",
    }
    for name, text in cases.items():
        assert _reasons([text]) == [name], name
    assert _reasons([ok], [False]) == ["unfinished"]
    assert _reasons([ok], [False], RequestFilter(require_end_of_turn=False)) == [None]
    assert _reasons(["Help me please!!!!!!!!!!!!!!!!!!!!", "hahahahahahahahaha is that funny?"]) == ["repetitive"] * 2
    assert _reasons(["What does [INST] mean in Llama 2?"]) == ["marker"]
    # legitimate look-alikes survive: one repeated 3-gram in a long request, code indentation, Elixir's pipe
    long_ok = ("I want to learn Python. What is the best way to learn Python if I already know some Java "
               "and a little bit of C from school?")
    assert repeat_fraction(long_ok) <= 0.3
    assert _reasons([long_ok, "Fix this code:\n" + " " * 24 + "x = 1", "Explain the |> operator in Elixir"]) \
        == [None, None, None]


def test_dedupe_exact_and_near():
    texts = ["What is the capital of France?",
             "what is   the capital of FRANCE",                              # exact after normalising
             "Can you help me write a short story about a dragon?",
             "Can you help me write a short story about a knight and a castle?",   # same first 8 words
             "France: what is the capital of?",                              # same word set, reordered
             "Name three rivers that flow through Germany."]
    assert _reasons(texts) == [None, "duplicate", None, "near_duplicate", "near_duplicate", None]
    off = RequestFilter(dedupe=False, near_dedupe=False)
    assert _reasons(texts, filt=off) == [None] * 6
    assert _reasons(texts, filt=RequestFilter(near_prefix_words=0)) == [None, "duplicate", None, None,
                                                                        "near_duplicate", None]


def test_filter_requests_counts_are_deterministic_and_seen_carries_over():
    texts = ["Hi", "What is the capital of France?", "What is the capital of France?", "x" * 700,
             "Tell me a story about a brave little robot.", "unfinished but long enough"]
    finished = [True, True, True, True, True, False]
    kept, counts = filter_requests(texts, finished, RequestFilter())
    assert kept == [1, 4]
    assert counts == {**dict.fromkeys(FILTERS, 0), "too_short": 1, "duplicate": 1, "too_long": 1, "unfinished": 1}
    assert list(counts) == list(FILTERS)
    assert filter_requests(texts, finished, RequestFilter()) == (kept, counts)
    seen = set()
    filter_requests(texts, finished, RequestFilter(), seen)
    kept2, counts2 = filter_requests(texts[1:2], [True], RequestFilter(), seen)
    assert kept2 == [] and counts2["duplicate"] == 1
    assert longest_char_run("abcabcabcabc!") == 12
    with pytest.raises(DataError, match="2 texts but 1 finished"):
        filter_requests(["a", "b"], [True], RequestFilter())
    with pytest.raises(DataError, match="min_chars"):
        RequestFilter(min_chars=10, max_chars=5)


# ------------------------------------------------------------------------------------------------ phase 1, scripted
BATCH = 6


def _batch_of(key, seed=0):
    data = np.asarray(jax.random.key_data(key)).tolist()
    for b in range(200):
        if np.asarray(jax.random.key_data(jax.random.fold_in(jax.random.key(seed), b))).tolist() == data:
            return b
    raise AssertionError("key is not fold_in(key(seed), b)")


def _scripted_texts(b):
    """(text, closes the turn) per row of batch b: two survivors in batch 0, one in every later batch."""
    return [(f"Please explain topic number {b} in simple terms.", True),
            ("What is the capital of France?", True),                             # duplicate after batch 0
            ("Hi", True),                                                         # too short
            ("How do I bake bread at home without an oven", False),               # unfinished
            (f"please explain topic number {b} in simple terms, with examples", True),   # near duplicate
            ("<|im_start|>assistant\nSure, here is", True)]                       # marker


class Scripted:
    """A generate_fn returning fixed token lists per batch (batch found from the key); can crash on call n."""

    def __init__(self, tok, crash_on=None):
        self.tok, self.crash_on, self.calls = tok, crash_on, []

    def __call__(self, cfg, params, prompts, max_new_tokens, sampling=None, eos_id=None, key=None, **kw):
        b = _batch_of(key)
        self.calls.append(b)
        if len(self.calls) == self.crash_on:
            raise RuntimeError("power cut")
        assert len({tuple(p) for p in prompts}) == 1 and len(prompts) == BATCH
        outs = []
        for text, done in _scripted_texts(b):
            ids = encode_text(self.tok, text)[:max_new_tokens - 1]
            outs.append(ids + [eos_id] if done else ids)
        return outs


def _requests(tok, out, gen, **kw):
    args = dict(num_requests=5, max_new_tokens=60, batch_size=BATCH, sampling=SAMPLING, seed=0,
                progress=False, generate_fn=gen)
    args.update(kw)
    return synthesize_requests(None, None, tok, out, **args)


def test_scripted_synthesis_filters_and_stops(tok, tmp_path):
    gen = Scripted(tok)
    stats = _requests(tok, tmp_path, gen)
    assert gen.calls == [0, 1, 2, 3]                          # 2 + 1 + 1 + 1 = 5 requests
    reqs = load_requests(tmp_path)
    assert [r["request"] for r in reqs] == ["Please explain topic number 0 in simple terms.",
                                            "What is the capital of France?"] + \
        [f"Please explain topic number {b} in simple terms." for b in (1, 2, 3)]
    assert [r["index"] for r in reqs] == list(range(5)) and [r["batch"] for r in reqs] == [0, 0, 1, 2, 3]
    assert stats["requests"] == 5 and stats["complete"] and stats["batches"] == 4 and stats["sampled"] == 24
    assert stats["rejected"] == {**dict.fromkeys(FILTERS, 0), "too_short": 4, "unfinished": 4,
                                 "near_duplicate": 4, "marker": 4, "duplicate": 3}
    assert stats["tokens_generated"] > 0 and stats["tokens_per_s"] > 0
    lines = [json.loads(x) for x in (tmp_path / "batches.jsonl").read_text().splitlines()]
    assert [x["kept"] for x in lines] == [2, 1, 1, 1] and lines[1]["rejected"]["duplicate"] == 1
    assert [x["first_in_run"] for x in lines] == [True, False, False, False]
    # stopping exactly at num_requests: batch 0 has two survivors, one is surplus
    one = _requests(tok, tmp_path / "one", Scripted(tok), num_requests=1)
    assert one["requests"] == 1 and one["surplus"] == 1 and len(load_requests(tmp_path / "one")) == 1
    # done: a rerun draws nothing
    again = Scripted(tok)
    assert _requests(tok, tmp_path, again)["new_batches"] == 0 and again.calls == []


def test_resume_after_crash_matches_uninterrupted_run(tok, tmp_path):
    ref = tmp_path / "ref"
    _requests(tok, ref, Scripted(tok))
    out = tmp_path / "run"
    with pytest.raises(RuntimeError, match="power cut"):
        _requests(tok, out, Scripted(tok, crash_on=3))
    assert len(load_requests(out)) == 3
    # the crash hit between a batch's requests and its batches.jsonl line, mid-way through a request line
    with open(out / "requests.jsonl", "a") as f:
        f.write(json.dumps({"index": 3, "request": "Please explain topic number 2 in simple terms.",
                            "batch": 2, "finished": True}) + "\n")
        f.write('{"index": 4, "request": "What is the ca')
    with open(out / "batches.jsonl", "a") as f:
        f.write('{"batch": 2, "sampled": 6, "ke')
    assert len(load_requests(out)) == 3
    gen = Scripted(tok)
    stats = _requests(tok, out, gen)
    assert gen.calls == [2, 3] and stats["new_batches"] == 2 and stats["requests"] == 5
    assert (out / "requests.jsonl").read_text() == (ref / "requests.jsonl").read_text()
    texts = [r["request"] for r in load_requests(out)]
    assert len(set(texts)) == len(texts) == 5
    ref_lines = [json.loads(x) for x in (ref / "batches.jsonl").read_text().splitlines()]
    lines = [json.loads(x) for x in (out / "batches.jsonl").read_text().splitlines()]
    strip = ("seconds", "first_in_run")
    assert [{k: v for k, v in x.items() if k not in strip} for x in lines] == \
        [{k: v for k, v in x.items() if k not in strip} for x in ref_lines]
    assert [x["first_in_run"] for x in lines] == [True, False, True, False]


def test_settings_refused_and_all_filtered(tok, tmp_path):
    _requests(tok, tmp_path / "a", Scripted(tok), num_requests=2)
    with pytest.raises(DataError, match=r"different \['max_new_tokens'\]"):
        _requests(tok, tmp_path / "a", Scripted(tok), num_requests=2, max_new_tokens=61)
    with pytest.raises(DataError, match=r"different \['filter'\]"):
        _requests(tok, tmp_path / "a", Scripted(tok), num_requests=2, filt=RequestFilter(min_chars=3))
    with pytest.raises(DataError, match=r"no request survived the filters in 2 batches.*'marker': 2, 'too_short': 8.*"
                                        r"lower RequestFilter.min_chars"):
        _requests(tok, tmp_path / "b", Scripted(tok), filt=RequestFilter(min_chars=590), max_batches=2)
    with pytest.raises(DataError, match="greedy"):
        _requests(tok, tmp_path / "c", Scripted(tok), sampling=Sampling())
    with pytest.warns(UserWarning, match="only 3 of 50 requests after max_batches=2"):
        stats = _requests(tok, tmp_path / "d", Scripted(tok), num_requests=50, max_batches=2)
    assert not stats["complete"]


# ------------------------------------------------------------------------------------------------ real teacher
def test_real_sampling_with_tiny_teacher(tok, teacher, tmp_path):
    from l2m_jax.infer.generate import _generate

    cfg, params = teacher
    filt = RequestFilter(min_chars=1, require_end_of_turn=False, max_repeat_fraction=1.0, max_char_repeat=100,
                         near_dedupe=False)
    compiled = _generate._cache_size()
    stats = synthesize_requests(cfg, params, tok, tmp_path, num_requests=12, max_new_tokens=11, batch_size=8,
                                sampling=SAMPLING, seed=3, filt=filt, progress=False)
    assert stats["batches"] >= 2 and stats["requests"] == 12
    assert _generate._cache_size() - compiled == 1              # every batch reuses one compiled program
    # batch 0's requests are exactly the filtered decodes of l2m_jax.generate with fold_in(key(seed), 0)
    prefix = user_turn_prefix(tok).tolist()
    outs = l2m_jax.generate(cfg, params, [prefix] * 8, 11, sampling=SAMPLING, eos_id=EOS,
                            key=jax.random.fold_in(jax.random.key(3), 0))
    texts = [tok.decode(o[:-1] if o[-1] == EOS else o, skip_special_tokens=False,
                        clean_up_tokenization_spaces=False).strip() for o in outs]
    filt = json.loads((tmp_path / "meta.json").read_text())["filter"]
    kept, _ = filter_requests(texts, [o[-1] == EOS for o in outs], RequestFilter(**filt))
    saved = [r["request"] for r in load_requests(tmp_path) if r["batch"] == 0]
    assert saved == [texts[i] for i in kept] and len(saved) > 0
    assert len({tuple(o) for o in outs}) > 1                    # rows sample independently


def _chat(tok, teacher, out, **kw):
    cfg, params = teacher
    args = dict(num_requests=3, request_tokens=8, answer_tokens=4, batch_size=4, seed_prompts=["hello there", "why?"],
                filt=RequestFilter(min_chars=1, require_end_of_turn=False, max_repeat_fraction=1.0,
                                   max_char_repeat=100, near_dedupe=False), progress=False)
    args.update(kw)
    return synthesize_chat(cfg, params, tok, out, **args)


def test_synthesize_chat_end_to_end(tok, teacher, tmp_path):
    rows = _chat(tok, teacher, tmp_path)
    assert [r["index"] for r in rows] == list(range(5))
    assert [(r["source"], r["request_index"]) for r in rows] == [("seed", 0), ("seed", 1), ("synthesized", 0),
                                                                 ("synthesized", 1), ("synthesized", 2)]
    requests = [r["request"] for r in load_requests(tmp_path / "requests")]
    cfg, params = teacher
    direct = l2m_jax.generate(cfg, params, [r["prompt_ids"].tolist() for r in rows], 4, eos_id=EOS)
    for r, prompt, greedy in zip(rows, ["hello there", "why?"] + requests, direct):
        user = [{"role": "user", "content": prompt}]
        assert r["messages"][0] == user[0] and r["messages"][1]["role"] == "assistant"
        np.testing.assert_array_equal(r["prompt_ids"], encode_chat_prompt(tok, user))
        np.testing.assert_array_equal(r["response_ids"], greedy)   # the answer belongs to this row's prompt
        assert r["response_ids"].dtype == np.int32 and r["finished"] == (greedy[-1] == EOS)
    for loaded in (load_synthesized(tmp_path), load_synthesized(tmp_path / "dataset")):
        assert len(loaded) == len(rows)
        for a, b in zip(loaded, rows):
            assert a["messages"] == b["messages"] and a.keys() == b.keys()
            assert {k: a[k] for k in ("finished", "source", "request_index", "index")} == \
                {k: b[k] for k in ("finished", "source", "request_index", "index")}
            np.testing.assert_array_equal(a["prompt_ids"], b["prompt_ids"])
            np.testing.assert_array_equal(a["response_ids"], b["response_ids"])
            assert a["prompt_ids"].dtype == np.int32
    info = json.loads((tmp_path / "dataset" / "l2m_synth.json").read_text())
    assert info["settings"]["answer_tokens"] == 4 and info["settings"]["request_sampling"]["top_p"] == 0.95
    assert info["stats"]["requests"]["tokens_per_s"] > 0 and info["stats"]["answers"]["tokens_per_s"] > 0

    def no_generation(*a, **k):
        raise AssertionError("a rerun must not generate")

    again = _chat(tok, teacher, tmp_path, generate_fn=no_generation)
    assert [r["messages"] for r in again] == [r["messages"] for r in rows]
    # a crash after the answers, before the dataset: rebuilt from the saved phases without generating
    import shutil
    shutil.rmtree(tmp_path / "dataset")
    rebuilt = _chat(tok, teacher, tmp_path, generate_fn=no_generation)
    assert [r["response_ids"].tolist() for r in rebuilt] == [r["response_ids"].tolist() for r in rows]
    with pytest.raises(DataError, match=r"different \['answer_tokens'\]"):
        _chat(tok, teacher, tmp_path, answer_tokens=5)
    with pytest.raises(DataError, match="greedy answers"):
        _chat(tok, teacher, tmp_path / "x", answers_per_request=2)
    with pytest.raises(DataError, match="not a synthesize_chat dataset"):
        load_synthesized(tmp_path / "requests")


WORDS = "alpha bravo charlie delta echo foxtrot golf hotel india juliet kilo lima mike november oscar".split()


def test_synthesize_chat_sorts_by_length_and_maps_answers_back(tok, tmp_path):
    def fake(cfg, params, prompts, max_new_tokens, sampling=None, eos_id=None, key=None, **kw):
        if len({tuple(p) for p in prompts}) == 1 and len(prompts[0]) == 6:       # the request phase
            b = _batch_of(key)
            texts = [f"Request {b}-{i}: " + " ".join(WORDS[:3 * i + b + 2]) for i in range(len(prompts))]
            return [encode_text(tok, t)[:max_new_tokens - 1] + [eos_id] for t in texts]
        fake.answer_batches.append([len(p) for p in prompts])
        # answers depend on the prompt and on the row's place (a stand-in for sampling noise)
        return [[3 + sum(p) % 200, 3 + j, eos_id] for j, p in enumerate(prompts)]

    fake.answer_batches = []
    rows = _chat(tok, (l2m_jax.ModelConfig.tiny(vocab_size=len(tok)), None), tmp_path, generate_fn=fake,
                 num_requests=4, request_tokens=40, answers_per_request=2, answer_sampling=SAMPLING,
                 seed_prompts=["a much longer seed prompt than the others", "hi"],
                 filt=RequestFilter(near_dedupe=False))
    flat = [n for b in fake.answer_batches for n in b]
    assert flat == sorted(flat) and len(flat) == 12                  # answered shortest first
    assert [(r["source"], r["request_index"]) for r in rows] == \
        [(s, i) for s, i in [("seed", 0), ("seed", 1)] + [("synthesized", k) for k in range(4)] for _ in (0, 1)]
    requests = [r["request"] for r in load_requests(tmp_path / "requests")]
    seeds = ["a much longer seed prompt than the others", "hi"]
    for r in rows:
        assert r["messages"][0]["content"] == (seeds if r["source"] == "seed" else requests)[r["request_index"]]
        assert r["response_ids"][0] == 3 + int(r["prompt_ids"].sum()) % 200
        np.testing.assert_array_equal(r["prompt_ids"], encode_chat_prompt(tok, r["messages"][:1]))
    for a, b in zip(rows[::2], rows[1::2]):                          # the two answers to one prompt
        assert a["messages"][0] == b["messages"][0]
    assert [r["messages"] for r in load_synthesized(tmp_path)] == [r["messages"] for r in rows]


def test_prompt_bucket_reaches_generate(tok, teacher, tmp_path, monkeypatch):
    import l2m_jax.infer.generate as gen_mod
    from l2m_jax.data.pseudo_labels import generate_pseudo_labels
    from l2m_jax.infer.common import pad_prompts

    cfg, params = teacher
    assert pad_prompts(cfg, [[5, 6, 7]], bucket=40)[0].shape == (1, 40)
    assert pad_prompts(cfg, [[5, 6, 7]])[0].shape == (1, 16)
    prompts = [[5, 6, 7], [8] * 20]
    assert l2m_jax.generate(cfg, params, prompts, 3, prompt_bucket=64) == l2m_jax.generate(cfg, params, prompts, 3)
    seen = []

    def recorder(cfg, params, prompts, max_new_tokens, **kw):
        seen.append(kw.get("prompt_bucket"))
        return [[EOS]] * len(prompts)

    monkeypatch.setattr(gen_mod, "generate", recorder)     # what the default generate_fn resolves to
    generate_pseudo_labels(cfg, params, tok, ["hi", "there"], tmp_path, max_new_tokens=2, batch_size=1,
                           prompt_bucket=32, progress=False)
    assert seen == [32, 32]
