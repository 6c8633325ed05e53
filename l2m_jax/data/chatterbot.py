"""The bundled default chat data: the ChatterBot corpus (BSD), read straight from its PyPI wheel.

`chatterbot-corpus==1.3.3` ships `chatterbot_corpus/data/<language>/*.yml`, each
`{categories: [...], conversations: [[user, bot, user, ...], ...]}`. The wheel (345 kB, sha256 pinned) is
fetched once with `pip download --no-deps` into the l2m cache (`$L2M_CACHE`, else `~/.cache/l2m_jax`) and
read with zipfile; the package is never installed or imported. Its English part gives 2,026 entries, of
which 2,025 are conversations (trivia.yml has one bare string) and 748 distinct opening lines.

Quirks handled, each counted in `CorpusStats`: an entry that is not a list is skipped; numbers in a
conversation become their text; other non-string turns (None, booleans, mappings) skip the conversation;
a trailing user turn without an answer is dropped from the messages; empty turns skip the conversation.
"""
from __future__ import annotations

import dataclasses
import os
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

import yaml

from l2m_jax.assets import cache_dir, sha256_of
from l2m_jax.data.chat import DataError

VERSION = "1.3.3"
WHEEL = f"chatterbot_corpus-{VERSION}-py2.py3-none-any.whl"
WHEEL_SHA256 = "86de5300afb9a80826386339d3bec79c0a72eb0358abb8327e2ecef5ae0ce154"
_DATA_PREFIX = "chatterbot_corpus/data/"


def corpus_wheel(directory: str | os.PathLike | None = None, *, download: bool = True) -> Path:
    """Path of the verified chatterbot-corpus wheel, downloading it with pip when it is not cached."""
    directory = Path(directory) if directory is not None else cache_dir()
    path = directory / WHEEL
    if not path.exists():
        if not download:
            raise DataError(f"{path} does not exist; fetch it with `pip download --no-deps "
                            f"chatterbot-corpus=={VERSION} -d {directory}`")
        directory.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryDirectory(dir=directory) as tmp:
            cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary", ":all:",
                   "--disable-pip-version-check", "-q", f"chatterbot-corpus=={VERSION}", "-d", tmp]
            done = subprocess.run(cmd, capture_output=True, text=True)
            got = Path(tmp) / WHEEL
            if done.returncode != 0 or not got.exists():
                raise DataError(f"could not download chatterbot-corpus=={VERSION} with pip "
                                f"({done.stderr.strip()[-300:] or 'no wheel produced'}); download {WHEEL} "
                                f"from PyPI by hand into {directory}")
            os.replace(got, path)   # atomic: a concurrent reader never sees half a wheel
    digest = sha256_of(path)
    if digest != WHEEL_SHA256:
        raise DataError(f"{path} has sha256 {digest}, expected {WHEEL_SHA256}; delete it and fetch it again")
    return path


@dataclasses.dataclass(frozen=True)
class CorpusStats:
    language: str
    files: int
    entries: int                 # items under `conversations:` in all files
    conversations: int           # kept, with at least one answer
    skipped_not_list: int
    skipped_bad_turn: int        # a None / boolean / mapping / empty turn
    single_turn: int             # a lone opening line: a seed prompt, no answer
    numeric_turns: int           # numbers turned into text
    turns: int                   # turns in the kept conversations (before dropping trailing user turns)
    prompts: int                 # distinct opening lines

    def __str__(self) -> str:
        return (f"chatterbot-corpus {VERSION} {self.language}: {self.files} files, {self.entries} entries -> "
                f"{self.conversations} conversations ({self.turns} turns), {self.prompts} distinct prompts; "
                f"skipped {self.skipped_not_list} non-list entries and {self.skipped_bad_turn} with unusable "
                f"turns, {self.single_turn} without an answer, {self.numeric_turns} numeric turns as text")


@dataclasses.dataclass(frozen=True)
class ChatterbotCorpus:
    conversations: list[list[dict[str, str]]]   # user/assistant alternating, ending on an assistant turn
    prompts: list[str]                          # first user turns, distinct, in corpus order
    stats: CorpusStats


def _turn_text(turn) -> str | None:
    if isinstance(turn, str):
        return turn.strip() or None
    if isinstance(turn, (int, float)) and not isinstance(turn, bool):
        return str(turn)
    return None


def parse_corpus(files: dict[str, bytes], language: str = "english") -> ChatterbotCorpus:
    """Parse `{file name: YAML bytes}` of one language, in sorted file order (see the module docstring)."""
    if not files:
        raise DataError(f"chatterbot corpus: no .yml files for language {language!r}")
    conversations, prompts, seen = [], [], set()
    c = dict(entries=0, skipped_not_list=0, skipped_bad_turn=0, single_turn=0, numeric_turns=0, turns=0)
    for name in sorted(files):
        try:
            doc = yaml.safe_load(files[name])
        except yaml.YAMLError as e:
            raise DataError(f"chatterbot corpus {name}: invalid YAML ({e})") from e
        entries = doc.get("conversations") if isinstance(doc, dict) else None
        if not isinstance(entries, list):
            raise DataError(f"chatterbot corpus {name}: expected a mapping with a 'conversations' list")
        for entry in entries:
            c["entries"] += 1
            if not isinstance(entry, list):
                c["skipped_not_list"] += 1
                continue
            turns = [_turn_text(t) for t in entry]
            if not turns or any(t is None for t in turns):
                c["skipped_bad_turn"] += 1
                continue
            c["numeric_turns"] += sum(not isinstance(t, str) for t in entry)
            if turns[0] not in seen:
                seen.add(turns[0])
                prompts.append(turns[0])
            if len(turns) < 2:
                c["single_turn"] += 1
                continue
            c["turns"] += len(turns)
            even = turns[: len(turns) // 2 * 2]   # a trailing user line has no answer
            conversations.append([{"role": "user" if k % 2 == 0 else "assistant", "content": t}
                                  for k, t in enumerate(even)])
    stats = CorpusStats(language=language, files=len(files), conversations=len(conversations),
                        prompts=len(prompts), **c)
    return ChatterbotCorpus(conversations, prompts, stats)


def load_chatterbot(language: str = "english", *, wheel: str | os.PathLike | None = None) -> ChatterbotCorpus:
    """Conversations and seed prompts of one language of the ChatterBot corpus (downloads the wheel once)."""
    path = Path(wheel) if wheel is not None else corpus_wheel()
    prefix = f"{_DATA_PREFIX}{language}/"
    with zipfile.ZipFile(path) as z:
        names = z.namelist()
        files = {n[len(prefix):]: z.read(n) for n in names if n.startswith(prefix) and n.endswith(".yml")}
        if not files:
            langs = sorted({n[len(_DATA_PREFIX):].split("/")[0] for n in names
                            if n.startswith(_DATA_PREFIX) and n.count("/") >= 3})
            raise DataError(f"chatterbot corpus has no language {language!r}; it has {langs}")
    return parse_corpus(files, language)


def chatterbot_rows(language: str = "english") -> list[dict[str, list[dict[str, str]]]]:
    """The conversations as chat rows `{"messages": [...]}` (the schema of l2m_jax.data.sources)."""
    return [{"messages": m} for m in load_chatterbot(language).conversations]


def chatterbot_prompts(language: str = "english") -> list[str]:
    """Distinct first user turns: the default seed prompts for teacher pseudo-labels."""
    return load_chatterbot(language).prompts
