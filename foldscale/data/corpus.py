"""The built-in corpus: the running interpreter's standard library source, one document per file.

It is there so that `foldscale` trains out of the box with no data and no network. It is built
once (tokenizer + token store) into `$FOLDSCALE_CACHE` (default ~/.cache/foldscale) and reused.
"""
import fcntl
import os
import shutil
import sys
import sysconfig
import time
from pathlib import Path

EXCLUDED_DIRS = {"site-packages", "dist-packages"}


def cache_root(cache_dir=None) -> Path:
    return Path(cache_dir or os.environ.get("FOLDSCALE_CACHE") or Path.home() / ".cache" / "foldscale")


def stdlib_files(max_files: int | None = None) -> list[Path]:
    """Sorted `*.py` files of the standard library that are valid UTF-8 (a few test fixtures
    are deliberately not), outside site-packages / dist-packages."""
    root = Path(sysconfig.get_paths()["stdlib"])
    files = []
    for path in sorted(root.rglob("*.py")):
        if EXCLUDED_DIRS & set(path.relative_to(root).parts) or not path.is_file():
            continue
        try:
            path.read_bytes().decode("utf-8")
        except UnicodeDecodeError:
            continue
        files.append(path)
        if max_files is not None and len(files) >= max_files:
            break
    return files


def default_store(cache_dir=None, vocab_size: int = 8192, max_files: int | None = None,
                  num_proc: int | None = None) -> Path:
    """Path of the default corpus's token store, building tokenizer + store on first use.

    Lives in `<cache>/stdlib-py3.X-v<vocab_size>/` (`tokenizer.model`, `store/`). The store
    directory appears only by an atomic rename at the end of a build, so its presence means a
    complete build. Concurrent callers (all ranks of a job) serialise on a file lock: one builds,
    the others wait and then reuse it. `max_files` (for tests) builds from a prefix of the files.
    """
    name = f"stdlib-py{sys.version_info[0]}.{sys.version_info[1]}-v{vocab_size}"
    if max_files is not None:
        name += f"-f{max_files}"
    root = cache_root(cache_dir) / name
    store = root / "store"
    if (store / "meta.json").is_file():
        return store
    root.mkdir(parents=True, exist_ok=True)
    with open(root / "build.lock", "w") as lock:
        try:
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            print(f"foldscale: waiting for another process building {root}", flush=True)
            fcntl.flock(lock, fcntl.LOCK_EX)
        if (store / "meta.json").is_file():
            return store
        _build(root, store, vocab_size, max_files, num_proc)
    return store


def _build(root: Path, store: Path, vocab_size: int, max_files, num_proc):
    from foldscale.data.store import prepare
    from foldscale.data.tokenizer import Tokenizer, train_tokenizer

    for stale in root.glob("*.tmp-*"):  # left by an interrupted build
        if stale.is_dir():
            shutil.rmtree(stale)
        else:
            stale.unlink()
    t0 = time.time()
    files = stdlib_files(max_files)
    print(f"foldscale: building the default corpus in {root}: {len(files)} files of "
          f"{sysconfig.get_paths()['stdlib']}", flush=True)
    tok_path = root / "tokenizer.model"
    if tok_path.is_file():
        tok = Tokenizer(tok_path)
    else:
        print(f"foldscale: [1/2] training a {vocab_size}-token tokenizer", flush=True)
        tok = train_tokenizer(files, vocab_size, tok_path)
        print(f"foldscale: tokenizer done ({time.time() - t0:.0f} s)", flush=True)
    print("foldscale: [2/2] tokenising into the token store", flush=True)
    result = prepare(files, tok, store, num_proc=num_proc,
                     source=f"python {sys.version.split()[0]} stdlib *.py ({len(files)} files)")
    print(f"foldscale: default corpus ready: {result.n_docs} documents, {result.n_tokens:,} "
          f"tokens, in {time.time() - t0:.0f} s: {store}", flush=True)
