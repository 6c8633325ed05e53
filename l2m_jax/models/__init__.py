"""Flax NNX modules over l2m_jax.ops; used functionally through pure-dict parameters."""
from .causal_lm import (CausalLM, abstract_params, apply_mixer, bind, check_tokens, forward,  # noqa: F401
                        init_params, mixer_io)
