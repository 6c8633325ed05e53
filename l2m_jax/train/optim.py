"""Optimisers (optax), the three stages' presets, and parameter freezing.

Precision: the trainer keeps every TRAINABLE parameter in float32 (the master weights; optax's moments are
float32 too) and the model casts weights to `cfg.dtype` (bf16 on GPU) when it computes. Frozen parameters
stay in whatever dtype they were loaded in. The original ran Adam directly on bf16 weights in stage 1
(MIL_SPEC §2.2); fp32 masters avoid updates smaller than a bf16 ulp vanishing.

Freezing: `trainable_mask` gives a pytree of bools; `split_trainable` cuts the params into a trainable and a
frozen tree (None where a leaf belongs to the other one) so the train step differentiates only w.r.t. the
trainable tree: no gradient, optimizer moment or update is ever computed for a frozen parameter.
"""
from __future__ import annotations

import dataclasses
import math
from typing import Any

import jax
import optax

from l2m_jax.config import ModelConfig

STAGES = ("stage1", "stage1+attention", "kd", "sft", "dpo")
_SSM_MIXERS = ("mamba", "mamba2")


def make_schedule(*, lr: float, warmup_steps: int, total_steps: int) -> optax.Schedule:
    """Linear warm-up from 0 to `lr` over `warmup_steps`, then cosine decay to 0 at `total_steps`.

    HF's `get_scheduler("cosine")` (what MiL used); steps count optimizer updates, not micro-batches.
    """
    if total_steps <= 0:
        raise ValueError(f"total_steps={total_steps} must be positive")
    if not 0 <= warmup_steps <= total_steps:
        raise ValueError(f"warmup_steps={warmup_steps} must be in [0, total_steps={total_steps}]")
    if warmup_steps == total_steps:  # nothing left to decay: optax's cosine needs at least one decay step
        return optax.linear_schedule(0.0, lr, max(warmup_steps, 1))
    return optax.warmup_cosine_decay_schedule(init_value=0.0, peak_value=lr, warmup_steps=warmup_steps,
                                              decay_steps=total_steps, end_value=0.0)


def make_optimizer(*, lr: float, betas: tuple[float, float] = (0.9, 0.999), eps: float = 1e-8,
                   weight_decay: float = 0.0, clip_norm: float | None = 1.0, warmup_steps: int = 0,
                   total_steps: int, accum_steps: int = 1) -> optax.GradientTransformation:
    """AdamW + global-norm clipping + warm-up/cosine schedule (+ gradient accumulation).

    total_steps and warmup_steps count optimizer updates. With accum_steps > 1 the result is an
    `optax.MultiSteps`: call it once per micro-batch; it averages `accum_steps` gradients, clips the mean,
    and updates on every accum_steps-th call (params are unchanged in between). The original's first
    update came one micro-batch late (MIL_SPEC §2.2); this one does not.
    The learning rate is injected as a hyperparameter so `current_lr(opt_state)` can report it.
    """
    if accum_steps < 1:
        raise ValueError(f"accum_steps={accum_steps} must be >= 1")
    if clip_norm is not None and not clip_norm > 0:
        raise ValueError(f"clip_norm={clip_norm} must be positive (or None for no clipping)")
    schedule = make_schedule(lr=lr, warmup_steps=warmup_steps, total_steps=total_steps)
    adamw = optax.inject_hyperparams(optax.adamw)(learning_rate=schedule, b1=betas[0], b2=betas[1], eps=eps,
                                                  weight_decay=weight_decay)
    tx = adamw if clip_norm is None else optax.chain(optax.clip_by_global_norm(clip_norm), adamw)
    if accum_steps > 1:
        tx = optax.MultiSteps(tx, every_k_schedule=accum_steps)
    return tx


def current_lr(opt_state: Any) -> jax.Array | None:
    """The learning rate of the latest update in a `make_optimizer` state (None for other optimizers)."""
    return optax.tree_utils.tree_get(opt_state, "learning_rate", default=None,
                                     filtering=lambda _path, value: isinstance(value, jax.Array))


@dataclasses.dataclass(frozen=True)
class StagePreset:
    """Optimiser (and loss) hyperparameters of one training stage (MIL_SPEC §2.2-§2.5).

    Give either warmup_steps (stage 1 counts steps) or warmup_ratio (HF's warmup_ratio: ceil(ratio·total)).
    Loss weights that belong to the stage travel here too: ce_weight/kl_weight (α, β) for distillation,
    dpo_beta for DPO.
    """
    lr: float
    betas: tuple[float, float] = (0.9, 0.999)
    eps: float = 1e-8
    weight_decay: float = 0.0
    clip_norm: float | None = 1.0
    warmup_steps: int | None = None
    warmup_ratio: float | None = None
    accum_steps: int = 1
    ce_weight: float | None = None
    kl_weight: float | None = None
    dpo_beta: float | None = None

    def __post_init__(self):
        if (self.warmup_steps is None) == (self.warmup_ratio is None):
            raise ValueError("StagePreset needs exactly one of warmup_steps and warmup_ratio")

    def warmup_for(self, total_steps: int) -> int:
        if self.warmup_steps is not None:
            return min(self.warmup_steps, total_steps)
        return math.ceil(self.warmup_ratio * total_steps)

    def replace(self, **kw) -> "StagePreset":
        return dataclasses.replace(self, **kw)

    def make_optimizer(self, total_steps: int) -> optax.GradientTransformation:
        """The optimizer for a run of `total_steps` optimizer updates."""
        return make_optimizer(lr=self.lr, betas=self.betas, eps=self.eps, weight_decay=self.weight_decay,
                              clip_norm=self.clip_norm, warmup_steps=self.warmup_for(total_steps),
                              total_steps=total_steps, accum_steps=self.accum_steps)


# Stage 1: Adam(0.9, 0.98), lr 8e-5, clip 0.1, 1500 warm-up steps, loss CE + 0.1·KL.
STAGE1 = StagePreset(lr=8e-5, betas=(0.9, 0.98), eps=1e-8, weight_decay=0.0, clip_norm=0.1, warmup_steps=1500,
                     ce_weight=1.0, kl_weight=0.1)
# Stage 2: HF AdamW defaults, lr 2e-5, warmup_ratio 0.01.
SFT = StagePreset(lr=2e-5, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.0, clip_norm=1.0, warmup_ratio=0.01)
# Stage 3: lr 5e-7, warmup_ratio 0.1, β 0.01 (the 1-epoch recipe).
DPO = StagePreset(lr=5e-7, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.0, clip_norm=1.0, warmup_ratio=0.1,
                  dpo_beta=0.01)
PRESETS = {"stage1": STAGE1, "sft": SFT, "dpo": DPO}


def trainable_mask(params: dict, cfg: ModelConfig, stage: str) -> dict:
    """A pytree of bools shaped like `params`: True where the parameter trains in `stage`.

    "stage1" (layerwise distillation) trains only the mixers of the Mamba layers — all of them, including
    ones distilled in an earlier progressive round and their gated norm — and freezes embeddings, lm_head,
    the final norm, attention layers, every MLP and the block-level norms (MIL_SPEC §8.7).
    "stage1+attention" also trains the attention layers the student keeps (not in MiL: they may adapt to the
    Mamba layers around them); MLPs, norms and embeddings stay frozen.
    "kd", "sft", "dpo" train everything.
    """
    if stage not in STAGES:
        raise ValueError(f"stage={stage!r}; choose one of {STAGES}")
    if stage not in ("stage1", "stage1+attention"):
        return jax.tree.map(lambda _: True, params)
    layers = params.get("layers") if isinstance(params, dict) else None
    if layers is None or set(layers) != set(range(cfg.n_layers)):
        keys = None if layers is None else sorted(layers, key=str)
        raise ValueError(f"params['layers'] must have int keys 0..{cfg.n_layers - 1} for cfg.n_layers="
                         f"{cfg.n_layers}, got {keys}; pass the parameters that belong to `cfg`")
    if not any(m in _SSM_MIXERS for m in cfg.layer_mixers):
        raise ValueError("stage 1 trains only Mamba mixers, but cfg has none (all layers are attention); "
                         "hybridize the model first")
    mask = jax.tree.map(lambda _: False, params)
    for i, kind in enumerate(cfg.layer_mixers):
        if kind in _SSM_MIXERS or stage == "stage1+attention":
            mask["layers"][i]["mixer"] = jax.tree.map(lambda _: True, params["layers"][i]["mixer"])
    return mask


def split_trainable(params: Any, mask: Any) -> tuple[Any, Any]:
    """(trainable, frozen): two trees shaped like `params`, each with None where the other holds the leaf."""
    try:
        trainable = jax.tree.map(lambda p, m: p if m else None, params, mask)
        frozen = jax.tree.map(lambda p, m: None if m else p, params, mask)
    except ValueError as e:
        raise ValueError(f"the trainable mask does not have the structure of params: {e}") from None
    return trainable, frozen


def merge(trainable: Any, frozen: Any) -> Any:
    """Inverse of `split_trainable`."""
    return jax.tree.map(lambda t, f: f if t is None else t, trainable, frozen, is_leaf=lambda x: x is None)
