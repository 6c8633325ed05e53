"""`python -m l2m_jax.generate`: streamed, sampled, file, chat and speculative modes; errors; SmolLM2 answers."""
import json
import os
import subprocess
import sys
import textwrap

import jax
import pytest

import l2m_jax
from l2m_jax.data.chat import end_of_turn_id
from l2m_jax.infer.speculative import shrink
from l2m_jax.ops.sampling import Sampling
from tests.conftest import save_tiny_chat_teacher

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """The tiny random teacher (and a 2-layer draft cut from it) saved with the byte-level ChatML tokenizer."""
    base = tmp_path_factory.mktemp("tiny")
    t = save_tiny_chat_teacher(base / "teacher")
    draft = str(base / "draft")
    l2m_jax.save(draft, *shrink(t["cfg"], t["params"], [0, 1]), format="l2m")
    t["tok"].save_pretrained(draft)
    return dict(t, draft=draft, eos=end_of_turn_id(t["tok"]), base=base)


def _ids(t, text):
    from l2m_jax.generate import encode_prompt
    return encode_prompt(t["tok"], text)


def _text(t, ids):
    return t["tok"].decode(ids, skip_special_tokens=True)


def _run(argv, capsys):
    from l2m_jax.generate import main
    assert main(argv) == 0
    return capsys.readouterr()


def test_import_keeps_l2m_jax_generate_the_function():
    """Whichever comes first, `l2m_jax.generate(cfg, params, ...)` is the function after the CLI module loads."""
    code = textwrap.dedent("""
        import inspect, jax, l2m_jax
        cfg = l2m_jax.ModelConfig.tiny(vocab_size=32, n_layers=2)
        params = l2m_jax.init_params(cfg, jax.random.key(0))
        want = l2m_jax.generate(cfg, params, [[1, 2, 3]], 4)          # the lazy function attribute
        import l2m_jax.generate
        from l2m_jax.generate import main
        from l2m_jax import generate
        got = l2m_jax.generate(cfg, params, [[1, 2, 3]], 4)
        assert got == generate(cfg, params, [[1, 2, 3]], max_new_tokens=4) == want, (got, want)
        assert len(got[0]) == 4 and all(isinstance(t, int) for t in got[0]) and callable(main)
        assert "max_new_tokens" in inspect.signature(l2m_jax.generate).parameters
        print("ok")
    """)
    env = dict(os.environ, JAX_PLATFORMS="cpu")
    proc = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode == 0 and proc.stdout.strip() == "ok", proc.stderr[-3000:]
    # and in this process, after the import (the rest of the suite keeps calling l2m_jax.generate)
    import l2m_jax.generate  # noqa: F401
    cfg = l2m_jax.ModelConfig.tiny(vocab_size=32, n_layers=2)
    out = l2m_jax.generate(cfg, l2m_jax.init_params(cfg, jax.random.key(0)), [[1, 2, 3]], 4)
    assert len(out) == 1 and len(out[0]) == 4


def test_greedy_stream_equals_generate(tiny, capsys):
    ids = _ids(tiny, "Hello there")
    want = l2m_jax.generate(tiny["cfg"], tiny["params"], [ids], 24, eos_id=tiny["eos"])[0]
    res = _run(["--model", tiny["dir"], "--prompt", "Hello there", "--max-new-tokens", "24"], capsys)
    assert res.out == _text(tiny, want) + "\n"
    assert "tokens/s" in res.err and "first token after" in res.err


def test_sampled_is_seeded_and_reproducible(tiny, capsys):
    argv = ["--model", tiny["dir"], "--prompt", "Tell me", "--max-new-tokens", "16", "--temperature", "0.8",
            "--top-p", "0.95", "--top-k", "50"]
    a = _run(argv + ["--seed", "3"], capsys).out
    b = _run(argv + ["--seed", "3"], capsys).out
    c = _run(argv + ["--seed", "4"], capsys).out
    assert a == b and a != c
    want = l2m_jax.generate(tiny["cfg"], tiny["params"], [_ids(tiny, "Tell me")], 16, eos_id=tiny["eos"],
                            sampling=Sampling(temperature=0.8, top_p=0.95, top_k=50), key=jax.random.key(3))[0]
    assert a == _text(tiny, want) + "\n"


def test_prompts_file_to_jsonl(tiny, tmp_path, capsys):
    prompts = ["first prompt", {"prompt": "second, a longer prompt than the first"},
               {"messages": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"}]}]
    src, dst = tmp_path / "p.jsonl", tmp_path / "out.jsonl"
    src.write_text("".join(json.dumps(p) + "\n" for p in prompts) + "\n")
    res = _run(["--model", tiny["dir"], "--prompts", str(src), "--output", str(dst), "--batch-size", "2",
                "--max-new-tokens", "10"], capsys)
    assert "tokens/s" in res.err and res.out == ""
    rows = [json.loads(line) for line in dst.read_text().splitlines()]
    assert len(rows) == 3
    from l2m_jax.generate import encode_prompt
    for p, row in zip(prompts, rows):
        assert set(row) == {"prompt", "response", "tokens", "finished"}
        q = p if isinstance(p, str) else p.get("prompt", p.get("messages"))
        assert row["prompt"] == q
        want = l2m_jax.generate(tiny["cfg"], tiny["params"], [encode_prompt(tiny["tok"], q)], 10,
                                eos_id=tiny["eos"])[0]
        assert row["tokens"] == want and row["response"] == _text(tiny, want)
        assert row["finished"] == (want[-1] == tiny["eos"])


def test_speculative_equals_greedy_and_reports_acceptance(tiny, capsys):
    ids = _ids(tiny, "Speculate")
    want = l2m_jax.generate(tiny["cfg"], tiny["params"], [ids], 12, eos_id=tiny["eos"])[0]
    res = _run(["--model", tiny["dir"], "--draft", tiny["draft"], "--k", "3", "--prompt", "Speculate",
                "--max-new-tokens", "12"], capsys)
    assert res.out == _text(tiny, want) + "\n"
    assert "acceptance rate" in res.err and "tokens per verifier call" in res.err and "tokens/s" in res.err


def test_chat_keeps_history(tiny):
    """Scripted stdin through `python -m l2m_jax.generate --chat`; turn 2 sees turn 1 in the template."""
    env = dict(os.environ, JAX_PLATFORMS="cpu")
    proc = subprocess.run([sys.executable, "-m", "l2m_jax.generate", "--model", tiny["dir"], "--chat",
                           "--max-new-tokens", "8"], input="Hello\n\nHow are you?\n/exit\nnever read\n",
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-3000:]
    from l2m_jax.generate import encode_prompt
    cfg, params, tok, eos = tiny["cfg"], tiny["params"], tiny["tok"], tiny["eos"]
    history = [{"role": "user", "content": "Hello"}]
    r1 = l2m_jax.generate(cfg, params, [encode_prompt(tok, history)], 8, eos_id=eos,
                          key=jax.random.key(0))[0]
    history += [{"role": "assistant", "content": _text(tiny, r1).strip()}, {"role": "user", "content": "How are you?"}]
    r2 = l2m_jax.generate(cfg, params, [encode_prompt(tok, history)], 8, eos_id=eos)[0]
    assert proc.stdout == _text(tiny, r1) + "\n" + _text(tiny, r2) + "\n"
    assert "tokens/s" in proc.stderr


def test_clear_errors(tiny, tmp_path):
    from l2m_jax.generate import main

    missing = str(tmp_path / "no-model-here")
    with pytest.raises(SystemExit, match=r"--model '.*no-model-here': no such file or directory"):
        main(["--model", missing, "--prompt", "x"])
    bare = str(tmp_path / "bare")
    l2m_jax.save(bare, tiny["cfg"], tiny["params"], format="l2m")
    with pytest.raises(SystemExit, match=r"no tokenizer beside the model in .*bare.*save_pretrained.*--tokenizer"):
        main(["--model", bare, "--prompt", "x"])
    other = str(tmp_path / "other-vocab")
    cfg = tiny["cfg"].replace(vocab_size=300)
    l2m_jax.save(other, cfg, l2m_jax.init_params(cfg, jax.random.key(1)), format="l2m")
    with pytest.raises(SystemExit, match=r"--draft .* vocabulary of 300 tokens but the model has 259"):
        main(["--model", tiny["dir"], "--tokenizer", tiny["dir"], "--draft", other, "--prompt", "x"])
    with pytest.raises(SystemExit, match=r"the prompt is \d+ tokens; .* needs \d+ positions but the model's context "
                                         r"is 256"):
        main(["--model", tiny["dir"], "--prompt", "word " * 60, "--max-new-tokens", "8"])


def test_smollm2_knows_the_capital_of_france(capsys):
    res = _run(["--model", "smollm2", "--prompt", "What is the capital of France?", "--max-new-tokens", "8"], capsys)
    assert "Paris" in res.out, res.out
