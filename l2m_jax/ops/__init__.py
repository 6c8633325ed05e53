"""Pure array functions: no parameters, no Flax.

Shape legend (used in every docstring, comment and einsum of the package):
  B batch        L length       D d_model       H heads        G kv heads / groups
  P head dim     N state size   V vocab         K draft tokens Q chunk length
  W conv width   C channels (of a depthwise conv)   T tokens in one verification call (K + 1)
  S cache slots (KV-cache capacity)

Numerics: SSM states, cumulative log-decays, softplus/exp, logits and losses are float32 whatever the
compute dtype; inputs are cast back to the compute dtype on the way out.
"""
