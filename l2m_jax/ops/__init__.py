"""Pure array functions: no parameters, no Flax.

Shape legend (used in every docstring, comment and einsum of the package):
  B batch        L length       D d_model       H heads        G kv heads / groups
  P head dim     N state size   V vocab         K draft tokens Q chunk length
  W conv width   C channels (of a depthwise conv)   T tokens in one verification call (K + 1)
  S cache slots (KV-cache capacity)

Numerics: SSM states, cumulative log-decays, softplus/exp, logits and losses are float32 whatever the
compute dtype; inputs are cast back to the compute dtype on the way out.

Kernel switches (read when a program is traced): `attention.set_attention`, `attention.set_decode_attention`,
`ssm.set_ssd_backend`, `l2m_jax.kernels.pallas_ssm.set_form`. `switches()` is their current settings; the
library's jitted entry points (generate, speculative decoding, streaming, evaluation, the lm-eval adapter) are
`keyed_jit` functions: their programs are keyed on it as on a static argument, so after a switch changes they
trace anew and switching back finds the earlier program. A function you jit yourself keeps what it traced: set
the switches first, jit it again, or jit it with `keyed_jit`.
"""
import functools
import inspect


def switches() -> tuple:
    """The kernel switches' current settings, hashable (a static argument of the jitted entry points)."""
    from ..kernels import pallas_ssm
    from . import attention, ssm

    return (attention.ATTN_IMPL, attention.DECODE_IMPL, attention.DECODE_BLOCK, attention.DECODE_MAX_QUERIES,
            attention.DECODE_LOOP, attention.DECODE_INTERPRET, ssm.SSD_BACKEND, pallas_ssm.FORM)


def keyed_jit(fn=None, **jit_kwargs):
    """`jax.jit(fn, **jit_kwargs)` whose compiled programs are also keyed on `switches()`, read at every call (and
    at `.lower(...)`): a decorator, with or without jit's keyword arguments (static_argnums, static_argnames...)."""
    import jax

    def wrap(fn):
        sig = inspect.signature(fn)
        if "switches" in sig.parameters:
            raise TypeError(f"{fn.__name__} has a parameter named 'switches'; keyed_jit adds that key itself")

        def keyed(*args, switches, **kwargs):
            del switches                           # a key of the compiled program only
            return fn(*args, **kwargs)

        functools.update_wrapper(keyed, fn)
        keyed.__signature__ = sig.replace(parameters=[
            *sig.parameters.values(), inspect.Parameter("switches", inspect.Parameter.KEYWORD_ONLY)])
        compiled = jax.jit(keyed, **{**jit_kwargs, "static_argnames": (
            *jit_kwargs.get("static_argnames", ()), "switches")})

        @functools.wraps(fn)
        def call(*args, **kwargs):
            return compiled(*args, switches=switches(), **kwargs)

        call.lower = lambda *args, **kwargs: compiled.lower(*args, switches=switches(), **kwargs)
        call._cache_size = compiled._cache_size    # how many programs it holds, as on a jax.jit function
        return call

    return wrap if fn is None else wrap(fn)
