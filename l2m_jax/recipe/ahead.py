"""Compiling ahead: the programs of later stages compiled in background threads while earlier work runs.

With JAX's persistent compilation cache on (GPUs: `run.use_compilation_cache`), every program compiled here is
written to the cache, and the real call later (same process) compiles nothing: it finds the executable in memory
or loads it. Nothing here ever fails a run: a failure is said and that program compiles when it is needed.

    CompileAhead(run, plan, first, student)    # the train steps of plan[first + 1:], three at a time
    AlignAllAhead.start(run)                   # align-all's step, its conversion's programs, its evaluation
"""
from __future__ import annotations

import time

import numpy as np

from .config import ALIGNED_ORDERS
from .data import say
from .run import ALIGN_ALL, Run, dpo_reference, stage_inputs, stage_settings, stage_setup


def precompile_preference_eval(policy, reference, pairs_shapes: dict, batch_size: int) -> None:
    """Compile `preference_eval`'s program for models (cfg, params; abstract or not) and the held-out pairs'
    shapes {key: (shape, dtype)} into the persistent compilation cache."""
    import jax

    from l2m_jax.models import shape_structs
    from l2m_jax.train.stages import dpo_pair_logratios

    batch = {k: jax.ShapeDtypeStruct((batch_size, *shape[1:]), dtype) for k, (shape, dtype) in pairs_shapes.items()}
    dpo_pair_logratios.lower(policy[0], reference[0], shape_structs(policy[1]), shape_structs(reference[1]),
                             batch).compile()


def abstract_model(model):
    """(cfg, params as jax.ShapeDtypeStructs): the shapes and dtypes of a model, no weights."""
    from l2m_jax.models import shape_structs

    cfg, params = model
    return cfg, shape_structs(params)


def convert_abstract(c, index: int, stage, student):
    """What `convert` makes of `student` (cfg, params; abstract or not), as jax.ShapeDtypeStructs: the same
    config, tree, shapes and dtypes, traced through `hybridize` without computing a weight."""
    import jax

    import l2m_jax

    s_cfg, s_params = student
    if s_cfg.attn_layers == stage.attn_layers:
        return abstract_model(student)
    key = jax.random.fold_in(jax.random.key(c.seed), index)
    # calibrating rescales the converted weights in their dtypes, from data; the tree is that of the same
    # init without it
    init = {"calibrated": "conv", "norm": "mil"}.get(c.init, c.init)
    out = {}

    def converted(params):
        out["cfg"], new = l2m_jax.hybridize(s_cfg, params, stage.attn_layers, c.mixer, key, init=init)
        return new

    params = jax.eval_shape(converted, abstract_model(student)[1])
    return out["cfg"], params


def compile_ahead_enabled(c) -> bool:
    """c.compile_ahead, and JAX's persistent compilation cache on (without it nothing could be reused)."""
    import jax

    return bool(getattr(c, "compile_ahead", True)) and bool(jax.config.jax_compilation_cache_dir)


class CompileAhead:
    """Compiles the train steps of the planned stages after plan[first] in a daemon thread, `workers` at a time.

    While stage `first` runs, each later stage's step is lowered from abstract inputs through the code its
    real run uses (`convert_abstract`, `stage_inputs`, `stage_setup`, `stages.precompile_stage`) and compiled
    into JAX's persistent compilation cache, so the stage's own jit finds the executable there. It only ever
    saves time: a failure is said and ignored (that stage compiles when it starts), and a stage that starts
    before the thread reached it is left to compile itself. The data of every planned stage is built here,
    in the calling thread (the stages would build it later anyway), for the batch shapes and step counts.
    """

    def __init__(self, run: Run, plan, first: int, student, workers: int = 3):
        import threading

        stage_inputs(run, plan[first])                      # the first stage's data first
        self._jobs = []
        self._heldout = None                   # DPO's held-out pairs: their evaluation compiles ahead too
        for i in range(first + 1, len(plan)):
            data, heldout, settings = stage_inputs(run, plan[i])
            self._jobs.append((i, plan[i], settings, {k: (v.shape, v.dtype) for k, v in data.items()}))
            if heldout is not None:
                self._heldout = {k: (v.shape, v.dtype) for k, v in heldout.items()}
        self._workers = int(workers)            # stages compiling at once
        self._state: dict[str, str] = {}        # stage name -> "running" | "done" | "failed" | "started"
        self._compiled: dict[str, list] = {}    # stage name -> its train step's executables (`compiled`)
        self._cond = threading.Condition()
        self._thread = threading.Thread(target=self._work, args=(run, plan[first], first, student),
                                        name="compile-ahead", daemon=True)
        self._thread.start()

    def _work(self, run: Run, first_stage, first: int, student) -> None:
        import queue
        import threading

        c = run.c
        try:
            teacher = abstract_model(run.teacher)
            model = convert_abstract(c, first, first_stage, student)
            evaluated = {model[0]} if precompile_eval(run, model, first_stage.name) else set()
            previous, models = first_stage, []
            for i, stage, _, _ in self._jobs:         # every stage's model, in order (shapes only: cheap)
                if previous.name == ALIGN_ALL:
                    model = teacher
                model, previous = convert_abstract(c, i, stage, model), stage
                models.append(model)
            # XLA compiles one program on about one core: the stages compile side by side, earliest first, in
            # daemon threads (a pool's workers would hold the interpreter's exit until their compiles end)
            todo = queue.Queue()
            for job, model in zip(self._jobs, models):
                todo.put((self._compile, (run, teacher, job, model)))
                if model[0] not in evaluated:           # the stage's evaluation at its end, once per structure
                    evaluated.add(model[0])
                    todo.put((precompile_eval, (run, model, job[1].name)))

            def drain():
                while True:
                    try:
                        fn, args = todo.get_nowait()
                    except queue.Empty:
                        return
                    fn(*args)

            workers = [threading.Thread(target=drain, name=f"compile-ahead-{k}", daemon=True)
                       for k in range(max(1, min(self._workers, len(self._jobs))))]
            for w in workers:
                w.start()
            for w in workers:
                w.join()
        except Exception as e:
            say(f"compile ahead stopped ({type(e).__name__}: {e}); the later stages compile when they start")

    def _compile(self, run: Run, teacher, job, model) -> None:
        """Compile one stage's train step (and DPO's preference evaluation) unless the stage has started."""
        from l2m_jax.train.stages import precompile_stage, stage_batch

        c = run.c
        _, stage, settings, shapes = job
        with self._cond:
            if stage.name in self._state:              # the stage has started: it compiles itself
                return
            self._state[stage.name] = "running"
        outcome, t0 = "failed", time.perf_counter()
        try:
            reference = dpo_reference(c, teacher, model)
            setup = stage_setup(c, stage, model, teacher, settings, reference)
            data = {k: np.empty((0, *shape[1:]), dtype) for k, (shape, dtype) in shapes.items()}
            executables = precompile_stage(setup, settings, stage_batch(setup, settings, data), mesh=run.mesh)
            with self._cond:
                self._compiled[stage.name] = executables
            if stage.kind == "dpo" and self._heldout is not None:
                precompile_preference_eval(model, reference, self._heldout, c.dpo.batch_size)
            outcome = "done"
            say(f"compile ahead: {stage.name} train step{' and preference evaluation' * (stage.kind == 'dpo')}"
                f" compiled in {time.perf_counter() - t0:.1f}s")
        except Exception as e:                          # never fails the run
            say(f"compile ahead: {stage.name} not compiled ahead ({type(e).__name__}: {e}); it compiles "
                "when it starts")
        finally:
            with self._cond:
                self._state[stage.name] = outcome
                self._cond.notify_all()

    def claim(self, name: str) -> None:
        """Stage `name` starts: wait for its step if it is compiling ahead now, else keep the thread off it."""
        t0 = time.perf_counter()
        with self._cond:
            self._state.setdefault(name, "started")
            while self._state[name] == "running":
                self._cond.wait()
        if time.perf_counter() - t0 > 1.0:
            say(f"{name}: waited {time.perf_counter() - t0:.0f}s for its train step to finish compiling ahead")

    def compiled(self, name: str) -> list:
        """Stage `name`'s train-step executables if they were compiled ahead (handed over once: the stage
        runs them through `loop.use_precompiled` instead of tracing and loading its own), else []."""
        with self._cond:
            return self._compiled.pop(name, [])

    def stop(self) -> None:
        """Compile nothing more (a stage in progress finishes in the background)."""
        with self._cond:
            for _, stage, _, _ in self._jobs:
                self._state.setdefault(stage.name, "started")

    def join(self, timeout: float | None = None) -> None:
        self._thread.join(timeout)


def precompile_eval(run: Run, model, name: str) -> bool:
    """Compile the held-out evaluation's forward (`evaluate`) for `model` (cfg, params; abstract or not) into
    the persistent compilation cache; True when it did. A failure is said and ignored."""
    from l2m_jax.eval.heldout import precompile_score, score_batch_shape

    try:
        precompile_score(model[0], model[1], score_batch_shape(model[0], run.texts, run.c.eval.window))
        return True
    except Exception as e:                                  # never fails the run
        say(f"compile ahead: {name}'s evaluation not compiled ahead ({type(e).__name__}: {e})")
        return False


class AlignAllAhead:
    """Compiles stage `ALIGN_ALL`'s train step in a daemon thread while the chat data is made (the stage's
    conversion asks for the data first): its model is the teacher with every layer converted and its batch
    [stage0.batch_size, data.seq_len], both known from the config; then its evaluation and the per-layer
    scores that rank the layers after it (`train.align.LAYER_SCORES`). `claim` waits for it, so the stage loads the
    executable from the persistent compilation cache; with init=calibrated (or norm), also the output-scale
    measurement its conversion runs first. Like `CompileAhead` it only ever saves time."""

    def __init__(self, run: Run):
        import threading

        self._executables: list = []
        self._side = None                    # the conversion's programs, compiled beside the step (`_work`)
        self._thread = threading.Thread(target=self._work, args=(run,), name="compile-ahead-align-all", daemon=True)
        self._thread.start()

    @classmethod
    def start(cls, run: Run) -> "AlignAllAhead | None":
        """One started for `run`, or None where compiling ahead is off or stage0.steps depends on the data."""
        return cls(run) if compile_ahead_enabled(run.c) and run.c.stage0.steps is not None else None

    def _work(self, run: Run) -> None:
        import threading

        from l2m_jax.train.stages import PlannedStage, precompile_stage, stage_batch

        c, t0 = run.c, time.perf_counter()
        try:
            stage, teacher = PlannedStage(ALIGN_ALL, "stage0", ()), abstract_model(run.teacher)
            model = convert_abstract(c, 0, stage, teacher)
            self._side = threading.Thread(target=self._conversion_programs, args=(c, teacher, model),
                                          name="compile-ahead-conversion", daemon=True)
            self._side.start()
            settings = stage_settings(c, "stage0", c.stage0.batch_size * c.stage0.accum_steps)
            setup = stage_setup(c, stage, model, teacher, settings)
            rows = {"tokens": np.empty((0, c.data.seq_len), np.int32),      # the stage-1 rows' dtypes
                    "loss_mask": np.empty((0, c.data.seq_len), bool)}
            self._executables = precompile_stage(setup, settings, stage_batch(setup, settings, rows), mesh=run.mesh)
            say(f"compile ahead: {ALIGN_ALL} train step compiled in {time.perf_counter() - t0:.1f}s")
            precompile_eval(run, model, ALIGN_ALL)
            from l2m_jax.train.align import precompile_layer_scores

            precompile_layer_scores(ALIGNED_ORDERS.get(c.stage1.layer_order, "nmse"), model, teacher,
                                    (c.stage0.batch_size, c.data.seq_len))                # the ranking after it
        except Exception as e:                               # never fails the run
            say(f"compile ahead: {ALIGN_ALL} not compiled ahead ({type(e).__name__}: {e}); it compiles when it starts")

    @staticmethod
    def _conversion_programs(c, teacher, model) -> None:
        """What runs before align-all's first step, in the order it runs, beside the step's compilation: the
        cache of the teacher's hidden states (stage1.teacher_cache), then the calibrated init's measurement."""
        try:
            if c.stage1.teacher_cache:
                from l2m_jax.train.stages import precompile_teacher_hidden

                precompile_teacher_hidden(teacher, c.stage1.batch_size, c.data.seq_len, compute_dtype=c.compute_dtype)
            if c.init in ("norm", "calibrated"):
                from l2m_jax.convert.hybridize import precompile_output_rms

                precompile_output_rms(teacher, model, range(teacher[0].n_layers),
                                      (c.calibration_rows, c.data.seq_len))
        except Exception as e:                               # never fails the run
            say(f"compile ahead: {ALIGN_ALL}'s conversion not compiled ahead ({type(e).__name__}: {e})")

    def claim(self, name: str) -> None:
        t0 = time.perf_counter()
        self._thread.join()
        if self._side is not None:
            self._side.join()
        if time.perf_counter() - t0 > 1.0:
            say(f"{name}: waited {time.perf_counter() - t0:.0f}s for its train step to finish compiling ahead")

    def compiled(self, name: str) -> list:
        """The align-all train step's executables, once (see `CompileAhead.compiled`); call after `claim`."""
        executables, self._executables = self._executables, []
        return executables if name == ALIGN_ALL else []
