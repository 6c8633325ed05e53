"""Plain training texts from Debian packages, for word-level KL distillation on raw text.

    python -m experiments.fetch_texts --out DIR

writes, from packages downloaded with `apt-get download` (never installed) and unpacked with `dpkg-deb -x`:

  DIR/moby_dick.txt        Herman Melville, Moby Dick (1851; public domain): the Project Gutenberg etext #2701
                           bundled as the R object `mobydick` in r-cran-tokenizers, without Project Gutenberg's
                           header, licence and footer, CRLF made LF
  DIR/kjv.txt              the King James Version of the Bible (1611; public domain, as the package says) from
                           bible-kjv-text, printed by the `bible` program of bible-kjv (run from the unpacked
                           package); a "Book N" heading line per chapter, then the chapter as one paragraph,
                           verse numbers removed. The chapters of the bundled held-out text
                           (l2m_jax/data/heldout_kjv.txt: John 1-3) are left out unless --keep-heldout.
  DIR/wordnet_glosses.txt  the gloss of every synset of WordNet 3.0 (wordnet-base; Princeton's WordNet licence,
                           permissive with notice, not public domain), one per line, nouns, verbs, adjectives,
                           adverbs in the order of the data files

and prints each file's size. `--heldout-kjv FILE` also writes the held-out file in the bundled format. It
needs a Debian-like system with apt-get and dpkg-deb; `apt-get download` needs current package lists (run
`apt-get update` once; as root this script runs it itself when a package is not found).
"""
from __future__ import annotations

import argparse
import bz2
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

PACKAGES = ("r-cran-tokenizers", "bible-kjv-text", "bible-kjv", "wordnet-base")
HELDOUT_KJV = ("John", (1, 2, 3))          # the chapters of l2m_jax/data/heldout_kjv.txt
WORDNET_FILES = ("data.noun", "data.verb", "data.adj", "data.adv")
_ALL_VERSES = "Gen1:1-Rev22:21"


class FetchError(RuntimeError):
    """A tool, package or file this script needs that is missing or not as expected."""


def _run(cmd: list[str], **kw) -> subprocess.CompletedProcess:
    return subprocess.run(cmd, capture_output=True, text=True, stdin=subprocess.DEVNULL, **kw)


def check_tools() -> None:
    """FetchError listing what is missing: apt-get, dpkg-deb, the Python package rdata."""
    missing = [t for t in ("apt-get", "dpkg-deb") if shutil.which(t) is None]
    try:
        import rdata  # noqa: F401
    except ImportError:
        missing.append("the Python package rdata (pip install rdata)")
    if missing:
        raise FetchError(f"missing: {', '.join(missing)}; this script needs a Debian-like system with apt "
                         "(apt-get, dpkg-deb) and rdata in the Python environment")


def download(packages: tuple[str, ...], workdir: Path) -> dict[str, Path]:
    """apt-get download each package into workdir; {name: .deb path}. Updates the lists once if needed."""
    def attempt() -> subprocess.CompletedProcess:
        return _run(["apt-get", "download", *packages], cwd=workdir)

    proc = attempt()
    not_found = ("Unable to locate package", "no installation candidate")
    if proc.returncode != 0 and any(s in proc.stderr for s in not_found):
        if os.geteuid() != 0:
            raise FetchError(f"apt-get download {' '.join(packages)} failed:\n{proc.stderr.strip()}\nrun "
                             "`sudo apt-get update` (or look the names up with `apt-cache search`) and try again")
        print("fetch_texts: package not found, running apt-get update once", file=sys.stderr)
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


def deb_version(deb: Path) -> str:
    return _run(["dpkg-deb", "-f", str(deb), "Version"]).stdout.strip()


def extract(deb: Path, dest: Path) -> Path:
    proc = _run(["dpkg-deb", "-x", str(deb), str(dest)])
    if proc.returncode != 0:
        raise FetchError(f"dpkg-deb -x {deb} failed: {proc.stderr.strip()}")
    return dest


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


def heldout_kjv(chapters: list[tuple[str, int, str]], version: str) -> str:
    """The bundled held-out file: a "# source" line, then one paragraph per held-out chapter."""
    book, wanted = HELDOUT_KJV
    paras = [t for b, c, t in chapters if b == book and c in wanted]
    note = (f"# The Gospel according to St John, chapters {wanted[0]}-{wanted[-1]}, King James Version (1611), one "
            f"paragraph per chapter, verse numbers removed; public domain, text from the Debian package "
            f"bible-kjv-text {version}.")
    return note + "\n" + "\n\n".join(paras) + "\n"


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


# ------------------------------------------------------------------------------------------------ main
def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", required=True, type=Path, help="folder for moby_dick.txt, kjv.txt, wordnet_glosses.txt")
    ap.add_argument("--keep-heldout", action="store_true",
                    help="keep the held-out chapters (John 1-3) in kjv.txt")
    ap.add_argument("--heldout-kjv", type=Path, help="also write the bundled held-out KJV file here")
    args = ap.parse_args(argv)
    try:
        check_tools()
        args.out.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryDirectory(prefix="fetch_texts.") as tmp:
            work = Path(tmp)
            debs = download(PACKAGES, work)
            root = work / "root"
            for deb in debs.values():
                extract(deb, root)
            versions = {name: deb_version(deb) for name, deb in debs.items()}
            chapters = kjv_chapters(root)
            book, held = HELDOUT_KJV
            kept = [(b, c, t) for b, c, t in chapters if args.keep_heldout or not (b == book and c in held)]
            outputs = {
                args.out / "moby_dick.txt": moby_dick(root),
                args.out / "kjv.txt": "\n\n".join(f"{b} {c}\n{t}" for b, c, t in kept) + "\n",
                args.out / "wordnet_glosses.txt": "\n".join(wordnet_glosses(root)) + "\n",
            }
            if args.heldout_kjv:
                outputs[args.heldout_kjv] = heldout_kjv(chapters, versions["bible-kjv-text"])
        for path, text in outputs.items():
            path.write_text(text, encoding="utf-8")
            print(f"{path}: {len(text):,} characters, {len(text.encode()):,} bytes, {text.count(chr(10)):,} lines")
        print("packages: " + ", ".join(f"{n} {v}" for n, v in versions.items()))
        if not args.keep_heldout:
            print(f"kjv.txt leaves out the held-out chapters {book} {held[0]}-{held[-1]}")
    except FetchError as e:
        print(f"fetch_texts: error: {e}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
