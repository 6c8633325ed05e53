"""MiL's training schedule (MIL_SPEC §2.1-§2.5) as small functions over the generic `Trainer`.

    plan = schedule(cfg.n_layers, stage1=(0.75, 0.5), sft=(0.5,), dpo=True)
    s_cfg, s_params = hybridize(t_cfg, t_params, plan[0].attn_layers, mixer="mamba2", key=key)
    r = distill_stage((s_cfg, s_params), (t_cfg, t_params), rows, settings)        # stage 1, round 1
    s_cfg, s_params = hybridize(r.cfg, r.params, plan[1].attn_layers, ...)          # 25% -> 50% Mamba
    ...
    r = sft_stage((r.cfg, r.params), sft_rows, settings)                             # stage 2
    r = dpo_stage((r.cfg, r.params), (t_cfg, t_params), pairs, settings)             # stage 3

Stage 1 (layerwise distillation): α·CE on the pseudo-label targets + β·KL(p_teacher ‖ p_student) on the same
sequences; only the Mamba mixers train (`trainable_mask(…, "stage1")`); the teacher's parameters ride along as a
frozen part of the Trainer's params, so its logits come from inside the jitted step. Progressive rounds and the
further SFT rounds (25%, 12.5%, 0% attention) are `hybridize` of the previous round's model: layers already
Mamba keep their trained weights, newly converted ones start from the current (fine-tuned) attention weights.
Stage 2 (SFT): next-token CE on the response tokens, every parameter trains. Stage 3 (DPO): sigmoid DPO on
summed response log-probs against a frozen reference (the teacher by default, or the SFT student).

Batch schemas (numpy arrays with N rows of L tokens, right-padded):
  distill / SFT  {"tokens": int [N, L], "loss_mask": bool [N, L]}   (what `data.packing` makes)
  DPO            {"chosen_tokens", "rejected_tokens": int [N, L], "chosen_mask", "rejected_mask": bool [N, L]}
                 (`preference_arrays` builds them from `data.preference.encode_preference` outputs)
Masks mark target tokens (aligned with the tokens; the losses shift). Each stage is resumable: give it a
ckpt_dir and call it again after an interruption.

Each stage function is `run_setup(<kind>_setup(models, settings, ...), data, settings, ...)`; a `StageSetup`
(loss, params, trainable mask) can be built from abstract models too, and `precompile_stage(setup, settings,
stage_batch(setup, settings, data))` compiles the stage's train step ahead of its run.
A setup holds its loss as a function of the mesh's weight gathering (`StageSetup.loss_on(mesh)`): on a mesh
with fsdp > 1 every forward of the loss (teacher, student, policy, reference) all-gathers each layer's weights
where the layer runs (`parallel.fsdp_gather`), so activations keep the rows' sharding; on other meshes the loss
is the plain one.
"""
from __future__ import annotations

import dataclasses
import functools
import os
from typing import Any, Callable, Mapping, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh

from .. import parallel
from ..config import ModelConfig
from ..convert.hybridize import attention_layers_for, stepwise_order
from ..data.chat import DataError
from ..data.packing import BatchIterator
from ..models import forward
from ..ops import keyed_jit
from . import chunked, losses
from .loop import Trainer, precompile_step
from .optim import StagePreset, trainable_mask

Model = tuple[ModelConfig, Any]     # (cfg, params)
KINDS = ("stage0", "stage1", "sft", "dpo")
DISTILL_KEYS = ("tokens", "loss_mask")
TEACHER_HIDDEN = "teacher_hidden"   # optional distill batch array [N, L, Dt]: the teacher's final hidden states
DPO_KEYS = ("chosen_tokens", "chosen_mask", "rejected_tokens", "rejected_mask")


class StageError(ValueError):
    """A stage that cannot run with the inputs given (models, data or settings)."""


# ------------------------------------------------------------------------------------------------ the plan
@dataclasses.dataclass(frozen=True)
class PlannedStage:
    name: str                       # e.g. "stage1-mamba25", "sft-mamba50", "dpo-mamba50"
    kind: str                       # "stage0" | "stage1" | "sft" | "dpo"
    attn_layers: tuple[int, ...]    # attention layers of the student trained in this stage


def _mamba_pct(n_layers: int, attn: Sequence[int], fraction: float | None) -> str:
    share = 1.0 - fraction if fraction is not None else 1.0 - len(attn) / n_layers
    return f"mamba{100 * share:g}"


def schedule(n_layers: int, *, stage1: Sequence[float] = (0.75, 0.5), sft: Sequence[float] = (0.5,),
             dpo: bool = True, stepwise: bool = False, align: bool = False, order=None,
             interleave: bool = False) -> list[PlannedStage]:
    """The stages of a MiL run: progressive stage-1 rounds, SFT rounds, then DPO.

    stage1: attention fractions of the distillation rounds, each from the previous round's model (MiL: 0.75
      then 0.5, i.e. first 25% then 50% Mamba; layer sets from `attention_layers_for`). stepwise=True instead
      converts one layer per round in MiL's stepwise order until the last fraction's layer set is reached.
    sft: attention fractions of the SFT rounds; the first is stage 2 proper (normally the last stage-1
      fraction), later ones (0.25, 0.125, 0.0) convert more layers of the previous SFT model (MIL_SPEC §8.8).
    dpo: align the last model.
    align: put a stage-0 round ("align-…", kind "stage0": layer-wise alignment of the newly converted mixers,
      `train.align`) before every stage-1 round, on the same layer set.
    order: the layers in the order they are converted (`attention_layers_for`; e.g. by how well an aligned
      mixer reproduces each attention layer, `train.align.conversion_order`); None: MiL's.
    interleave: every SFT round whose fraction is also a stage-1 fraction runs right after that stage-1 round
      (end-to-end at each fraction; the next stage-1 round continues from it); the other SFT rounds follow the
      last stage-1 round as without it.
    Every round keeps a subset of the previous round's attention layers (a Mamba layer never turns back).
    """
    for name, fracs in (("stage1", stage1), ("sft", sft)):
        bad = [f for f in fracs if not 0.0 <= float(f) <= 1.0]
        if bad:
            raise StageError(f"{name} attention fractions {bad} must lie in [0, 1]")
    rounds: list[tuple[str, tuple[int, ...], float | None]] = []
    if stepwise and stage1:
        target = set(attention_layers_for(n_layers, float(stage1[-1]), order))
        steps = [i for i in (stepwise_order(n_layers) if order is None else order) if i not in target]
        for s in range(1, len(steps) + 1):
            attn = tuple(i for i in range(n_layers) if i not in steps[:s])
            rounds.append((f"stage1-step{s:02d}", attn, None))
    else:
        rounds += [("stage1", tuple(attention_layers_for(n_layers, float(f), order)), float(f)) for f in stage1]
    sft_rounds = [("sft", tuple(attention_layers_for(n_layers, float(f), order)), float(f)) for f in sft]
    if interleave:             # stepwise rounds have no fraction (None), so no SFT round matches one
        after = {r[2]: r for r in sft_rounds if r[2] in {s1[2] for s1 in rounds}}
        if not after:
            raise StageError(f"interleave puts each SFT round right after the stage-1 round at its fraction, but "
                             f"the SFT fractions {list(sft)} share none with the stage-1 fractions {list(stage1)}"
                             + (" (stepwise rounds have no fraction of their own)" if stepwise else ""))
        sft_rounds = [r for r in sft_rounds if r[2] not in after]
        rounds = [r for s1 in rounds for r in ([s1, after[s1[2]]] if s1[2] in after else [s1])]
    rounds += sft_rounds
    plan, prev = [], tuple(range(n_layers))
    for kind, attn, frac in rounds:
        if not set(attn) <= set(prev):
            raise StageError(f"{kind} round with attention fraction {frac} keeps attention layers "
                             f"{sorted(set(attn) - set(prev))} that an earlier round already made Mamba; list "
                             "the fractions in decreasing order")
        name = kind if kind.startswith("stage1-step") else f"{kind}-{_mamba_pct(n_layers, attn, frac)}"
        if any(p.name == name for p in plan):
            raise StageError(f"two {kind} rounds at the same attention fraction ({name}); each round after the "
                             "first must convert more layers")
        if kind == "stage1" and attn == prev:
            raise StageError(f"stage-1 round {name} converts no layer (its layer set equals the previous one)")
        if align and kind.startswith("stage1"):
            plan.append(PlannedStage(name.replace("stage1", "align", 1), "stage0", attn))
        plan.append(PlannedStage(name, "stage1" if kind.startswith("stage1") else kind, attn))
        prev = attn
    if dpo:
        if not plan:
            raise StageError("DPO needs a hybrid student: enable stage 1 or SFT rounds")
        plan.append(PlannedStage(f"dpo-{plan[-1].name.partition('-')[2]}", "dpo", prev))
    return plan


# ------------------------------------------------------------------------------------------------ settings
@dataclasses.dataclass(frozen=True)
class StageSettings:
    """How long and how a stage trains; the optimizer and loss weights come from `preset`.

    steps counts optimizer updates; each takes preset.accum_steps micro-batches of batch_size rows (global,
    split over the mesh's devices). seconds: a wall-clock budget; the stage stops cleanly (with a checkpoint)
    before the first step that would start after it (distill_stage's StageResult.stopped_by_budget says so).
    """
    steps: int
    batch_size: int
    preset: StagePreset
    seed: int = 0
    save_every: int = 1000
    progress: bool = True
    allow_config_change: bool = False   # resume a checkpoint made with other optimizer settings or steps
    seconds: float | None = None        # wall-clock budget of this call (compilation included); None: none


@dataclasses.dataclass
class StageResult:
    cfg: ModelConfig
    params: Any                     # the trained model, each leaf in its input dtype
    history: list[dict[str, float]]  # metrics of the steps this call ran (empty if it resumed at the end)
    start_step: int                 # micro-steps already done when this call began (> 0: resumed)
    restore: dict = dataclasses.field(default_factory=dict)   # what resuming found: Trainer.restore_info
    stopped_by_budget: bool = False  # distill_stage: settings.seconds ran out before settings.steps were done


# ------------------------------------------------------------------------------------------------ checks
def _check_data(data: Mapping[str, np.ndarray], keys: Sequence[str], *, stage: str, cfg: ModelConfig,
                settings: StageSettings, mesh: Mesh | None) -> dict[str, np.ndarray]:
    missing = [k for k in keys if k not in data]
    if missing:
        raise StageError(f"{stage}: the data lacks {missing}; it needs arrays {list(keys)} (see l2m_jax.train.stages)")
    arrays = {k: np.asarray(data[k]) for k in keys}
    shapes = {k: v.shape for k, v in arrays.items() if k != TEACHER_HIDDEN}
    if len({s for s in shapes.values()}) != 1 or len(next(iter(shapes.values()))) != 2:
        raise StageError(f"{stage}: data arrays must all be [N, L], got {shapes}")
    n, length = next(iter(shapes.values()))
    if TEACHER_HIDDEN in arrays:
        h = arrays[TEACHER_HIDDEN]
        if h.ndim != 3 or h.shape[:2] != (n, length) or not jnp.issubdtype(h.dtype, jnp.floating):
            raise StageError(f"{stage}: {TEACHER_HIDDEN} must be the teacher's float hidden states [N, L, D] of "
                             f"the {n} x {length} token rows, got {h.dtype} {h.shape}; compute them with "
                             "l2m_jax.train.stages.teacher_hidden_states(teacher, data['tokens'])")
    if n == 0:
        raise StageError(f"{stage}: the dataset is empty (0 rows); check the data sources and length limits")
    if settings.steps < 1 or settings.batch_size < 1:
        raise StageError(f"{stage}: steps={settings.steps} and batch_size={settings.batch_size} must be positive")
    if settings.batch_size > n:
        raise StageError(f"{stage}: batch_size={settings.batch_size} exceeds the {n} rows of data; lower the "
                         "batch size or add data")
    n_dev = (mesh.size if mesh is not None else jax.device_count()) // max(1, jax.process_count())
    if settings.batch_size % n_dev:
        raise StageError(f"{stage}: batch_size={settings.batch_size} is not a multiple of the {n_dev} devices "
                         "the batch is split over")
    for k, v in arrays.items():
        if k == TEACHER_HIDDEN:
            continue
        if k.endswith("tokens"):
            if not np.issubdtype(v.dtype, np.integer):
                raise StageError(f"{stage}: {k} must hold integer token ids, got {v.dtype}")
            if v.min() < 0 or v.max() >= cfg.vocab_size:
                raise StageError(f"{stage}: {k} has ids in [{v.min()}, {v.max()}] but the model's vocabulary has "
                                 f"{cfg.vocab_size}; were the data tokenized with the teacher's tokenizer?")
        elif not arrays[k][:, 1:].any():
            raise StageError(f"{stage}: {k} selects no target token in any row; nothing would be learned")
    if cfg.attn_layers and length > cfg.max_position_embeddings:
        raise StageError(f"{stage}: rows of {length} tokens exceed the model's {cfg.max_position_embeddings} "
                         "positions; use a shorter seq_len")
    return arrays


def _check_pair(student: ModelConfig, other: ModelConfig, what: str) -> None:
    if student.vocab_size != other.vocab_size:
        raise StageError(f"the student's vocabulary ({student.vocab_size}) differs from the {what}'s "
                         f"({other.vocab_size}): they must share one tokenizer")


COMPUTE_DTYPES = ("float32", "bfloat16", "float16")
TRAINS = ("stage1", "stage1+attention", "kd")      # what a distillation stage trains (optim.trainable_mask)


def _compute_entry(compute_dtype: str | None) -> dict:
    """The checkpoint-config entry of a compute dtype: none at the default, so older runs still resume."""
    return {} if compute_dtype is None else {"compute_dtype": str(compute_dtype)}


def computing_in(cfg: ModelConfig, compute_dtype: str | None) -> ModelConfig:
    """`cfg` with its activations and matmuls in `compute_dtype` (mixed precision): the parameters keep their
    own dtype (the Trainer's float32 masters, a float32 teacher) and are cast where they are used; norms,
    softmaxes, the SSM state and the loss stay float32. None: `cfg` unchanged."""
    if compute_dtype is None:
        return cfg
    if str(compute_dtype) not in COMPUTE_DTYPES:
        raise StageError(f"compute_dtype={compute_dtype!r}; choose one of {COMPUTE_DTYPES} (or None: the "
                         "models' own dtype)")
    return cfg.replace(dtype=str(compute_dtype))


def _all(tree: Any, value: bool) -> Any:
    return jax.tree.map(lambda _: value, tree)


# ------------------------------------------------------------------------------------------------ running
@dataclasses.dataclass(frozen=True)
class StageSetup:
    """Everything a stage hands the Trainer but the data: its loss, parameters and trainable mask.

    Built by `distill_setup`, `sft_setup`, `dpo_setup` (and `align.align_setup`) from models whose parameters
    are arrays or jax.ShapeDtypeStructs, so that `run_setup` (the real run) and `precompile_stage` (the
    program alone, ahead of time) go through the same construction.
    """
    name: str                   # "stage0" | "stage1" | "sft" | "dpo": the stage in the run config
    label: str                  # how errors name the stage ("stage 1", "SFT", ...)
    keys: tuple[str, ...]       # the batch arrays the loss reads (DISTILL_KEYS or DPO_KEYS)
    cfg: ModelConfig            # the trained model's config (the data's token ids are checked against it)
    make_loss: Callable         # make_loss(gather=None | fn) -> loss_fn(params, batch, rng); see `loss_on`
    params: dict                # the Trainer's params: the trained model, plus a frozen teacher/reference
    mask: dict
    part: str | None            # the key of params holding the trained model (None: params is the model)
    config: dict                # the stage's settings, recorded in its checkpoints' config

    def loss_on(self, mesh: Mesh | None) -> Callable:
        """The stage's loss_fn for a step on `mesh` (None: the Trainer's default mesh, all devices on "data"):
        with `weight_gather(mesh)`, so on an fsdp mesh each layer gathers its weights instead of the batch."""
        return self.make_loss(gather=weight_gather(mesh))


def weight_gather(mesh: Mesh | None) -> Callable | None:
    """`parallel.fsdp_gather(mesh)` where the mesh splits parameters over "fsdp" (size > 1); else None, and
    the stages' losses are exactly the ones without gathering (single-device and data-parallel programs)."""
    if mesh is None or dict(mesh.shape).get(parallel.FSDP, 1) == 1:
        return None
    return parallel.fsdp_gather(mesh)


def _run(name: str, loss_fn: Callable, params: dict, mask: dict, data: dict[str, np.ndarray],
         settings: StageSettings, *, mesh: Mesh | None, ckpt_dir, log_dir,
         config: Any) -> tuple[Any, list, int, dict]:
    """Train with a Trainer; returns (full trained params, history, start micro-step, Trainer.restore_info)."""
    accum = settings.preset.accum_steps
    run_config = {"stage": name, "config": config, "steps": settings.steps, "batch_size": settings.batch_size,
                  "seed": settings.seed, "preset": dataclasses.asdict(settings.preset),
                  "rows": int(next(iter(data.values())).shape[0]), "seq_len": int(next(iter(data.values())).shape[1])}
    batches = BatchIterator(data, settings.batch_size, seed=settings.seed, shuffle=True)
    with Trainer(loss_fn, params, mask, settings.preset.make_optimizer(settings.steps), mesh,
                 ckpt_dir=None if ckpt_dir is None else os.fspath(ckpt_dir),
                 log_dir=None if log_dir is None else os.fspath(log_dir), config=run_config,
                 save_every=settings.save_every, rng=settings.seed, progress=settings.progress,
                 allow_config_change=settings.allow_config_change) as trainer:
        start = trainer.step
        history = trainer.fit(batches, settings.steps * accum, seconds=settings.seconds)
        return trainer.params, history, start, trainer.restore_info


def run_setup(setup: StageSetup, data: Mapping[str, np.ndarray], settings: StageSettings, *,
              mesh: Mesh | None = None, ckpt_dir=None, log_dir=None, config: Any = None) -> StageResult:
    """Train a stage set up by `*_setup` on `data` (its `keys`); `config` is recorded as the run's "extra"."""
    arrays = _check_data(data, setup.keys, stage=setup.label, cfg=setup.cfg, settings=settings, mesh=mesh)
    trained, history, start, restore = _run(setup.name, setup.loss_on(mesh), setup.params, setup.mask, arrays,
                                            settings, mesh=mesh, ckpt_dir=ckpt_dir, log_dir=log_dir,
                                            config={**setup.config, "extra": config})
    model, before = ((trained, setup.params) if setup.part is None
                     else (trained[setup.part], setup.params[setup.part]))
    short = settings.seconds is not None and start + len(history) < settings.steps * settings.preset.accum_steps
    return StageResult(setup.cfg, _like(model, before), history, start, restore, stopped_by_budget=short)


def stage_batch(setup: StageSetup, settings: StageSettings, data: Mapping[str, Any]) -> dict:
    """The micro-batch the stage's step receives (process-local: settings.batch_size rows), as
    jax.ShapeDtypeStructs, from `data` shaped like the stage's dataset (arrays, or anything with .shape
    [N, L] and .dtype: only the row length and dtypes are read)."""
    missing = [k for k in setup.keys if k not in data]
    if missing:
        raise StageError(f"{setup.label}: the data lacks {missing}; it needs arrays {list(setup.keys)}")
    return {k: jax.ShapeDtypeStruct((settings.batch_size, *data[k].shape[1:]), np.dtype(data[k].dtype))
            for k in setup.keys}


def precompile_stage(setup: StageSetup, settings: StageSettings, batch: Mapping[str, Any], *,
                     mesh: Mesh | None = None) -> list:
    """Compile the train step `run_setup(setup, data, settings, mesh=mesh)` will run, without data or
    weights (setup's params may be abstract); batch: `stage_batch(...)`. With JAX's persistent compilation
    cache on, the real stage then loads the executable instead of compiling it (`loop.precompile_step`)."""
    mesh = parallel.make_mesh() if mesh is None else mesh
    return precompile_step(setup.loss_on(mesh), setup.params, setup.mask,
                           settings.preset.make_optimizer(settings.steps), mesh, batch, rng=settings.seed)


def _like(new: Any, old: Any) -> Any:
    """`new` with every leaf cast back to the dtype of the matching leaf of `old` (fp32 masters -> cfg dtype)."""
    return jax.tree.map(lambda a, b: a.astype(b.dtype), new, old)


def _check_loss_chunk(loss_chunk: int | None) -> None:
    if loss_chunk is not None and (isinstance(loss_chunk, bool) or not isinstance(loss_chunk, int)
                                   or loss_chunk < 1):
        raise StageError(f"loss_chunk={loss_chunk!r} must be a positive int (positions per chunk) or None")


def distill_loss_fn(student_cfg: ModelConfig, teacher_cfg: ModelConfig, *, alpha: float, beta: float,
                    kl_reduction: str = "token_mean", temperature: float = 1.0, remat: bool = False,
                    loss_chunk: int | None = None, gather: Callable | None = None,
                    teacher_cached: bool = False) -> Callable:
    """Stage-1 loss over params {"student", "teacher"} and a distill batch (see `losses.stage1_loss`).

    A batch without "loss_mask" makes every token a target; remat rematerialises both models' layers.
    Token ids are not range-checked inside the step: the stages check their data once (`_check_data`).
    loss_chunk: None computes whole [B, L, V] logits; an int computes the loss from the hidden states in chunks
    of that many positions (`chunked.stage1_loss_chunked`: the same loss, no [B, L, V] float32 tensor).
    gather: None, or `parallel.fsdp_gather(mesh)` on an fsdp mesh (`weight_gather`): both models gather each
    layer's weights (and the embedding and head) where they are used, as in `forward`.
    teacher_cached: the batch carries the teacher's final hidden states (`TEACHER_HIDDEN` [B, L, Dt], computed
    once per row by `teacher_hidden_states`), so the step runs only the teacher's head, not its layers: the
    same loss, without a teacher forward in every step.
    """
    _check_loss_chunk(loss_chunk)

    def teacher(params, batch):                     # [B, L, Dt] final hidden states, [Dt, V] head
        if teacher_cached:
            return (jax.lax.stop_gradient(batch[TEACHER_HIDDEN]),
                    jax.lax.stop_gradient(chunked.head_of(teacher_cfg, params["teacher"], gather=gather)))
        return jax.lax.stop_gradient(chunked.hidden_and_head(teacher_cfg, params["teacher"], batch["tokens"],
                                                             remat=remat, gather=gather))

    def loss_fn(params, batch, rng):
        tokens = batch["tokens"]                                                    # [B, L]
        if loss_chunk is not None:
            targets, target_mask = losses.shift_for_next_token(tokens, batch.get("loss_mask"))
            t_hidden, t_head = teacher(params, batch)                               # [B, L, Dt], [Dt, V]
            s_hidden, s_head = chunked.hidden_and_head(student_cfg, params["student"], tokens, remat=remat,
                                                       gather=gather)              # [B, L, D], [D, V]
            return chunked.stage1_loss_chunked(s_hidden, t_hidden, s_head, t_head, targets, target_mask,
                                               alpha=alpha, beta=beta, kl_reduction=kl_reduction,
                                               temperature=temperature, chunk=loss_chunk)
        if teacher_cached:
            t_logits = chunked.logits_from(*teacher(params, batch))                 # [B, L, V]
        else:
            t_logits, _ = forward(teacher_cfg, params["teacher"], tokens, remat=remat, checked=False,
                                  gather=gather)                                    # [B, L, V]
        s_logits, _ = forward(student_cfg, params["student"], tokens, remat=remat, checked=False,
                              gather=gather)                                        # [B, L, V]
        targets, target_mask = losses.shift_for_next_token(tokens, batch.get("loss_mask"))
        return losses.stage1_loss(s_logits, jax.lax.stop_gradient(t_logits), targets, target_mask, alpha=alpha,
                                  beta=beta, kl_reduction=kl_reduction, temperature=temperature)
    return loss_fn


@functools.partial(jax.jit, static_argnums=0)
def _final_hidden(cfg: ModelConfig, params, tokens):     # tokens [B, L] -> final-normed hidden [B, L, D]
    return chunked.hidden_and_head(cfg, params, tokens)[0]


def teacher_hidden_states(teacher: Model, tokens: np.ndarray, *, batch_size: int = 32,
                          compute_dtype: str | None = None) -> np.ndarray:      # [N, L, D] in the compute dtype
    """The teacher's final-normed hidden states for every row of tokens int [N, L], computed once: with them as
    the distill data's `TEACHER_HIDDEN` (`distill_stage(..., teacher_cached=True)`) a stage-1 or KD step runs
    only the teacher's head, not its layers. Rows go through in batches of `batch_size` (the last one filled
    up with copies, so one program serves every batch); compute_dtype as the stage's (`computing_in`), which
    is also the dtype of the result (bf16 halves the host memory: N·L·D·2 bytes)."""
    cfg, params = teacher
    tokens = np.asarray(tokens)
    if tokens.ndim != 2 or not np.issubdtype(tokens.dtype, np.integer) or tokens.shape[0] == 0:
        raise StageError(f"teacher_hidden_states needs token rows int [N, L], got {tokens.dtype} {tokens.shape}")
    if batch_size < 1:
        raise StageError(f"batch_size={batch_size} must be >= 1")
    run_cfg = computing_in(cfg, compute_dtype)
    out = []
    for s in range(0, len(tokens), batch_size):
        rows = tokens[s:s + batch_size]
        full = rows if len(rows) == batch_size or len(tokens) < batch_size else np.concatenate(
            [rows, np.repeat(rows[:1], batch_size - len(rows), axis=0)])
        out.append(np.asarray(_final_hidden(run_cfg, params, jnp.asarray(full, jnp.int32)))[:len(rows)])
    return np.concatenate(out)


def precompile_teacher_hidden(teacher: Model, batch_size: int, seq_len: int, *,
                              compute_dtype: str | None = None) -> None:
    """Compile what `teacher_hidden_states` runs per batch (teacher params may be abstract), so the call after
    it, in this process or from the persistent compilation cache, compiles nothing."""
    cfg, params = teacher
    _final_hidden.lower(computing_in(cfg, compute_dtype), params,
                        jax.ShapeDtypeStruct((batch_size, seq_len), jnp.int32)).compile()


def distill_setup(student: Model, teacher: Model, settings: StageSettings, *, kl_reduction: str = "token_mean",
                  temperature: float = 1.0, trains: str = "stage1", loss_chunk: int | None = None,
                  compute_dtype: str | None = None, teacher_cached: bool = False) -> StageSetup:
    """`distill_stage`'s loss, params and mask (params may be jax.ShapeDtypeStructs); checks the settings.

    compute_dtype: both models' forward passes run in it (`computing_in`); the result keeps the student's cfg.
    teacher_cached: the data carries `TEACHER_HIDDEN` (see `distill_loss_fn`)."""
    (s_cfg, s_params), (t_cfg, t_params) = student, teacher
    _check_pair(s_cfg, t_cfg, "teacher")
    alpha, beta = settings.preset.ce_weight, settings.preset.kl_weight
    if alpha is None or beta is None:
        raise StageError("stage 1 needs loss weights: set ce_weight (α) and kl_weight (β) in its StagePreset")
    if kl_reduction not in losses.KL_REDUCTIONS:
        raise StageError(f"kl_reduction={kl_reduction!r}; choose one of {losses.KL_REDUCTIONS}")
    if trains not in TRAINS:
        raise StageError(f"trains={trains!r}; choose 'stage1' (Mamba mixers only), 'stage1+attention' (every "
                         "mixer, attention included) or 'kd' (everything)")
    _check_loss_chunk(loss_chunk)
    make_loss = functools.partial(distill_loss_fn, computing_in(s_cfg, compute_dtype),
                                  computing_in(t_cfg, compute_dtype), alpha=alpha, beta=beta, kl_reduction=kl_reduction, temperature=temperature,
                                  loss_chunk=loss_chunk, teacher_cached=teacher_cached)
    mask = {"student": trainable_mask(s_params, s_cfg, trains), "teacher": _all(t_params, False)}
    keys = DISTILL_KEYS + ((TEACHER_HIDDEN,) if teacher_cached else ())
    return StageSetup("stage1", "stage 1", keys, s_cfg, make_loss, {"student": s_params, "teacher": t_params},
                      mask, "student", {"student": s_cfg.to_dict(), "teacher": t_cfg.to_dict(),
                                        "kl_reduction": kl_reduction, "temperature": temperature, "trains": trains,
                                        **_compute_entry(compute_dtype)})


def distill_stage(student: Model, teacher: Model, data: Mapping[str, np.ndarray], settings: StageSettings, *,
                  kl_reduction: str = "token_mean", temperature: float = 1.0, mesh: Mesh | None = None,
                  ckpt_dir=None, log_dir=None, config: Any = None, trains: str = "stage1",
                  loss_chunk: int | None = None, compute_dtype: str | None = None,
                  teacher_cached: bool = False) -> StageResult:
    """Stage 1 (one progressive round): train the student's Mamba mixers on α·CE + β·KL against the teacher.

    α, β are settings.preset.ce_weight / kl_weight. kl_reduction "token_mean" (default) averages the KL over
    the target positions; "mil" is the original's unmasked sum over positions divided by the batch size.
    trains="kd" trains every student parameter instead (MiL's later end-to-end KD; also how a draft model
    for speculative decoding is distilled); "stage1+attention" also trains the attention layers MiL keeps frozen.
    loss_chunk: see `distill_loss_fn` (None: whole logits). compute_dtype: see `computing_in`.
    teacher_cached: `data` carries the teacher's hidden states (`teacher_hidden_states`), computed once per row.
    """
    setup = distill_setup(student, teacher, settings, kl_reduction=kl_reduction, temperature=temperature,
                          trains=trains, loss_chunk=loss_chunk, compute_dtype=compute_dtype,
                          teacher_cached=teacher_cached)
    return run_setup(setup, data, settings, mesh=mesh, ckpt_dir=ckpt_dir, log_dir=log_dir, config=config)


def sft_loss_fn(cfg: ModelConfig, *, loss_chunk: int | None = None, gather: Callable | None = None) -> Callable:
    """SFT loss (`losses.sft_loss`); loss_chunk as in `distill_loss_fn` (`chunked.sft_loss_chunked`), gather
    too."""
    _check_loss_chunk(loss_chunk)

    def loss_fn(params, batch, rng):
        if loss_chunk is not None:
            hidden, head = chunked.hidden_and_head(cfg, params, batch["tokens"], gather=gather)  # [B, L, D], [D, V]
            return chunked.sft_loss_chunked(hidden, head, batch["tokens"], batch["loss_mask"], chunk=loss_chunk)
        logits, _ = forward(cfg, params, batch["tokens"], checked=False, gather=gather)   # [B, L, V]
        return losses.sft_loss(logits, batch["tokens"], batch["loss_mask"])
    return loss_fn


def sft_setup(student: Model, settings: StageSettings, *, loss_chunk: int | None = None,
              compute_dtype: str | None = None) -> StageSetup:
    """`sft_stage`'s loss, params and mask (params may be jax.ShapeDtypeStructs); compute_dtype: `computing_in`."""
    cfg, params = student
    _check_loss_chunk(loss_chunk)
    return StageSetup("sft", "SFT", DISTILL_KEYS, cfg,
                      functools.partial(sft_loss_fn, computing_in(cfg, compute_dtype), loss_chunk=loss_chunk),
                      params, trainable_mask(params, cfg, "sft"), None,
                      {"student": cfg.to_dict(), **_compute_entry(compute_dtype)})


def sft_stage(student: Model, data: Mapping[str, np.ndarray], settings: StageSettings, *,
              mesh: Mesh | None = None, ckpt_dir=None, log_dir=None, config: Any = None,
              loss_chunk: int | None = None, compute_dtype: str | None = None) -> StageResult:
    """Stage 2 (or a further SFT round): next-token CE on the response tokens; every parameter trains.

    loss_chunk: see `distill_loss_fn` (None: whole logits). compute_dtype: see `computing_in`."""
    return run_setup(sft_setup(student, settings, loss_chunk=loss_chunk, compute_dtype=compute_dtype), data,
                     settings, mesh=mesh, ckpt_dir=ckpt_dir, log_dir=log_dir, config=config)


def dpo_loss_fn(policy_cfg: ModelConfig, ref_cfg: ModelConfig, *, beta: float,
                loss_chunk: int | None = None, gather: Callable | None = None) -> Callable:
    """Sigmoid DPO over params {"policy", "reference"}; chosen and rejected rows share one forward.

    loss_chunk as in `distill_loss_fn` (`chunked.sequence_logprobs_chunked`), gather too (both models)."""
    _check_loss_chunk(loss_chunk)

    def loss_fn(params, batch, rng):
        b = batch["chosen_tokens"].shape[0]
        tokens = jnp.concatenate([batch["chosen_tokens"], batch["rejected_tokens"]], axis=0)    # [2B, L]
        mask = jnp.concatenate([batch["chosen_mask"], batch["rejected_mask"]], axis=0)          # [2B, L]
        if loss_chunk is not None:
            p_hidden, p_head = chunked.hidden_and_head(policy_cfg, params["policy"], tokens,
                                                       gather=gather)              # [2B, L, D], [D, V]
            r_hidden, r_head = jax.lax.stop_gradient(
                chunked.hidden_and_head(ref_cfg, params["reference"], tokens, gather=gather))
            p = chunked.sequence_logprobs_chunked(p_hidden, p_head, tokens, mask, loss_chunk)   # [2B]
            r = chunked.sequence_logprobs_chunked(r_hidden, r_head, tokens, mask, loss_chunk)
            return losses.dpo_loss(p[:b], p[b:], r[:b], r[b:], beta=beta)
        p_logits, _ = forward(policy_cfg, params["policy"], tokens, checked=False, gather=gather)   # [2B, L, V]
        r_logits, _ = forward(ref_cfg, params["reference"], tokens, checked=False, gather=gather)
        p = losses.sequence_logprobs(p_logits, tokens, mask)                                    # [2B]
        r = jax.lax.stop_gradient(losses.sequence_logprobs(r_logits, tokens, mask))
        return losses.dpo_loss(p[:b], p[b:], r[:b], r[b:], beta=beta)
    return loss_fn


@keyed_jit(static_argnums=(0, 1))
def dpo_pair_logratios(policy_cfg: ModelConfig, ref_cfg: ModelConfig, policy_params, ref_params,
                       batch: Mapping[str, jax.Array]) -> tuple[jax.Array, jax.Array]:
    """Per preference pair, the sequence log-ratios π − ref of the chosen and of the rejected answer (fp32 [B]
    each; summed over the response tokens, as `dpo_loss_fn` sums them). One compiled program per pair of configs
    and batch shape: DPO's held-out evaluation before and after training shares it (`preference_metrics`)."""
    b = batch["chosen_tokens"].shape[0]
    tokens = jnp.concatenate([batch["chosen_tokens"], batch["rejected_tokens"]], axis=0)        # [2B, L]
    mask = jnp.concatenate([batch["chosen_mask"], batch["rejected_mask"]], axis=0)              # [2B, L]
    p = losses.sequence_logprobs(forward(policy_cfg, policy_params, tokens, checked=False)[0], tokens, mask)
    r = losses.sequence_logprobs(forward(ref_cfg, ref_params, tokens, checked=False)[0], tokens, mask)
    ratio = p - r
    return ratio[:b], ratio[b:]


def preference_metrics(chosen_logratio: np.ndarray, rejected_logratio: np.ndarray, beta: float) -> dict:
    """`losses.dpo_loss`'s metrics over whole arrays of per-pair log-ratios (numpy): loss, reward_margin,
    reward_accuracy (chosen reward above the rejected one)."""
    margin = beta * (np.asarray(chosen_logratio, np.float64) - np.asarray(rejected_logratio, np.float64))
    return {"loss": float(np.mean(np.logaddexp(0.0, -margin))), "reward_margin": float(np.mean(margin)),
            "reward_accuracy": float(np.mean(margin > 0))}


def dpo_setup(policy: Model, reference: Model, settings: StageSettings, *,
              loss_chunk: int | None = None, compute_dtype: str | None = None) -> StageSetup:
    """`dpo_stage`'s loss, params and mask (params may be jax.ShapeDtypeStructs); checks the settings.
    compute_dtype: both models' forward passes run in it (`computing_in`)."""
    (p_cfg, p_params), (r_cfg, r_params) = policy, reference
    _check_pair(p_cfg, r_cfg, "reference")
    if settings.preset.dpo_beta is None:
        raise StageError("DPO needs dpo_beta in its StagePreset")
    mask = {"policy": trainable_mask(p_params, p_cfg, "dpo"), "reference": _all(r_params, False)}
    _check_loss_chunk(loss_chunk)
    return StageSetup("dpo", "DPO", DPO_KEYS, p_cfg,
                      functools.partial(dpo_loss_fn, computing_in(p_cfg, compute_dtype),
                                        computing_in(r_cfg, compute_dtype), beta=settings.preset.dpo_beta,
                                        loss_chunk=loss_chunk),
                      {"policy": p_params, "reference": r_params}, mask, "policy",
                      {"policy": p_cfg.to_dict(), "reference": r_cfg.to_dict(), **_compute_entry(compute_dtype)})


def dpo_stage(policy: Model, reference: Model, data: Mapping[str, np.ndarray], settings: StageSettings, *,
              mesh: Mesh | None = None, ckpt_dir=None, log_dir=None, config: Any = None,
              loss_chunk: int | None = None, compute_dtype: str | None = None) -> StageResult:
    """Stage 3: DPO of the policy against a frozen reference (the teacher, or a copy of the SFT student).

    β is settings.preset.dpo_beta. The reference's parameters are a frozen part of the Trainer's params.
    loss_chunk: see `distill_loss_fn` (None: whole logits). compute_dtype: see `computing_in`.
    """
    return run_setup(dpo_setup(policy, reference, settings, loss_chunk=loss_chunk, compute_dtype=compute_dtype),
                     data, settings, mesh=mesh, ckpt_dir=ckpt_dir, log_dir=log_dir, config=config)


# ------------------------------------------------------------------------------------------------ DPO data
def preference_arrays(encoded: Sequence[Mapping[str, Any]], seq_len: int, pad_id: int) -> dict[str, np.ndarray]:
    """Pad `encode_preference` outputs into the DPO batch schema: four arrays [N, seq_len]."""
    if len(encoded) == 0:
        raise DataError("preference_arrays: no preference pairs")
    out = {"chosen_tokens": np.full((len(encoded), seq_len), pad_id, np.int32),
           "rejected_tokens": np.full((len(encoded), seq_len), pad_id, np.int32),
           "chosen_mask": np.zeros((len(encoded), seq_len), bool),
           "rejected_mask": np.zeros((len(encoded), seq_len), bool)}
    for i, e in enumerate(encoded):
        for side in ("chosen", "rejected"):
            ids, mask = np.asarray(e[f"{side}_ids"]), np.asarray(e[f"{side}_mask"])
            if ids.size > seq_len:
                raise DataError(f"preference pair {i}: the {side} sequence has {ids.size} tokens, more than "
                                f"seq_len={seq_len}; encode with max_len <= seq_len")
            out[f"{side}_tokens"][i, :ids.size] = ids
            out[f"{side}_mask"][i, :ids.size] = mask
    return out
