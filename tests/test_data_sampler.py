import json
import tempfile
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from data_helpers import random_docs
from foldscale.config import ConfigError
from foldscale.data.sampler import IGNORE_INDEX, SegmentStreamSampler, assign_documents
from foldscale.data.store import StoreError, write_store


def docs_from_lengths(lengths, seed=0):
    rng = np.random.default_rng(seed)
    return [rng.integers(4, 1000, n) for n in lengths]


def expected_docs(store, split, n_streams, g, seed, at_least):
    """Document ids stream g must read, epoch after epoch (the oracle's assignment)."""
    ids, lengths = store.docs(split), store.doc_lengths[store.docs(split)]
    out, epoch = [], 0
    while len(out) < at_least:
        out += ids[assign_documents(lengths, n_streams, seed, epoch)[g]].tolist()
        epoch += 1
    return out


def check_stream(store, rows, doc_ids, l):
    """rows: the (ids, targets, reset, seg_index) of one stream, step after step. Checks them
    against the segments of `doc_ids` cut by the contract: ids = doc[s*l : s*l+l],
    targets = doc[s*l+1 : s*l+l+1], padded with 0 / -100."""
    pos = s = 0
    for ids, targets, reset, seg_index in rows:
        doc = np.asarray(store.doc(doc_ids[pos]), np.int64)
        want_ids = np.zeros(l, np.int64)
        piece = doc[s * l:s * l + l]
        want_ids[:len(piece)] = piece
        want_targets = np.full(l, IGNORE_INDEX, np.int64)
        piece = doc[s * l + 1:s * l + l + 1]
        want_targets[:len(piece)] = piece
        assert np.array_equal(ids, want_ids) and np.array_equal(targets, want_targets)
        assert bool(reset) == (s == 0) and int(seg_index) == s
        s += 1
        if s * l >= len(doc):
            pos, s = pos + 1, 0


def run(store, split, world_size, streams, l, seed, steps):
    """All ranks' batches, one list per rank."""
    samplers = [SegmentStreamSampler(store, split, r, world_size, streams, l, seed)
                for r in range(world_size)]
    return [[next(s) for _ in range(steps)] for s in samplers]


@settings(max_examples=60, deadline=None)
@given(lengths=st.lists(st.integers(0, 40), min_size=1, max_size=25),
       long_doc=st.booleans(), world_size=st.sampled_from([1, 2, 3]),
       streams=st.integers(1, 3), l=st.sampled_from([1, 3, 8]), seed=st.integers(0, 3))
def test_streams_follow_the_contract(lengths, long_doc, world_size, streams, l, seed):
    if long_doc:
        lengths = lengths + [300]
    if not any(lengths):
        lengths = lengths + [1]
    with tempfile.TemporaryDirectory() as tmp:
        store = write_store(docs_from_lengths(lengths, seed), Path(tmp) / "s", 1000, val_fraction=0)
        assert store.n_docs == sum(n > 0 for n in lengths)  # empty documents never reach a stream
        n_streams = world_size * streams
        steps = 2 * -(-sum(lengths) // l) // n_streams + 3  # about two epochs per stream
        batches = run(store, "train", world_size, streams, l, seed, steps)
        for rank, rank_batches in enumerate(batches):
            assert len(rank_batches) == steps  # every rank yields at every step
            for j in range(streams):
                g = rank * streams + j
                rows = [(b.ids[j].numpy(), b.targets[j].numpy(), b.reset[j], b.seg_index[j])
                        for b in rank_batches]
                check_stream(store, rows, expected_docs(store, "train", n_streams, g, seed, steps), l)
            for b in rank_batches:
                assert b.ids.shape == b.targets.shape == (streams, l)
                assert b.ids.dtype == b.targets.dtype == b.seg_index.dtype == torch.int64
                assert b.reset.dtype == torch.bool
                assert b.n_tokens == int((b.targets != IGNORE_INDEX).sum())


@settings(max_examples=100, deadline=None)
@given(lengths=st.lists(st.integers(1, 500), min_size=1, max_size=60),
       n_streams=st.integers(1, 9), seed=st.integers(0, 5), epoch=st.integers(0, 5))
def test_assignment_is_a_balanced_partition(lengths, n_streams, seed, epoch):
    lengths = np.array(lengths, np.int64)
    parts = assign_documents(lengths, n_streams, seed, epoch)
    assert len(parts) == n_streams
    assert sorted(np.concatenate(parts).tolist()) == list(range(len(lengths)))  # each doc once
    loads = [int(lengths[p].sum()) for p in parts]
    assert max(loads) - min(loads) <= lengths.max()


def test_new_shuffle_each_epoch_and_pure():
    lengths = np.random.default_rng(0).integers(1, 100, 60)
    e0, e1 = assign_documents(lengths, 4, 0, 0), assign_documents(lengths, 4, 0, 1)
    assert any(not np.array_equal(a, b) for a, b in zip(e0, e1))
    again = assign_documents(lengths, 4, 0, 0)
    assert all(np.array_equal(a, b) for a, b in zip(e0, again))


def test_streams_do_not_start_with_their_longest_document():
    lengths = np.random.default_rng(1).integers(1, 1000, 400)
    parts = assign_documents(lengths, 4, 0, 0)
    firsts = [lengths[p[0]] == lengths[p].max() for p in parts]
    assert not all(firsts)


def test_fewer_documents_than_streams(tmp_path):
    store = write_store([[4, 5, 6], [7, 8]], tmp_path / "s", 100, val_fraction=0)
    batches = run(store, "train", 3, 2, 4, 0, 5)
    for rank_batches in batches:
        assert bool(rank_batches[0].reset.all())  # every stream found a document at once
        assert all(b.n_tokens > 0 for b in rank_batches)
    sampler = SegmentStreamSampler(store, "train", 2, 3, 2, 4)
    for _ in range(10):
        next(sampler)
    assert sampler.epoch >= 3  # 6 streams share 2 documents: each skips epochs


def test_empty_split_is_refused(tmp_path):
    store = write_store([[4, 5]], tmp_path / "s", 100, val_fraction=0)
    with pytest.raises(StoreError, match="'val' split .* has no documents"):
        SegmentStreamSampler(store, "val", 0, 1, 1, 4)
    with pytest.raises(ValueError, match="rank 2"):
        SegmentStreamSampler(store, "train", 2, 2, 1, 4)


@pytest.fixture
def store(tmp_path):
    return write_store(random_docs(np.random.default_rng(0), 80, 60), tmp_path / "s", 1000,
                       val_fraction=0.2)


@pytest.mark.parametrize("split", ["train", "val"])
def test_resume_is_exact(store, split):
    def make():
        return SegmentStreamSampler(store, split, 1, 2, 3, 7, seed=5)

    straight = make()
    reference = [next(straight) for _ in range(120)]
    first = make()
    for _ in range(50):
        next(first)
    state = json.loads(json.dumps(first.state_dict()))
    resumed = make()
    resumed.load_state_dict(state)
    for want in reference[50:]:
        got = next(resumed)
        assert torch.equal(got.ids, want.ids) and torch.equal(got.targets, want.targets)
        assert torch.equal(got.reset, want.reset) and torch.equal(got.seg_index, want.seg_index)
    assert resumed.pad_fraction == straight.pad_fraction
    assert resumed.epoch == straight.epoch >= 1


def test_resume_refuses_a_different_setup(store, tmp_path):
    state = SegmentStreamSampler(store, "train", 0, 2, 3, 7).state_dict()
    other_store = write_store([[4, 5, 6]] * 5, tmp_path / "o", 1000)
    for other, what in [(SegmentStreamSampler(store, "train", 0, 3, 3, 7), "world_size"),
                        (SegmentStreamSampler(store, "train", 0, 2, 2, 7), "streams_per_rank"),
                        (SegmentStreamSampler(store, "train", 0, 2, 3, 8), "segment_len"),
                        (SegmentStreamSampler(other_store, "train", 0, 2, 3, 7), "store")]:
        with pytest.raises(ConfigError, match=f"saved state has {what}="):
            other.load_state_dict(state)


def test_pad_fraction_and_epoch(store):
    sampler = SegmentStreamSampler(store, "train", 0, 1, 4, 16)
    assert sampler.pad_fraction == 0.0 and sampler.epoch == 0
    batches = [next(sampler) for _ in range(200)]
    padded = sum(int((b.targets == IGNORE_INDEX).sum()) for b in batches)
    assert sampler.pad_fraction == pytest.approx(padded / (200 * 4 * 16))
    assert 0 < sampler.pad_fraction < 1
    assert sampler.epoch >= 1


def test_throughput_well_over_a_million_tokens_per_second(tmp_path):
    docs = random_docs(np.random.default_rng(0), 1000, 6000, vocab_size=8192)
    store = write_store(docs, tmp_path / "s", 8192, val_fraction=0)
    sampler = SegmentStreamSampler(store, "train", 0, 1, 8, 512)
    next(sampler)
    start, tokens = time.perf_counter(), 0
    for _ in range(300):
        tokens += next(sampler).n_tokens
    rate = tokens / (time.perf_counter() - start)
    assert rate > 2e6, f"{rate:.3g} tokens/s"
