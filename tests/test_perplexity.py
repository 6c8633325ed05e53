"""Perplexity: windowed scoring against torch's NLL on the real teacher, the CLI on the bundled held-out text,
and input errors. The teacher is fetched once into the l2m_jax cache."""
import re

import numpy as np
import pytest

import l2m_jax
from l2m_jax import assets
from l2m_jax.config import ModelConfig
from l2m_jax.eval.perplexity import main, perplexity


def test_heldout_text_is_bundled_prose():
    text = assets.heldout_text()
    assert text.startswith("Vanity was the beginning and the end of Sir Walter Elliot's character")
    assert len(text) > 5000 and text.count("\n\n") == 9  # ten paragraphs, the source note left out
    assert "#" not in text


@pytest.fixture(scope="module")
def teacher():
    cfg, params = l2m_jax.load("smollm2")
    return cfg, params, l2m_jax.load_tokenizer("smollm2")


def test_windowed_perplexity_matches_torch(teacher, torch_cpu):
    from transformers import LlamaForCausalLM

    cfg, params, tokenizer = teacher
    ids = tokenizer.encode(assets.heldout_text())[:80]
    # windows [0, 32), [31, 63), [62, 80): every token after the first scored once; the last one is padded
    n, ppl = perplexity(cfg, params, ids, window=32)
    ref_model = LlamaForCausalLM.from_pretrained(str(assets.smollm2_hf_dir())).eval()
    nll = []
    with torch_cpu.no_grad():
        for start in range(0, len(ids) - 1, 31):
            chunk = torch_cpu.tensor([ids[start:start + 32]])
            logp = torch_cpu.log_softmax(ref_model(chunk).logits[0, :-1].double(), dim=-1)
            nll += (-logp.gather(-1, chunk[0, 1:, None])[:, 0]).tolist()
    assert n == len(nll) == 79
    np.testing.assert_allclose(ppl, np.exp(np.mean(nll)), rtol=1e-4)
    # a longer context can only help on average; a single window sees it all
    n_full, ppl_full = perplexity(cfg, params, ids, max_tokens=len(ids))
    assert n_full == 79 and ppl_full < ppl


def test_cli_on_heldout_text(capsys):
    assert main(["--model", "smollm2", "--max-tokens", "200"]) == 0
    out = capsys.readouterr().out
    assert "text: bundled held-out text" in out
    assert re.search(r"^tokens scored: 199$", out, re.M), out
    ppl = float(re.search(r"^perplexity: ([0-9.]+)$", out, re.M).group(1))
    assert 1.0 < ppl < 100.0, f"perplexity {ppl} on English prose"


def test_cli_bad_paths(tmp_path, capsys):
    with pytest.raises(SystemExit, match=r"error: model path .*nowhere' does not exist"):
        main(["--model", str(tmp_path / "nowhere")])
    with pytest.raises(SystemExit, match=r"error: --text .*missing.txt' is not a file"):
        main(["--model", "smollm2", "--text", str(tmp_path / "missing.txt")])


def test_bad_inputs_raise():
    cfg = ModelConfig.tiny()  # validation happens before any forward pass: no parameters needed
    with pytest.raises(ValueError, match="at least 2"):
        perplexity(cfg, None, [5])
    with pytest.raises(ValueError, match="max_tokens=1"):
        perplexity(cfg, None, [5, 6, 7], max_tokens=1)
    with pytest.raises(ValueError, match=r"lie in \[0, 128\)"):
        perplexity(cfg, None, [5, 128])
    with pytest.raises(ValueError, match=r"window=257 must lie in \[2, 256\]"):
        perplexity(cfg, None, [5, 6, 7], window=257)
    with pytest.raises(ValueError, match="1-D sequence"):
        perplexity(cfg, None, [[5, 6]])
