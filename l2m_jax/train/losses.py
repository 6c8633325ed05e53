"""Training losses as pure functions: distillation KL, next-token CE, SFT, sequence log-probs, DPO.

Every function casts logits to float32 first, whatever the compute dtype: log-softmax over a 32k-128k vocab
in bf16 loses the small probabilities that the KL and the log-probs are made of.

Alignment convention: `logits[:, t]` is the model's prediction for token t+1 of its input. Callers that
hold the input `tokens` turn them into aligned `targets` with `shift_for_next_token`, which keeps the
length L (the last position gets a masked dummy target) so that no [B, L, V] slice of the logits is copied.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp

KL_REDUCTIONS = ("token_mean", "mil")


def _check_logits(name: str, logits: jax.Array) -> None:
    if logits.ndim != 3:
        raise ValueError(f"{name} must be [B, L, V], got shape {logits.shape}")


def _check_mask(name: str, mask: jax.Array | None, shape: tuple[int, ...]) -> None:
    if mask is not None and tuple(mask.shape) != tuple(shape):
        raise ValueError(f"{name} has shape {tuple(mask.shape)}; it must match the [B, L] positions {tuple(shape)}")


def _masked_mean(values: jax.Array, mask: jax.Array | None) -> jax.Array:
    """Mean of `values` [B, L] over positions where mask [B, L] is true (0.0 when none are)."""
    if mask is None:
        return jnp.mean(values)
    m = mask.astype(jnp.float32)
    return jnp.sum(values * m) / jnp.maximum(jnp.sum(m), 1.0)


def kl_divergence(student_logits: jax.Array,   # [B, L, V]
                  teacher_logits: jax.Array,   # [B, L, V]
                  *,
                  mask: jax.Array | None = None,   # [B, L] bool
                  reduction: str = "token_mean",
                  temperature: float = 1.0) -> jax.Array:   # [] float32
    """Forward KL(p_teacher ‖ p_student) of the next-token distributions, reduced to a scalar.

    reduction:
      "token_mean" (default): the mean of the per-position KL over positions where `mask` is true (all
          positions when mask is None). Its size does not depend on the sequence length, so β and the
          learning rate mean the same thing for 512- and 4096-token batches.
      "mil": exactly the original's `kl_div(log_softmax(s), softmax(t), reduction="batchmean")`: the KL
          summed over every position and the vocabulary, divided by the batch size B only, with `mask`
          IGNORED (prompt and pad positions count). Its magnitude grows like L (≈ L × the token mean), so
          MiL's β = 0.1 is effectively ~L times the token-mean β.
    temperature: both distributions are softened by it; no T² rescaling is applied (MiL uses T = 1).
    Teacher probabilities that are exactly 0 contribute 0 (0·log 0 = 0), as in PyTorch's kl_div.
    """
    _check_logits("student_logits", student_logits)
    if student_logits.shape != teacher_logits.shape:
        raise ValueError(f"student_logits {student_logits.shape} and teacher_logits {teacher_logits.shape} "
                         "must have the same [B, L, V] shape (same tokenizer, same positions)")
    if reduction not in KL_REDUCTIONS:
        raise ValueError(f"reduction={reduction!r}; choose one of {KL_REDUCTIONS}")
    if not temperature > 0:
        raise ValueError(f"temperature={temperature} must be positive")
    _check_mask("mask", mask, student_logits.shape[:2])
    log_ps = jax.nn.log_softmax(student_logits.astype(jnp.float32) / temperature, axis=-1)   # [B, L, V]
    log_pt = jax.nn.log_softmax(teacher_logits.astype(jnp.float32) / temperature, axis=-1)   # [B, L, V]
    pt = jnp.exp(log_pt)
    per_vocab = jnp.where(pt > 0, pt * (log_pt - log_ps), 0.0)
    per_pos = jnp.sum(per_vocab, axis=-1)                                                    # [B, L]
    if reduction == "mil":
        return jnp.sum(per_pos) / per_pos.shape[0]
    return _masked_mean(per_pos, mask)


def token_logprobs(logits: jax.Array,    # [B, L, V]
                   targets: jax.Array,   # [B, L] int
                   ) -> jax.Array:       # [B, L] float32
    """log p(targets[b, t] | logits[b, t]) in float32."""
    _check_logits("logits", logits)
    if targets.shape != logits.shape[:2]:
        raise ValueError(f"targets has shape {targets.shape}; it must be the [B, L] of logits {logits.shape}")
    logp = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)
    return jnp.take_along_axis(logp, targets[..., None].astype(jnp.int32), axis=-1)[..., 0]


def cross_entropy(logits: jax.Array,     # [B, L, V]
                  targets: jax.Array,    # [B, L] int, aligned with logits
                  mask: jax.Array | None = None,   # [B, L] bool: which targets count
                  ) -> jax.Array:        # [] float32
    """Token-mean negative log-likelihood of `targets` over the positions where `mask` is true.

    `targets[:, t]` is the token that `logits[:, t]` should predict (see `shift_for_next_token`).
    Returns 0.0 when the mask selects nothing (HF would return NaN).
    """
    _check_mask("mask", mask, targets.shape)
    return _masked_mean(-token_logprobs(logits, targets), mask)


def shift_for_next_token(tokens: jax.Array,               # [B, L] int
                         mask: jax.Array | None = None,   # [B, L] bool: which tokens are targets
                         ) -> tuple[jax.Array, jax.Array]:   # targets [B, L], target_mask [B, L]
    """Next-token targets aligned with the logits of `forward(tokens)`.

    targets[:, t] = tokens[:, t+1] and target_mask[:, t] = mask[:, t+1]; the last position has no next
    token, so its target is 0 and it is masked out. mask[:, 0] is never used (nothing predicts token 0).
    mask None means every token is a target.
    """
    if tokens.ndim != 2:
        raise ValueError(f"tokens must be [B, L], got shape {tokens.shape}")
    _check_mask("mask", mask, tokens.shape)
    if mask is None:
        mask = jnp.ones(tokens.shape, bool)
    pad_t = jnp.zeros_like(tokens[:, :1])
    pad_m = jnp.zeros_like(mask[:, :1], dtype=bool)
    targets = jnp.concatenate([tokens[:, 1:], pad_t], axis=1)
    target_mask = jnp.concatenate([mask[:, 1:].astype(bool), pad_m], axis=1)
    return targets, target_mask


def sequence_logprobs(logits: jax.Array,   # [B, L, V] from forward(tokens)
                      tokens: jax.Array,   # [B, L] int
                      mask: jax.Array,     # [B, L] bool: response tokens
                      ) -> jax.Array:      # [B] float32
    """Σ_t log p(tokens[b, t] | tokens[b, :t]) over the response tokens (mask true) of each row.

    The DPO sequence log-probability: prompt and pad tokens are masked out; mask[:, 0] is ignored.
    """
    targets, target_mask = shift_for_next_token(tokens, mask)
    return jnp.sum(token_logprobs(logits, targets) * target_mask, axis=-1)


def stage1_loss(student_logits: jax.Array,   # [B, L, V]
                teacher_logits: jax.Array,   # [B, L, V]
                targets: jax.Array,          # [B, L] int, aligned with the logits
                mask: jax.Array,             # [B, L] bool
                *,
                alpha: float = 1.0,
                beta: float = 0.1,
                kl_reduction: str = "token_mean",
                temperature: float = 1.0) -> tuple[jax.Array, dict[str, jax.Array]]:
    """MiL's distillation loss α·CE(targets) + β·KL(p_teacher ‖ p_student) (MIL_SPEC §2.2).

    `mask` selects the CE targets and, with kl_reduction="token_mean", the KL positions too (under "mil"
    the KL is unmasked, as in the original). Returns (loss, {"loss", "ce", "kl", "tokens"}).
    """
    ce = cross_entropy(student_logits, targets, mask)
    kl = kl_divergence(student_logits, teacher_logits, mask=mask, reduction=kl_reduction,
                       temperature=temperature)
    loss = alpha * ce + beta * kl
    return loss, {"loss": loss, "ce": ce, "kl": kl, "tokens": jnp.sum(mask.astype(jnp.float32))}


def sft_loss(logits: jax.Array,   # [B, L, V] from forward(tokens)
             tokens: jax.Array,   # [B, L] int
             mask: jax.Array,     # [B, L] bool: response tokens (prompt and pad false)
             ) -> tuple[jax.Array, dict[str, jax.Array]]:
    """Next-token CE on the response tokens only. Returns (loss, {"loss", "ce", "tokens"})."""
    targets, target_mask = shift_for_next_token(tokens, mask)
    ce = cross_entropy(logits, targets, target_mask)
    return ce, {"loss": ce, "ce": ce, "tokens": jnp.sum(target_mask.astype(jnp.float32))}


def dpo_loss(policy_chosen_logps: jax.Array,     # [B]
             policy_rejected_logps: jax.Array,   # [B]
             ref_chosen_logps: jax.Array,        # [B]
             ref_rejected_logps: jax.Array,      # [B]
             *,
             beta: float) -> tuple[jax.Array, dict[str, jax.Array]]:
    """Sigmoid DPO: mean_b −log σ(β[(π_w − ref_w) − (π_l − ref_l)]) on summed sequence log-probs.

    The reference (the teacher by default in l2m_jax, or the SFT student) gets no gradient.
    Metrics: reward_chosen/rejected = β(π − ref) (batch means), reward_margin, reward_accuracy (fraction of
    pairs whose chosen reward beats the rejected one), logps_chosen/rejected.
    """
    arrays = dict(policy_chosen_logps=policy_chosen_logps, policy_rejected_logps=policy_rejected_logps,
                  ref_chosen_logps=ref_chosen_logps, ref_rejected_logps=ref_rejected_logps)
    shapes = {k: tuple(v.shape) for k, v in arrays.items()}
    if len(set(shapes.values())) != 1 or policy_chosen_logps.ndim != 1:
        raise ValueError(f"DPO log-probs must all be [B] with the same B, got {shapes}")
    if not beta > 0:
        raise ValueError(f"beta={beta} must be positive")
    pc, pr = policy_chosen_logps.astype(jnp.float32), policy_rejected_logps.astype(jnp.float32)
    rc = jax.lax.stop_gradient(ref_chosen_logps.astype(jnp.float32))
    rr = jax.lax.stop_gradient(ref_rejected_logps.astype(jnp.float32))
    chosen_reward = beta * (pc - rc)      # [B]
    rejected_reward = beta * (pr - rr)    # [B]
    margin = chosen_reward - rejected_reward
    loss = -jnp.mean(jax.nn.log_sigmoid(margin))
    metrics = {
        "loss": loss,
        "reward_chosen": jnp.mean(chosen_reward),
        "reward_rejected": jnp.mean(rejected_reward),
        "reward_margin": jnp.mean(margin),
        "reward_accuracy": jnp.mean((chosen_reward > rejected_reward).astype(jnp.float32)),
        "logps_chosen": jnp.mean(pc),
        "logps_rejected": jnp.mean(pr),
    }
    return loss, metrics
