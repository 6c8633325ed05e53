"""Kernel tests. The Pallas kernels run in interpret mode on a CPU and compiled where JAX sees a GPU, so
`pytest tests/kernels` on a GPU machine checks the device kernels against the same references."""
import jax

INTERPRET = jax.default_backend() != "gpu"
