"""Plain English prose from Debian packages, for word-level KL distillation on raw text.

The packages are downloaded with `apt-get download` (never installed) and unpacked with `dpkg-deb -x`, so a
fresh Debian or Ubuntu machine needs no model or dataset hub. Each source becomes one UTF-8 file NAME.txt:

  moby_dick          Herman Melville, Moby Dick (1851; public domain): the Project Gutenberg etext #2701 bundled
                     as the R object `mobydick` in r-cran-tokenizers, without Project Gutenberg's header, licence
                     and footer, CRLF made LF
  fortunes           the quotations, jokes and anecdotes of the fortune cookie files of fortunes and fortunes-min
                     (/usr/share/games/fortunes; not the ascii-art file, no offensive ones), one record per
                     paragraph
  devils_dictionary  Ambrose Bierce, The Devil's Dictionary (1911; public domain) from dict-devil's dictd
                     database, one entry per paragraph
  wordnet_glosses    the gloss of every synset of WordNet 3.0 (wordnet-base; Princeton's WordNet licence,
                     permissive with notice, not public domain), one per line, nouns, verbs, adjectives, adverbs
  kjv                the King James Version of the Bible (1611; public domain) from bible-kjv-text, printed by the
                     `bible` program of bible-kjv; a "Book N" heading line per chapter, then the chapter as one
                     paragraph, verse numbers removed, the held-out chapters (John 1-3) left out

`PROSE_SOURCES` are the training texts: every source but kjv, whose book holds held-out material (the CLI
`python -m experiments.fetch_texts` writes it). `ensure_prose()` returns their files in `prose_dir()`
($L2M_CACHE/texts-v2), fetching the missing ones; a machine without apt-get, dpkg-deb, the Python package rdata
or a reachable mirror gets one `FetchError` saying which.

The training texts are screened against the books the held-out texts come from: every record (paragraph) of
them that shares a span of SCREEN_WORDS words with the whole KJV (bible-kjv-text, John 1-3 included) or with
any of Jane Austen's six novels (r-cran-janeaustenr) is left out (`screen_records`), and `Fetched.screened`
counts what was. Decontamination in the recipe catches only spans of the held-out excerpts themselves; this
also keeps out quotations from elsewhere in their books (the fortune files quote the KJV, Moby-Dick's
extracts quote Isaiah and Job), so that no stage trains on their authors' text. The books themselves are kept
beside the texts (`books/kjv.txt`, `books/austen.txt`; `ensure_books()`, `screen_books()`), so the recipe
screens what the teacher writes the same way (`l2m_jax.recipe.data.heldout_filter`); they are never training
data.

Within a record or entry, lines are stripped of surrounding whitespace and blank lines dropped, so that a blank
line separates exactly the records (and `l2m_jax.data.text` cuts long files only between them).
"""
from __future__ import annotations

import bz2
import dataclasses
import gzip
import lzma
import os
import re
import shutil
import struct
import subprocess
import sys
import tempfile
import warnings
import zlib
from pathlib import Path
from typing import Sequence

__all__ = ["FetchError", "SOURCE_PACKAGES", "PROSE_SOURCES", "HELDOUT_KJV", "prose_dir", "ensure_prose",
           "fetch_prose", "build_texts", "fortune_records", "parse_fortunes", "devil_entries", "dictd_number",
           "screen_records", "austen_novels", "BOOKS", "ensure_books", "screen_books", "book_word_ids"]

SOURCE_PACKAGES: dict[str, tuple[str, ...]] = {      # every source, in the order the CLI writes them
    "moby_dick": ("r-cran-tokenizers",),
    "kjv": ("bible-kjv-text", "bible-kjv"),
    "fortunes": ("fortunes", "fortunes-min"),
    "devils_dictionary": ("dict-devil",),
    "wordnet_glosses": ("wordnet-base",),
}
PROSE_SOURCES = ("moby_dick", "fortunes", "devils_dictionary", "wordnet_glosses")
HELDOUT_KJV = ("John", (1, 2, 3))          # the chapters of l2m_jax/data/heldout_kjv.txt
# the books of the held-out texts, whole: training records sharing SCREEN_WORDS words in a row with one are dropped
SCREEN_PACKAGES = {"kjv": ("bible-kjv-text", "bible-kjv"), "austen": ("r-cran-janeaustenr",)}
AUSTEN_NOVELS = ("emma", "mansfieldpark", "northangerabbey", "persuasion", "prideprejudice", "sensesensibility")
SCREEN_WORDS = 10                          # about 13 tokens of SmolLM2's tokenizer, the recipe's decontamination
BOOKS = ("kjv", "austen")                  # books/NAME.txt beside the texts: the screening references, whole
WORDNET_FILES = ("data.noun", "data.verb", "data.adj", "data.adv")
FORTUNES_DIR = "usr/share/games/fortunes"
FORTUNES_SKIP = ("ascii-art",)             # pictures, not prose
# fortunes attributed to the authors or the book of the held-out texts (Jane Austen; a Bible chapter:verse):
# left out, so that no stage trains on a quotation from the source of a held-out text
_BIBLE_BOOKS = ("Genesis|Exodus|Leviticus|Numbers|Deuteronomy|Joshua|Judges|Ruth|Samuel|Kings|Chronicles|Ezra|"
                "Nehemiah|Esther|Job|Psalms?|Proverbs|Ecclesiastes|Song of Solomon|Isaiah|Jeremiah|Lamentations|"
                "Ezekiel|Daniel|Hosea|Joel|Amos|Obadiah|Jonah|Micah|Nahum|Habakkuk|Zephaniah|Haggai|Zechariah|"
                "Malachi|Matthew|Mark|Luke|John|Acts|Romans|Corinthians|Galatians|Ephesians|Philippians|"
                "Colossians|Thessalonians|Timothy|Titus|Philemon|Hebrews|James|Peter|Jude|Revelations?")
HELDOUT_SOURCE_QUOTE = re.compile(rf"^--.*(\b(Jane|J\.) Austen\b|\b({_BIBLE_BOOKS})\s+\d+(:\d+)?)", re.M)
DEVIL_DICT = "usr/share/dictd/devil.dict.dz"
DEVIL_INDEX = "usr/share/dictd/devil.index"
_ALL_VERSES = "Gen1:1-Rev22:21"
_DICTD_B64 = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/"


class FetchError(RuntimeError):
    """A tool, package or file needed to fetch the texts that is missing or not as expected."""


# ------------------------------------------------------------------------------------------ packages
def _run(cmd: list[str], **kw) -> subprocess.CompletedProcess:
    return subprocess.run(cmd, capture_output=True, text=True, stdin=subprocess.DEVNULL, **kw)


def check_tools(rdata: bool = True) -> None:
    """FetchError listing what is missing: apt-get, dpkg-deb, the Python package rdata (if `rdata`)."""
    import importlib.util

    missing = [t for t in ("apt-get", "dpkg-deb") if shutil.which(t) is None]
    if rdata and importlib.util.find_spec("rdata") is None:
        missing.append("the Python package rdata (pip install rdata)")
    if missing:
        raise FetchError(f"missing: {', '.join(missing)}; fetching the texts needs a Debian-like system with apt "
                         "(apt-get, dpkg-deb)" + (" and rdata in the Python environment" if rdata else ""))


def download(packages: Sequence[str], workdir: Path) -> dict[str, Path]:
    """apt-get download each package into workdir; {name: .deb path}. Updates the lists once if needed."""
    packages = tuple(packages)

    def attempt() -> subprocess.CompletedProcess:
        return _run(["apt-get", "download", *packages], cwd=workdir)

    proc = attempt()
    not_found = ("Unable to locate package", "no installation candidate")
    if proc.returncode != 0 and any(s in proc.stderr for s in not_found):
        if os.geteuid() != 0:
            raise FetchError(f"apt-get download {' '.join(packages)} failed:\n{proc.stderr.strip()}\nrun "
                             "`sudo apt-get update` (or look the names up with `apt-cache search`) and try again")
        print("l2m_jax: package not found, running apt-get update once", file=sys.stderr, flush=True)
        upd = _run(["apt-get", "update"])
        if upd.returncode != 0:
            raise FetchError(f"apt-get update failed:\n{upd.stderr.strip()}")
        proc = attempt()
    if proc.returncode != 0:
        raise FetchError(f"apt-get download {' '.join(packages)} failed:\n{proc.stderr.strip()}\nis the package "
                         "name right for this release (`apt-cache search NAME`) and the mirror reachable?")
    debs = {}
    for name in packages:
        found = sorted(workdir.glob(f"{name}_*.deb"))
        if not found:
            raise FetchError(f"apt-get download left no {name}_*.deb in {workdir}")
        debs[name] = found[-1]
    return debs


def _unpacked(packages: Sequence[str], work: Path) -> tuple[Path, dict[str, Path]]:
    """Download `packages` into `work` and unpack them all into work/root: (root, {name: .deb path})."""
    debs = download(packages, work)
    for deb in debs.values():
        extract(deb, work / "root")
    return work / "root", debs


def deb_version(deb: Path) -> str:
    return _run(["dpkg-deb", "-f", str(deb), "Version"]).stdout.strip()


def extract(deb: Path, dest: Path) -> Path:
    proc = _run(["dpkg-deb", "-x", str(deb), str(dest)])
    if proc.returncode != 0:
        raise FetchError(f"dpkg-deb -x {deb} failed: {proc.stderr.strip()}")
    return dest


def _paragraph(text: str) -> str:
    """One paragraph: every line stripped, blank lines dropped."""
    return "\n".join(line.strip() for line in text.splitlines() if line.strip())


# --------------------------------------------------------------------------------------------- Moby Dick
def read_lazyload(base: Path, name: str):
    """Object `name` of the R lazy-load database base.rdb / base.rdx, converted by rdata.

    base.rdx is an ordinary (gzip) RDS file: list(variables = list(NAME = c(offset, length)), references,
    compressed). base.rdb holds each object at its offset: a 4-byte big-endian uncompressed length, then
    the serialized object compressed with zlib (compressed = TRUE / 1) or, for compressed = 2 / 3, a type
    byte ('Z' zlib, '2' bzip2, 'X' xz, '0' stored) before the bzip2 / xz / zlib stream.
    """
    import rdata

    with warnings.catch_warnings():   # rdata warns about the .rdx extension and the header-less stream
        warnings.simplefilter("ignore")
        index = rdata.conversion.convert(rdata.parser.parse_file(base.with_suffix(".rdx")))
        variables = {str(k): v for k, v in index["variables"].items()}
        if name not in variables:
            raise FetchError(f"{base}.rdb has no object {name!r}; it has {sorted(variables)}")
        offset, length = (int(x) for x in variables[name])
        compressed = int(index["compressed"][0])
        with open(base.with_suffix(".rdb"), "rb") as f:
            f.seek(offset)
            blob = f.read(length)
        size = struct.unpack(">I", blob[:4])[0]
        body = blob[4:]
        if compressed in (2, 3):
            kind, body = body[:1], body[1:]
            data = {b"Z": zlib.decompress, b"2": bz2.decompress, b"X": lzma.decompress,
                    b"0": lambda b: b}[kind](body)
        elif compressed:
            data = zlib.decompress(body)
        else:
            data = body
        if len(data) != size:
            raise FetchError(f"{base}.rdb object {name!r}: {len(data)} bytes, the header says {size}")
        return rdata.conversion.convert(rdata.parser.parse_data(data))


def moby_dick(root: Path) -> str:
    obj = read_lazyload(root / "usr/lib/R/site-library/tokenizers/data/Rdata", "mobydick")
    text = str(obj[0]).lstrip("\ufeff").replace("\r\n", "\n")
    start = re.search(r"^\*\*\* ?START OF (THIS|THE) PROJECT GUTENBERG EBOOK.*$", text, re.M)
    end = re.search(r"^\*\*\* ?END OF (THIS|THE) PROJECT GUTENBERG EBOOK.*$", text, re.M)
    if not (start and end):
        raise FetchError("mobydick: no Project Gutenberg START / END lines; the package's text has changed")
    body = text[start.end():end.start()]
    body = re.sub(r"^\s*Produced by .*\n", "", body)                       # transcriber credit
    body = re.sub(r"\n\s*End of (the )?Project Gutenberg'?s? .*\s*$", "", body)
    body = re.sub(r"[ \t]+\n", "\n", body)
    return re.sub(r"\n{3,}", "\n\n", body).strip() + "\n"


# ------------------------------------------------------------------------------------------------- KJV
def kjv_chapters(root: Path) -> list[tuple[str, int, str]]:
    """(book, chapter, text) of every chapter, verses joined by spaces, verse numbers removed."""
    exe = root / "usr/bin/bible"
    libdir = root / "usr/lib"
    if not (libdir / "bible.data").is_file():
        raise FetchError(f"no bible.data under {libdir}; bible-kjv-text did not unpack as expected")
    # pretty-printing on (the default): "Book N" headings, one "  V text" line per verse with -l huge
    cmd = [str(exe), "-l", "1000000", "-p", str(libdir), _ALL_VERSES]
    try:
        proc = _run(cmd)
    except OSError as e:
        raise FetchError(f"could not run the unpacked `bible` program ({e}); install bible-kjv "
                         "(`apt-get install bible-kjv`) or run this on Debian") from e
    if proc.returncode != 0 or not proc.stdout:
        raise FetchError(f"`{' '.join(cmd)}` failed (exit {proc.returncode}): {proc.stderr.strip()}")
    chapters: list[tuple[str, int, list[str]]] = []
    for line in proc.stdout.splitlines():
        if not line.strip():
            continue
        verse = re.fullmatch(r"\s+(\d+) (.*)", line)
        heading = re.fullmatch(r"(\S.*) (\d+)", line)
        if verse and chapters:
            book, chap, verses = chapters[-1]
            if int(verse.group(1)) != len(verses) + 1:
                raise FetchError(f"{book} {chap}: verse {verse.group(1)} follows verse {len(verses)}")
            verses.append(verse.group(2).strip())
        elif heading and not verse:
            chapters.append((heading.group(1), int(heading.group(2)), []))
        else:
            raise FetchError(f"unexpected line in the output of `bible`: {line[:80]!r}")
    n_verses = sum(len(v) for _, _, v in chapters)
    if len(chapters) != 1189 or n_verses != 31102:
        raise FetchError(f"`bible` printed {len(chapters)} chapters and {n_verses} verses, expected 1189 and 31102")
    return [(book, chap, " ".join(verses)) for book, chap, verses in chapters]


def kjv_text(chapters: list[tuple[str, int, str]], keep_heldout: bool = False) -> str:
    """kjv.txt: "Book N" then the chapter, chapters separated by blank lines; John 1-3 left out unless kept."""
    book, held = HELDOUT_KJV
    kept = [(b, c, t) for b, c, t in chapters if keep_heldout or not (b == book and c in held)]
    return "\n\n".join(f"{b} {c}\n{t}" for b, c, t in kept) + "\n"


def heldout_kjv(chapters: list[tuple[str, int, str]], version: str) -> str:
    """The bundled held-out file: a "# source" line, then one paragraph per held-out chapter."""
    book, wanted = HELDOUT_KJV
    paras = [t for b, c, t in chapters if b == book and c in wanted]
    note = (f"# The Gospel according to St John, chapters {wanted[0]}-{wanted[-1]}, King James Version (1611), one "
            f"paragraph per chapter, verse numbers removed; public domain, text from the Debian package "
            f"bible-kjv-text {version}.")
    return note + "\n" + "\n\n".join(paras) + "\n"


# --------------------------------------------------------------------------------------------- fortunes
# ---------------------------------------------------------------------------------- screening against the books
def austen_novels(root: Path) -> dict[str, str]:
    """{name: text} of Jane Austen's six novels (janeaustenr's character vectors, one line per element)."""
    base = root / "usr/lib/R/site-library/janeaustenr/data/Rdata"
    return {name: "\n".join(str(x) for x in read_lazyload(base, name) if x is not None) for name in AUSTEN_NOVELS}


def _words(text: str) -> list[str]:
    return re.findall(r"[a-z0-9]+(?:'[a-z]+)?", text.lower())


def book_word_ids(books: Sequence[str], n: int = SCREEN_WORDS) -> tuple[dict[str, int], object]:
    """(vocabulary word -> id, `data.text.NgramIndex` of the books' n-word runs): the books in the form
    `screen_records` compares, built once (the index of two long books takes seconds) for many calls with this n."""
    import numpy as np

    from l2m_jax.data.text import ngram_index

    vocab: dict[str, int] = {}
    ids = [np.asarray([vocab.setdefault(w, len(vocab)) for w in _words(b)], np.int64) for b in books]
    return vocab, ngram_index(ids, n)


def screen_records(records: Sequence[str], books, n: int = SCREEN_WORDS) -> list[bool]:
    """keep[i]: False where records[i] shares n words in a row (lower-cased, punctuation ignored) with a book.
    `books`: the books' texts, or `book_word_ids(texts, n)` to reuse across calls."""
    import numpy as np

    from l2m_jax.data.text import ngram_overlap

    vocab, refs = books if isinstance(books, tuple) else book_word_ids(books, n)
    unknown = -1                                   # a word no book has: it can be in no shared span

    def ids(text: str) -> np.ndarray:
        return np.asarray([vocab.get(w, unknown) for w in _words(text)], np.int64)

    hits = ngram_overlap([ids(r) for r in records], refs, n)
    return [not hit for hit in hits]


def _screen_text(text: str, books, sep: str) -> tuple[str, int, int]:
    """(text without the `sep`-separated records that share a span with a book, dropped, records)."""
    records = text.rstrip("\n").split(sep)
    keep = screen_records(records, books)
    return sep.join(r for r, k in zip(records, keep) if k) + "\n", keep.count(False), len(records)


def _overstrike(text: str) -> str:
    """Resolve backspace overstriking ("___\\b\\b\\bnot" underlines "not") to the characters printed last."""
    while "\b" in text:
        fewer = re.sub(r"[^\x08\n]\x08", "", text)
        if fewer == text:                       # a backspace at a line start: nothing to strike
            return text.replace("\b", "")
        text = fewer
    return text


def parse_fortunes(text: str) -> list[str]:
    """The records of one fortune file (records end at lines that are exactly "%"), each one paragraph."""
    records, lines = [], []
    for line in text.replace("\r\n", "\n").split("\n"):
        if line == "%":
            records.append(lines)
            lines = []
        else:
            lines.append(line)
    records.append(lines)
    out = (_paragraph(_overstrike("\n".join(r))) for r in records)
    return [r for r in out if r]


def fortune_records(directory: Path) -> list[str]:
    """The records of every fortune file directly in `directory`, files sorted by name.

    Left out: the strfile indexes (*.dat), the *.u8 names (symbolic links to the same files), the ascii-art
    file, every subfolder (off/ holds the offensive ones), and the records attributed to the sources of the
    held-out texts (HELDOUT_SOURCE_QUOTE: "-- Jane Austen", "-- Proverbs 18:12", "-- 1 John 4:18").
    """
    directory = Path(directory)
    if not directory.is_dir():
        raise FetchError(f"no folder {directory}; the fortunes packages did not unpack as expected")
    files = sorted(p for p in directory.iterdir() if p.is_file() and not p.is_symlink()
                   and p.suffix not in (".dat", ".u8") and p.name not in FORTUNES_SKIP)
    if not files:
        raise FetchError(f"no fortune files in {directory}")
    records = []
    for p in files:
        try:
            records += parse_fortunes(p.read_text(encoding="utf-8"))
        except UnicodeDecodeError as e:
            raise FetchError(f"fortune file {p} is not UTF-8 ({e})") from None
    return [r for r in records if not HELDOUT_SOURCE_QUOTE.search(r)]


# ---------------------------------------------------------------------------------- The Devil's Dictionary
def dictd_number(s: str) -> int:
    """A dictd index offset or length: base-64 digits A-Z a-z 0-9 + / read as a positional number."""
    if not s or any(ch not in _DICTD_B64 for ch in s):
        raise FetchError(f"{s!r} is not a dictd base-64 number (digits {_DICTD_B64})")
    n = 0
    for ch in s:
        n = n * 64 + _DICTD_B64.index(ch)
    return n


def devil_entries(dict_path: Path, index_path: Path) -> list[str]:
    """Every entry of a dictd database (the .dict.dz body, the .index) as one paragraph, in body order.

    The .dict.dz is dictzip, a gzip file the gzip module reads whole; each index line is "headword TAB offset
    TAB length" into the uncompressed body. The meta entries (headwords 00-database-* / 00database*) are
    left out, and headwords sharing one definition ("babe", "baby") give it once.
    """
    try:
        body = gzip.decompress(Path(dict_path).read_bytes())
    except (OSError, EOFError) as e:
        raise FetchError(f"{dict_path} is not a gzip (dictzip) file: {e}") from None
    spans = set()
    for i, line in enumerate(Path(index_path).read_text(encoding="utf-8").splitlines()):
        if not line.strip():
            continue
        fields = line.split("\t")
        if len(fields) != 3:
            raise FetchError(f"{index_path} line {i + 1}: {line[:80]!r} is not 'headword TAB offset TAB length'")
        head, offset, length = fields[0], dictd_number(fields[1]), dictd_number(fields[2])
        if head.startswith(("00-database", "00database")):
            continue
        if offset + length > len(body):
            raise FetchError(f"{index_path} line {i + 1}: entry {head!r} ends at byte {offset + length}, past the "
                             f"{len(body)} bytes of {dict_path}")
        spans.add((offset, length))
    entries = []
    for offset, length in sorted(spans):
        try:
            text = body[offset:offset + length].decode("utf-8")
        except UnicodeDecodeError as e:
            raise FetchError(f"{dict_path}: the entry at byte {offset} is not UTF-8 ({e})") from None
        if _paragraph(text):
            entries.append(_paragraph(text))
    if not entries:
        raise FetchError(f"{index_path} names no entries (besides the 00-database ones)")
    return entries


# --------------------------------------------------------------------------------------------- WordNet
def wordnet_glosses(root: Path) -> list[str]:
    glosses = []
    for name in WORDNET_FILES:
        path = root / "usr/share/wordnet" / name
        with open(path, encoding="utf-8") as f:
            for line in f:
                if line.startswith("  "):          # the licence header
                    continue
                _, sep, gloss = line.partition(" | ")
                if not sep:
                    raise FetchError(f"{path}: a synset line without ' | ' gloss: {line[:80]!r}")
                glosses.append(gloss.strip())
    return [g for g in glosses if g]


# ------------------------------------------------------------------------------------------- fetching
@dataclasses.dataclass
class Fetched:
    texts: dict[str, str]                  # {source name: the text of NAME.txt}
    versions: dict[str, str]               # {package: version}
    heldout_kjv: str | None = None         # the bundled held-out file's text, when asked for
    screened: dict[str, tuple[int, int]] = dataclasses.field(default_factory=dict)   # {source: (dropped, of)}
    books: dict[str, str] = dataclasses.field(default_factory=dict)    # {"kjv", "austen": whole text} if screened


def _check_names(names: Sequence[str], allowed: Sequence[str]) -> tuple[str, ...]:
    if isinstance(names, str):
        names = (names,)
    names = tuple(dict.fromkeys(names))
    unknown = [n for n in names if n not in allowed]
    if "kjv" in unknown:
        raise ValueError("kjv is not a training source here (its book holds the held-out John 1-3); write it "
                         "with `python -m experiments.fetch_texts --out DIR`")
    if unknown or not names:
        raise ValueError(f"prose sources {list(names)}: choose from {list(allowed)}")
    return names


def build_texts(names: Sequence[str], *, keep_heldout: bool = False, heldout: bool = False,
                screen: bool = True) -> Fetched:
    """The texts of the named sources (any of SOURCE_PACKAGES), fetched into a temporary folder.

    `keep_heldout` keeps John 1-3 in kjv; `heldout` also builds the bundled held-out KJV file (needs "kjv");
    `screen` leaves out of every training source (all but kjv) the records sharing SCREEN_WORDS words in a row
    with the whole KJV or an Austen novel (`screen_records`; counts in `Fetched.screened`).
    """
    names = _check_names(names, tuple(SOURCE_PACKAGES))
    if heldout and "kjv" not in names:
        raise ValueError("heldout=True needs the source 'kjv'")
    screen = screen and any(n != "kjv" for n in names)
    check_tools(rdata="moby_dick" in names or screen)
    wanted = list(names) + (list(SCREEN_PACKAGES) if screen else [])
    packages = tuple(dict.fromkeys(p for n in wanted for p in {**SOURCE_PACKAGES, **SCREEN_PACKAGES}[n]))
    with tempfile.TemporaryDirectory(prefix="l2m_prose.") as tmp:
        root, debs = _unpacked(packages, Path(tmp))
        versions = {name: deb_version(deb) for name, deb in debs.items()}
        texts, chapters = {}, None
        for name in names:
            if name == "moby_dick":
                texts[name] = moby_dick(root)
            elif name == "kjv":
                chapters = kjv_chapters(root)
                texts[name] = kjv_text(chapters, keep_heldout)
            elif name == "fortunes":
                texts[name] = "\n\n".join(fortune_records(root / FORTUNES_DIR)) + "\n"
            elif name == "devils_dictionary":
                texts[name] = "\n\n".join(devil_entries(root / DEVIL_DICT, root / DEVIL_INDEX)) + "\n"
            else:
                texts[name] = "\n".join(wordnet_glosses(root)) + "\n"
        if heldout or screen:
            chapters = chapters or kjv_chapters(root)
        held = heldout_kjv(chapters, versions["bible-kjv-text"]) if heldout else None
        screened, books = {}, {}
        if screen:
            books = _books(chapters, root)
            refs = book_word_ids(list(books.values()))
            for name in names:
                if name != "kjv":
                    sep = "\n" if name == "wordnet_glosses" else "\n\n"     # one gloss per line
                    texts[name], dropped, of = _screen_text(texts[name], refs, sep)
                    screened[name] = (dropped, of)
    return Fetched(texts, versions, held, screened, books)


def _books(chapters: list[tuple[str, int, str]], root: Path) -> dict[str, str]:
    """{"kjv": every chapter (John 1-3 included), "austen": the six novels}, chapters / novels blank-line apart."""
    return {"kjv": "\n\n".join(t for _, _, t in chapters) + "\n",
            "austen": "\n\n".join(austen_novels(root).values()) + "\n"}


def write_text(path: Path, text: str) -> Path:
    """Write `text` to `path` (UTF-8) through a temporary file, so that a file present is a whole one."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=path.name + ".", suffix=".part")
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(text)
        os.chmod(tmp, 0o644)  # mkstemp makes it private; the cache may be shared
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return path


def fetch_prose(out_dir: "str | os.PathLike[str]", names: Sequence[str] = PROSE_SOURCES) -> list[Path]:
    """Fetch the named training texts (of PROSE_SOURCES) and write out_dir/NAME.txt; their paths, in order."""
    names = _check_names(names, PROSE_SOURCES)
    fetched = build_texts(names)
    print("l2m_jax: left out, sharing " + f"{SCREEN_WORDS} words in a row with the KJV or an Austen novel: "
          + ", ".join(f"{d} of {o} records of {n}" for n, (d, o) in fetched.screened.items()),
          file=sys.stderr, flush=True)
    for book, text in fetched.books.items():
        write_text(Path(out_dir) / "books" / f"{book}.txt", text)
    return [write_text(Path(out_dir) / f"{n}.txt", fetched.texts[n]) for n in names]


def prose_dir() -> Path:
    """Where `ensure_prose` keeps the texts: $L2M_CACHE/texts-v2 (default ~/.cache/l2m_jax/texts-v2; v2: the
    texts screened against the held-out texts' books, which the texts of an older cache are not)."""
    from l2m_jax.assets import cache_dir

    return cache_dir() / "texts-v2"


def ensure_prose(names: Sequence[str] = PROSE_SOURCES, directory: "str | os.PathLike[str] | None" = None
                 ) -> list[Path]:
    """The files directory/NAME.txt of the named sources (default: `prose_dir()`), fetching only missing ones.

    Raises FetchError naming the missing files, where they were to go and why they cannot be fetched.
    """
    names = _check_names(names, PROSE_SOURCES)
    directory = Path(directory) if directory is not None else prose_dir()
    paths = [directory / f"{n}.txt" for n in names]
    missing = [n for n, p in zip(names, paths) if not (p.is_file() and p.stat().st_size > 0)]
    if missing:
        packages = [p for n in missing for p in SOURCE_PACKAGES[n]]
        print(f"l2m_jax: fetching {', '.join(missing)} (Debian packages {', '.join(packages)}) into {directory} ...",
              file=sys.stderr, flush=True)
        try:
            fetch_prose(directory, missing)
        except FetchError as e:
            raise FetchError(f"cannot fetch the prose texts {missing} into {directory}: {e}") from None
    return paths


def screen_books(directory: "str | os.PathLike[str] | None" = None) -> list[Path] | None:
    """The books the texts were screened against (directory/books/NAME.txt for NAME in BOOKS; default
    `prose_dir()`), or None where any is missing. Never fetches: `ensure_books` does."""
    base = (Path(directory) if directory is not None else prose_dir()) / "books"
    paths = [base / f"{b}.txt" for b in BOOKS]
    return paths if all(p.is_file() and p.stat().st_size > 0 for p in paths) else None


def ensure_books(directory: "str | os.PathLike[str] | None" = None) -> list[Path]:
    """The books of `screen_books`, fetched (bible-kjv-text, bible-kjv, r-cran-janeaustenr) if missing; a
    FetchError says why they cannot be."""
    directory = Path(directory) if directory is not None else prose_dir()
    found = screen_books(directory)
    if found:
        return found
    packages = [p for b in BOOKS for p in SCREEN_PACKAGES[b]]
    print(f"l2m_jax: fetching the held-out texts' books (Debian packages {', '.join(packages)}) into "
          f"{directory / 'books'} ...", file=sys.stderr, flush=True)
    check_tools(rdata=True)
    try:
        with tempfile.TemporaryDirectory(prefix="l2m_books.") as tmp:
            root, _ = _unpacked(packages, Path(tmp))
            books = _books(kjv_chapters(root), root)
    except FetchError as e:
        raise FetchError(f"cannot fetch the books into {directory / 'books'}: {e}") from None
    return [write_text(directory / "books" / f"{b}.txt", books[b]) for b in BOOKS]
