"""l2m_jax: The Mamba in the Llama in JAX.

    cfg, params = l2m_jax.load(path)
    logits, state = l2m_jax.forward(cfg, params, tokens, state=None)
    s_cfg, s_params = l2m_jax.hybridize(cfg, params, attn_layers=[1, 3, ...], mixer="mamba2", key=key)
    tokens = l2m_jax.generate(cfg, params, prompts, max_new_tokens=...)
    tokens, stats = l2m_jax.speculative_generate((t_cfg, t_params), (d_cfg, d_params), prompts, k=4)
    l2m_jax.save(path, cfg, params, format="l2m" | "mil" | "hf")
"""
from .config import ModelConfig, RopeScaling, SSMConfig  # noqa: F401
from .convert.checkpoint import load, save  # noqa: F401
from .errors import CheckpointError  # noqa: F401
from .models import forward, init_params  # noqa: F401


def __getattr__(name):
    # heavier pieces load on first use
    if name == "hybridize":
        from .convert.hybridize import hybridize
        return hybridize
    if name == "generate":
        from .infer.generate import generate
        return generate
    if name == "speculative_generate":
        from .infer.speculative import speculative_generate
        return speculative_generate
    if name == "load_tokenizer":
        from .data.tokenizer import load_tokenizer
        return load_tokenizer
    raise AttributeError(f"module 'l2m_jax' has no attribute {name!r}")
