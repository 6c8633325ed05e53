import json

import jax
import numpy as np
import pytest

from l2m_jax.config import ModelConfig
from l2m_jax.data.chat import encode_chat_prompt
from l2m_jax.data.pseudo_labels import DataError, generate_pseudo_labels, load_pseudo_labels
from tests.data import tiny_chatml_tokenizer

EOS = 2   # <|im_end|>
PROMPTS = [f"question {i}" for i in range(9)] + [[{"role": "system", "content": "S"},
                                                  {"role": "user", "content": "last one"}]]


@pytest.fixture(scope="module")
def tok():
    return tiny_chatml_tokenizer()


def stub_generate(cfg, params, prompts, max_new_tokens, sampling=None, eos_id=None, key=None):
    """Deterministic answers from the prompt ids; every third prompt runs out of tokens, others end in EOS."""
    outs = []
    for p in prompts:
        s = int(sum(p))
        if s % 3 == 0:
            outs.append([10 + (s + k) % 50 for k in range(max_new_tokens)])
        else:
            n = 1 + s % (max_new_tokens - 1)
            outs.append([10 + (s + k) % 50 for k in range(n)] + [eos_id])
    return outs


def _run(tok, out_dir, generate_fn=stub_generate, prompts=PROMPTS, **kw):
    args = dict(max_new_tokens=6, batch_size=3, shard_size=4, seed=0, generate_fn=generate_fn, progress=False)
    args.update(kw)
    return generate_pseudo_labels(ModelConfig.tiny(), None, tok, prompts, out_dir, **args)


def test_rows_written_and_loaded(tok, tmp_path):
    assert _run(tok, tmp_path) == {"total": 10, "skipped": 0, "generated": 10}
    assert sorted(p.name for p in tmp_path.glob("shard-*")) == ["shard-00000.jsonl", "shard-00001.jsonl",
                                                               "shard-00002.jsonl"]
    rows = load_pseudo_labels(tmp_path)
    assert [r["index"] for r in rows] == list(range(10))
    for r, prompt in zip(rows, PROMPTS):
        msgs = [{"role": "user", "content": prompt}] if isinstance(prompt, str) else prompt
        assert r["messages"][:-1] == msgs and r["messages"][-1]["role"] == "assistant"
        np.testing.assert_array_equal(r["prompt_ids"], encode_chat_prompt(tok, msgs))
        expected = stub_generate(None, None, [r["prompt_ids"].tolist()], 6, eos_id=EOS)[0]
        np.testing.assert_array_equal(r["response_ids"], expected)
        assert r["finished"] == (expected[-1] == EOS)
        assert r["messages"][-1]["content"] == tok.decode(expected, skip_special_tokens=True)


def test_resume_after_crash_and_partial_line(tok, tmp_path):
    reference = tmp_path / "reference"
    _run(tok, reference)
    calls = []

    def crashing(cfg, params, prompts, *a, **k):
        calls.append(len(prompts))
        if len(calls) == 3:
            raise RuntimeError("power cut")
        return stub_generate(cfg, params, prompts, *a, **k)

    out = tmp_path / "run"
    with pytest.raises(RuntimeError, match="power cut"):
        _run(tok, out, crashing)
    assert len(load_pseudo_labels(out, require_complete=False)) == 6
    with pytest.raises(DataError, match="4 of 10 prompts have no label"):
        load_pseudo_labels(out)
    with open(out / "shard-00001.jsonl", "a") as f:      # the crash left half a line behind
        f.write('{"index": 6, "prompt": "quest')
    assert len(load_pseudo_labels(out, require_complete=False)) == 6

    seen = []

    def counting(cfg, params, prompts, *a, **k):
        seen.append(prompts)
        return stub_generate(cfg, params, prompts, *a, **k)

    assert _run(tok, out, counting) == {"total": 10, "skipped": 6, "generated": 4}
    # only prompts 6..9: 6-8, then 9 padded to the batch size with copies of itself
    assert [len(p) for p in seen] == [3, 3] and seen[1] == [seen[1][0]] * 3
    for name in ("shard-00000.jsonl", "shard-00001.jsonl", "shard-00002.jsonl"):
        assert (out / name).read_text() == (reference / name).read_text()
    assert _run(tok, out, counting)["generated"] == 0 and len(seen) == 2


def test_resume_refuses_other_settings_or_prompts(tok, tmp_path):
    _run(tok, tmp_path, prompts=PROMPTS[:4])
    with pytest.raises(DataError, match=r"different \['max_new_tokens'\]"):
        _run(tok, tmp_path, prompts=PROMPTS[:4], max_new_tokens=7)
    with pytest.raises(DataError, match="another prompt list"):
        _run(tok, tmp_path, prompts=["other"] + PROMPTS[1:4])
    (tmp_path / "shard-00000.jsonl").write_text('{"index": 0}\nnot json\n{"index": 1}\n')
    with pytest.raises(DataError, match="line 2 is not valid JSON"):
        load_pseudo_labels(tmp_path, require_complete=False)


def test_bad_inputs(tok, tmp_path):
    with pytest.raises(DataError, match=r"prompts\[1\] is empty"):
        _run(tok, tmp_path / "a", prompts=["fine", "  "])
    with pytest.raises(DataError, match="exceed the model's 256 positions"):
        _run(tok, tmp_path / "b", prompts=["x" * 250])

    def with_prompt(cfg, params, prompts, max_new_tokens, **k):
        return [p + [5] * max_new_tokens for p in prompts]

    with pytest.raises(DataError, match="must return only the new tokens"):
        _run(tok, tmp_path / "c", with_prompt, prompts=["hi"])


def test_real_generate_on_tiny_model(tok, tmp_path):
    import l2m_jax
    from l2m_jax.models import init_params

    cfg = ModelConfig.tiny(vocab_size=len(tok))
    params = init_params(cfg, jax.random.key(0))
    prompts = ["hello", "the cat"]
    generate_pseudo_labels(cfg, params, tok, prompts, tmp_path, max_new_tokens=4, batch_size=2, seed=0,
                           progress=False)
    rows = load_pseudo_labels(tmp_path)
    direct = l2m_jax.generate(cfg, params, [r["prompt_ids"].tolist() for r in rows], 4, eos_id=EOS)
    for r, d in zip(rows, direct):
        np.testing.assert_array_equal(r["response_ids"], d)
        assert 1 <= r["response_ids"].size <= 4
    assert json.loads((tmp_path / "meta.json").read_text())["eos_id"] == EOS


def test_the_last_short_batch_runs_at_the_full_batch_size(tok, tmp_path):
    sizes = []

    def counting(cfg, params, prompts, max_new_tokens, **k):
        sizes.append(len(prompts))
        return stub_generate(cfg, params, prompts, max_new_tokens, **k)

    _run(tok, tmp_path / "a", counting)                         # 10 prompts in batches of 3: one compiled shape
    assert sizes == [3, 3, 3, 3]
    padded = load_pseudo_labels(tmp_path / "a")
    _run(tok, tmp_path / "b", batch_size=10)
    plain = load_pseudo_labels(tmp_path / "b")
    assert [r["response_ids"].tolist() for r in padded] == [r["response_ids"].tolist() for r in plain]
    sizes.clear()
    _run(tok, tmp_path / "c", counting, prompts=PROMPTS[:2])    # a single batch is not padded
    assert sizes == [2]
