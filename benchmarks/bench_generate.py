"""Streaming generation: prompt tokens/s, new tokens/s and peak memory against prompt length,
through foldscale.generate.stream_generate (the path `foldscale generate` takes: key/value caches,
and on a GPU one CUDA graph replay per new token), side by side with the uncached reference that
re-runs the current segment for every new token. Two cached rows: the one-token step eager
("cached") and through torch.compile ("compiled", by default on a GPU only; --compile-modes adds a
row per torch.compile mode), so their ratio is measured in one run; compilation happens in a
warm-up, outside the timing. Greedy, random weights: speed and memory do not depend on them.

    python -m benchmarks.bench_generate --model 350m --prompts 10000,100000 --json benchmarks/results/generate.json
    python -m benchmarks.bench_generate --quick
"""
import argparse
import functools
import time

import torch

from tools.benchlib import cuda_sync, device_name, print_table, write_json
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
    p.add_argument("--compile", action=argparse.BooleanOptionalAction, default=None,
                   help="add the torch.compile row (default: on a GPU)")
    p.add_argument("--compile-modes", default="default",
                   help="torch.compile modes of the compiled rows, e.g. default,max-autotune-no-cudagraphs")
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
    compiled = cuda if args.compile is None else args.compile
    modes = args.compile_modes.split(",") if compiled else []
    steps = {"cached": False, **{"compiled" if m == "default" else f"compiled {m}": m for m in modes}}
    paths = {path: functools.partial(stream_generate, model, max_new_tokens=args.new_tokens, temperature=0,
                                     compile=on) for path, on in steps.items()}
    paths["uncached"] = lambda ids: uncached_generate(model, ids, args.new_tokens)
    for path in steps:  # warm-up, once per process: allocate, tune, compile
        t0 = time.perf_counter()
        for _ in paths[path](torch.randint(0, cfg.vocab_size, (1, 5 * cfg.segment_len // 2), device=device)):
            pass
        cuda_sync()
        print(f"warm-up of {path}: {time.perf_counter() - t0:.1f} s", flush=True)
    rows = []
    for n in map(int, args.prompts.split(",")):
        ids = torch.randint(0, cfg.vocab_size, (1, n), device=device)
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
            for _ in stream_generate(model, ids, 16, compile=compiled):
                pass
            cuda_sync()
        print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=20))
    print(f"\n{device_name()}, {args.model} ({cfg.num_params() / 1e6:.0f}M, l={cfg.segment_len}), "
          f"{'bf16' if cuda else 'fp32'}, batch 1, {args.new_tokens} new tokens, greedy")
    print_table(rows, ["prompt_tokens", "path", "prompt_tok_s", "new_tok_s", "peak_gib"])
    speed = {(r["prompt_tokens"], r["path"]): r["new_tok_s"] for r in rows}
    for n, path in speed:
        if path.startswith("compiled"):
            print(f"prompt {n}: {path} / cached new tokens/s = {speed[n, path] / speed[n, 'cached']:.2f}x")
    write_json(args.json, rows, model=args.model)


if __name__ == "__main__":
    main()
