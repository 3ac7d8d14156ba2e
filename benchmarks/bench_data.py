"""Data pipeline throughput: default corpus build, tokenizer training, prepare, sampler.

    python -m benchmarks.bench_data [--quick] [--json benchmarks/results/bench_data.json]

The default corpus is built cold into a temporary cache (or --cache DIR, reused if there), so
the build time is the one a first-time user waits. --quick uses 40 files and a 512-token
vocabulary: a smoke test for CI, its figures mean nothing.
"""
import argparse
import os
import platform
import tempfile
import time
from pathlib import Path

import torch

from tools.benchlib import write_json
from foldscale.data import SegmentStreamSampler, TokenStore, default_store, prepare, stdlib_files, train_tokenizer
from foldscale.data.tokenizer import available_cores


def timed(fn):
    start = time.perf_counter()
    result = fn()
    return result, time.perf_counter() - start


def bench(cache: Path, work: Path, quick: bool, segment_len: int, streams: int) -> list[dict]:
    vocab, max_files = (512, 40) if quick else (8192, None)
    cores = available_cores()
    store_path, build_s = timed(lambda: default_store(cache, vocab, max_files=max_files))
    files = stdlib_files(max_files)
    source_mb = sum(f.stat().st_size for f in files) / 1e6
    tok, train_s = timed(lambda: train_tokenizer(files, vocab, work / "tok.model"))
    store, prep_s = timed(lambda: prepare(files, tok, work / "store", num_proc=cores))

    os.sched_setaffinity(0, {min(os.sched_getaffinity(0))})  # the sampler on one core
    torch.set_num_threads(1)
    sampler = SegmentStreamSampler(TokenStore.open(store_path), "train", 0, 1, streams, segment_len)
    next(sampler)
    steps = 200 if quick else 5000
    tokens, sample_s = timed(lambda: sum(next(sampler).n_tokens for _ in range(steps)))
    return [
        {"name": "default corpus build (tokenizer + store, cold)", "value": round(build_s, 1),
         "unit": "s", "detail": f"{len(files)} files, {source_mb:.1f} MB, vocab {vocab}"},
        {"name": "tokenizer training", "value": round(train_s, 1), "unit": "s",
         "detail": f"BPE vocab {vocab}, {cores} threads"},
        {"name": "prepare (tokenise + write)", "value": round(store.n_tokens / prep_s),
         "unit": "tokens/s", "detail": f"{store.n_tokens:,} tokens in {prep_s:.1f} s, "
                                       f"{source_mb / prep_s:.2f} MB/s, num_proc={cores}"},
        {"name": f"sampler l={segment_len} B={streams}", "value": round(tokens / sample_s),
         "unit": "tokens/s", "detail": f"one core, {steps} steps, targets counted, "
                                       f"pad fraction {sampler.pad_fraction:.3f}"},
    ]


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="toy size, for CI smoke tests")
    parser.add_argument("--cache", type=Path, help="default corpus cache (default: a fresh temp dir)")
    parser.add_argument("--json", type=Path, help="also write the table here")
    parser.add_argument("--segment-len", type=int, default=512)
    parser.add_argument("--streams", type=int, default=8)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        rows = bench(args.cache or tmp / "cache", tmp, args.quick, args.segment_len, args.streams)
    width = max(len(r["name"]) for r in rows)
    print(f"\n{'measure':{width}s}  {'value':>12s}  unit      detail")
    for r in rows:
        print(f"{r['name']:{width}s}  {r['value']:>12,}  {r['unit']:8s}  {r['detail']}")
    write_json(args.json, rows, cores=available_cores(), python=platform.python_version(), quick=args.quick)


if __name__ == "__main__":
    main()
