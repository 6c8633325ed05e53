"""experiments.bench_train's jitted steps take every parameter as an argument: no array is closed over, so
XLA never bakes parameters into the program as constants (at Llama-3-8B shapes that was 16 GB of them)."""
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from experiments import bench_train as bt
from l2m_jax.models import init_params
from l2m_jax.train.optim import make_optimizer, split_trainable, trainable_mask

SMALL = 1024  # elements: RoPE frequencies, iotas and scalars are below this; any weight matrix is above it


def _jaxpr_const_sizes(fn, *args) -> list[int]:
    return [int(np.size(c)) for c in jax.make_jaxpr(fn)(*args).consts]


def _hlo_const_sizes(fn, *args) -> list[int]:
    """Element counts of every stablehlo.constant of the lowered (jitted) program."""
    text = jax.jit(fn).lower(*args).as_text()
    shapes = re.findall(r"stablehlo\.constant[^\n]*:\s*tensor<([^>]*)>", text)
    assert shapes, "no constant found: the pattern no longer matches the printed StableHLO"
    return [int(np.prod([int(d) for d in s.split("x")[:-1]], dtype=np.int64)) for s in shapes]


@pytest.fixture(scope="module")
def stage1():
    t_cfg = bt.shapes("tiny")
    s_cfg = bt.student_cfg(t_cfg)
    t_params, s_params = bt.stage1_setup(t_cfg, s_cfg, jax.random.key(0))
    train, frozen = split_trainable(s_params, trainable_mask(s_params, s_cfg, "stage1"))
    opt = bt.stage1_opt()
    state = (train, opt.init(train))
    tokens = jnp.zeros((1, 16), jnp.int32)
    step = bt.stage1_step(t_cfg, s_cfg, opt)
    closed = lambda state, tokens: step(state, frozen, t_params, tokens)  # noqa: E731  the old, closed-over step
    return step, closed, state, frozen, t_params, tokens


def test_stage1_step_has_no_parameter_constants(stage1):
    step, _, state, frozen, teacher, tokens = stage1
    assert max(_jaxpr_const_sizes(step, state, frozen, teacher, tokens), default=0) <= SMALL
    assert max(_hlo_const_sizes(step, state, frozen, teacher, tokens)) <= SMALL


def test_closed_over_stage1_step_is_caught(stage1):
    """The check has teeth: closing over the frozen leaves and the teacher puts them in as constants."""
    _, closed, state, _, teacher, tokens = stage1
    big = teacher["embed"]["embedding"].size
    assert big > SMALL
    assert max(_jaxpr_const_sizes(closed, state, tokens)) >= big
    assert max(_hlo_const_sizes(closed, state, tokens)) >= big


def test_stage1_step_runs(stage1):
    step, _, state, frozen, teacher, tokens = stage1
    (train, _), loss = jax.jit(step)(state, frozen, teacher, tokens)
    assert np.isfinite(float(loss))
    assert jax.tree.structure(train) == jax.tree.structure(state[0])


def test_full_step_has_no_parameter_constants():
    cfg32 = bt.student_cfg(bt.shapes("tiny")).replace(param_dtype="float32")
    params = jax.jit(init_params, static_argnums=0)(cfg32, jax.random.key(0))
    opt = make_optimizer(lr=2e-5, total_steps=10, warmup_steps=1)
    state = (params, opt.init(params))
    tokens, mask = jnp.zeros((1, 16), jnp.int32), jnp.ones((1, 16), bool)
    step = bt.full_step(cfg32, opt)
    assert max(_jaxpr_const_sizes(step, state, tokens, mask), default=0) <= SMALL
    closed = lambda tokens, mask: step(state, tokens, mask)  # noqa: E731
    assert max(_jaxpr_const_sizes(closed, tokens, mask)) >= params["embed"]["embedding"].size
