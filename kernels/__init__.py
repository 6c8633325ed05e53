"""Fused SSM decode kernels behind one dispatch (installed as `l2m_jax.kernels`)."""
