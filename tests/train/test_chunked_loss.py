"""The chunked losses (train.chunked) equal the whole-logits losses, values and gradients, and their gradient
program holds no [B, L, V] float32 array."""
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import l2m_jax
from l2m_jax.config import ModelConfig
from l2m_jax.models import bind
from l2m_jax.train import chunked, losses
from l2m_jax.train.stages import StageError, distill_loss_fn, dpo_loss_fn, sft_loss_fn

B, L = 2, 40           # B·L > D, so no weight-sized array is as large as a [B, L, V] one
CHUNKS = (7, 8, 40, 64)   # does not divide L, divides L, = L, > L
RTOL, ATOL = 1e-5, 1e-6


def close(a, b):
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
        np.testing.assert_allclose(np.asarray(x), np.asarray(y), rtol=RTOL, atol=ATOL)


@pytest.fixture(scope="module", params=[False, True], ids=["untied", "tied"])
def models(request):
    # V = 131: no other dimension of the tiny model (d_inner = 128, …) equals it: the memory check sees logits only
    t_cfg = ModelConfig.tiny(n_layers=2, vocab_size=131, tie_embeddings=request.param)
    t_params = l2m_jax.init_params(t_cfg, jax.random.key(0))
    s_cfg, s_params = l2m_jax.hybridize(t_cfg, t_params, (1,), "mamba2", jax.random.key(1))
    # the student's head and norms differ from the teacher's, so the KL and its gradient are not ~0
    s_params = jax.tree.map(lambda x: x * 1.1, s_params)
    rng = np.random.default_rng(0)
    tokens = rng.integers(0, t_cfg.vocab_size, (B, L)).astype(np.int32)
    mask = rng.random((B, L)) < 0.7
    mask[:, 1] = True
    other = rng.integers(0, t_cfg.vocab_size, (B, L)).astype(np.int32)
    other_mask = rng.random((B, L)) < 0.5
    other_mask[:, 2] = True
    batch = {"tokens": jnp.asarray(tokens), "loss_mask": jnp.asarray(mask)}
    pairs = {"chosen_tokens": jnp.asarray(tokens), "chosen_mask": jnp.asarray(mask),
             "rejected_tokens": jnp.asarray(other), "rejected_mask": jnp.asarray(other_mask)}
    return (s_cfg, s_params), (t_cfg, t_params), batch, pairs


# ------------------------------------------------------------------------------------------------ pure functions
def test_hidden_and_head_give_forward_logits(models):
    (s_cfg, s_params), _, batch, _ = models
    hidden, head = chunked.hidden_and_head(s_cfg, s_params, batch["tokens"])
    assert hidden.shape == (B, L, s_cfg.d_model) and head.shape == (s_cfg.d_model, s_cfg.vocab_size)
    logits, _ = l2m_jax.forward(s_cfg, s_params, batch["tokens"], checked=False)
    close(chunked._logits(hidden, head), logits)
    close(chunked._logits(hidden, head), bind(s_cfg, s_params).logits(hidden))


@pytest.mark.parametrize("kl_reduction", losses.KL_REDUCTIONS)
@pytest.mark.parametrize("chunk", CHUNKS)
def test_stage1_chunked_equals_stage1_loss(chunk, kl_reduction):
    d, dt, v = 16, 24, 50
    k = jax.random.split(jax.random.key(3), 5)
    s_h, t_h = jax.random.normal(k[0], (B, L, d)), jax.random.normal(k[1], (B, L, dt))
    s_w, t_w = jax.random.normal(k[2], (d, v)) * 0.3, jax.random.normal(k[3], (dt, v)) * 0.3
    targets = jax.random.randint(k[4], (B, L), 0, v)
    mask = jnp.asarray(np.random.default_rng(1).random((B, L)) < 0.6)
    kw = dict(alpha=0.7, beta=0.3, kl_reduction=kl_reduction, temperature=1.5)

    def full(s_h, s_w):
        return losses.stage1_loss(jnp.einsum("BLD,DV->BLV", s_h, s_w), jnp.einsum("BLD,DV->BLV", t_h, t_w),
                                  targets, mask, **kw)

    def part(s_h, s_w):
        return chunked.stage1_loss_chunked(s_h, t_h, s_w, t_w, targets, mask, chunk=chunk, **kw)

    (l_full, m_full), g_full = jax.value_and_grad(full, argnums=(0, 1), has_aux=True)(s_h, s_w)
    (l_part, m_part), g_part = jax.value_and_grad(part, argnums=(0, 1), has_aux=True)(s_h, s_w)
    assert set(m_part) == set(m_full) == {"loss", "ce", "kl", "tokens"}
    close(m_part, m_full)
    close(l_part, l_full)
    close(g_part, g_full)
    lp = chunked.token_logprobs_chunked(s_h, s_w, targets, chunk)
    close(lp, losses.token_logprobs(jnp.einsum("BLD,DV->BLV", s_h, s_w), targets))


def test_bad_chunk_and_shapes():
    h, w, t = jnp.zeros((B, L, 8)), jnp.zeros((8, 10)), jnp.zeros((B, L), jnp.int32)
    for bad in (0, -3, 2.5, True, None):
        with pytest.raises(ValueError, match="chunk"):
            chunked.token_logprobs_chunked(h, w, t, bad)
    with pytest.raises(ValueError, match=r"\[D, V\]"):
        chunked.token_logprobs_chunked(h, jnp.zeros((9, 10)), t, 4)
    with pytest.raises(ValueError, match="reduction"):
        chunked.stage1_loss_chunked(h, h, w, w, t, t > 0, kl_reduction="sum", chunk=4)
    with pytest.raises(StageError, match="loss_chunk"):
        sft_loss_fn(ModelConfig.tiny(), loss_chunk=0)


# ------------------------------------------------------------------------------------------------ the stage loss fns
def _grad(loss_fn, params, trained, batch):
    def objective(p):
        return loss_fn({**params, trained: p}, batch, None)
    return jax.jit(jax.value_and_grad(objective, has_aux=True))(params[trained])


@pytest.mark.parametrize("kl_reduction", losses.KL_REDUCTIONS)
def test_distill_loss_fn_chunked_equals_unchunked(models, kl_reduction):
    (s_cfg, s_params), (t_cfg, t_params), batch, _ = models
    params = {"student": s_params, "teacher": t_params}
    kw = dict(alpha=1.0, beta=0.5, kl_reduction=kl_reduction)
    (loss, metrics), grads = _grad(distill_loss_fn(s_cfg, t_cfg, **kw), params, "student", batch)
    assert float(metrics["kl"]) > 1e-4
    for chunk in (7, 64):
        (c_loss, c_metrics), c_grads = _grad(distill_loss_fn(s_cfg, t_cfg, loss_chunk=chunk, **kw), params,
                                             "student", batch)
        close(c_loss, loss)
        close(c_metrics, metrics)
        close(c_grads, grads)


def test_sft_and_dpo_loss_fns_chunked_equal_unchunked(models):
    (s_cfg, s_params), (t_cfg, t_params), batch, pairs = models
    (loss, metrics), grads = _grad(lambda p, b, r: sft_loss_fn(s_cfg)(p["m"], b, r), {"m": s_params}, "m", batch)
    (c_loss, c_metrics), c_grads = _grad(lambda p, b, r: sft_loss_fn(s_cfg, loss_chunk=7)(p["m"], b, r),
                                         {"m": s_params}, "m", batch)
    close((c_loss, c_metrics, c_grads), (loss, metrics, grads))

    params = {"policy": s_params, "reference": t_params}
    (loss, metrics), grads = _grad(dpo_loss_fn(s_cfg, t_cfg, beta=0.1), params, "policy", pairs)
    (c_loss, c_metrics), c_grads = _grad(dpo_loss_fn(s_cfg, t_cfg, beta=0.1, loss_chunk=7), params, "policy",
                                         pairs)
    assert abs(float(metrics["reward_margin"])) > 0
    close((c_loss, c_metrics, c_grads), (loss, metrics, grads))


# ------------------------------------------------------------------------------------------------ memory
def _avals(jaxpr):
    """Every variable's aval in a jaxpr and the jaxprs nested in its equations (scan, checkpoint, pjit …)."""
    for v in list(jaxpr.invars) + list(jaxpr.constvars):
        yield v.aval
    for eqn in jaxpr.eqns:
        for v in eqn.outvars:
            yield v.aval
        stack = list(eqn.params.values())
        while stack:
            p = stack.pop()
            if hasattr(p, "eqns"):
                yield from _avals(p)
            elif hasattr(p, "jaxpr") and hasattr(p.jaxpr, "eqns"):
                yield from _avals(p.jaxpr)
            elif isinstance(p, (tuple, list)):
                stack.extend(p)


def _logit_sized(fn, params, batch, rows, vocab):
    """fp32 arrays in the gradient program of fn that are [rows, L, V], or as large with V last (stacked chunks)."""
    jaxpr = jax.make_jaxpr(jax.grad(lambda p: fn(p, batch, None)[0]))(params).jaxpr
    found = []
    for a in _avals(jaxpr):
        shape = tuple(getattr(a, "shape", ()))
        if getattr(a, "dtype", None) != jnp.float32 or not shape:
            continue
        if shape == (rows, L, vocab) or (shape[-1] == vocab and math.prod(shape) >= rows * L * vocab):
            found.append(shape)
    return found


def test_chunked_gradient_holds_no_whole_logits(models):
    (s_cfg, s_params), (t_cfg, t_params), batch, pairs = models
    v = s_cfg.vocab_size

    def student_only(fn, teacher_key, teacher):
        return lambda p, b, r: fn({"student" if teacher_key == "teacher" else "policy": p, teacher_key: teacher},
                                  b, r)

    for kl_reduction in losses.KL_REDUCTIONS:
        kw = dict(alpha=1.0, beta=0.5, kl_reduction=kl_reduction)
        assert _logit_sized(student_only(distill_loss_fn(s_cfg, t_cfg, **kw), "teacher", t_params),
                            s_params, batch, B, v)
        assert not _logit_sized(student_only(distill_loss_fn(s_cfg, t_cfg, loss_chunk=8, **kw), "teacher",
                                             t_params), s_params, batch, B, v)
    assert _logit_sized(sft_loss_fn(s_cfg), s_params, batch, B, v)
    assert not _logit_sized(sft_loss_fn(s_cfg, loss_chunk=7), s_params, batch, B, v)
    assert _logit_sized(student_only(dpo_loss_fn(s_cfg, t_cfg, beta=0.1), "reference", t_params),
                        s_params, pairs, 2 * B, v)
    assert not _logit_sized(student_only(dpo_loss_fn(s_cfg, t_cfg, beta=0.1, loss_chunk=8), "reference",
                                         t_params), s_params, pairs, 2 * B, v)


def test_bf16_hidden_states_match_whole_logits():
    """Compute dtype bf16, fp32 head (the Trainer's masters): each chunk's logits are CausalLM.logits' exactly."""
    d, v = 16, 50
    k = jax.random.split(jax.random.key(4), 4)
    s_h = jax.random.normal(k[0], (B, L, d)).astype(jnp.bfloat16)
    t_h = jax.random.normal(k[1], (B, L, d)).astype(jnp.bfloat16)
    s_w, t_w = jax.random.normal(k[2], (d, v)) * 0.3, jax.random.normal(k[3], (d, v)) * 0.3
    targets = jnp.arange(B * L).reshape(B, L) % v
    mask = jnp.ones((B, L), bool)

    def logits(h, w):
        return jnp.einsum("BLD,DV->BLV", h, w.astype(h.dtype), preferred_element_type=jnp.float32)

    def full(s_h, s_w):
        return losses.stage1_loss(logits(s_h, s_w), logits(t_h, t_w), targets, mask)[0]

    def part(s_h, s_w):
        return chunked.stage1_loss_chunked(s_h, t_h, s_w, t_w, targets, mask, chunk=7)[0]

    (l_full, g_full), (l_part, g_part) = (jax.value_and_grad(f, argnums=(0, 1))(s_h, s_w) for f in (full, part))
    np.testing.assert_allclose(float(l_part), float(l_full), rtol=RTOL)
    assert g_part[0].dtype == jnp.bfloat16 and g_part[1].dtype == jnp.float32
    for a, b in zip(g_part, g_full):
        np.testing.assert_allclose(np.asarray(a, np.float32), np.asarray(b, np.float32), rtol=2e-2, atol=1e-4)


def test_stages_take_loss_chunk(models, monkeypatch):
    """distill/sft/dpo_stage thread loss_chunk to their losses; stage 1's first step equals the unchunked one."""
    from l2m_jax.train import optim
    from l2m_jax.train.stages import StageSettings, distill_stage, dpo_stage, sft_stage
    (s_cfg, s_params), teacher, batch, pairs = models
    if s_cfg.tie_embeddings:
        pytest.skip("the stages' plumbing does not depend on the head")
    calls = []
    for name in ("stage1_loss_chunked", "sft_loss_chunked", "sequence_logprobs_chunked"):
        def spy(*a, _f=getattr(chunked, name), _name=name, **kw):
            calls.append(_name)
            return _f(*a, **kw)
        monkeypatch.setattr(chunked, name, spy)
    data = {k: np.asarray(v) for k, v in batch.items()}

    def settings(preset, **kw):
        return StageSettings(steps=1, batch_size=B, progress=False,
                             preset=preset.replace(lr=1e-3, warmup_steps=0, warmup_ratio=None, **kw))

    whole = distill_stage((s_cfg, s_params), teacher, data, settings(optim.STAGE1, kl_weight=0.5))
    assert calls == []
    part = distill_stage((s_cfg, s_params), teacher, data, settings(optim.STAGE1, kl_weight=0.5), loss_chunk=16)
    assert calls == ["stage1_loss_chunked"]
    for key in ("loss", "ce", "kl"):
        np.testing.assert_allclose(part.history[0][key], whole.history[0][key], rtol=RTOL)
    sft_stage((s_cfg, s_params), data, settings(optim.SFT), loss_chunk=16)
    assert calls[1:] == ["sft_loss_chunked"]
    dpo_stage((s_cfg, s_params), teacher, {k: np.asarray(v) for k, v in pairs.items()}, settings(optim.DPO),
              loss_chunk=16)
    assert calls[2:] == ["sequence_logprobs_chunked"] * 2
