"""Plain training texts from Debian packages, for word-level KL distillation on raw text.

    python -m experiments.fetch_texts --out DIR

writes, from packages downloaded with `apt-get download` (never installed) and unpacked with `dpkg-deb -x`
(l2m_jax.data.prose describes each source):

  DIR/moby_dick.txt          Herman Melville, Moby Dick (r-cran-tokenizers), without Project Gutenberg's frame
  DIR/kjv.txt                the King James Version of the Bible (bible-kjv-text, printed by bible-kjv's
                             `bible`), a "Book N" heading line per chapter, then the chapter as one paragraph. The
                             chapters of the bundled held-out text (l2m_jax/data/heldout_kjv.txt: John 1-3) are
                             left out unless --keep-heldout.
  DIR/fortunes.txt           the fortune cookie files of fortunes and fortunes-min, one record per paragraph
  DIR/devils_dictionary.txt  Ambrose Bierce, The Devil's Dictionary (dict-devil), one entry per paragraph
  DIR/wordnet_glosses.txt    the gloss of every synset of WordNet 3.0 (wordnet-base), one per line
  DIR/books/kjv.txt, DIR/books/austen.txt   the books of the held-out texts whole (the KJV with John 1-3, Austen's
                             six novels from r-cran-janeaustenr): what the training files are screened against,
                             never training data

and prints each file's size. `--heldout-kjv FILE` also writes the held-out file in the bundled format. It
needs a Debian-like system with apt-get and dpkg-deb; `apt-get download` needs current package lists (run
`apt-get update` once; as root this script runs it itself when a package is not found). The recipe's
`data.text=[prose]` fetches the same files (without kjv) into $L2M_CACHE/texts-v2 by itself. The training files
leave out every record sharing 10 words in a row with the whole KJV or an Austen novel (l2m_jax.data.prose).
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

from l2m_jax.data.prose import HELDOUT_KJV, SOURCE_PACKAGES, FetchError, build_texts, write_text


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", required=True, type=Path,
                    help="folder for " + ", ".join(f"{n}.txt" for n in SOURCE_PACKAGES))
    ap.add_argument("--keep-heldout", action="store_true",
                    help="keep the held-out chapters (John 1-3) in kjv.txt")
    ap.add_argument("--heldout-kjv", type=Path, help="also write the bundled held-out KJV file here")
    args = ap.parse_args(argv)
    try:
        fetched = build_texts(tuple(SOURCE_PACKAGES), keep_heldout=args.keep_heldout,
                              heldout=args.heldout_kjv is not None)
        outputs = {args.out / f"{name}.txt": text for name, text in fetched.texts.items()}
        outputs.update({args.out / "books" / f"{name}.txt": text for name, text in fetched.books.items()})
        if args.heldout_kjv:
            outputs[args.heldout_kjv] = fetched.heldout_kjv
        for path, text in outputs.items():
            write_text(path, text)
            print(f"{path}: {len(text):,} characters, {len(text.encode()):,} bytes, {text.count(chr(10)):,} lines")
        print("packages: " + ", ".join(f"{n} {v}" for n, v in fetched.versions.items()))
        print("left out, sharing a span with the KJV or an Austen novel: " + ", ".join(
            f"{n} {d} of {o} records" for n, (d, o) in fetched.screened.items()))
        if not args.keep_heldout:
            book, held = HELDOUT_KJV
            print(f"kjv.txt leaves out the held-out chapters {book} {held[0]}-{held[-1]}")
    except FetchError as e:
        print(f"fetch_texts: error: {e}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
