"""Documents of the suite: real text from a token store with a task's pieces spliced in.

A task tells a `Story`: the pieces before the needle, the needle (the last piece the answer
depends on), the pieces after it, the question and the answer, each already tokenized.
`layout` lays a story out in filler text and `Document.tokens` reads any slice of the result
without building the rest, so a document of a million tokens costs memory for its pieces and
for the list of filler documents it walks through, not for its tokens.
"""
import bisect
from dataclasses import dataclass

import numpy as np

from foldscale.data import TokenStore, Tokenizer

IGNORE = -100
MAX_PREFIX_SEGMENTS = 1024
"""Evaluation's default cap on the filler before the needle, in segments (`eval_doc`'s max_prefix)."""


class Corpus:
    """The documents of one split of a token store, read as filler: each without its final eos
    and followed by a blank line, so that documents read on one from another."""

    def __init__(self, store: TokenStore, split: str):
        if store.tokenizer_path is None:
            raise ValueError(f"{store.path} has no tokenizer; the suite needs a store made by "
                             "`foldscale prepare` (or the built-in corpus)")
        self.store, self.split = store, split
        self.tokenizer = Tokenizer(store.tokenizer_path)
        self.ids = store.docs(split)
        if not len(self.ids):
            raise ValueError(f"{store.path} has no {split} documents")
        self.sep = np.array(self.tokenizer.encode("\n\n"), np.int64)
        ends_in_eos = store.tokens[store.offsets[self.ids + 1] - 1] == self.tokenizer.eos_id
        self.body = store.doc_lengths[self.ids] - ends_in_eos  # tokens kept of each document
        self.lengths = self.body + len(self.sep)  # filler tokens of each document

    def read(self, k: int, a: int, b: int) -> np.ndarray:
        """Tokens a..b-1 of the k-th document's filler text."""
        body = int(self.body[k])
        doc = self.store.doc(int(self.ids[k]))
        head = np.asarray(doc[min(a, body):min(b, body)], np.int64)
        return np.concatenate([head, self.sep[max(a - body, 0):max(b - body, 0)]])


class Filler:
    """An endless stream of real text: a random document of the corpus from a random token on,
    then all its documents in random order, a fresh permutation each pass. The stream is a
    function of the generator's state when it is made; only the documents read so far are
    listed (a pass at a time)."""

    def __init__(self, corpus: Corpus, rng: np.random.Generator):
        self.corpus = corpus
        self.rng = np.random.default_rng(rng.integers(2**63))
        first = int(self.rng.integers(len(corpus.ids)))
        self.order = np.array([first])  # positions in the split of the documents listed so far
        self.skip = np.array([int(self.rng.integers(corpus.lengths[first]))])  # tokens skipped of each
        self.ends = corpus.lengths[self.order] - self.skip  # stream offset after each

    def _extend(self):
        order = self.rng.permutation(len(self.corpus.ids))
        self.order = np.concatenate([self.order, order])
        self.skip = np.concatenate([self.skip, np.zeros(len(order), np.int64)])
        self.ends = np.concatenate([self.ends, self.ends[-1] + np.cumsum(self.corpus.lengths[order])])

    def take(self, a: int, b: int) -> np.ndarray:
        """Tokens a..b-1 of the stream."""
        while self.ends[-1] < b:
            self._extend()
        out, i = [], int(np.searchsorted(self.ends, a, side="right"))
        while a < b:
            begin = int(self.ends[i - 1]) if i else 0
            stop = min(b, int(self.ends[i]))
            off = int(self.skip[i]) - begin
            out.append(self.corpus.read(int(self.order[i]), a + off, stop + off))
            a, i = stop, i + 1
        return np.concatenate(out) if out else np.zeros(0, np.int64)


@dataclass
class Story:
    """A task instance before layout, every piece tokenized. `before` and `after` hold
    (role, tokens) in story order; roles are "support" (the answer depends on it) or
    "distractor". The needle is the last supporting piece."""
    before: list
    needle: np.ndarray
    after: list
    question: np.ndarray
    answer: np.ndarray

    def size(self) -> int:
        """Tokens of all pieces together: the document's length less its filler."""
        pieces = [t for _, t in self.before + self.after] + [self.needle, self.question, self.answer]
        return sum(len(t) for t in pieces)


def encode(tokenizer: Tokenizer, text: str) -> np.ndarray:
    return np.array(tokenizer.encode(text), np.int64)


class Document:
    """Filler with pieces spliced in. `pieces` lists (role, position, tokens) in document order,
    the question (role "question") and the answer (role "answer") last; filler fills every
    other position, and goes on past the answer for as long as a batch asks."""

    def __init__(self, filler: Filler, runs: list):
        """runs: in document order, ints (that many filler tokens) and (role, tokens) pieces."""
        self.filler = filler
        self.spans, self.pieces = [], []  # spans: (position, length, filler offset or tokens)
        pos = used = 0
        for run in runs:
            if isinstance(run, tuple):
                role, tokens = run
                self.pieces.append((role, pos, tokens))
                self.spans.append((pos, len(tokens), tokens))
                pos += len(tokens)
            elif run:
                self.spans.append((pos, run, used))
                pos, used = pos + run, used + run
        self.end = pos  # after the answer
        self.spans.append((pos, None, used))  # the filler after the answer, as long as asked
        self.starts = [s[0] for s in self.spans]

    def piece(self, role: str) -> tuple[int, np.ndarray]:
        """(position, tokens) of the last piece of this role."""
        return [(p, t) for r, p, t in self.pieces if r == role][-1]

    @property
    def distance(self) -> int:
        """Tokens from the end of the needle to the start of the question."""
        needle, tokens = self.piece("support")
        return self.piece("question")[0] - needle - len(tokens)

    def tokens(self, a: int, b: int) -> np.ndarray:
        """Tokens at positions a..b-1 (b may lie past the answer)."""
        out = []
        i = bisect.bisect_right(self.starts, a) - 1
        while a < b:
            pos, length, src = self.spans[i]
            stop = b if length is None else min(b, pos + length)
            if isinstance(src, np.ndarray):
                out.append(src[a - pos:stop - pos])
            else:
                out.append(self.filler.take(src + a - pos, src + stop - pos))
            a, i = stop, i + 1
        return np.concatenate(out) if out else np.zeros(0, np.int64)

    def targets(self, a: int, b: int) -> np.ndarray:
        """Next-token targets of positions a..b-1: the answer's tokens at the positions that
        predict them (the last question token and all but the last answer token), -100 elsewhere."""
        out = np.full(b - a, IGNORE, np.int64)
        at, answer = self.piece("answer")
        for j, token in enumerate(answer):
            if a <= at - 1 + j < b:
                out[at - 1 + j - a] = token
        return out


def layout(story: Story, filler: Filler, prefix: int, gap: int, rng: np.random.Generator) -> Document:
    """`prefix` filler tokens with the pieces before the needle scattered in them (at uniformly
    random points, in story order), the needle, then `gap` filler tokens with the pieces after
    it scattered the same way, then the question and the answer. The needle's distance to the
    question is `gap` plus the tokens of the pieces after it."""
    runs = []
    for region, pieces, end in ((prefix, story.before, [("support", story.needle)]),
                                (gap, story.after, [("question", story.question), ("answer", story.answer)])):
        cuts = np.sort(rng.integers(0, region + 1, len(pieces)))
        for piece, run in zip(pieces, np.diff(cuts, prepend=0)):
            runs += [int(run), piece]
        runs += [int(region - (cuts[-1] if len(pieces) else 0))] + end
    return Document(filler, runs)


def batch(docs: list[Document], a: int, b: int) -> tuple[np.ndarray, np.ndarray]:
    """ids and targets (B, b - a) of positions a..b-1 of every document."""
    return (np.stack([d.tokens(a, b) for d in docs]), np.stack([d.targets(a, b) for d in docs]))


def training_docs(task, corpus: Corpus, n: int, length: int, rng: np.random.Generator,
                  tail: int = 0) -> list[Document]:
    """n documents of `length` tokens whose answer ends `tail` tokens or fewer before the end
    (uniform, as far as the story leaves room; filler after it), so that the rows of a batch
    have their answers at different offsets in a segment. With tail 0 the answer's last token
    is the last token of every row: in a step whose length puts the answer across a segment
    boundary every row's answer crosses it, and that step's large loss is clipped as one
    gradient. The filler is split between before and after the needle uniformly at random, so
    the needle lies at any depth; a story too long for `length` is drawn again."""
    docs = []
    for _ in range(n):
        for _ in range(100):
            story = task.story(rng)
            if story.size() <= length:
                break
        else:
            raise ValueError(f"{task.name}: stories need more than {length} tokens; train on longer "
                             "sequences (--start-segments, --segment-len)")
        free = length - story.size()
        free -= int(rng.integers(0, min(tail, free) + 1)) if tail else 0
        prefix = int(rng.integers(0, free + 1))
        docs.append(layout(story, Filler(corpus, rng), prefix, free - prefix, rng))
    return docs


def eval_doc(task, corpus: Corpus, seed: int, multiple: int, l: int, i: int, max_prefix: int) -> Document:
    """Document i of the row `multiple`: the needle ends at least multiple * l tokens before the
    question (the gap of filler after it is uniform in [multiple * l, (multiple + 1) * l), so
    the needle and the question fall at every offset within a segment) and has a prefix of
    filler uniform in [0, min(multiple + 1, max_prefix) * l) before it. A function of
    (seed, multiple, i) alone."""
    rng = np.random.default_rng([seed, multiple, i])
    story = task.story(rng)
    prefix = int(rng.integers(0, min(multiple + 1, max_prefix) * l))
    gap = int(rng.integers(multiple * l, (multiple + 1) * l))
    return layout(story, Filler(corpus, rng), prefix, gap, rng)
