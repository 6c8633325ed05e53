"""Token sampling (greedy / temperature / top-k / top-p) and Leviathan et al.'s speculative acceptance."""
from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp


@dataclasses.dataclass(frozen=True)
class Sampling:
    """temperature 0 means greedy; top_k 0 and top_p 1 switch those filters off."""
    temperature: float = 0.0
    top_k: int = 0
    top_p: float = 1.0

    def __post_init__(self):
        if self.temperature < 0 or self.top_k < 0 or not 0 < self.top_p <= 1:
            raise ValueError(f"invalid {self}: need temperature >= 0, top_k >= 0, 0 < top_p <= 1")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0 or self.top_k == 1


GREEDY = Sampling()


def adjusted_probs(logits, sampling: Sampling):
    """The distribution actually sampled from: logits [..., V] -> fp32 probs [..., V].

    Greedy is the one-hot of the argmax, so the speculative acceptance rule reduces to exact matching.
    """
    logits = logits.astype(jnp.float32)
    v = logits.shape[-1]
    if sampling.greedy:
        return jax.nn.one_hot(jnp.argmax(logits, axis=-1), v, dtype=jnp.float32)
    z = logits / sampling.temperature
    if sampling.top_k and sampling.top_k < v:
        kth = jax.lax.top_k(z, sampling.top_k)[0][..., -1:]
        z = jnp.where(z < kth, -jnp.inf, z)
    if sampling.top_p < 1.0:
        # keep the smallest prefix of the sorted distribution whose mass reaches top_p (the top token always)
        zs = jnp.sort(z, axis=-1)[..., ::-1]
        ps = jax.nn.softmax(zs, axis=-1)
        before = jnp.cumsum(ps, axis=-1) - ps
        cutoff = jnp.min(jnp.where(before < sampling.top_p, zs, jnp.inf), axis=-1, keepdims=True)
        z = jnp.where(z < cutoff, -jnp.inf, z)
    return jax.nn.softmax(z, axis=-1)


def sample(probs, key):
    """probs [..., V] -> int32 [...]; argmax where the distribution is one-hot."""
    return jax.random.categorical(key, jnp.log(probs), axis=-1).astype(jnp.int32)


def draw(logits, sampling: Sampling, key):
    """Sample tokens from logits [..., V] under `sampling` (greedy skips the random draw over V)."""
    if sampling.greedy:
        return jnp.argmax(logits, axis=-1).astype(jnp.int32)
    return sample(adjusted_probs(logits, sampling), key)


def speculative_accept(p, q, drafts, key):
    """Leviathan et al. (2023), Alg. 1, batched.

    p [B, K+1, V] target probs at the K+1 verified positions, q [B, K, V] draft probs, drafts int [B, K].
    Accept draft i while u_i·q_i(d_i) <= p_i(d_i); at the first rejection sample from normalise(max(p − q, 0));
    when all K pass, sample the bonus token from p_K. Returns (n_accepted int32 [B], next_token int32 [B]).
    """
    b, k = drafts.shape
    k_u, k_s = jax.random.split(key)
    pd = jnp.take_along_axis(p[:, :k], drafts[..., None], axis=-1)[..., 0]
    qd = jnp.take_along_axis(q, drafts[..., None], axis=-1)[..., 0]
    u = jax.random.uniform(k_u, (b, k))
    ok = u * qd <= pd
    n_acc = jnp.sum(jnp.cumprod(ok.astype(jnp.int32), axis=1), axis=1)        # leading accepts
    rows = jnp.arange(b)
    p_at = p[rows, n_acc]                                                      # [B, V]
    q_at = jnp.concatenate([q, jnp.zeros_like(q[:, :1])], axis=1)[rows, n_acc]  # zero when all accepted
    resid = jnp.maximum(p_at - q_at, 0.0)
    mass = jnp.sum(resid, axis=-1, keepdims=True)
    dist = jnp.where(mass > 0, resid / jnp.where(mass > 0, mass, 1.0), p_at)
    return n_acc.astype(jnp.int32), sample(dist, k_s)
