"""Flax NNX modules over l2m_jax.ops; used functionally through pure-dict parameters."""
from .causal_lm import CausalLM, abstract_params, bind, check_tokens, forward, init_params  # noqa: F401
