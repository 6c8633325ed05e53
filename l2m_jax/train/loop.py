"""The generic training loop: one jitted, donated step on a mesh; orbax checkpoints with resume; logging.

    trainer = Trainer(loss_fn, params, mask, optimizer, mesh, ckpt_dir=..., log_dir=..., config=run_cfg)
    history = trainer.fit(ArrayBatches({"tokens": x, "mask": m}, batch_size=8), num_steps=1000)

`loss_fn(params, batch, rng) -> (loss, metrics)` sees the full parameter tree (trainable and frozen
merged), a batch dict of arrays [B, ...] sharded over the mesh, and a per-step key. Gradients are taken
only w.r.t. the trainable subtree (see `optim.split_trainable`). Large inputs that do not train (a
teacher's parameters) belong in `params` with a False mask, e.g. params={"student": ..., "teacher": ...},
so they enter the step as sharded arguments instead of being baked into the compiled program.

The jitted step, its shardings and the abstract train state come from `step_program`, which reads only
shapes and dtypes: `precompile_step(loss_fn, abstract_params, mask, optimizer, mesh, batch)` lowers and
compiles the very program a Trainer with those arguments runs, without weights (with JAX's persistent
compilation cache on, that Trainer's first step then loads it instead of compiling).

A checkpoint at step k holds the state after k updates: trainable params, optimizer state, step and RNG
(arrays) plus the data position, a config fingerprint and the parameter structure (JSON). Frozen params are
not saved: they come from wherever the caller loaded them. Resuming restores the latest step into the
current state's shapes, dtypes and shardings and continues bit-for-bit: the step key is
fold_in(base key, step) and the data source restores its position.

Resuming is guarded and self-repairing:
- a checkpoint of another config raises CheckpointMismatchError; with allow_config_change=True a config
  change (new optimizer settings, more steps) is logged, recorded in `restore_info` and
  `log_dir/config_history.jsonl`, and the checkpoint restores as long as the state's structure is the same;
- a checkpoint that does not read back (a truncated file) is moved aside to `<step>.corrupt-<n>`, which
  orbax does not see as a step, and the next older one is tried; if none restores, CheckpointError;
- a torn last line of metrics.jsonl (a kill mid-write) is cut before appending; a bad line before it is an
  error (`metrics_file.MetricsFileError`).
`trainer.restore_info` says what happened: {"step", "quarantined", "config_changes"}.

A NaN or infinite metric stops `fit` with NonFiniteError. Checkpoints holding the parameters that step
started from would replay it whatever the settings, so they are moved aside (`<step>.nonfinite-<n>`); the
error says which checkpoint, if any, a re-run resumes from.

Metrics go to `log_dir/metrics.jsonl` (always) and to TensorBoard event files in `log_dir`: with
`tensorboardX` (a dependency), else `flax.metrics.tensorboard` where TensorFlow is installed; without either
a warning says TensorBoard is skipped. Multi-host: every process calls the same methods; only process 0
writes logs; each process's data source yields that process's rows of the global batch.
"""
from __future__ import annotations

import contextlib
import contextvars
import dataclasses
import hashlib
import json
import logging
import math
import os
import sys
import time
from typing import Any, Callable, Iterator, Mapping, NamedTuple, Protocol, runtime_checkable

import jax
import jax.numpy as jnp
import numpy as np
import optax
import orbax.checkpoint as ocp
from jax.sharding import Mesh
from tqdm.auto import tqdm

from l2m_jax import parallel
from l2m_jax.errors import CheckpointError
from l2m_jax.train import metrics_file
from l2m_jax.train.metrics_file import MetricsFileError  # noqa: F401  (raised from here too)
from l2m_jax.train.optim import current_lr, merge, split_trainable

log = logging.getLogger(__name__)

LossFn = Callable[[Any, dict, jax.Array], tuple[jax.Array, dict]]


class NonFiniteError(FloatingPointError):
    """A training metric became NaN or infinite.

    step, metric, value: where; checkpoint_step: the newest checkpoint on disk, which a re-run resumes from
    (None: none, a re-run starts from step 0); ckpt_dir: where it is (None: the Trainer saves none);
    set_aside: the step directories moved aside because they hold the parameters this step started from.
    """

    def __init__(self, message: str, *, step: int | None = None, metric: str | None = None,
                 value: float | None = None, checkpoint_step: int | None = None, ckpt_dir: str | None = None,
                 set_aside: list[str] | None = None):
        super().__init__(message)
        self.step, self.metric, self.value = step, metric, value
        self.checkpoint_step, self.ckpt_dir, self.set_aside = checkpoint_step, ckpt_dir, list(set_aside or [])


class CheckpointMismatchError(ValueError):
    """The checkpoint directory was written by a different configuration."""


@runtime_checkable
class BatchSource(Protocol):
    """An iterator of batches (dicts of arrays [B, ...]) whose position can be saved and restored."""

    def __next__(self) -> dict[str, np.ndarray]: ...

    def state(self) -> dict: ...            # JSON-serialisable position

    def restore(self, state: dict) -> None: ...


class ArrayBatches:
    """In-memory `BatchSource` over a dict of equally long arrays [N, ...].

    Each epoch yields N // batch_size batches (with shuffle, a fresh permutation per epoch from `seed` and
    the epoch number; the N % batch_size rows left over differ from epoch to epoch). repeat=False stops
    after one epoch.
    """

    def __init__(self, arrays: Mapping[str, np.ndarray], batch_size: int, *, shuffle: bool = False,
                 seed: int = 0, repeat: bool = True):
        if not arrays:
            raise ValueError("ArrayBatches needs at least one array")
        self._arrays = {k: np.asarray(v) for k, v in arrays.items()}
        sizes = {k: v.shape[0] if v.ndim else None for k, v in self._arrays.items()}
        if len(set(sizes.values())) != 1 or None in sizes.values():
            raise ValueError(f"ArrayBatches arrays must share their leading dimension N, got {sizes}")
        self._n = next(iter(sizes.values()))
        if not 0 < batch_size <= self._n:
            raise ValueError(f"batch_size={batch_size} must be in [1, N={self._n}]")
        self.batch_size, self.shuffle, self.seed, self.repeat = batch_size, shuffle, seed, repeat
        self._epoch, self._index = 0, 0

    def __iter__(self) -> Iterator[dict[str, np.ndarray]]:
        return self

    def _order(self) -> np.ndarray:
        if not self.shuffle:
            return np.arange(self._n)
        return np.random.default_rng([self.seed, self._epoch]).permutation(self._n)

    def __next__(self) -> dict[str, np.ndarray]:
        per_epoch = self._n // self.batch_size
        if self._index >= per_epoch:
            if not self.repeat:
                raise StopIteration
            self._epoch, self._index = self._epoch + 1, 0
        rows = self._order()[self._index * self.batch_size:(self._index + 1) * self.batch_size]
        self._index += 1
        return {k: v[rows] for k, v in self._arrays.items()}

    def state(self) -> dict:
        return {"epoch": self._epoch, "index": self._index}

    def restore(self, state: dict) -> None:
        self._epoch, self._index = int(state["epoch"]), int(state["index"])


class TrainState(NamedTuple):
    step: jax.Array          # [] int32: optimizer calls done
    trainable: Any           # params tree, None where frozen (float32 master weights)
    opt_state: Any
    rng: jax.Array           # raw key data of the base key; step k uses fold_in(key, k)


def _jsonable(obj: Any) -> Any:
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        return _jsonable(dataclasses.asdict(obj))
    if isinstance(obj, Mapping):
        return {str(k): _jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_jsonable(v) for v in obj]
    if isinstance(obj, np.generic):
        return obj.item()
    if obj is None or isinstance(obj, (bool, int, float, str)):
        return obj
    raise TypeError(f"config value {obj!r} of type {type(obj).__name__} is not JSON-serialisable; pass "
                    "plain data (dataclasses, dicts, lists, numbers, strings) as the Trainer config")


def _fingerprint(obj: Any) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True).encode()).hexdigest()[:16]


def _open_tensorboard(log_dir: str) -> tuple[Callable[[str, float, int], Any], Callable[[], Any]] | None:
    """(write_scalar, close) of a TensorBoard event writer in `log_dir`, or None (with a warning) without one."""
    try:
        from tensorboardX import SummaryWriter
        writer = SummaryWriter(log_dir)
        return writer.add_scalar, writer.close
    except ImportError:
        pass
    try:
        from flax.metrics.tensorboard import SummaryWriter
        writer = SummaryWriter(log_dir)
        return writer.scalar, writer.close
    except ImportError:
        log.warning("no TensorBoard writer is importable (pip install tensorboardX); %s gets metrics.jsonl "
                    "but no event files", log_dir)
        return None


def _config_diff(old: Any, new: Any, same_structure: bool = True) -> str:
    """Which part of a run config changed, for the resume error."""
    parts = [] if same_structure else ["the parameter/optimizer structure"]
    if old != new:
        if isinstance(old, dict) and isinstance(new, dict):
            keys = sorted(k for k in set(old) | set(new) if old.get(k) != new.get(k))
            parts.append(f"config keys {keys}")
        else:
            parts.append("the config")
    return " and ".join(parts) or "the fingerprint"


def _config_changes(old: Any, new: Any, prefix: str = "") -> list[str]:
    """Every leaf that differs between two JSON configs, as 'a.b: old -> new'."""
    if isinstance(old, dict) and isinstance(new, dict):
        return [c for k in sorted(set(old) | set(new))
                for c in _config_changes(old.get(k, "<absent>"), new.get(k, "<absent>"), f"{prefix}{k}.")]
    return [] if old == new else [f"{prefix[:-1] or 'config'}: {old!r} -> {new!r}"]


def _with_new_hyperparams(fresh: Any, restored: Any) -> Any:
    """`restored` optimizer state with the constant hyperparameters (betas, eps, weight decay) of `fresh`.

    optax.inject_hyperparams keeps constant hyperparameters in the state, so a restored state would go on
    using the old ones; scheduled ones (the learning rate) are recomputed from the new schedule every update.
    """
    if isinstance(restored, optax.InjectStatefulHyperparamsState):
        hyper = {k: v if k in restored.hyperparams_states else fresh.hyperparams[k]
                 for k, v in restored.hyperparams.items()}
        return restored._replace(hyperparams=hyper,
                                 inner_state=_with_new_hyperparams(fresh.inner_state, restored.inner_state))
    if isinstance(restored, tuple) and hasattr(restored, "_fields"):
        return type(restored)(*(_with_new_hyperparams(f, r) for f, r in zip(fresh, restored)))
    if isinstance(restored, (tuple, list)):
        return type(restored)(_with_new_hyperparams(f, r) for f, r in zip(fresh, restored))
    if isinstance(restored, dict):
        return {k: _with_new_hyperparams(fresh[k], v) for k, v in restored.items()}
    return restored


def _short(error: BaseException) -> str:
    """The first line of an exception (orbax/tensorstore errors run to pages)."""
    text = str(error).strip().splitlines()
    first = text[0] if text else ""
    return f"{type(error).__name__}: {first[:300]}"


_QUIETED = False


def _quiet_abandoned_reads() -> None:
    """Silence what a failed orbax restore leaves behind (installed once per process, before restoring).

    orbax stops at the first tensorstore read that fails; the reads still in flight then complete onto its
    closed event loop (a 'RuntimeError: Event loop is closed' traceback each) or are garbage-collected with
    their errors unretrieved (an asyncio error each): pages of noise after the one warning that matters.
    """
    global _QUIETED
    if _QUIETED:
        return
    _QUIETED = True
    previous = sys.unraisablehook

    def hook(unraisable):
        error = unraisable.exc_value
        if not (isinstance(error, RuntimeError) and str(error) == "Event loop is closed"):
            previous(unraisable)

    sys.unraisablehook = hook
    logging.getLogger("asyncio").addFilter(lambda r: not (str(r.msg).startswith("Future exception was never "
                                                                 "retrieved") and "tensorstore" in r.getMessage()))


def _updates_done(opt_state: Any, step: int) -> int:
    """Optimizer updates applied after `step` micro-steps: MultiSteps counts them, else one per step."""
    if isinstance(opt_state, optax.MultiStepsState):
        return int(opt_state.gradient_step)
    return step


def _updates_before(opt_state: Any, step: int) -> int:
    """Updates applied before micro-step `step`, from the state after it (MultiSteps resets mini_step on one)."""
    if isinstance(opt_state, optax.MultiStepsState):
        return int(opt_state.gradient_step) - int(int(opt_state.mini_step) == 0)
    return step - 1


def _first_nonfinite(metrics: dict[str, float]) -> str | None:
    """The first NaN/inf metric, the loss before the others; None if all are finite."""
    for name in sorted(metrics, key=lambda k: (k != "loss", k)):
        if not math.isfinite(metrics[name]):
            return name
    return None


def _batch_tokens(batch: Mapping[str, np.ndarray]) -> int:
    """Tokens in a batch, for tokens/s: the size of batch["tokens"], else of its first 2-D array."""
    if "tokens" in batch:
        return int(np.size(batch["tokens"]))
    for v in batch.values():
        if np.ndim(v) >= 2:
            return int(np.shape(v)[0] * np.shape(v)[1])
    return 0


# ------------------------------------------------------------------------------------------------ the step program
def base_key(rng: int | jax.Array) -> jax.Array:
    """The typed base key of a seed, a typed key or a legacy uint32 PRNGKey."""
    key = jax.random.key(rng) if isinstance(rng, (int, np.integer)) else jnp.asarray(rng)
    if not jnp.issubdtype(key.dtype, jax.dtypes.prng_key):
        key = jax.random.wrap_key_data(key)
    return key


def make_train_step(loss_fn: LossFn, optimizer: optax.GradientTransformation,
                    rng_impl: Any) -> Callable[[TrainState, Any, dict], tuple[TrainState, dict]]:
    """The (unjitted) train step: (state, frozen, batch) -> (new state, metrics)."""

    def _train_step(state: TrainState, frozen: Any, batch: dict) -> tuple[TrainState, dict]:
        key = jax.random.fold_in(jax.random.wrap_key_data(state.rng, impl=rng_impl), state.step)

        def objective(trainable):
            return loss_fn(merge(trainable, frozen), batch, key)

        (loss, metrics), grads = jax.value_and_grad(objective, has_aux=True)(state.trainable)
        updates, opt_state = optimizer.update(grads, state.opt_state, state.trainable)
        trainable = optax.apply_updates(state.trainable, updates)
        metrics = {**metrics, "loss": loss, "grad_norm": optax.global_norm(grads)}
        lr = current_lr(opt_state)
        if lr is not None:
            metrics["lr"] = lr
        return TrainState(state.step + 1, trainable, opt_state, state.rng), metrics
    return _train_step


def _check_trainable(trainable: Any) -> None:
    leaves = jax.tree_util.tree_flatten_with_path(trainable)[0]
    if not leaves:
        raise ValueError("the trainable mask selects no parameters; nothing would train")
    bad = [parallel.path_str(p) for p, x in leaves if not jnp.issubdtype(x.dtype, jnp.floating)]
    if bad:
        raise ValueError(f"non-float parameters cannot train: {bad}; set their mask entries to False")


class StepProgram(NamedTuple):
    """What a Trainer jits, derived from shapes and dtypes alone (`step_program`)."""
    step_fn: Any             # jax.jit of the train step: donated state, explicit in/out shardings
    state_sh: TrainState     # shardings of the train state
    frozen_sh: Any           # shardings of the frozen tree (None where a leaf trains)
    state: TrainState        # the train state as jax.ShapeDtypeStruct leaves (fp32 trainable), with shardings
    frozen: Any              # the frozen tree as jax.ShapeDtypeStruct leaves, with shardings


def _abstract(x: Any, sharding: Any) -> jax.ShapeDtypeStruct:
    return jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=sharding, weak_type=getattr(x, "weak_type", False))


def step_program(loss_fn: LossFn, params: Any, mask: Any, optimizer: optax.GradientTransformation, mesh: Mesh,
                 *, rng: int | jax.Array = 0, rules=parallel.DEFAULT_RULES,
                 min_shard_size: int = 2 ** 12) -> StepProgram:
    """The Trainer's jitted step with its shardings and abstract state, for `params` as arrays or as
    jax.ShapeDtypeStructs (`jax.eval_shape`, `models.abstract_params`): only shapes and dtypes are read, so
    the program a Trainer compiles can be lowered, and compiled ahead (`precompile_step`), without weights."""
    key = base_key(rng)
    trainable, frozen = split_trainable(params, mask)
    _check_trainable(trainable)
    shard = lambda tree: parallel.param_shardings(tree, mesh, rules, min_size=min_shard_size)  # noqa: E731
    train_sh, frozen_sh = shard(trainable), shard(frozen)
    # the trainable leaves as the Trainer holds them: fp32 master weights
    train = jax.tree.map(lambda x, sh: jax.ShapeDtypeStruct(x.shape, jnp.float32, sharding=sh), trainable, train_sh)
    opt = jax.eval_shape(optimizer.init, train)
    opt_sh = shard(opt)
    rep = parallel.replicated(mesh)
    state_sh = TrainState(rep, train_sh, opt_sh, rep)
    rng_data = jax.random.key_data(key)
    state = TrainState(jax.ShapeDtypeStruct((), jnp.int32, sharding=rep), train, jax.tree.map(_abstract, opt, opt_sh),
                       jax.ShapeDtypeStruct(rng_data.shape, rng_data.dtype, sharding=rep))
    step_fn = jax.jit(make_train_step(loss_fn, optimizer, jax.random.key_impl(key)), donate_argnums=(0,),
                      in_shardings=(state_sh, frozen_sh, parallel.batch_sharding(mesh)),
                      out_shardings=(state_sh, rep))
    return StepProgram(step_fn, state_sh, frozen_sh, state, jax.tree.map(_abstract, frozen, frozen_sh))


def batch_spec(mesh: Mesh, batch: Mapping[str, Any]) -> dict[str, jax.ShapeDtypeStruct]:
    """The global batch the step receives for process-local batches like `batch` (arrays or anything with
    .shape and .dtype, [B_local, ...]), as `Trainer` puts them on the mesh."""
    sh = parallel.batch_sharding(mesh)
    return {k: jax.ShapeDtypeStruct((v.shape[0] * jax.process_count(), *v.shape[1:]),
                                    jax.dtypes.canonicalize_dtype(v.dtype), sharding=sh) for k, v in batch.items()}


def precompile_step(loss_fn: LossFn, params: Any, mask: Any, optimizer: optax.GradientTransformation, mesh: Mesh,
                    batch: Mapping[str, Any], *, rng: int | jax.Array = 0, rules=parallel.DEFAULT_RULES,
                    min_shard_size: int = 2 ** 12) -> list:
    """Lower and compile the train step a `Trainer(loss_fn, params, mask, optimizer, mesh, rng=rng, ...)` will
    run on batches like `batch` (process-local, [B, ...]; see `batch_spec`); params may be abstract.

    With JAX's persistent compilation cache on, the Trainer's first step then loads the executable instead of
    compiling it. Returns the compiled executables: one, or two where the state a step returns differs from
    the initial one in weak types (a second signature the Trainer also compiles at its second step).
    """
    program = step_program(loss_fn, params, mask, optimizer, mesh, rng=rng, rules=rules,
                           min_shard_size=min_shard_size)
    spec = batch_spec(mesh, batch)
    compiled = [program.step_fn.lower(program.state, program.frozen, spec).compile()]
    out_state = jax.tree.map(_abstract, compiled[0].out_info[0], program.state_sh)
    if _signature(out_state) != _signature(program.state):
        compiled.append(program.step_fn.lower(out_state, program.frozen, spec).compile())
    return compiled


_PRECOMPILED: contextvars.ContextVar[tuple] = contextvars.ContextVar("l2m_precompiled_steps", default=())


@contextlib.contextmanager
def use_precompiled(executables):
    """Trainers made inside take these compiled train steps (`precompile_step`'s, e.g. from a background thread)
    in place of tracing, lowering and loading their own: each step runs the first executable whose input
    signature fits, or the Trainer's own jitted step if none does, so a stale one only costs that check."""
    token = _PRECOMPILED.set(tuple(executables or ()))
    try:
        yield
    finally:
        _PRECOMPILED.reset(token)


class _PrecompiledStep:
    """The train step through given executables, falling back to `jitted` (see `use_precompiled`). A call whose
    arguments do not fit an executable raises before running it, so nothing is donated by a miss."""

    def __init__(self, executables, jitted):
        self._executables, self._jitted, self._last = list(executables), jitted, 0
        self.used = 0                                   # steps that ran through an executable

    def __call__(self, *args):
        if not self._executables:
            return self._jitted(*args)
        order = [self._last] + [i for i in range(len(self._executables)) if i != self._last]
        for i in order:
            try:
                out = self._executables[i](*args)
            except (TypeError, ValueError):            # another signature (weak types, shardings): the next one
                continue
            self._last = i
            self.used += 1
            return out
        log.warning("none of the %d train-step executables compiled ahead fits this step's arguments; the "
                    "Trainer runs its own jitted step", len(self._executables))
        self._executables = []                         # said once; not tried again
        return self._jitted(*args)


def _signature(tree: Any) -> list:
    return [(x.shape, x.dtype, x.weak_type) for x in jax.tree.leaves(tree)]


class Trainer:
    """Trains the `mask`-selected part of `params` with `optimizer` on `mesh`. See the module docstring.

    Args:
      loss_fn: (params, batch, rng) -> (loss [], metrics dict of scalars); jit-compatible.
      params: the full parameter tree (nested dicts of arrays).
      mask: a tree of bools like params (`optim.trainable_mask`); True leaves train.
      optimizer: an optax transformation, called once per step (`optim.make_optimizer`).
      mesh: a ("data", "fsdp") mesh (`parallel.make_mesh`); default: all devices on "data".
      ckpt_dir: orbax checkpoint directory (None: no checkpoints, no resume). Resumes from its latest step.
      log_dir: directory for metrics.jsonl (and TensorBoard events).
      config: JSON-able description of the run (model/stage/data settings); its fingerprint, with the
        parameter structure, must match a checkpoint's to resume from it.
      allow_config_change: resume a checkpoint whose config differs (deliberately changed optimizer settings
        or steps): the difference is logged and recorded instead of raising CheckpointMismatchError. The
        state's structure (parameters, optimizer state) must still match.
      save_every: checkpoint every this many steps (and always at the end of `fit`).
      max_to_keep: checkpoints kept on disk.
      rng: seed or key; step k's key is fold_in(key, k).
      rules, min_shard_size: passed to `parallel.param_shardings`.
      progress: show a tqdm bar (loss, tokens/s, ETA).
      async_checkpoints: write checkpoints in the background (the step loop continues).
    """

    def __init__(self, loss_fn: LossFn, params: Any, mask: Any, optimizer: optax.GradientTransformation,
                 mesh: Mesh | None = None, *, ckpt_dir: str | os.PathLike | None = None,
                 log_dir: str | os.PathLike | None = None, config: Any = None, save_every: int = 1000,
                 max_to_keep: int = 3, rng: int | jax.Array = 0,
                 rules=parallel.DEFAULT_RULES, min_shard_size: int = 2 ** 12, progress: bool = True,
                 async_checkpoints: bool = True, allow_config_change: bool = False):
        if save_every < 1:
            raise ValueError(f"save_every={save_every} must be >= 1")
        self.mesh = parallel.make_mesh() if mesh is None else mesh
        self._progress = progress
        self.save_every = save_every
        key = base_key(rng)
        program = step_program(loss_fn, params, mask, optimizer, self.mesh, rng=key, rules=rules,
                               min_shard_size=min_shard_size)
        trainable, frozen = split_trainable(params, mask)
        train_sh, frozen_sh = program.state_sh.trainable, program.frozen_sh
        rep = parallel.replicated(self.mesh)
        # fp32 master weights (a lossless upcast for bf16 checkpoints; the model casts to cfg.dtype), in
        # fresh buffers: the step donates them, and the caller's arrays must survive that
        trainable = jax.jit(lambda t: jax.tree.map(lambda x: x.astype(jnp.float32), t),
                            out_shardings=train_sh)(trainable)
        self._frozen = parallel.shard_params(frozen, frozen_sh)
        opt_state = jax.jit(optimizer.init, out_shardings=program.state_sh.opt_state)(trainable)
        self._state_sh = program.state_sh
        self.state = TrainState(jax.device_put(jnp.zeros((), jnp.int32), rep), trainable, opt_state,
                                jax.device_put(jax.random.key_data(key), rep))
        precompiled = _PRECOMPILED.get()
        self._step_fn = _PrecompiledStep(precompiled, program.step_fn) if precompiled else program.step_fn
        self._log_params(params, mask, train_sh, frozen_sh)

        self._structure = [[parallel.path_str(p), list(x.shape), str(x.dtype)]
                           for p, x in jax.tree_util.tree_flatten_with_path(self.state)[0]]
        self._config = _jsonable(config)
        self._fingerprint = _fingerprint([self._config, self._structure])
        self._pending_data_state = None
        self._step = 0
        self._allow_config_change = allow_config_change
        self.restore_info: dict[str, Any] = {"step": None, "quarantined": [], "config_changes": []}
        self.stopped_by_budget = False         # the last fit stopped at its wall-clock budget
        self.ckpt_dir = None if ckpt_dir is None else os.path.abspath(os.fspath(ckpt_dir))
        self.log_dir = None if log_dir is None or jax.process_index() != 0 else os.fspath(log_dir)
        self._mngr = self._jsonl = self._tb = None
        metrics_path = None if self.log_dir is None else os.path.join(self.log_dir, "metrics.jsonl")
        if metrics_path is not None:
            self._repair_metrics(metrics_path)          # before any work: a damaged file fails fast
        if self.ckpt_dir is not None:
            options = ocp.CheckpointManagerOptions(max_to_keep=max_to_keep,
                                                   enable_async_checkpointing=async_checkpoints)
            self._mngr = ocp.CheckpointManager(self.ckpt_dir, options=options, item_names=("state", "meta"))
            try:
                self._restore_latest()
            except BaseException:
                self.close()
                raise
        if self.log_dir is not None:
            os.makedirs(self.log_dir, exist_ok=True)
            self._record_config_changes()
            self._jsonl = open(metrics_path, "a")
            self._tb = _open_tensorboard(self.log_dir)

    # ------------------------------------------------------------------ state views
    @property
    def step(self) -> int:
        """Optimizer calls done (a host mirror of state.step, so reading it never waits on the device)."""
        return self._step

    @property
    def trainable(self) -> Any:
        return self.state.trainable

    @property
    def params(self) -> Any:
        """The full parameter tree: current trainable (float32) leaves merged with the frozen ones."""
        return merge(self.state.trainable, self._frozen)

    # ------------------------------------------------------------------ set-up helpers
    def _log_params(self, params, mask, train_sh, frozen_sh) -> None:
        shardings = merge(train_sh, frozen_sh)
        n_train = n_total = 0
        for (path, x), m, sh in zip(jax.tree_util.tree_flatten_with_path(params)[0], jax.tree.leaves(mask),
                                    jax.tree.leaves(shardings)):
            n_total += x.size
            n_train += x.size if m else 0
            log.info("param %-48s %-16s %-9s %-24s %s", parallel.path_str(path), tuple(x.shape),
                     "float32" if m else x.dtype, parallel.describe(sh), "train" if m else "frozen")
        log.info("mesh %s; %d of %d parameters train (%.1f%%)", dict(self.mesh.shape), n_train, n_total,
                 100.0 * n_train / max(n_total, 1))

    # ------------------------------------------------------------------ the step
    def _put_batch(self, batch: Mapping[str, np.ndarray]) -> dict:
        n = self.mesh.size // max(1, jax.process_count())
        out = {}
        for k, v in batch.items():
            v = np.asarray(v)
            if v.ndim == 0 or v.shape[0] % n:
                raise ValueError(f"batch[{k!r}] has shape {v.shape}; its leading (row) dim must be a multiple "
                                 f"of the {n} local devices of the mesh {dict(self.mesh.shape)}")
            out[k] = jax.make_array_from_process_local_data(parallel.batch_sharding(self.mesh), v)
        return out

    # ------------------------------------------------------------------ checkpoints
    def _restore_latest(self) -> None:
        """Restore the newest checkpoint that reads back; newer ones that do not are quarantined."""
        steps = sorted(self._mngr.all_steps(), reverse=True)
        if steps:
            _quiet_abandoned_reads()
        for step in steps:
            try:
                meta = self._mngr.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore()))["meta"]
            except Exception as e:                      # a truncated or garbled metadata file
                self._quarantine(step, e)
                continue
            changes = self._check_compatible(step, meta)
            fresh = self.state
            try:
                state = self._restore_state(step)
            except Exception as e:                      # a truncated or missing array file
                self._quarantine(step, e)
                continue
            if changes:
                state = state._replace(opt_state=_with_new_hyperparams(fresh.opt_state, state.opt_state))
            self.state, self._pending_data_state, self._step = state, meta["data"], step
            self.restore_info.update(step=step, config_changes=changes)
            log.info("resumed from %s at step %d", self.ckpt_dir, step)
            return
        if self.restore_info["quarantined"]:
            bad = "; ".join(f"step {q['step']}: {q['error']}" for q in self.restore_info["quarantined"])
            raise CheckpointError(
                f"no checkpoint in {self.ckpt_dir} restores ({bad}); each was moved aside to <step>.corrupt-<n> "
                "there. Run again to start from step 0, or move an intact copy of a step directory back")

    def _restore_state(self, step: int) -> TrainState:
        leaves, treedef = jax.tree.flatten(self.state)
        abstract = {f"{i:05d}": jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding)
                    for i, x in enumerate(leaves)}
        restored = self._mngr.restore(step, args=ocp.args.Composite(state=ocp.args.StandardRestore(abstract)))
        return jax.tree.unflatten(treedef, [restored["state"][f"{i:05d}"] for i in range(len(leaves))])

    def _check_compatible(self, step: int, meta: dict) -> list[str]:
        """The config changes this checkpoint resumes across ([] if none); raises if it cannot resume."""
        if meta.get("fingerprint") == self._fingerprint:
            return []
        old = meta.get("config")
        same_structure = meta.get("structure") == json.loads(json.dumps(self._structure))
        if same_structure and self._allow_config_change:
            changes = _config_changes(old, self._config)
            log.warning("resuming %s step %d with a changed configuration (allow_config_change): %s",
                        self.ckpt_dir, step, "; ".join(changes))
            return changes
        if same_structure:
            fix = ("resume with the same config, pass allow_config_change=True to resume it with the new "
                   "settings, or use a new ckpt_dir")
        else:
            fix = ("the saved state cannot be loaded into this one (allow_config_change cannot help): use a new "
                   f"ckpt_dir, or delete {self.ckpt_dir} to start from step 0")
        raise CheckpointMismatchError(
            f"checkpoint directory {self.ckpt_dir} (step {step}) was written by a different run configuration "
            f"(differs in {_config_diff(old, self._config, same_structure)}); {fix}")

    def _move_aside(self, step: int, label: str) -> str:
        """Rename a step directory to `<step>.<label>-<n>`, a name orbax does not read as a step; returns it."""
        src = os.path.join(self.ckpt_dir, str(step))
        n = 1
        while os.path.exists(f"{src}.{label}-{n}"):
            n += 1
        dst = f"{src}.{label}-{n}"
        if jax.process_index() == 0:
            os.rename(src, dst)
        self._mngr.reload()
        return dst

    def _quarantine(self, step: int, error: Exception) -> None:
        dst = self._move_aside(step, "corrupt")
        log.warning("checkpoint step %d in %s does not restore (%s); moved it to %s and trying the next older "
                    "checkpoint", step, self.ckpt_dir, _short(error), dst)
        self.restore_info["quarantined"].append({"step": step, "moved_to": dst, "error": _short(error)})

    def _set_aside_replaying(self, updates: int) -> list[str]:
        """Move aside the checkpoints that hold the parameters a non-finite step started from (those after
        `updates` updates): resuming one replays the same batch on the same parameters, whatever the settings."""
        moved = []
        for step in sorted(self._mngr.all_steps(), reverse=True):
            try:
                meta = self._mngr.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore()))["meta"]
            except Exception:                           # unreadable: the next resume quarantines it
                continue
            if meta.get("updates", step) != updates:
                break
            moved.append(self._move_aside(step, "nonfinite"))
        return moved

    def _repair_metrics(self, path: str) -> None:
        torn = metrics_file.repair(path)
        if torn:
            log.warning("%s ended in a line cut off mid-write (%d bytes, a run killed while logging); removed "
                        "it, the step it held is logged again", path, len(torn))

    def _record_config_changes(self) -> None:
        changes = self.restore_info["config_changes"]
        if not changes:
            return
        entry = {"time": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), "step": self.restore_info["step"],
                 "changes": changes}
        with open(os.path.join(self.log_dir, "config_history.jsonl"), "a") as f:
            f.write(json.dumps(entry) + "\n")

    def save(self, data: BatchSource | None = None) -> None:
        """Checkpoint the current state (and `data`'s position) unless this step is already saved."""
        if self._mngr is None:
            raise ValueError("this Trainer has no ckpt_dir; pass ckpt_dir=... to save checkpoints")
        step = self.step
        if self._mngr.latest_step() == step:
            return
        leaves = jax.tree.leaves(self.state)
        meta = {"step": step, "data": None if data is None else data.state(), "fingerprint": self._fingerprint,
                "config": self._config, "structure": self._structure,
                "updates": _updates_done(self.state.opt_state, step)}
        self._mngr.save(step, args=ocp.args.Composite(
            state=ocp.args.StandardSave({f"{i:05d}": x for i, x in enumerate(leaves)}),
            meta=ocp.args.JsonSave(meta)), force=True)

    # ------------------------------------------------------------------ the loop
    def fit(self, data: BatchSource, num_steps: int, *, seconds: float | None = None) -> list[dict[str, float]]:
        """Train until `num_steps` steps in total are done (a resumed run continues where it stopped).

        A step is one optimizer call on one batch (one micro-batch when the optimizer accumulates).
        Returns the host metrics of the steps run by this call: the loss_fn's metrics plus "loss",
        "grad_norm" (of this batch's gradient, before clipping), "lr" (for `make_optimizer` optimizers),
        "tokens_per_s" and "step" (steps done after it). Stops early, with a checkpoint, if `data` runs out,
        or once `seconds` of wall clock (compilation included) have passed since the call began: no step
        starts after the budget, and `self.stopped_by_budget` says it happened. Each process reads its own
        clock, so multi-host runs should bound themselves by steps.
        """
        if seconds is not None and not seconds > 0:
            raise ValueError(f"seconds={seconds} must be a positive wall-clock budget (or None)")
        self.stopped_by_budget = False
        if self._mngr is not None and not isinstance(data, BatchSource):
            raise TypeError(f"data ({type(data).__name__}) must have state()/restore() (the BatchSource "
                            "protocol) so its position can be checkpointed; see ArrayBatches")
        if self._pending_data_state is not None:
            data.restore(self._pending_data_state)
            self._pending_data_state = None
        history: list[dict[str, float]] = []
        start = self.step
        bar = tqdm(total=num_steps, initial=start, desc="train", disable=not self._progress, dynamic_ncols=True)
        try:
            t_last = t_start = time.perf_counter()
            while self.step < num_steps:
                if seconds is not None and time.perf_counter() - t_start >= seconds:
                    log.info("wall-clock budget of %.0f s reached after step %d of %d", seconds, self.step,
                             num_steps)
                    self.stopped_by_budget = True
                    break
                try:
                    batch = next(data)
                except StopIteration:
                    log.warning("data exhausted after step %d of %d", self.step, num_steps)
                    break
                step = self.step + 1
                with jax.profiler.StepTraceAnnotation("train", step_num=step):
                    self.state, metrics = self._step_fn(self.state, self._frozen, self._put_batch(batch))
                self._step = step
                metrics = {k: float(v) for k, v in jax.device_get(metrics).items()}
                bad = _first_nonfinite(metrics)
                if bad is not None:
                    raise self._nonfinite_error(step, bad, metrics[bad])
                now = time.perf_counter()
                metrics["tokens_per_s"] = _batch_tokens(batch) / max(now - t_last, 1e-9)
                t_last = now
                metrics["step"] = step
                history.append(metrics)
                self._write_metrics(step, metrics)
                bar.update(1)
                bar.set_postfix(loss=f"{metrics['loss']:.4f}", tok_s=f"{metrics['tokens_per_s']:.0f}")
                if self._mngr is not None and step % self.save_every == 0:
                    self.save(data)
            if self._mngr is not None:
                self.save(data)
        finally:
            bar.close()
            if self._mngr is not None:
                self._mngr.wait_until_finished()
        return history

    def _nonfinite_error(self, step: int, metric: str, value: float) -> NonFiniteError:
        """The error for a NaN/inf metric, saying truthfully which checkpoint a re-run resumes from."""
        saved, moved = None, []
        if self._mngr is not None:
            self._mngr.wait_until_finished()                # a save in flight counts once it is on disk
            moved = self._set_aside_replaying(_updates_before(self.state.opt_state, step))
            saved = self._mngr.latest_step()
        where = []
        if moved:
            where.append(f"the checkpoints {moved} hold the parameters this step started from (resuming one "
                         "would repeat it), so they were moved aside")
        if self.ckpt_dir is None:
            where.append("this Trainer has no ckpt_dir, so nothing was saved")
        elif saved is None:
            where.append(f"no {'other ' if moved else ''}checkpoint is in {self.ckpt_dir}: a re-run starts from "
                         "step 0")
        else:
            where.append(f"the newest checkpoint is step {saved} in {self.ckpt_dir}: a re-run resumes from it")
        return NonFiniteError(
            f"step {step}: metric {metric!r} is {value}; training stopped; {'; '.join(where)}. Lower the learning "
            "rate, clip gradients harder (a smaller clip_norm) or check the data for bad values (to resume a "
            "checkpoint with changed optimizer settings, pass allow_config_change=True)",
            step=step, metric=metric, value=value, checkpoint_step=saved, ckpt_dir=self.ckpt_dir, set_aside=moved)

    def _write_metrics(self, step: int, metrics: dict[str, float]) -> None:
        if self._jsonl is not None:
            self._jsonl.write(json.dumps(metrics) + "\n")
            self._jsonl.flush()
        if self._tb is not None:
            for name, value in metrics.items():
                if name != "step":
                    self._tb[0](name, value, step)

    def close(self) -> None:
        """Wait for pending checkpoints and close files."""
        if self._mngr is not None:
            self._mngr.wait_until_finished()
            self._mngr.close()
            self._mngr = None
        if self._jsonl is not None:
            self._jsonl.close()
            self._jsonl = None
        if self._tb is not None:
            self._tb[1]()
            self._tb = None

    def __enter__(self) -> "Trainer":
        return self

    def __exit__(self, *exc) -> None:
        self.close()
