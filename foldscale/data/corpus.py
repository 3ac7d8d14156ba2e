"""The built-in corpus: the running interpreter's standard library source, one document per file.

It is there so that `foldscale` trains out of the box with no data and no network. It is built
once (tokenizer + token store) into `$FOLDSCALE_CACHE` (default ~/.cache/foldscale), checked
on every use, and rebuilt when it is found damaged.
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
    found = []
    for folder, subfolders, names in os.walk(sysconfig.get_paths()["stdlib"]):
        subfolders[:] = [d for d in subfolders if d not in EXCLUDED_DIRS]  # not walked at all
        found += [Path(folder, name) for name in names if name.endswith(".py")]
    files = []
    for path in sorted(found):
        if not path.is_file():
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
                  num_proc: int | None = None, rebuild: bool = False) -> Path:
    """Path of the built-in corpus's token store, checked in full (`TokenStore.verify`, 15 ms),
    building it on first use and rebuilding it, with one line that says why, when it is damaged
    or when REBUILD is asked for (`foldscale prepare --default --overwrite`).

    Lives in `<cache>/stdlib-py3.X-v<vocab_size>/store/`, with the tokenizer inside it. A build
    writes elsewhere and renames the store into place at the end. Concurrent callers (all ranks
    of a job) serialise on a file lock: one builds, the others wait and then reuse it.
    `max_files` (for tests) builds from a prefix of the files.
    """
    name = f"stdlib-py{sys.version_info[0]}.{sys.version_info[1]}-v{vocab_size}"
    if max_files is not None:
        name += f"-f{max_files}"
    root = cache_root(cache_dir) / name
    store = root / "store"
    if not rebuild and _damage(store) is None:
        return store
    root.mkdir(parents=True, exist_ok=True)
    with open(root / "build.lock", "w") as lock:
        try:
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            print(f"foldscale: waiting for another process building {root}", flush=True)
            fcntl.flock(lock, fcntl.LOCK_EX)
        damage = "a rebuild was asked for" if rebuild else _damage(store)
        if damage is None:
            return store
        if store.exists():
            print(f"foldscale: rebuilding the built-in corpus at {store} ({damage})", flush=True)
            (root / "tokenizer.model").unlink(missing_ok=True)
        command = f"foldscale prepare --default --vocab-size {vocab_size}"
        if max_files is not None:
            command += f" --max-files {max_files}"
        _build(root, store, vocab_size, max_files, num_proc, command)
    return store


def _damage(store: Path) -> str | None:
    """None when STORE opens and verifies, else what is wrong with it."""
    from foldscale.data.store import DamagedStoreError, TokenStore

    if not store.exists():
        return "not built yet"
    try:
        TokenStore.open(store).verify()
    except DamagedStoreError as e:
        return f"damaged: {e.file} {e.problem}"
    return None


def _build(root: Path, store: Path, vocab_size: int, max_files, num_proc, command: str):
    """Train the tokenizer (unless an interrupted build left one) and write the store, a line
    per phase with its elapsed time; the tokenising shows a bar."""
    from foldscale.data.store import prepare
    from foldscale.data.tokenizer import Tokenizer, TokenizerError, available_cores, train_tokenizer

    for stale in [*root.glob("*.tmp-*"), *root.glob("*.old-*")]:  # left by an interrupted build
        if stale.is_dir():
            shutil.rmtree(stale)
        else:
            stale.unlink()
    t0 = time.time()
    files = stdlib_files(max_files)
    megabytes = sum(f.stat().st_size for f in files) / 1e6
    expect = megabytes / (0.6 * available_cores())  # measured: 32 MB in 27 s on 2 cores
    print(f"foldscale: building the built-in corpus in {root}: {len(files)} files "
          f"({megabytes:.0f} MB) of {sysconfig.get_paths()['stdlib']}, roughly "
          f"{max(1, round(expect))} s", flush=True)
    tok_path = root / "tokenizer.model"
    try:
        tok = Tokenizer(tok_path)  # trained by a build that was interrupted after it
    except TokenizerError:
        print(f"foldscale: [1/2] training a {vocab_size}-token tokenizer", flush=True)
        tok = train_tokenizer(files, vocab_size, tok_path)
        print(f"foldscale: [1/2] tokenizer trained ({time.time() - t0:.0f} s)", flush=True)
    print("foldscale: [2/2] tokenising into the token store", flush=True)
    result = prepare(files, tok, store, num_proc=num_proc, overwrite=True, command=command,
                     source=f"python {sys.version.split()[0]} stdlib *.py ({len(files)} files)")
    tok_path.unlink()  # the store holds its own, checked copy
    print(f"foldscale: [2/2] built-in corpus ready ({time.time() - t0:.0f} s): {result.n_docs} "
          f"documents, {result.n_tokens:,} tokens: {store}", flush=True)
