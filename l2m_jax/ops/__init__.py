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
library's jitted entry points (generate, speculative decoding, streaming, evaluation, the lm-eval adapter) take it
as a static argument, so after a switch changes they trace anew and switching back finds the earlier program. A
function you jit yourself keeps what it traced: set the switches first, or jit it again.
"""


def switches() -> tuple:
    """The kernel switches' current settings, hashable (a static argument of the jitted entry points)."""
    from ..kernels import pallas_ssm
    from . import attention, ssm

    return (attention.ATTN_IMPL, attention.DECODE_IMPL, attention.DECODE_BLOCK, attention.DECODE_MAX_QUERIES,
            attention.DECODE_LOOP, attention.DECODE_INTERPRET, ssm.SSD_BACKEND, pallas_ssm.FORM)
