"""Token store: a whole corpus as one flat, memory-mapped token array plus document offsets.

A store directory holds `tokens.bin` (every document's tokens, each ending in eos, back to
back), `offsets.npy` (int64 start of each document, n_docs + 1 entries), `split.npy` (uint8 per
document: 0 train, 1 val), `tokenizer.model` (a copy, so the store is self-contained) and
`meta.json`. It is written once (`prepare`, or `write_store` for token lists) into a temporary
directory that is renamed into place at the end, so a store that exists is complete.
Reading needs only numpy: `datasets` is imported inside `prepare` alone, because the training
machines do not have it.
"""
import glob
import hashlib
import json
import os
import re
import shutil
from pathlib import Path

import numpy as np

from foldscale.config import FoldscaleError

FORMAT_VERSION = 1
SPLITS = {"train": 0, "val": 1}
_FORMATS = {".json": "json", ".jsonl": "json", ".parquet": "parquet", ".csv": "csv"}
_META_KEYS = ("vocab_size", "dtype", "tokenizer_hash", "tokenizer_file", "n_docs", "n_tokens",
              "fingerprint")
_HUB_NAME = re.compile(r"^[A-Za-z0-9][\w.-]*(/[\w.-]+)?$")


class StoreError(FoldscaleError):
    """A token store (or its input) that cannot be used; the message says what to do."""


def _rebuild_hint(path) -> str:
    return f"re-run `foldscale prepare --out {path} --overwrite` to rebuild it"


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
               source: str, overwrite: bool) -> "TokenStore":
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
        }
        (self.tmp / "meta.json").write_text(json.dumps(meta, indent=2) + "\n")
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
        return writer.finish(val_fraction, seed, tokenizer_hash, None, source, overwrite)
    except BaseException:
        writer.abort()
        raise


class TokenStore:
    """A validated, memory-mapped token store. Open with `TokenStore.open(path)`."""

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
        path = Path(path)
        if not path.is_dir():
            raise StoreError(f"token store not found: {path} (build one with `foldscale prepare`)")
        meta_file = path / "meta.json"
        try:
            meta = json.loads(meta_file.read_text())
        except FileNotFoundError:
            raise StoreError(f"{meta_file} is missing: {path} is not a complete token store; "
                             f"{_rebuild_hint(path)}") from None
        except json.JSONDecodeError as e:
            raise StoreError(f"{meta_file} is corrupt ({e}); {_rebuild_hint(path)}") from None
        if meta.get("format_version") != FORMAT_VERSION:
            raise StoreError(f"{meta_file}: format version {meta.get('format_version')} is not "
                             f"{FORMAT_VERSION}; {_rebuild_hint(path)}")

        def bad(file, what):
            return StoreError(f"{path / file} {what}; {_rebuild_hint(path)}")

        missing = [k for k in _META_KEYS if k not in meta]
        if missing:
            raise bad("meta.json", f"lacks {', '.join(missing)}")
        dtype = np.dtype(meta["dtype"])
        n_docs, n_tokens = int(meta["n_docs"]), int(meta["n_tokens"])
        tokens_file = path / "tokens.bin"
        if not tokens_file.is_file():
            raise bad("tokens.bin", "is missing")
        size = tokens_file.stat().st_size
        if size != n_tokens * dtype.itemsize:
            raise bad("tokens.bin", f"has {size} bytes but meta.json says {n_tokens} tokens of "
                                    f"{dtype.name} ({n_tokens * dtype.itemsize} bytes): truncated?")
        try:
            offsets = np.load(path / "offsets.npy")
            split = np.load(path / "split.npy")
        except (FileNotFoundError, ValueError, OSError) as e:
            raise bad("offsets.npy / split.npy", f"cannot be read ({e})") from None
        if (offsets.shape != (n_docs + 1,) or offsets[0] != 0 or offsets[-1] != n_tokens
                or np.any(np.diff(offsets) <= 0)):
            raise bad("offsets.npy", f"does not match meta.json ({n_docs} documents, "
                                     f"{n_tokens} tokens, each document non-empty)")
        if split.shape != (n_docs,) or not np.isin(split, list(SPLITS.values())).all():
            raise bad("split.npy", f"does not hold one train/val mark per document ({n_docs})")
        if meta["tokenizer_file"] and not (path / meta["tokenizer_file"]).is_file():
            raise bad(meta["tokenizer_file"], "is missing")
        tokens = np.memmap(tokens_file, dtype=dtype, mode="r", shape=(n_tokens,))
        return cls(path, meta, tokens, offsets, split)

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


def _expand(inputs) -> tuple[list[tuple[str, list[str]]], list[str]]:
    """Sort inputs into local file groups by format (in input order) and hub dataset names."""
    groups: dict[str, list[str]] = {}
    hub = []
    for item in ([inputs] if isinstance(inputs, (str, Path)) else inputs):
        item = str(item)
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
        elif _HUB_NAME.match(item) and Path(item).suffix not in (*_FORMATS, ".txt"):
            hub.append(item)
            continue
        else:
            raise StoreError(f"input file not found: {item}")
        for f in files:
            suffixes = [s for s in Path(f).suffixes if s not in (".gz", ".bz2", ".xz", ".zst")]
            fmt = _FORMATS.get(suffixes[-1] if suffixes else "", "text")
            groups.setdefault(fmt, []).append(f)
    return list(groups.items()), hub


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
        kwargs = {"sample_by": "document"} if fmt == "text" else {}
        ds = datasets.load_dataset(fmt, data_files=files, split="train", cache_dir=cache_dir,
                                   **kwargs)
        parts.append((", ".join(files[:3]) + (" ..." if len(files) > 3 else ""), ds,
                      "text" if fmt == "text" else text_field))
    for name in hub:
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


def prepare(inputs, tokenizer, out, text_field: str = "text", val_fraction: float = 0.01,
            seed: int = 0, num_proc: int | None = None, overwrite: bool = False,
            source: str | None = None) -> TokenStore:
    """Tokenise INPUTS (see `load_documents`) with TOKENIZER (a `Tokenizer` or model path) into
    a token store at OUT. Each document is stored as its tokens + eos; empty ones are dropped."""
    import datasets
    from tqdm import tqdm

    from foldscale.data.tokenizer import Tokenizer, available_cores

    tok = tokenizer if isinstance(tokenizer, Tokenizer) else Tokenizer(tokenizer)
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
        if source is None:
            source = ", ".join(map(str, [inputs] if isinstance(inputs, (str, Path)) else inputs))
        return writer.finish(val_fraction, seed, tok.hash, tok.path, source, overwrite)
    except BaseException:
        writer.abort()
        raise
