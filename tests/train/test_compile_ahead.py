"""Compile ahead: a stage's train step compiled from abstract inputs (no data, no weights) is the very program
the real stage compiles, so with JAX's persistent compilation cache on the real stage loads it (a cache hit).

Each test counts, per compiled module, the persistent cache's hits and writes (JAX logs both with the module's
name); the train step is the module `jit__train_step`. A lowering that differed in anything (function, dtypes,
shardings, donation, optimizer constants, batch shapes) would miss and write a second entry.
"""
import contextlib
import logging
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import l2m_jax
from l2m_jax import parallel
from l2m_jax.recipe import ahead as recipe_ahead
from l2m_jax.recipe import run as recipe
from l2m_jax.recipe.config import (DataConfig, DpoConfig, EvalConfig, RecipeConfig, SftConfig, Stage0Config,
                                   Stage1Config)
from l2m_jax.recipe.data import load_teacher
from l2m_jax.train import optim, stages
from l2m_jax.train.align import layer_nmse
from l2m_jax.train.loop import ArrayBatches, Trainer, precompile_step
from tests.train.test_loop import TOY_MASK, toy_arrays, toy_loss, toy_params

STEP = "jit__train_step"
L = 32


class _CacheLog(logging.Handler):
    """Module names of the persistent cache's hits and writes, from JAX's debug log."""

    def __init__(self):
        super().__init__(logging.DEBUG)
        self.hits, self.writes = [], []

    def emit(self, record):
        m = record.getMessage()
        hit = re.match(r"Persistent compilation cache hit for '([^']+)'", m)
        write = re.match(r"Writing (\S+) to persistent compilation cache", m)
        if hit:
            self.hits.append(hit.group(1))
        if write:
            self.writes.append(write.group(1))

    def count(self, module=STEP):
        return self.hits.count(module), self.writes.count(module)


@contextlib.contextmanager
def persistent_cache(directory):
    """JAX's persistent compilation cache in `directory`, caching every program (on CPU too); restored after."""
    from jax._src import compilation_cache

    names = ("jax_compilation_cache_dir", "jax_persistent_cache_min_compile_time_secs",
             "jax_persistent_cache_min_entry_size_bytes")
    old = {n: getattr(jax.config, n) for n in names}
    loggers = [logging.getLogger("jax._src.compiler"), logging.getLogger("jax._src.compilation_cache")]
    levels = [lg.level for lg in loggers]
    handler = _CacheLog()
    jax.config.update("jax_compilation_cache_dir", str(directory))
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
    jax.config.update("jax_persistent_cache_min_entry_size_bytes", -1)
    compilation_cache.reset_cache()        # whether the cache is used is decided once per process
    for lg in loggers:
        lg.setLevel(logging.DEBUG)
        lg.addHandler(handler)
    try:
        yield handler
    finally:
        for lg, level in zip(loggers, levels):
            lg.removeHandler(handler)
            lg.setLevel(level)
        for n, v in old.items():
            jax.config.update(n, v)
        compilation_cache.reset_cache()


def test_precompiled_trainer_step_is_a_cache_hit(tmp_path):
    tx = lambda: optim.make_optimizer(lr=0.05, clip_norm=1.0, warmup_steps=1, total_steps=8, accum_steps=2)  # noqa: E731
    abstract = jax.eval_shape(lambda: toy_params())
    arrays = toy_arrays()
    with persistent_cache(tmp_path / "xla") as cache:
        precompile_step(toy_loss, abstract, TOY_MASK, tx(), parallel.make_mesh(), {k: v[:4] for k, v in arrays.items()},
                        rng=7)
        assert cache.count() == (0, 1)
        trainer = Trainer(toy_loss, toy_params(), TOY_MASK, tx(), progress=False, rng=7)
        trainer.fit(ArrayBatches(arrays, 4), 3)
        assert cache.count() == (1, 1)
        # another learning rate is another program: the test sees a differing lowering
        other = optim.make_optimizer(lr=0.01, clip_norm=1.0, warmup_steps=1, total_steps=8, accum_steps=2)
        Trainer(toy_loss, toy_params(), TOY_MASK, other, progress=False, rng=7).fit(ArrayBatches(arrays, 4), 1)
        assert cache.count() == (1, 2)


def test_trainer_runs_the_precompiled_executables_and_falls_back_to_its_own_step():
    """use_precompiled hands a Trainer the executables precompile_step made from abstract inputs: every step
    runs through them, with the weights and metrics of a Trainer that compiled its own step; executables that
    fit nothing (another batch size) leave the Trainer on its own jitted step."""
    from l2m_jax.train.loop import use_precompiled

    tx = lambda: optim.make_optimizer(lr=0.05, clip_norm=1.0, warmup_steps=1, total_steps=8, accum_steps=2)  # noqa: E731
    abstract = jax.eval_shape(lambda: toy_params())
    arrays = toy_arrays()
    mesh = parallel.make_mesh()
    own = Trainer(toy_loss, toy_params(), TOY_MASK, tx(), mesh, progress=False, rng=7)
    want = own.fit(ArrayBatches(arrays, 4), 3)
    for rows, used in ((4, 3), (2, 0)):
        batch = {k: v[:rows] for k, v in arrays.items()}
        executables = precompile_step(toy_loss, abstract, TOY_MASK, tx(), mesh, batch, rng=7)
        with use_precompiled(executables):
            trainer = Trainer(toy_loss, toy_params(), TOY_MASK, tx(), mesh, progress=False, rng=7)
        got = trainer.fit(ArrayBatches(arrays, 4), 3)
        assert trainer._step_fn.used == used
        assert [h["loss"] for h in got] == [h["loss"] for h in want]
        for a, b in zip(jax.tree.leaves(trainer.state.trainable), jax.tree.leaves(own.state.trainable)):
            np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    assert not isinstance(Trainer(toy_loss, toy_params(), TOY_MASK, tx(), mesh, progress=False)._step_fn,
                          type(trainer._step_fn))          # outside use_precompiled: its own step


# ------------------------------------------------------------------------------------------------ the recipe
class FakeRun:
    """The parts of recipe.Run the stages read, with random data instead of the teacher's chat data."""

    def __init__(self, c, mesh=None):
        self.c = c
        t_cfg, t_params, _ = load_teacher(c)
        self.teacher = (t_cfg, jax.tree.map(lambda x: x.astype(jnp.bfloat16), t_params))   # frozen bf16 teacher
        self.mesh = parallel.make_mesh() if mesh is None else mesh
        r = np.random.default_rng(0)
        tokens = lambda: r.integers(3, t_cfg.vocab_size, (8, L)).astype(np.int32)  # noqa: E731
        mask = lambda: r.random((8, L)) < 0.7  # noqa: E731
        self.texts = {"text": r.integers(3, t_cfg.vocab_size, 100), "other": r.integers(3, t_cfg.vocab_size, 40)}
        self._data = {"stage1": {"tokens": tokens(), "loss_mask": mask()},
                      "sft": {"tokens": tokens(), "loss_mask": mask()},
                      "dpo": ({"chosen_tokens": tokens(), "chosen_mask": mask(), "rejected_tokens": tokens(),
                               "rejected_mask": mask()}, None)}
        if c.stage1.teacher_cache:                   # as Run.data builds it
            self._data["stage1"] = recipe.with_teacher_hidden(c, self.teacher, self._data["stage1"])

    def data(self, kind):
        if kind == "stage0" or (kind == "sft" and self.c.sft.loss == "kd"):
            kind = "stage1"
        return self._data[kind]

    def evaluate(self, name, cfg, params):
        return {}

    def copy_nll(self, name, cfg, params):
        return 0.0


def tiny_config(**kw):
    kw.setdefault("stage0", Stage0Config(steps=2, batch_size=2))
    kw.setdefault("stage1", Stage1Config(attn_fractions=[0.5], steps=2, batch_size=2))
    kw.setdefault("sft", SftConfig(attn_fractions=[0.25], steps=2, batch_size=2))
    kw.setdefault("dpo", DpoConfig(steps=2, batch_size=2))
    return RecipeConfig(teacher="tiny-random", progress=False, data=DataConfig(seq_len=L), **kw)


def models_along(run, plan):
    """The real student entering each planned stage, converted as the recipe converts it, untrained."""
    student, out = run.teacher, []
    for i, stage in enumerate(plan):
        student = recipe.convert(run, i, stage, student)
        out.append(student)
    return out


def tree_spec(tree):
    leaves, treedef = jax.tree_util.tree_flatten(jax.eval_shape(lambda t: t, tree))
    return treedef, [(x.shape, x.dtype) for x in leaves]


@pytest.mark.parametrize("init", ["calibrated", "mil"])
def test_abstract_conversion_matches_the_real_one(init):
    c = tiny_config(init=init, sft=SftConfig(attn_fractions=[0.5, 0.0], steps=2, batch_size=2))
    run = FakeRun(c)
    plan = recipe.make_plan(c, run.teacher[0].n_layers)
    assert [p.kind for p in plan] == ["stage0", "stage1", "sft", "sft", "dpo"]
    abstract = recipe_ahead.abstract_model(run.teacher)
    for i, (stage, (cfg, params)) in enumerate(zip(plan, models_along(run, plan))):
        abstract = recipe_ahead.convert_abstract(c, i, stage, abstract)
        assert abstract[0] == cfg, stage.name
        assert tree_spec(abstract[1]) == tree_spec(params), stage.name
        assert all(isinstance(x, jax.ShapeDtypeStruct) for x in jax.tree.leaves(abstract[1]))
    # the frozen trunk keeps the teacher's bf16, fresh mixers start in the model's param dtype
    dtypes = {x.dtype for x in jax.tree.leaves(abstract[1])}
    assert jnp.dtype(jnp.bfloat16) in dtypes


def _precompile(run, plan, index, model):
    c = run.c
    stage = plan[index]
    data, _, settings = recipe.stage_inputs(run, stage)
    abstract = recipe_ahead.abstract_model(model)
    teacher = recipe_ahead.abstract_model(run.teacher)
    setup = recipe.stage_setup(c, stage, abstract, teacher, settings,
                               teacher if c.dpo.reference == "teacher" else abstract)
    return stages.precompile_stage(setup, settings, stages.stage_batch(setup, settings, data), mesh=run.mesh)


def _train_real(run, plan, index, model, tmp_path):
    c, stage = run.c, plan[index]
    data, _, settings = recipe.stage_inputs(run, stage)
    reference = run.teacher if c.dpo.reference == "teacher" else model
    dirs = dict(mesh=run.mesh, ckpt_dir=None, log_dir=tmp_path / stage.name, config={"name": stage.name})
    return recipe._train(run, stage, model, data, settings, dirs, reference if stage.kind == "dpo" else None)


CASES = {  # name: (config overrides, the planned stage to compile)
    "stage1": ({}, "stage1-mamba50"),
    "sft": ({}, "sft-mamba75"),
    "sft-kd": ({"sft": SftConfig(attn_fractions=[0.25], steps=2, batch_size=2, loss="kd", loss_chunk=8)},
               "sft-mamba75"),
    "dpo": ({"dpo": DpoConfig(steps=2, batch_size=2, reference="sft")}, "dpo-mamba75"),
    "stage0": ({}, "align-mamba50"),
    "stage1-mixed": ({"compute_dtype": "bfloat16"}, "stage1-mamba50"),   # mixed precision, through stage_setup
    # the teacher's hidden states in the data: the steps run its head only
    "stage1-cached": ({"stage1": Stage1Config(attn_fractions=[0.5], steps=2, batch_size=2, teacher_cache=True)},
                      "stage1-mamba50"),
    "sft-kd-cached": ({"stage1": Stage1Config(attn_fractions=[0.5], steps=2, batch_size=2, teacher_cache=True),
                       "sft": SftConfig(attn_fractions=[0.25], steps=2, batch_size=2, loss="kd")}, "sft-mamba75"),
}


@pytest.mark.parametrize("case", list(CASES))
def test_stage_compiled_ahead_is_a_cache_hit(case, tmp_path):
    overrides, name = CASES[case]
    run = FakeRun(tiny_config(**overrides))
    plan = recipe.make_plan(run.c, run.teacher[0].n_layers)
    index = [p.name for p in plan].index(name)
    model = models_along(run, plan)[index]
    with persistent_cache(tmp_path / "xla") as cache:
        _precompile(run, plan, index, model)
        hits, writes = cache.count()
        assert hits == 0 and writes >= 1
        result = _train_real(run, plan, index, model, tmp_path)
        assert len(result.history) == 2
        assert cache.count() == (hits + 1, writes), f"{name}: the real train step was not a cache hit"


def test_compile_ahead_thread_precompiles_later_stages_and_survives_failures(tmp_path, monkeypatch, capsys):
    run = FakeRun(tiny_config())
    plan = recipe.make_plan(run.c, run.teacher[0].n_layers)
    assert [p.name for p in plan] == ["align-mamba50", "stage1-mamba50", "sft-mamba75", "dpo-mamba75"]
    models = models_along(run, plan)
    real_precompile = stages.precompile_stage

    def failing_for_sft(setup, *a, **kw):
        if setup.name == "sft":
            raise RuntimeError("no compiler today")
        return real_precompile(setup, *a, **kw)

    monkeypatch.setattr(stages, "precompile_stage", failing_for_sft)
    with persistent_cache(tmp_path / "xla") as cache:
        assert recipe_ahead.compile_ahead_enabled(run.c)
        assert not recipe_ahead.compile_ahead_enabled(tiny_config(compile_ahead=False))
        capsys.readouterr()
        ahead = recipe_ahead.CompileAhead(run, plan, 0, run.teacher)
        ahead.claim("stage1-mamba50")          # waits while it compiles, or keeps the thread off it
        ahead.join(timeout=600)
        said = capsys.readouterr().out
        assert "compile ahead: sft-mamba75 not compiled ahead (RuntimeError: no compiler today)" in said
        assert "compile ahead: dpo-mamba75 train step and preference evaluation compiled in" in said
        assert "compile ahead: align" not in said     # the first stage is the one running meanwhile
        before = cache.count()
        _train_real(run, plan, 3, models[3], tmp_path)          # compiled ahead: a hit
        assert cache.count() == (before[0] + 1, before[1])
        _train_real(run, plan, 2, models[2], tmp_path)          # its compilation failed: compiles now
        assert cache.count() == (before[0] + 1, before[1] + 1)
    assert not recipe_ahead.compile_ahead_enabled(run.c)             # the cache is off again


def test_align_all_step_compiled_while_the_data_is_made_is_a_cache_hit(tmp_path):
    run = FakeRun(tiny_config(stage1=Stage1Config(attn_fractions=[0.5], steps=2, batch_size=2,
                                                  layer_order="aligned")))
    plan = recipe.make_plan(run.c, run.teacher[0].n_layers)
    assert plan[0].name == recipe.ALIGN_ALL and plan[0].attn_layers == ()
    model = recipe.convert(run, 0, plan[0], run.teacher)                  # every layer converted
    assert not model[0].attn_layers
    with persistent_cache(tmp_path / "xla") as cache:
        ahead = recipe_ahead.AlignAllAhead.start(run)
        ahead.claim(recipe.ALIGN_ALL)
        hits, writes = cache.count()
        assert hits == 0 and writes >= 1
        result = _train_real(run, plan, 0, model, tmp_path)
        assert cache.count() == (hits + 1, writes), "the align-all train step was not a cache hit"
        # the per-layer errors that rank the layers afterwards were compiled ahead too: reused from memory or
        # loaded from the cache, never compiled (and written) again
        before = cache.count("jit_loss_fn")
        assert before[1] >= 1
        l2m_jax.save(tmp_path / "aligned", result.cfg, result.params, format="l2m")   # as the recipe keeps it
        scores = layer_nmse(l2m_jax.load(tmp_path / "aligned"), run.teacher, run.data("stage0"),
                            batch_size=run.c.stage0.batch_size)
        assert sorted(scores) == list(range(run.teacher[0].n_layers))
        assert cache.count("jit_loss_fn")[1] == before[1], "layer_nmse compiled its forward again"
    assert recipe_ahead.AlignAllAhead.start(run) is None                      # the cache is off: nothing to fill


def test_evaluation_compiled_ahead_is_not_compiled_again(tmp_path):
    """In the same process the real evaluation reuses the executable compiled ahead (JAX keeps it in memory:
    no new compilation, so no new cache entry); a model not compiled ahead compiles and writes one. The window
    is this test's own, so no other test can have compiled these programs in this process already."""
    run = FakeRun(tiny_config(eval=EvalConfig(window=48)))
    plan = recipe.make_plan(run.c, run.teacher[0].n_layers)
    models = models_along(run, plan)
    with persistent_cache(tmp_path / "xla") as cache:
        assert recipe_ahead.precompile_eval(run, recipe_ahead.abstract_model(models[1]), "stage1-mamba50")
        assert cache.count("jit__score") == (0, 1)
        scores, _ = recipe.evaluate(*models[1], run.texts, run.c.eval.window)
        assert set(scores) == {"text", "other"} and all(v["perplexity"] > 1 for v in scores.values())
        assert cache.count("jit__score") == (0, 1), "the evaluation compiled its forward again"
        assert recipe.copy_nll(run.c, models[1]) > 0                  # the recall probe: 8 rows of the window
        assert cache.count("jit__score") == (0, 1), "the recall probe compiled the forward again"
        recipe.evaluate(*models[2], run.texts, run.c.eval.window)      # 25%: another program, not ahead
        assert cache.count("jit__score") == (0, 2)


def test_answers_program_compiled_while_the_requests_are_sampled_is_not_compiled_again(tmp_path, caplog, capsys):
    """With the persistent cache on, the recipe's chat data compiles the answers' generation program in a
    background thread while the teacher samples its requests (`AnswersAhead`): generation compiles two
    programs in all (requests, answers), the answers' one only once. The prompt bucket holds every prompt, as
    the GPU preset's does."""
    from experiments.distill_config import load_config
    from l2m_jax.recipe.data import AnswersAhead
    from tests.test_zephyr_distill import TINY

    c, _ = load_config(["preset=smollm2", *TINY, "pseudo_labels.prompt_bucket=128", f"out={tmp_path / 'run'}"])
    run = recipe.Run(c, tmp_path / "run")
    with persistent_cache(tmp_path / "xla"):
        jax.clear_caches()
        rows = run.rows()
    said = capsys.readouterr().out
    assert "compile ahead: the answers' generation compiled in" in said
    compiled = sum("CACHE MISS for 'jit__generate'" in r.getMessage() for r in caplog.records)
    assert compiled == 2, f"{compiled} generation programs compiled (requests + answers is 2)"
    assert len(rows) == 6 + 12 and all(r["response_ids"].size for r in rows)
    assert AnswersAhead.start(c, tmp_path / "run", run.teacher, run.tok, []) is None   # answered: no thread


def test_calibrated_conversion_measured_ahead_compiles_nothing(tmp_path, caplog):
    """AlignAllAhead also compiles the output-scale measurement that align-all's calibrated conversion runs
    first (`precompile_output_rms`): the conversion after it compiles no program of its own for it."""
    run = FakeRun(tiny_config(stage1=Stage1Config(attn_fractions=[0.5], steps=2, batch_size=2,
                                                  layer_order="aligned")))
    plan = recipe.make_plan(run.c, run.teacher[0].n_layers)
    assert run.c.init == "calibrated" and run.data("stage1")["tokens"].shape[0] >= run.c.calibration_rows

    def compiled():
        return sum("CACHE MISS for 'jit__output_ms'" in r.getMessage() for r in caplog.records)

    with persistent_cache(tmp_path / "xla"):
        jax.clear_caches()
        recipe_ahead.AlignAllAhead.start(run).claim(recipe.ALIGN_ALL)
        assert compiled() == 1
        model = recipe.convert(run, 0, plan[0], run.teacher)              # every layer converted, calibrated
        assert not model[0].attn_layers
        assert compiled() == 1, "the calibrated conversion compiled its measurement again"
