"""Streaming generation: prompt tokens/s, new tokens/s and peak memory against prompt length,
through foldscale.generate.stream_generate (the path `foldscale generate` takes: key/value caches,
and on a GPU one CUDA graph replay per new token), side by side with the uncached reference that
re-runs the current segment for every new token. Greedy, random weights: speed and memory do not
depend on them.

    python -m benchmarks.bench_generate --model 350m --prompts 10000,100000 --json benchmarks/results/generate.json
    python -m benchmarks.bench_generate --quick
"""
import argparse
import time

import torch

from benchmarks.benchlib import cuda_sync, device_name, print_table, write_json
from foldscale.config import ModelConfig
from foldscale.generate import stream_generate
from foldscale.model import FoldedLM


def uncached_generate(model: FoldedLM, ids, max_new_tokens):
    """The reference without caches: every new token re-runs its whole pending segment."""
    l = model.cfg.segment_len
    n_whole = (ids.shape[1] - 1) // l * l
    state = model.forward_stream(ids[:, :n_whole], keep_logits=False).state if n_whole else None
    pending = ids[:, n_whole:]
    for _ in range(max_new_tokens):
        out = model(pending, state=state)
        if pending.shape[1] == l:
            state, pending = out.state, pending[:, :0]
        token = out.logits[:, -1].argmax(-1)
        yield token
        pending = torch.cat([pending, token[:, None]], dim=1)


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="350m")
    p.add_argument("--prompts", default="10000,100000")
    p.add_argument("--new-tokens", "--new_tokens", type=int, default=256)
    p.add_argument("--profile", action="store_true", help="print where 16 generated tokens spend their time")
    p.add_argument("--json")
    p.add_argument("--quick", action="store_true")
    args = p.parse_args()
    if args.quick:
        args.model, args.prompts, args.new_tokens = "tiny", "100,1000", 8
    cuda = torch.cuda.is_available()
    device = torch.device("cuda" if cuda else "cpu")
    cfg = ModelConfig.load(args.model)
    model = FoldedLM(cfg).to(device, torch.bfloat16 if cuda else torch.float32).eval()
    paths = {"cached": lambda ids: stream_generate(model, ids, args.new_tokens, temperature=0),
             "uncached": lambda ids: uncached_generate(model, ids, args.new_tokens)}
    rows = []
    for n in map(int, args.prompts.split(",")):
        ids = torch.randint(0, cfg.vocab_size, (1, n), device=device)
        next(paths["cached"](ids[:, :2 * cfg.segment_len]))  # warm-up: first calls allocate and tune
        for path, generate in paths.items():
            if cuda:
                torch.cuda.reset_peak_memory_stats()
            gen = generate(ids)
            t0 = time.perf_counter()
            next(gen)  # reads the whole prompt, then picks the first token
            cuda_sync()
            t1 = time.perf_counter()
            tokens = sum(1 for _ in gen)
            cuda_sync()
            t2 = time.perf_counter()
            rows.append({"prompt_tokens": n, "path": path, "prompt_tok_s": n / (t1 - t0),
                         "new_tok_s": tokens / max(t2 - t1, 1e-9),
                         "peak_gib": torch.cuda.max_memory_allocated() / 2**30 if cuda else float("nan")})
            print(rows[-1], flush=True)
    if args.profile:
        from torch.profiler import ProfilerActivity, profile
        ids = torch.randint(0, cfg.vocab_size, (1, 3 * cfg.segment_len + 5), device=device)
        with profile(activities=[ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])) as prof:
            for _ in stream_generate(model, ids, 16):
                pass
            cuda_sync()
        print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=20))
    print(f"\n{device_name()}, {args.model} ({cfg.num_params() / 1e6:.0f}M, l={cfg.segment_len}), "
          f"{'bf16' if cuda else 'fp32'}, batch 1, {args.new_tokens} new tokens, greedy")
    print_table(rows, ["prompt_tokens", "path", "prompt_tok_s", "new_tok_s", "peak_gib"])
    write_json(args.json, rows, model=args.model)


if __name__ == "__main__":
    main()
