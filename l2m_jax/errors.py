"""Errors raised at l2m_jax's boundaries."""

MODEL_SOURCES = "an HF model directory, a .gguf file, an l2m_jax/MiL checkpoint directory, or the name 'smollm2'"


class CheckpointError(ValueError):
    """A checkpoint that cannot be read as asked: the message names the file and the fix."""


def missing_model(path) -> str:
    """The one message for a model path that is not there (from `load`, `load_tokenizer` and the commands)."""
    return f"model path {str(path)!r} does not exist (no such file or directory); pass {MODEL_SOURCES}"
