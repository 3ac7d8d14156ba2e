"""Sentencepiece tokenizer that reproduces source code exactly: `decode(encode(text)) == text`.

Sentencepiece normally rewrites whitespace (collapses runs, adds a leading space, drops "\\n",
which its trainer treats as a line separator). Code needs every space, tab and newline, so the
trainer runs with identity normalisation, no dummy prefix, whitespace-only pieces allowed, and
"\\n" as a user-defined symbol; byte fallback makes any other character representable.
One known exception: the character U+2581 ("▁") is sentencepiece's own space marker and decodes
as " ".
"""
import hashlib
import io
import os
import random
import re
from collections.abc import Iterable
from pathlib import Path

import sentencepiece as spm

from foldscale.config import FoldscaleError

PAD_ID, UNK_ID, BOS_ID, EOS_ID = 0, 1, 2, 3


class TokenizerError(FoldscaleError):
    """A tokenizer file that is missing or unreadable, or training input that cannot be used."""


def available_cores() -> int:
    return len(os.sched_getaffinity(0))


def _training_lines(texts: Iterable[str], max_len: int):
    """Sentencepiece trains on lines; newlines are a user symbol, so lines lose nothing."""
    for text in texts:
        for line in text.split("\n"):
            if line.strip() and len(line) <= max_len:
                yield line


def _sample(lines: Iterable[str], k: int, seed: int = 0) -> list[str]:
    """At most K of LINES (all for K <= 0), each kept with the same chance (reservoir sampling), the
    same K for the same lines: sentencepiece's own sampling (`input_sentence_size`) draws another
    sample in every process, and with it another tokenizer. Given no more than its
    `input_sentence_size`, sentencepiece samples nothing."""
    rng, kept = random.Random(seed), []
    for i, line in enumerate(lines):
        if i < k or k <= 0:
            kept.append(line)
        elif (j := rng.randrange(i + 1)) < k:
            kept[j] = line
    return kept


def _read_files(paths):
    for p in paths:
        yield Path(p).read_text(encoding="utf-8", errors="replace")


def train_tokenizer(inputs, vocab_size: int, out, input_sentence_size: int = 1_000_000) -> "Tokenizer":
    """Train a BPE tokenizer on INPUTS, a list of text file paths or an iterator of documents.

    At most `input_sentence_size` lines are used, which keeps training on large corpora to seconds:
    a sample, the same for the same text, so the same text gives the same tokenizer. The model file
    is written atomically (temp file + rename).
    A vocab size the text cannot fill, too small or too large, is refused with the bound that
    holds for this text.
    """
    if vocab_size < 1:
        raise TokenizerError(f"vocab size must be positive, got {vocab_size}")
    if isinstance(inputs, (list, tuple)):
        missing = [str(p) for p in inputs if not Path(p).is_file()]
        if missing:
            raise TokenizerError(f"tokenizer input file not found: {missing[0]}")
        texts = _read_files(inputs)
    else:
        texts = inputs
    max_sentence_length = 16384
    lines = _sample(_training_lines(texts, max_sentence_length), input_sentence_size)
    if not lines:
        raise TokenizerError("no text to train the tokenizer on (all inputs are empty)")
    model = io.BytesIO()
    try:
        spm.SentencePieceTrainer.train(
            sentence_iterator=iter(lines), model_writer=model, vocab_size=vocab_size,
            model_type="bpe", byte_fallback=True, pad_id=PAD_ID, unk_id=UNK_ID, bos_id=BOS_ID,
            eos_id=EOS_ID, num_threads=available_cores(), input_sentence_size=input_sentence_size,
            shuffle_input_sentence=True, max_sentence_length=max_sentence_length,
            remove_extra_whitespaces=False, add_dummy_prefix=False, split_digits=True,
            allow_whitespace_only_pieces=True, normalization_rule_name="identity",
            user_defined_symbols=["\n"], minloglevel=2)
    except RuntimeError as e:
        raise TokenizerError(_training_failure(str(e), vocab_size)) from None
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f"{out.name}.tmp-{os.getpid()}")
    tmp.write_bytes(model.getvalue())
    os.replace(tmp, out)
    return Tokenizer(out)


def _training_failure(message: str, vocab_size: int) -> str:
    """Sentencepiece's training error in foldscale's terms. Its vocabulary bounds depend on the
    text: at least 256 byte pieces + 5 special pieces (pad, unk, bos, eos, newline) + one per
    character that is needed to cover 99.95% of the text, and at most what BPE merges of the
    text can make. Its advice names trainer options (--character_coverage) foldscale does not
    have, so it is left out."""
    too_small = re.search(r"smaller than required_chars\. \d+ vs (\d+)", message)
    if too_small:
        least = int(too_small.group(1))
        return (f"vocab size {vocab_size} is too small for this input: it needs at least {least} "
                "(256 byte pieces, 5 special pieces and one per common character of the text); "
                f"use --vocab-size {least} or more")
    too_large = re.search(r"Vocabulary size too high \(\d+\)\. Please set it to a value <= (\d+)",
                          message)
    if too_large:
        most = int(too_large.group(1))
        return (f"vocab size {vocab_size} is too large for this input: its text yields at most "
                f"{most} pieces; use --vocab-size {most} or less, or train on more text")
    first = message.strip().splitlines()[0] if message.strip() else "no message"
    first = re.sub(r"^.*?\] ", "", first)  # sentencepiece's source location and failed check
    first = re.sub(r"[^.]*--[a-z_]+[^.]*\.?", "", first).strip()  # advice about its options
    return f"sentencepiece training failed: {first}"


class Tokenizer:
    """A trained sentencepiece model plus its identity (`hash`), which token stores record."""

    def __init__(self, path):
        self.path = Path(path)
        try:
            data = self.path.read_bytes()
        except FileNotFoundError:
            raise TokenizerError(f"tokenizer file not found: {self.path} "
                                 "(train one with `foldscale tokenizer train`)") from None
        self._load(data)

    def _load(self, data: bytes):
        self._sp = spm.SentencePieceProcessor()
        try:
            self._sp.LoadFromSerializedProto(data)
        except (RuntimeError, TypeError):
            raise TokenizerError(f"tokenizer file is not a sentencepiece model (corrupt?): "
                                 f"{self.path}") from None
        self._data = data
        self.hash = hashlib.sha256(data).hexdigest()
        self.vocab_size = self._sp.get_piece_size()
        self.pad_id, self.unk_id = self._sp.pad_id(), self._sp.unk_id()
        self.bos_id, self.eos_id = self._sp.bos_id(), self._sp.eos_id()

    def __getstate__(self):
        # datasets.map with num_proc pickles the tokenizer into worker processes.
        return {"path": str(self.path), "data": self._data}

    def __setstate__(self, state):
        self.path = Path(state["path"])
        self._load(state["data"])

    def encode(self, text: str) -> list[int]:
        return self._sp.encode(text)

    def encode_batch(self, texts: list[str]) -> list[list[int]]:
        return self._sp.encode(list(texts))

    def decode(self, ids) -> str:
        return self._sp.decode([int(i) for i in ids])

    def __repr__(self):
        return f"Tokenizer({str(self.path)!r}, vocab_size={self.vocab_size})"
