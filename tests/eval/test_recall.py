"""The in-context recall probes against transformers' attention weights and logits (torch, eager, fp32)."""
import jax
import numpy as np
import pytest

import l2m_jax
from l2m_jax.convert.hybridize import hybridize
from l2m_jax.eval.recall import (copy_loss, copy_loss_without, induction_scores, previous_token_scores,
                                 repeated_tokens, top_induction_layers)
from l2m_jax.models import attention_probabilities
from tests.models.test_hf_parity import CASES, _hf_model


@pytest.fixture(scope="module", params=["llama-gqa-untied", "mistral-sliding-window"])
def pair(request, tmp_path_factory, torch_cpu):
    """(transformers model, the same model loaded by l2m_jax)."""
    model = _hf_model(torch_cpu, CASES[request.param])
    path = tmp_path_factory.mktemp(request.param)
    model.save_pretrained(path)
    return model, l2m_jax.load(path)


def _hf(model, tokens, torch):
    with torch.no_grad():
        out = model(torch.tensor(np.asarray(tokens, np.int64)), output_attentions=True)
    return [a.numpy() for a in out.attentions], out.logits.numpy()


def test_repeated_tokens():
    t = repeated_tokens(97, rows=3, period=5, seed=1)
    assert t.shape == (3, 10) and t.dtype == np.int32
    np.testing.assert_array_equal(t[:, :5], t[:, 5:])
    assert t.min() >= 97 // 4 and t.max() < 97
    np.testing.assert_array_equal(t, repeated_tokens(97, rows=3, period=5, seed=1))
    assert not np.array_equal(t, repeated_tokens(97, rows=3, period=5, seed=2))
    with pytest.raises(ValueError, match="period=1"):
        repeated_tokens(97, period=1)
    with pytest.raises(ValueError, match="low=96"):
        repeated_tokens(97, low=96)


def test_attention_probabilities_match_transformers(pair, torch_cpu):
    model, (cfg, params) = pair
    tokens = np.random.default_rng(0).integers(0, 97, size=(2, 13))
    ref, _ = _hf(model, tokens, torch_cpu)
    probs = attention_probabilities(cfg, params, tokens)
    assert sorted(probs) == [0, 1, 2]
    for i, p in probs.items():
        assert p.shape == (2, cfg.n_heads, 13, 13) and p.dtype == np.float32
        np.testing.assert_allclose(np.asarray(p), ref[i], atol=2e-6)
    only = attention_probabilities(cfg, params, tokens, layers=[2, 7])
    assert list(only) == [2]


def test_induction_scores_and_copy_loss_match_numpy_on_transformers(pair, torch_cpu):
    model, (cfg, params) = pair
    rows, period = 4, 6
    tokens = repeated_tokens(cfg.vocab_size, rows, period, seed=3)
    attn, logits = _hf(model, tokens, torch_cpu)
    q = np.arange(period, 2 * period)
    want = {i: a[:, :, q, q - period + 1].mean(axis=(0, 2)) for i, a in enumerate(attn)}   # [H] per layer
    got = induction_scores((cfg, params), rows=rows, period=period, seed=3, per_head=True)
    assert sorted(got) == [0, 1, 2]
    for i in got:
        np.testing.assert_allclose(got[i], want[i], atol=2e-6)
    best = induction_scores((cfg, params), rows=rows, period=period, seed=3)
    assert best == pytest.approx({i: float(want[i].max()) for i in want}, abs=2e-6)
    prev = previous_token_scores((cfg, params), rows=rows, period=period, seed=3, per_head=True)
    for i, a in enumerate(attn):
        np.testing.assert_allclose(prev[i], a[:, :, q, q - 1].mean(axis=(0, 2)), atol=2e-6)

    x = logits[:, period:-1].astype(np.float64)
    logp = x - x.max(-1, keepdims=True)
    logp -= np.log(np.exp(logp).sum(-1, keepdims=True))
    nll = -np.take_along_axis(logp, tokens[:, period + 1:, None].astype(np.int64), axis=-1).mean()
    assert copy_loss((cfg, params), rows=rows, period=period, seed=3) == pytest.approx(nll, rel=1e-5)


def test_induction_scores_skip_mamba_layers_and_need_attention(pair):
    _, teacher = pair
    hybrid = hybridize(*teacher, attn_layers=[1], mixer="mamba2")
    assert sorted(induction_scores(hybrid, rows=2, period=4)) == [1]
    none = hybridize(*teacher, attn_layers=[], mixer="mamba2")
    with pytest.raises(ValueError, match="no attention layer"):
        induction_scores(none, rows=2, period=4)
    with pytest.raises(ValueError, match="previous_token_scores: the model has no attention layer"):
        previous_token_scores(none, rows=2, period=4)
    assert np.isfinite(copy_loss(none, rows=2, period=4))


def test_copy_loss_without_a_layer_equals_the_model_with_that_mixers_output_weights_zeroed(pair):
    _, teacher = pair
    hybrid = hybridize(*teacher, attn_layers=[0, 2], mixer="mamba2", key=jax.random.key(1), init="random")
    for cfg, params in (teacher, hybrid):
        probe = dict(rows=2, period=6, seed=4)
        got = copy_loss_without((cfg, params), **probe)
        assert sorted(got) == [0, 1, 2]
        for i, m in enumerate(cfg.layer_mixers):
            out = "o" if m == "attention" else "out_proj"
            mixer = dict(params["layers"][i]["mixer"])
            mixer[out] = {"kernel": np.zeros_like(mixer[out]["kernel"])}
            layers = dict(params["layers"])
            layers[i] = dict(layers[i], mixer=mixer)
            assert got[i] == pytest.approx(copy_loss((cfg, dict(params, layers=layers)), **probe), rel=1e-5)
        assert copy_loss_without((cfg, params), [1], **probe) == {1: got[1]}
    with pytest.raises(ValueError, match="layers \\[3\\]"):
        copy_loss_without(teacher, [3])


def test_top_induction_layers():
    scores = {0: 0.1, 3: 0.9, 5: 0.4, 7: 0.4, 9: 0.05}
    assert top_induction_layers(scores, 3) == [5, 7, 3]
    assert top_induction_layers(scores, 0) == []
    with pytest.raises(ValueError, match="k=6"):
        top_induction_layers(scores, 6)


def test_command_line_prints_scores_and_copy_loss(tmp_path, capsys):
    from l2m_jax.eval import recall

    cfg = l2m_jax.ModelConfig(vocab_size=97, d_model=32, n_layers=2, n_heads=4, n_kv_heads=2, head_dim=8,
                              ffn_dim=48, max_position_embeddings=64)
    model = (cfg, l2m_jax.init_params(cfg, 0))
    l2m_jax.save(tmp_path / "m", *model, format="l2m")
    assert recall.main(["--model", str(tmp_path / "m"), "--rows", "2", "--period", "5", "--top", "1"]) == 0
    out = capsys.readouterr().out
    scores = induction_scores(model, rows=2, period=5)
    assert f"0: {scores[0]:.3f}, 1: {scores[1]:.3f}" in out
    assert f"strongest 1 (weakest of them first): {top_induction_layers(scores, 1)}" in out
    prev = previous_token_scores(model, rows=2, period=5)
    assert f"(strongest head): 0: {prev[0]:.3f}, 1: {prev[1]:.3f}" in out
    assert f"copy NLL (the second copy, nats per token): {copy_loss(model, rows=2, period=5):.4f}" in out
    assert "removed" not in out
    assert recall.main(["--model", str(tmp_path / "m"), "--rows", "2", "--period", "5", "--ablate"]) == 0
    without = copy_loss_without(model, rows=2, period=5)
    assert f"removed: 0: {without[0]:.3f}, 1: {without[1]:.3f}" in capsys.readouterr().out
