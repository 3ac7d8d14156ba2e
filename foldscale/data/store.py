"""Token store: a whole corpus as one flat, memory-mapped token array plus document offsets.

A store directory holds `tokens.bin` (every document's tokens, each ending in eos, back to
back), `offsets.npy` (int64 start of each document, n_docs + 1 entries), `split.npy` (uint8 per
document: 0 train, 1 val), `tokenizer.model` (a copy, so the store is self-contained) and
`meta.json`. It is written once (`prepare`, or `write_store` for token lists) into a temporary
directory that is renamed into place at the end, so a store that exists was complete.

Later damage (a full disk, a killed copy, a flipped bit) is caught by a manifest in meta.json:
every other file's size and sha256, and meta.json's own checksum. `TokenStore.open` checks all
but the hash of tokens.bin; `TokenStore.verify` hashes that too (see there for the cost). A damaged
store raises `DamagedStoreError`, which names the file and the `foldscale prepare` command that
made the store (recorded in meta.json), so the fix is one command.
Reading needs only numpy: `datasets` is imported inside `prepare` alone, because the training
machines do not have it.
"""
import codecs
import glob
import hashlib
import json
import os
import re
import shlex
import shutil
from pathlib import Path

import numpy as np

from foldscale.config import FoldscaleError

FORMAT_VERSION = 2
SPLITS = {"train": 0, "val": 1}
_FORMATS = {".json": "json", ".jsonl": "json", ".parquet": "parquet", ".csv": "csv"}
_COMPRESSED = (".gz", ".bz2", ".xz", ".zst")
_HUB_NAME = re.compile(r"^[A-Za-z0-9][\w.-]*(/[\w.-]+)?$")


class StoreError(FoldscaleError):
    """A token store (or its input) that cannot be used; the message says what to do."""


class DamagedStoreError(StoreError):
    """A store file that is missing or differs from what meta.json recorded when it was written.

    `file` is the file's name in the store, `problem` what is wrong with it; the message adds
    the command that rebuilds the store, when meta.json still tells it."""

    def __init__(self, store, file: str, problem: str, command: str | None):
        self.store, self.file, self.problem = Path(store), file, problem
        if command:
            fix = f"rebuild it with `{command} --overwrite`"
        else:
            fix = "rebuild it with the `foldscale prepare` command that made it, adding --overwrite"
        super().__init__(f"token store damaged: {self.store / file} {problem}; {fix}")


def _sha256(file: Path) -> str:
    with open(file, "rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()


def _meta_text(meta: dict) -> str:
    """meta.json's exact text: META (less any old checksum) plus the checksum of that."""
    body = {k: v for k, v in meta.items() if k != "checksum"}
    checksum = hashlib.sha256(json.dumps(body, indent=2).encode()).hexdigest()
    return json.dumps({**body, "checksum": checksum}, indent=2) + "\n"


def _salvage_command(raw: bytes) -> str | None:
    """The rebuild command from a damaged meta.json, when its "command" entry (written first,
    so truncation spares it longest) still reads as a JSON string."""
    found = re.search(rb'"command": ("(?:[^"\\]|\\.)*")', raw)
    try:
        return json.loads(found.group(1)) if found else None
    except ValueError:
        return None


def _read_meta(path: Path) -> dict:
    """meta.json of the store at PATH, refused unless it is byte for byte what was written."""
    try:
        raw = (path / "meta.json").read_bytes()
    except FileNotFoundError:
        raise DamagedStoreError(path, "meta.json", "is missing", None) from None

    def damaged(problem):
        return DamagedStoreError(path, "meta.json", problem, _salvage_command(raw))

    try:
        meta = json.loads(raw)
    except ValueError:  # JSONDecodeError or UnicodeDecodeError
        raise damaged("is not valid JSON (truncated or overwritten?)") from None
    if not isinstance(meta, dict) or "checksum" not in meta:
        raise damaged("has no checksum: it was written by an older foldscale (format 1) "
                      "or is not a token store's")
    if raw != _meta_text(meta).encode():
        raise damaged("does not match its own checksum (changed after it was written)")
    if meta["format_version"] != FORMAT_VERSION:
        raise damaged(f"is format version {meta['format_version']}; this foldscale reads "
                      f"version {FORMAT_VERSION}")
    return meta


def _check_file(path: Path, meta: dict, name: str, digest: bool):
    """Refuse the store at PATH unless its file NAME has the size (and, with DIGEST, the
    sha256) that meta.json recorded."""
    entry, file = meta["files"][name], path / name

    def damaged(problem):
        return DamagedStoreError(path, name, problem, meta["command"])

    if not file.is_file():
        raise damaged("is missing")
    size = file.stat().st_size
    if size != entry["bytes"]:
        raise damaged(f"has {size} bytes where meta.json recorded {entry['bytes']}"
                      + (" (truncated)" if size < entry["bytes"] else ""))
    if digest and _sha256(file) != entry["sha256"]:
        raise damaged("does not match the sha256 recorded in meta.json (changed after it was "
                      "written)")


def _dtype_for(vocab_size: int) -> np.dtype:
    return np.dtype(np.uint16 if vocab_size <= 65536 else np.uint32)


def _split_docs(n_docs: int, val_fraction: float, seed: int) -> np.ndarray:
    """Mark whole documents as val: document i is val when u_i < val_fraction, u_i the i-th
    draw of a generator seeded with `seed` (so a document's split does not depend on n_docs).
    At least one val document when val_fraction > 0 and there are two or more documents."""
    if not 0 <= val_fraction < 1:
        raise StoreError(f"val_fraction must be in [0, 1), got {val_fraction}")
    u = np.random.default_rng(seed).random(n_docs)
    val = u < val_fraction
    if val_fraction > 0 and n_docs >= 2 and not val.any():
        val[np.argmin(u)] = True
    if n_docs >= 1 and val.all():
        val[np.argmax(u)] = False
    return val.astype(np.uint8)


class _Writer:
    """Appends documents (flat tokens + lengths) to a store being built in `tmp`.

    Both `write_store` and `prepare` go through this class, so there is one on-disk writer.
    Empty documents are dropped here and counted."""

    def __init__(self, out, vocab_size: int, overwrite: bool):
        self.out = Path(out)
        if self.out.exists() and not overwrite:
            raise StoreError(f"{self.out} already exists; pass --overwrite (overwrite=True) "
                             "to replace it")
        self.vocab_size = vocab_size
        self.dtype = _dtype_for(vocab_size)
        self.tmp = self.out.with_name(f"{self.out.name}.tmp-{os.getpid()}")
        shutil.rmtree(self.tmp, ignore_errors=True)
        self.tmp.mkdir(parents=True)
        self._file = open(self.tmp / "tokens.bin", "wb")
        self._lengths = []
        self.dropped_empty = 0

    def add(self, flat: np.ndarray, lengths: np.ndarray):
        if flat.size and (flat.min() < 0 or flat.max() >= self.vocab_size):
            raise StoreError(f"token id {int(flat.max())} out of range for vocab_size "
                             f"{self.vocab_size}")
        self.dropped_empty += int((lengths == 0).sum())
        self._lengths.append(lengths[lengths > 0].astype(np.int64))
        self._file.write(np.ascontiguousarray(flat, dtype=self.dtype).tobytes())

    def finish(self, val_fraction: float, seed: int, tokenizer_hash: str, tokenizer_file,
               source: str, command: str | None, overwrite: bool) -> "TokenStore":
        """Write offsets, split, the tokenizer copy and meta.json (with every file's size and
        sha256), then rename the store into place. COMMAND, the `foldscale prepare` line that
        makes this store again, is recorded for the hint of a later damage."""
        self._file.close()
        lengths = np.concatenate(self._lengths) if self._lengths else np.zeros(0, np.int64)
        if lengths.size == 0:
            raise StoreError(f"no documents with any tokens to store "
                             f"({self.dropped_empty} empty documents dropped)")
        offsets = np.zeros(lengths.size + 1, np.int64)
        np.cumsum(lengths, out=offsets[1:])
        split = _split_docs(lengths.size, val_fraction, seed)
        np.save(self.tmp / "offsets.npy", offsets)
        np.save(self.tmp / "split.npy", split)
        if tokenizer_file is not None:
            shutil.copyfile(tokenizer_file, self.tmp / "tokenizer.model")
        fingerprint = hashlib.sha256(offsets.tobytes() + split.tobytes()
                                     + tokenizer_hash.encode()).hexdigest()[:16]
        meta = {
            "command": command,
            "format_version": FORMAT_VERSION,
            "vocab_size": self.vocab_size,
            "dtype": self.dtype.name,
            "tokenizer_hash": tokenizer_hash,
            "tokenizer_file": "tokenizer.model" if tokenizer_file is not None else None,
            "n_docs": int(lengths.size),
            "n_tokens": int(offsets[-1]),
            "splits": {name: {"docs": int((split == code).sum()),
                              "tokens": int(lengths[split == code].sum())}
                       for name, code in SPLITS.items()},
            "dropped_empty_docs": self.dropped_empty,
            "val_fraction": val_fraction,
            "seed": seed,
            "fingerprint": fingerprint,
            "source": source,
            "files": {p.name: {"bytes": p.stat().st_size, "sha256": _sha256(p)}
                      for p in sorted(self.tmp.iterdir())},
        }
        (self.tmp / "meta.json").write_text(_meta_text(meta))
        if self.out.exists():
            if not overwrite:
                raise StoreError(f"{self.out} appeared while writing; pass --overwrite")
            old = self.out.with_name(f"{self.out.name}.old-{os.getpid()}")
            os.rename(self.out, old)
            os.rename(self.tmp, self.out)
            shutil.rmtree(old)
        else:
            os.rename(self.tmp, self.out)
        return TokenStore.open(self.out)

    def abort(self):
        self._file.close()
        shutil.rmtree(self.tmp, ignore_errors=True)


def write_store(docs, out, vocab_size: int, val_fraction: float = 0.1,
                tokenizer_hash: str = "none", seed: int = 0, overwrite: bool = False,
                source: str = "write_store") -> "TokenStore":
    """Write a store from token lists as they are (no eos is added); empty ones are dropped."""
    arrays = [np.asarray(d, dtype=np.int64).reshape(-1) for d in docs]
    writer = _Writer(out, vocab_size, overwrite)
    try:
        flat = np.concatenate(arrays) if arrays else np.zeros(0, np.int64)
        writer.add(flat, np.array([a.size for a in arrays], np.int64))
        return writer.finish(val_fraction, seed, tokenizer_hash, None, source, None, overwrite)
    except BaseException:
        writer.abort()
        raise


def _not_a_store(path: Path):
    """Refuse a model or a run given where a token store belongs, before it reads as a damaged store."""
    if (path / "config.json").is_file() and (path / "model.safetensors").is_file():
        raise StoreError(f"{path} is an exported model, not a token store: give the store (from `foldscale "
                         "prepare`) as --data, after the model")
    from foldscale.checkpoint import run_checkpoints  # here: checkpoint.py imports the data package
    if run_checkpoints(path).is_dir() or (path / "COMPLETE").is_file():
        raise StoreError(f"{path} is a training run or checkpoint, not a token store: give the store (from "
                         "`foldscale prepare`) as --data")


class TokenStore:
    """A checked, memory-mapped token store. Open with `TokenStore.open(path)`."""

    def __init__(self, path: Path, meta: dict, tokens: np.memmap, offsets: np.ndarray,
                 split: np.ndarray):
        self.path = path
        self.meta = meta
        self.tokens = tokens
        self.offsets = offsets
        self.split = split
        self.doc_lengths = np.diff(offsets)
        self.n_docs = int(meta["n_docs"])
        self.n_tokens = int(meta["n_tokens"])
        self.vocab_size = int(meta["vocab_size"])
        self.tokenizer_hash = meta["tokenizer_hash"]
        self.fingerprint = meta["fingerprint"]
        self.tokenizer_path = path / meta["tokenizer_file"] if meta["tokenizer_file"] else None

    @classmethod
    def open(cls, path) -> "TokenStore":
        """Open the store at PATH after the cheap checks: meta.json is what was written (its
        checksum), every file it lists is there with its recorded size, and every file but
        tokens.bin has its recorded sha256 (they are read whole anyway). A store that fails one
        raises `DamagedStoreError`; call `verify()` to hash tokens.bin as well."""
        path = Path(path)
        if not path.is_dir():
            raise StoreError(f"token store not found: {path} (build one with `foldscale prepare`)")
        if not (path / "meta.json").exists():
            _not_a_store(path)
        meta = _read_meta(path)
        for name in meta["files"]:
            _check_file(path, meta, name, digest=name != "tokens.bin")
        tokens = np.memmap(path / "tokens.bin", dtype=np.dtype(meta["dtype"]), mode="r",
                           shape=(int(meta["n_tokens"]),))
        return cls(path, meta, tokens, np.load(path / "offsets.npy"), np.load(path / "split.npy"))

    def verify(self) -> "TokenStore":
        """Hash every file of the store, tokens.bin included, against meta.json; raise
        `DamagedStoreError` naming the first that differs. Costs one read of the store at
        about 1.2 GB/s (sha256 with the CPU's SHA instructions; measured: 15 ms for the
        built-in corpus's 19.5 MB from the page cache, against 1.5 ms for `open`), so
        `default_store` always does it; a 10 GB store would take ~10 s."""
        for name in self.meta["files"]:
            _check_file(self.path, self.meta, name, digest=True)
        return self

    def docs(self, split: str) -> np.ndarray:
        """Indices of the documents of `split` ("train" or "val"), ascending."""
        if split not in SPLITS:
            raise StoreError(f"unknown split {split!r}; use one of {sorted(SPLITS)}")
        return np.flatnonzero(self.split == SPLITS[split])

    def doc(self, i: int) -> np.ndarray:
        """Tokens of document i (a read-only memmap view, ending in eos for prepared stores)."""
        return self.tokens[self.offsets[i]:self.offsets[i + 1]]

    def check_compatible(self, vocab_size: int, tokenizer_hash: str | None = None):
        """Refuse a model whose vocabulary or tokenizer differs from this store's."""
        if vocab_size != self.vocab_size:
            raise StoreError(f"model vocab_size {vocab_size} does not match the token store "
                             f"{self.path} (vocab_size {self.vocab_size}); set the model's "
                             f"vocab_size to {self.vocab_size} or prepare the data again with a "
                             f"tokenizer of {vocab_size} tokens")
        if tokenizer_hash is not None and tokenizer_hash != self.tokenizer_hash:
            raise StoreError(f"tokenizer mismatch: the token store {self.path} was made with "
                             f"tokenizer {self.tokenizer_hash[:12]}, the model uses "
                             f"{tokenizer_hash[:12]}")

    def __repr__(self):
        return f"TokenStore({str(self.path)!r}, docs={self.n_docs}, tokens={self.n_tokens})"


def _as_list(inputs) -> list[str]:
    return [str(i) for i in ([inputs] if isinstance(inputs, (str, Path)) else inputs)]


def _expand(inputs) -> tuple[list[tuple[str, list[str]]], list[str]]:
    """Sort inputs into local file groups by format (in input order) and hub dataset names."""
    groups: dict[str, list[str]] = {}
    hub = []
    for item in _as_list(inputs):
        if glob.has_magic(item):
            files = sorted(f for f in glob.glob(item, recursive=True) if os.path.isfile(f))
            if not files:
                raise StoreError(f"no input files matched {item!r}")
        elif os.path.isdir(item):
            files = sorted(str(f) for f in Path(item).rglob("*") if f.is_file())
            if not files:
                raise StoreError(f"input directory {item} holds no files")
        elif os.path.isfile(item):
            files = [item]
        elif _HUB_NAME.match(item) and "/" in item and Path(item).suffix not in (*_FORMATS, ".txt") \
                and not os.path.exists(item.split("/")[0]):
            hub.append(item)
            continue
        else:
            raise StoreError(f"input not found: {item} is no file, directory or glob here (a Hugging Face dataset "
                             "is named owner/name)")
        for f in files:
            suffixes = [s for s in Path(f).suffixes if s not in _COMPRESSED]
            fmt = _FORMATS.get(suffixes[-1] if suffixes else "", "text")
            groups.setdefault(fmt, []).append(f)
    return list(groups.items()), hub


def _first_bad_byte(file) -> tuple[int, int] | None:
    """(offset, value) of the first byte of FILE that does not decode as UTF-8, or None."""
    decoder = codecs.getincrementaldecoder("utf-8")()
    offset = 0
    with open(file, "rb") as f:
        while True:
            chunk = f.read(1 << 20)
            pending = len(decoder.getstate()[0])  # bytes of a character cut by the last chunk
            try:
                decoder.decode(chunk, final=not chunk)
            except UnicodeDecodeError as e:
                return offset - pending + e.start, e.object[e.start]
            if not chunk:
                return None
            offset += len(chunk)


def _check_utf8(file: str):
    """Refuse FILE unless it decodes as UTF-8 (binary files do not). Done before `datasets`
    reads it, because datasets either fails without naming the file or, for json, keeps the
    bad bytes and fails later, mid-tokenising. One extra read: 0.05 s for the 32 MB of the
    built-in corpus, against 15 s of tokenising (2 cores). Compressed files are left to
    datasets, so one of those that is not UTF-8 gets its error without the offset."""
    bad = None if file.endswith(_COMPRESSED) else _first_bad_byte(file)
    if bad:
        raise StoreError(f"{file} is not UTF-8 text: byte 0x{bad[1]:02x} at offset {bad[0]} does "
                         "not decode; leave binary files out of --input, and convert text to "
                         "UTF-8 first (e.g. `iconv -f latin1 -t utf-8`)")


def _shown(files: list[str]) -> str:
    return ", ".join(files[:3]) + (" ..." if len(files) > 3 else "")


def _unreadable(fmt: str, files: list[str], error: Exception) -> StoreError:
    """The error for FILES that `datasets` could not read as FMT, with the cause's first line."""
    cause = error.__cause__ or error  # DatasetGenerationError says no more than "an error occurred"
    lines = str(cause).strip().splitlines()
    detail = f"{type(cause).__name__}: {lines[0]}" if lines else type(cause).__name__
    return StoreError(f"could not read {_shown(files)} as {fmt} ({detail})")


def _check_hub_reachable(name: str):
    """Refuse at once, rather than after the Hub client's retries, a dataset name when the Hub
    cannot be reached (HF_HUB_OFFLINE=1 reads the Hugging Face cache instead, unchecked)."""
    import socket
    from urllib.parse import urlparse

    from huggingface_hub import constants
    if constants.HF_HUB_OFFLINE:
        return
    host = urlparse(constants.ENDPOINT).hostname
    try:
        socket.create_connection((host, 443), timeout=5).close()
    except OSError as e:
        raise StoreError(f"cannot reach {host} to load dataset {name!r} ({e}): download it where there is "
                         "network and pass its files, or set HF_HUB_OFFLINE=1 to use a copy in the Hugging Face "
                         "cache") from None


def load_documents(inputs, text_field: str = "text", cache_dir=None):
    """Load INPUTS (files, globs, directories, or Hugging Face dataset names) as one
    `datasets.Dataset` with a single "text" column, one row per document.

    Text files are one document per file (code files must stay whole); json/jsonl/parquet/csv
    rows are documents, their text in `text_field`."""
    import datasets

    groups, hub = _expand(inputs)
    if not groups and not hub:
        raise StoreError("no input given")
    parts = []
    for fmt, files in groups:
        if fmt != "parquet":
            for f in files:
                _check_utf8(f)
        kwargs = {"sample_by": "document"} if fmt == "text" else {}
        reading = datasets.DownloadConfig(download_desc="reading input files")  # not "Downloading data"
        try:
            ds = datasets.load_dataset(fmt, data_files=files, split="train", cache_dir=cache_dir,
                                       download_config=reading, **kwargs)
        except Exception as e:  # datasets raises many kinds, none naming the file at fault
            raise _unreadable(fmt, files, e) from None
        parts.append((_shown(files), ds, "text" if fmt == "text" else text_field))
    for name in hub:
        _check_hub_reachable(name)
        try:
            ds = datasets.load_dataset(name, split="train", cache_dir=cache_dir)
        except Exception as e:
            first = str(e).strip().splitlines()[0] if str(e).strip() else ""
            raise StoreError(f"could not load dataset {name!r} from the Hugging Face Hub "
                             f"({type(e).__name__}: {first}); without network access, download "
                             "it elsewhere and pass its files") from None
        parts.append((name, ds, text_field))
    columns = []
    for where, ds, field in parts:
        if field not in ds.column_names:
            raise StoreError(f"text field {field!r} not found in {where}; fields there: "
                             f"{', '.join(ds.column_names)} (choose one with --text-field)")
        feature = ds.features[field]
        if getattr(feature, "dtype", None) not in ("string", "large_string"):
            raise StoreError(f"field {field!r} in {where} holds {feature}, not text")
        ds = ds.select_columns([field])
        columns.append(ds.rename_column(field, "text") if field != "text" else ds)
    return columns[0] if len(columns) == 1 else datasets.concatenate_datasets(columns)


def _tokenize(batch, tokenizer):
    ids = tokenizer.encode_batch([t or "" for t in batch["text"]])
    return {"ids": [x + [tokenizer.eos_id] if x else [] for x in ids]}


def _absolute(inputs: list[str]) -> list[str]:
    """INPUTS usable from any directory: local files, directories and globs made absolute, hub
    dataset names kept."""
    return [os.path.abspath(i) if os.path.exists(i) or glob.has_magic(i) else i for i in inputs]


def _prepare_command(inputs: list[str], tokenizer_path, out, text_field: str,
                     val_fraction: float, seed: int) -> str:
    """The `foldscale prepare` line that writes this store again, from any directory."""
    args = ["foldscale", "prepare"]
    for item in _absolute(inputs):
        args += ["--input", item]
    args += ["--text-field", text_field, "--tokenizer", os.path.abspath(tokenizer_path),
             "--out", os.path.abspath(out), "--val-fraction", str(val_fraction), "--seed", str(seed)]
    return shlex.join(args)


def prepare(inputs, tokenizer, out, text_field: str = "text", val_fraction: float = 0.01,
            seed: int = 0, num_proc: int | None = None, overwrite: bool = False,
            source: str | None = None, command: str | None = None) -> TokenStore:
    """Tokenise INPUTS (see `load_documents`) with TOKENIZER (a `Tokenizer` or model path) into
    a token store at OUT. Each document is stored as its tokens + eos; empty ones are dropped.

    meta.json records COMMAND as the way to rebuild the store (default: the `foldscale prepare`
    line for these arguments, so that it rebuilds the same store byte for byte), and SOURCE as
    a description of the inputs (default: their list, with absolute paths)."""
    import datasets
    from tqdm import tqdm

    from foldscale.data.tokenizer import Tokenizer, available_cores

    inputs = _as_list(inputs)
    tok = tokenizer if isinstance(tokenizer, Tokenizer) else Tokenizer(tokenizer)
    if command is None:
        command = _prepare_command(inputs, tok.path, out, text_field, val_fraction, seed)
    num_proc = num_proc or available_cores()
    writer = _Writer(out, tok.vocab_size, overwrite)
    try:
        cache = writer.tmp / "hf-cache"
        docs = load_documents(inputs, text_field, cache_dir=str(cache))
        num_proc = max(1, min(num_proc, len(docs)))
        features = datasets.Features({"ids": datasets.Sequence(datasets.Value(writer.dtype.name))})
        ids = docs.map(_tokenize, batched=True, batch_size=64, remove_columns=["text"],
                       num_proc=num_proc if num_proc > 1 else None, fn_kwargs={"tokenizer": tok},
                       features=features, desc="tokenizing", cache_file_name=str(cache / "ids.arrow"))
        with tqdm(total=len(ids), desc="writing", unit="doc") as bar:
            for table in ids.with_format("arrow").iter(batch_size=4096):
                column = table.column("ids").combine_chunks()
                lengths = column.value_lengths().fill_null(0).to_numpy()
                writer.add(column.flatten().to_numpy(), lengths.astype(np.int64))
                bar.update(len(lengths))
        del docs, ids
        shutil.rmtree(cache)
        source = source or ", ".join(_absolute(inputs))
        return writer.finish(val_fraction, seed, tok.hash, tok.path, source, command, overwrite)
    except BaseException:
        writer.abort()
        raise
