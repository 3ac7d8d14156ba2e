"""SegmentStreamSampler: cuts whole documents into segments and feeds them to parallel streams.

The model carries a state from one segment of a document to the next, so every stream
(row of a batch) must read its documents in order, segment after segment, and say when a new
document starts (`reset`). Only numpy and torch are used here: no `datasets`.
"""
import heapq
from dataclasses import dataclass

import numpy as np
import torch

from foldscale.config import ConfigError
from foldscale.data.store import StoreError, TokenStore

IGNORE_INDEX = -100
STATE_VERSION = 1


@dataclass(frozen=True)
class Batch:
    """One step of one rank: row b is the next segment of stream b."""

    ids: torch.Tensor        # (B, l) int64, pad_id (0) past a document's end
    targets: torch.Tensor    # (B, l) int64, the next token; -100 past a document's end
    reset: torch.Tensor      # (B,) bool, True at a document's first segment
    seg_index: torch.Tensor  # (B,) int64, the segment's index within its document
    n_tokens: int            # targets != -100

    def to(self, device) -> "Batch":
        """To a GPU from pinned memory without waiting: a pageable copy would make the host wait for
        the GPU to finish the previous step before it could queue this one."""
        cuda = torch.device(device).type == "cuda"

        def move(t):
            return (t.pin_memory() if cuda else t).to(device, non_blocking=cuda)
        return Batch(move(self.ids), move(self.targets), move(self.reset), move(self.seg_index), self.n_tokens)


def assign_documents(lengths: np.ndarray, n_streams: int, seed: int, epoch: int) -> list[np.ndarray]:
    """Deal documents (given by their lengths) to `n_streams` streams for one epoch.

    Shuffle with (seed, epoch), sort longest first (stable), give each document to the least
    loaded stream (a heap; longest-processing-time greedy), then shuffle each stream's list so a
    stream does not always start with its longest document. Greedy LPT guarantees
    max load - min load <= the longest document. Ties between equally loaded streams are
    broken by a priority that rotates by the number of documents each epoch, so when there are
    fewer documents than streams every stream still gets one within ceil(streams / docs) epochs.
    Returns, per stream, positions into `lengths`; a pure function of its arguments.
    """
    n = len(lengths)
    rng = np.random.default_rng((seed, epoch))
    perm = rng.permutation(n)
    order = perm[np.argsort(-lengths[perm], kind="stable")]
    shift = (epoch * n) % n_streams
    heap = [(0, (g - shift) % n_streams, g) for g in range(n_streams)]
    heapq.heapify(heap)
    owner = np.empty(n, np.int64)
    for k, length in enumerate(lengths[order].tolist()):
        load, priority, g = heap[0]
        owner[k] = g
        heapq.heapreplace(heap, (load + length, priority, g))
    by_owner = np.argsort(owner, kind="stable")
    bounds = np.searchsorted(owner[by_owner], np.arange(n_streams + 1))
    streams = []
    for g in range(n_streams):
        mine = order[by_owner[bounds[g]:bounds[g + 1]]]
        rng.shuffle(mine)
        streams.append(mine)
    return streams


class SegmentStreamSampler:
    """Endless iterator of `Batch`es for one rank: `streams_per_rank` streams of segments.

    Each epoch, the documents of `split` are dealt to all `world_size * streams_per_rank`
    streams with `assign_documents` (near-equal token counts; every document to exactly one
    stream). A stream reads its documents in order, one segment of `segment_len` tokens per
    step: a document of n tokens gives ceil(n / l) segments, segment s has
    ids = doc[s*l : s*l+l] and targets = doc[s*l+1 : s*l+l+1], padded. Streams never stop,
    because DeepSpeed's collectives hang if one rank does: a stream that finishes its documents
    of epoch e goes on with its own documents of epoch e+1 (each stream has its own epoch
    counter; a stream that gets no document in an epoch skips it). The assignment of an epoch
    depends only on (seed, epoch, store, world size, streams per rank), so ranks agree without
    talking to each other. `state_dict()` / `load_state_dict()` resume exactly.
    """

    def __init__(self, store: TokenStore, split: str, rank: int, world_size: int,
                 streams_per_rank: int, segment_len: int, seed: int = 0):
        if not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} is not in [0, world_size={world_size})")
        if streams_per_rank < 1 or segment_len < 1:
            raise ValueError("streams_per_rank and segment_len must be >= 1")
        self.store, self.split, self.rank, self.world_size = store, split, rank, world_size
        self.streams_per_rank, self.segment_len, self.seed = streams_per_rank, segment_len, seed
        self._doc_ids = store.docs(split)
        if self._doc_ids.size == 0:
            raise StoreError(f"the {split!r} split of token store {store.path} has no documents; "
                             "prepare it with a larger val_fraction or more data")
        self._lengths = store.doc_lengths[self._doc_ids]
        self._plans = {}
        self._streams = [[0, 0, 0] for _ in range(streams_per_rank)]  # [epoch, doc position, segment]
        self._steps = 0
        self._target_tokens = 0
        for j in range(streams_per_rank):
            self._settle(j)

    def _plan(self, epoch: int) -> list[tuple[np.ndarray, np.ndarray]]:
        """(start offsets, lengths) of this rank's streams' documents in epoch `epoch`."""
        if epoch not in self._plans:
            streams = assign_documents(self._lengths, self.world_size * self.streams_per_rank,
                                       self.seed, epoch)
            first = self.rank * self.streams_per_rank
            docs = [self._doc_ids[p] for p in streams[first:first + self.streams_per_rank]]
            self._plans[epoch] = [(self.store.offsets[d], self.store.doc_lengths[d]) for d in docs]
            oldest = min((s[0] for s in self._streams), default=epoch)
            for e in [e for e in self._plans if e < oldest]:
                del self._plans[e]
        return self._plans[epoch]

    def _settle(self, j: int):
        """Move stream j past finished epochs, so its state names the next segment to read."""
        state = self._streams[j]
        while state[1] >= len(self._plan(state[0])[j][0]):
            state[:] = [state[0] + 1, 0, 0]

    def __iter__(self):
        return self

    def __next__(self) -> Batch:
        B, l = self.streams_per_rank, self.segment_len
        ids = np.zeros((B, l), np.int64)
        targets = np.full((B, l), IGNORE_INDEX, np.int64)
        reset = np.zeros(B, np.bool_)
        seg_index = np.zeros(B, np.int64)
        tokens = self.store.tokens
        for j, state in enumerate(self._streams):
            epoch, pos, s = state
            starts, lengths = self._plan(epoch)[j]
            start, n = int(starts[pos]), int(lengths[pos])
            a = s * l
            chunk = tokens[start + a:start + min(a + l + 1, n)]
            k = min(l, n - a)
            ids[j, :k] = chunk[:k]
            targets[j, :len(chunk) - 1] = chunk[1:]
            reset[j] = s == 0
            seg_index[j] = s
            state[:] = [epoch, pos + 1, 0] if (s + 1) * l >= n else [epoch, pos, s + 1]
            self._settle(j)
        n_tokens = int((targets != IGNORE_INDEX).sum())
        self._steps += 1
        self._target_tokens += n_tokens
        return Batch(torch.from_numpy(ids), torch.from_numpy(targets), torch.from_numpy(reset),
                     torch.from_numpy(seg_index), n_tokens)

    @property
    def epoch(self) -> int:
        """The lowest epoch any of this rank's streams is still reading."""
        return min(s[0] for s in self._streams)

    @property
    def pad_fraction(self) -> float:
        """Fraction of target positions so far that were padding (cumulative)."""
        total = self._steps * self.streams_per_rank * self.segment_len
        return 1.0 - self._target_tokens / total if total else 0.0

    def _identity(self) -> dict:
        return {"store": self.store.fingerprint, "split": self.split, "rank": self.rank,
                "world_size": self.world_size, "streams_per_rank": self.streams_per_rank,
                "segment_len": self.segment_len, "seed": self.seed}

    def state_dict(self) -> dict:
        return {"version": STATE_VERSION, **self._identity(),
                "streams": [list(s) for s in self._streams],
                "steps": self._steps, "target_tokens": self._target_tokens}

    def load_state_dict(self, state: dict):
        if state.get("version") != STATE_VERSION:
            raise ConfigError(f"sampler state version {state.get('version')} is not {STATE_VERSION}")
        for key, mine in self._identity().items():
            if state[key] != mine:
                raise ConfigError(f"cannot resume the data sampler: the saved state has {key}={state[key]!r} but "
                                  f"this run has {key}={mine!r}; resume with the --data and --seed the run began with")
        self._streams = [[int(x) for x in s] for s in state["streams"]]
        self._steps, self._target_tokens = int(state["steps"]), int(state["target_tokens"])
        self._plans = {}


def redeal(states: list[dict], rank: int, world_size: int, streams_per_rank: int) -> dict:
    """Rank RANK's sampler state in a run of WORLD_SIZE x STREAMS_PER_RANK streams, dealt from
    STATES: the `state_dict()` of every rank of a run with the same total number of streams, in
    rank order. Streams are numbered globally (stream g of rank r is r * streams_per_rank + g)
    and the documents are dealt over the total, so the returned state reads exactly what global
    streams rank * STREAMS_PER_RANK ... + STREAMS_PER_RANK - 1 would have read in the saved run.
    `target_tokens` (only for the padding fraction) becomes this rank's share of the total.

    ConfigError when STATES are not all ranks of one run (same store, split, segment_len, seed)
    or when the total number of streams differs, saying what to set.
    """
    first = states[0]
    saved_world, saved_per_rank = first["world_size"], first["streams_per_rank"]
    same = ("version", "store", "split", "world_size", "streams_per_rank", "segment_len", "seed", "steps")
    if first.get("version") != STATE_VERSION:
        raise ConfigError(f"sampler state version {first.get('version')} is not {STATE_VERSION}")
    if len(states) != saved_world or any(s["rank"] != r or any(s[k] != first[k] for k in same)
                                         for r, s in enumerate(states)):
        raise ConfigError(f"cannot re-deal the data sampler: expected the states of ranks 0..{saved_world - 1} "
                          f"of one run, in order, got ranks {[s['rank'] for s in states]} (or they disagree on "
                          f"{', '.join(same)})")
    total = saved_world * saved_per_rank
    if world_size * streams_per_rank != total:
        raise ConfigError(f"the saved sampler has {total} streams in all ({saved_world} rank(s) x {saved_per_rank}) but "
                          f"this run has {world_size * streams_per_rank} ({world_size} x {streams_per_rank}): "
                          f"{streams_to_set(total, world_size)}")
    streams = [s for state in states for s in state["streams"]]
    mine = streams[rank * streams_per_rank:(rank + 1) * streams_per_rank]
    target_tokens = sum(int(s["target_tokens"]) for s in states) * streams_per_rank // total
    return {**first, "rank": rank, "world_size": world_size, "streams_per_rank": streams_per_rank,
            "streams": [list(s) for s in mine], "target_tokens": target_tokens}


def streams_to_set(total: int, world_size: int) -> str:
    """What to set so that WORLD_SIZE ranks run TOTAL streams in all."""
    if total % world_size == 0:
        return f"with {world_size} rank(s) set train_micro_batch_size_per_gpu to {total // world_size}"
    fits = [n for n in range(1, total + 1) if total % n == 0]
    return f"{total} streams cannot be shared by {world_size} ranks: run on {', '.join(map(str, fits))} rank(s)"
