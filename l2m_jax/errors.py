"""Errors raised at l2m_jax's boundaries."""


class CheckpointError(ValueError):
    """A checkpoint that cannot be read as asked: the message names the file and the fix."""
