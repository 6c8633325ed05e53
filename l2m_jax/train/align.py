"""Stage 0, layer-wise alignment: each converted mixer regresses the attention output it replaces.

Not in MiL; the hidden-state alignment of MOHAWK and the attention transfer of LoLCATs / RADLADS. One forward
of the reference model (the teacher, whose attention layers the student's Mamba layers replace) gives, for every
converted layer i, the normalised hidden state u_i [B, L, D] its attention saw and the output a_i [B, L, D] it
added to the residual stream. The student's mixer i then runs on u_i — the teacher's activations, so no
gradient flows through the trunk and all layers train at once, independently — and the loss is

    (1 / |layers|) Σ_i  mean_{t, d} (mixer_i(u_i) − a_i)² / var(a_i)

over the real positions t (and channels d), var(a_i) being the variance of a_i over the same positions and
channels. Dividing by it makes every layer's term 1 for a mixer that outputs the constant mean, whatever the
layer's output scale. Only the Mamba mixers train (`trainable_mask(…, "stage1")`).

    r = align_stage((s_cfg, s_params), (t_cfg, t_params), rows, settings)      # then distill_stage(...)
"""
from __future__ import annotations

import functools
from typing import Any, Callable, Mapping, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh

from ..config import ModelConfig
from ..models import apply_mixer, mixer_io, shape_structs
from .optim import trainable_mask
from .stages import (DISTILL_KEYS, Model, StageError, StageResult, StageSettings, StageSetup, _all, _check_pair,
                     _compute_entry, computing_in, run_setup)


def aligned_layers(student: ModelConfig, reference: ModelConfig) -> tuple[int, ...]:
    """The layers stage 0 trains: Mamba in the student, attention in the reference."""
    if not student.ssm_layers:
        raise StageError("stage 0 aligns Mamba layers with the attention layers they replace, but the student "
                         "has no Mamba layer; hybridize it first")
    layers = tuple(i for i in student.ssm_layers if reference.layer_mixers[i] == "attention")
    if not layers:
        raise StageError(f"stage 0: none of the student's Mamba layers {list(student.ssm_layers)} is an attention "
                         "layer of the reference model; align against the model they were converted from")
    return layers


def normalised_mse(pred: jax.Array, target: jax.Array, mask: jax.Array | None) -> jax.Array:
    """mean((pred − target)²) / var(target) over the real positions (mask [B, L]) and channels; fp32 []."""
    p, t = pred.astype(jnp.float32), target.astype(jnp.float32)            # [B, L, D]
    m = jnp.ones(t.shape[:2], jnp.float32) if mask is None else mask.astype(jnp.float32)
    count = jnp.maximum(jnp.sum(m), 1.0) * t.shape[-1]
    mean = jnp.sum(t * m[..., None]) / count
    var = jnp.sum(jnp.square(t - mean) * m[..., None]) / count
    mse = jnp.sum(jnp.square(p - t) * m[..., None]) / count
    return mse / jnp.maximum(jax.lax.stop_gradient(var), 1e-12)


def align_loss_fn(student_cfg: ModelConfig, reference_cfg: ModelConfig, layers: Sequence[int], *,
                  gather: Callable | None = None) -> Callable:
    """Stage-0 loss over params {"student", "teacher"} and a distill batch; metrics per layer too.

    gather: None, or `parallel.fsdp_gather(mesh)` on an fsdp mesh (`stages.weight_gather`): the weights the
    loss uses (the teacher's embedding and layers, the student's aligned mixers) are gathered whole, so the
    activations keep the rows' sharding instead of every device gathering the batch."""
    layers = tuple(sorted(int(i) for i in layers))

    def loss_fn(params, batch, rng):
        tokens = batch["tokens"]                                                      # [B, L]
        mask = batch.get("loss_mask")
        teacher, student = params["teacher"], params["student"]
        if gather is not None:              # leaves the loss does not read are dropped with their gathers
            teacher, student = gather(teacher), gather(student)
        inputs, outputs = jax.lax.stop_gradient(mixer_io(reference_cfg, teacher, tokens, layers, checked=False))
        terms = jnp.stack([normalised_mse(apply_mixer(student_cfg, student, i, inputs[i]), outputs[i], mask)
                           for i in layers])                                        # [n_layers]
        loss = jnp.mean(terms)
        metrics = {"loss": loss, "nmse_max": jnp.max(terms), "nmse_min": jnp.min(terms),
                   "tokens": jnp.float32(tokens.size) if mask is None else jnp.sum(mask.astype(jnp.float32))}
        metrics.update({f"nmse_layer{i:02d}": t for i, t in zip(layers, terms)})
        return loss, metrics
    return loss_fn


def align_setup(student: Model, teacher: Model, *, compute_dtype: str | None = None) -> StageSetup:
    """`align_stage`'s loss, params and mask (params may be jax.ShapeDtypeStructs); checks the models.
    compute_dtype: the teacher's forward and the mixers run in it (`stages.computing_in`)."""
    (s_cfg, s_params), (t_cfg, t_params) = student, teacher
    _check_pair(s_cfg, t_cfg, "teacher")
    if s_cfg.n_layers != t_cfg.n_layers or s_cfg.d_model != t_cfg.d_model:
        raise StageError(f"stage 0: the student ({s_cfg.n_layers} layers, d_model {s_cfg.d_model}) was not made "
                         f"from this teacher ({t_cfg.n_layers} layers, d_model {t_cfg.d_model})")
    layers = aligned_layers(s_cfg, t_cfg)
    mask = {"student": trainable_mask(s_params, s_cfg, "stage1"), "teacher": _all(t_params, False)}
    return StageSetup("stage0", "stage 0", DISTILL_KEYS, s_cfg,
                      functools.partial(align_loss_fn, computing_in(s_cfg, compute_dtype),
                                        computing_in(t_cfg, compute_dtype), layers),
                      {"student": s_params, "teacher": t_params}, mask, "student",
                      {"student": s_cfg.to_dict(), "teacher": t_cfg.to_dict(), "layers": list(layers),
                       **_compute_entry(compute_dtype)})


def align_stage(student: Model, teacher: Model, data: Mapping[str, np.ndarray], settings: StageSettings, *,
                mesh: Mesh | None = None, ckpt_dir=None, log_dir=None, config: Any = None,
                compute_dtype: str | None = None) -> StageResult:
    """Stage 0: train the student's Mamba mixers to reproduce the teacher's attention outputs layer by layer.

    data: the stage-1 schema {"tokens", "loss_mask"} (the mask marks the positions scored). Resumable like
    every stage. Returns the student with aligned mixers; everything else is untouched. compute_dtype: see
    `stages.computing_in`.
    """
    return run_setup(align_setup(student, teacher, compute_dtype=compute_dtype), data, settings, mesh=mesh,
                     ckpt_dir=ckpt_dir, log_dir=log_dir, config=config)


# ------------------------------------------------------------------------------------------------ layer order
def _scored_rows(data: Mapping[str, np.ndarray], max_rows: int | None, what: str):
    """(tokens, loss mask, how many rows to score) of a per-layer score's data (the stage-1 schema)."""
    tokens = np.asarray(data["tokens"])
    mask = np.asarray(data["loss_mask"]) if "loss_mask" in data else np.ones(tokens.shape, bool)
    n = len(tokens) if max_rows is None else min(len(tokens), int(max_rows))
    if n == 0:
        raise StageError(f"{what}: the data has no rows")
    return tokens, mask, n


def layer_nmse(student: Model, teacher: Model, data: Mapping[str, np.ndarray], *, batch_size: int = 32,
               max_rows: int | None = 128) -> dict[int, float]:
    """{layer: stage-0 loss term} of every aligned layer (`aligned_layers`), on the first `max_rows` rows of
    `data` (the stage-1 schema; None: all), in batches of `batch_size`, weighted by each batch's real tokens.

    How badly the student's mixer reproduces the attention output it replaces, per layer; 0 is exact, 1 is no
    better than the output's mean. No gradient, one compiled forward per batch shape."""
    (s_cfg, s_params), (t_cfg, t_params) = student, teacher
    layers = aligned_layers(s_cfg, t_cfg)
    tokens, mask, n = _scored_rows(data, max_rows, "layer_nmse")
    loss_fn = _nmse_fn(s_cfg, t_cfg, layers)
    params = {"student": s_params, "teacher": t_params}
    sums, weight = np.zeros(len(layers)), 0.0
    for start in range(0, n, batch_size):
        batch = {"tokens": jnp.asarray(tokens[start:start + batch_size]),
                 "loss_mask": jnp.asarray(mask[start:start + batch_size])}
        _, metrics = loss_fn(params, batch, None)
        w = float(metrics["tokens"])
        sums += w * np.array([float(metrics[f"nmse_layer{i:02d}"]) for i in layers])
        weight += w
    return {i: float(v / max(weight, 1.0)) for i, v in zip(layers, sums)}


@functools.lru_cache(maxsize=16)
def _nmse_fn(student: ModelConfig, reference: ModelConfig, layers: tuple[int, ...]):
    """The jitted stage-0 loss `layer_nmse` runs, one per model pair (so compiling it ahead is reused)."""
    return jax.jit(align_loss_fn(student, reference, layers))


def precompile_layer_nmse(student: Model, teacher: Model, rows: tuple[int, int]) -> None:
    """Compile `layer_nmse`'s forward for batches of `rows` = (batch_size, seq_len) (params may be abstract),
    e.g. in a thread while the student trains; the later `layer_nmse` call reuses the executable."""
    (s_cfg, s_params), (t_cfg, t_params) = student, teacher
    batch = {"tokens": jax.ShapeDtypeStruct(rows, jnp.int32), "loss_mask": jax.ShapeDtypeStruct(rows, jnp.bool_)}
    _nmse_fn(s_cfg, t_cfg, aligned_layers(s_cfg, t_cfg)).lower(
        shape_structs({"student": s_params, "teacher": t_params}), batch, None).compile()


def layer_kl(student: Model, teacher: Model, data: Mapping[str, np.ndarray], *, batch_size: int = 32,
             max_rows: int | None = 128) -> dict[int, float]:
    """{layer: KL(teacher ‖ the teacher with only that layer's attention replaced by the student's mixer)} of
    every aligned layer (`aligned_layers`): next-token KL, token mean over the real positions of the first
    `max_rows` rows of `data` (None: all), in batches of `batch_size`, weighted by each batch's real tokens.

    How much converting that one layer alone costs the model's output, where `layer_nmse` measures how badly
    the mixer reproduces its own layer's output: an error the later layers absorb counts little here. No
    gradient; one compiled program per batch shape serves every layer (`CausalLM.swap_hidden`)."""
    (s_cfg, s_params), (t_cfg, t_params) = student, teacher
    layers = aligned_layers(s_cfg, t_cfg)
    tokens, mask, n = _scored_rows(data, max_rows, "layer_kl")
    fn = _swap_kl_fn(s_cfg, t_cfg)
    sums, weight = np.zeros(len(layers)), 0.0
    for start in range(0, n, batch_size):
        batch = {"tokens": jnp.asarray(tokens[start:start + batch_size]),
                 "loss_mask": jnp.asarray(mask[start:start + batch_size])}
        w = float(np.sum(mask[start:start + batch_size]))
        sums += w * np.asarray(fn(s_params, t_params, batch, jnp.asarray(layers, jnp.int32)), np.float64)
        weight += w
    return {i: float(v / max(weight, 1.0)) for i, v in zip(layers, sums)}


@functools.lru_cache(maxsize=16)
def _swap_kl_fn(student: ModelConfig, reference: ModelConfig):
    from ..models import bind
    from .losses import kl_divergence

    @jax.jit
    def fn(s_params, t_params, batch, layers):
        """[len(layers)] KLs: the teacher's logits once, then one swapped forward per layer (lax.map)."""
        model, donor = bind(reference, t_params), bind(student, s_params)
        tokens, mask = batch["tokens"], batch["loss_mask"]
        want = model.logits(model.hidden(tokens)[0])
        return jax.lax.map(lambda sel: kl_divergence(model.logits(model.swap_hidden(tokens, donor, sel)), want,
                                                     mask=mask), layers)
    return fn


LAYER_SCORES = {"nmse": layer_nmse, "kl": layer_kl}   # the per-layer scores a conversion order ranks by


def precompile_layer_scores(metric: str, student: Model, teacher: Model, rows: tuple[int, int]) -> None:
    """Compile LAYER_SCORES[metric]'s program for batches of `rows` = (batch_size, seq_len) (params may be
    abstract), e.g. in a thread while the student trains; the later call reuses the executable."""
    if metric == "nmse":
        return precompile_layer_nmse(student, teacher, rows)
    (s_cfg, s_params), (t_cfg, t_params) = student, teacher
    batch = {"tokens": jax.ShapeDtypeStruct(rows, jnp.int32), "loss_mask": jax.ShapeDtypeStruct(rows, jnp.bool_)}
    layers = jax.ShapeDtypeStruct((len(aligned_layers(s_cfg, t_cfg)),), jnp.int32)
    _swap_kl_fn(s_cfg, t_cfg).lower(shape_structs(s_params), shape_structs(t_params), batch, layers).compile()


def conversion_order(scores: Mapping[int, float], n_layers: int) -> list[int]:
    """Every layer, in the order to convert them to Mamba: the lowest score first (`layer_nmse`: the attention
    layers an aligned mixer reproduces best; `layer_kl`: those whose conversion alone costs the output least),
    the worst last (they keep attention longest); ties by index.
    For `hybridize.attention_layers_for(n, f, order)` and `stages.schedule(..., order=)`."""
    if sorted(int(i) for i in scores) != list(range(n_layers)):
        raise StageError(f"a conversion order needs a score for every one of the {n_layers} layers; got "
                         f"{sorted(int(i) for i in scores)} (align a student with every layer converted)")
    bad = {i: v for i, v in scores.items() if not np.isfinite(v)}
    if bad:
        raise StageError(f"conversion_order: scores {bad} are not finite")
    return sorted((int(i) for i in scores), key=lambda i: (float(scores[i]), i))


def keep_last(order: Sequence[int], layers: Sequence[int]) -> list[int]:
    """`order` (a conversion order, every layer once) with `layers` moved to its end in the sequence given: they
    turn Mamba last, and the last of them keeps attention longest (`hybridize.attention_layers_for`)."""
    order, layers = [int(i) for i in order], [int(i) for i in layers]
    missing = sorted(set(layers) - set(order))
    if missing or len(set(layers)) != len(layers):
        raise StageError(f"keep_last: layers {layers} must be distinct layers of the order (not in it: {missing})")
    return [i for i in order if i not in set(layers)] + layers


def take_mixers(student: Model, source: Model, layers: Sequence[int]) -> Model:
    """`student` with the mixers of `layers` taken from `source` (e.g. a student aligned with every layer
    converted): both must have the same mixer kind and config at those layers."""
    (s_cfg, s_params), (src_cfg, src_params) = student, source
    for i in layers:
        if s_cfg.layer_mixers[i] != src_cfg.layer_mixers[i] or s_cfg.ssm != src_cfg.ssm:
            raise StageError(f"take_mixers: layer {i} is {s_cfg.layer_mixers[i]} in the student but "
                             f"{src_cfg.layer_mixers[i]} in the source (or their SSM settings differ)")
    new = dict(s_params["layers"])
    for i in layers:
        new[i] = dict(new[i], mixer=src_params["layers"][i]["mixer"])
    return s_cfg, dict(s_params, layers=new)
