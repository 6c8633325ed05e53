"""Flax NNX modules over l2m_jax.ops; used functionally through pure-dict parameters."""
from .causal_lm import (REMAT_POLICIES, CausalLM, abstract_params, apply_mixer, attention_probabilities,  # noqa: F401
                        bind, check_length, check_tokens, forward, init_params, mixer_io, remat_policy,
                        shape_structs)
