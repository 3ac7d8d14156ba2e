"""Streaming generation: prompt tokens/s, new tokens/s and peak memory against prompt length,
through foldscale.generate.stream_generate (the path `foldscale generate` takes: key/value caches,
and on a GPU one CUDA graph replay per new token), side by side with the uncached reference that
re-runs the current segment for every new token. Two cached rows: the one-token step eager
("cached") and through torch.compile in the decoder's mode ("compiled", by default on a GPU only;
--compile-modes sets the modes, a row each), so their ratio is measured in one run; compilation
happens in a warm-up, outside the timing. --hf adds the row of transformers' `generate()` on the
same weights exported with `foldscale export --format hf` (issue 24). --flash-decoding adds the
compiled row with one new row's attention through flash attention's variable-length kernel
(`model.FLASH_DECODING`). --profile prints the kernels of one new token (the compiled step run
without its CUDA graph, so that each kernel shows), with their count and time per token. Greedy,
random weights: speed and memory do not depend on them.

    python -m benchmarks.bench_generate --model 350m --prompts 10000,100000 --json benchmarks/results/generate.json
    python -m benchmarks.bench_generate --model 125m --hf --json benchmarks/results/generate_hf.json
    python -m benchmarks.bench_generate --quick
"""
import argparse
import contextlib
import functools
import queue
import tempfile
import threading
import time
from pathlib import Path

import torch

from tools.benchlib import cuda_sync, device_name, print_table, profile_run, write_json
from foldscale.config import ModelConfig
from foldscale.generate import DECODE_COMPILE_MODE, StreamDecoder, stream_generate
from foldscale import model as model_module
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


def hf_generate(model, ids, max_new_tokens):
    """transformers' generate() on an HF export, as its tokens come: it runs in a thread and hands
    each new token over through a streamer (which is given the prompt first)."""
    from transformers.generation.streamers import BaseStreamer

    class Tokens(BaseStreamer):
        def __init__(self):
            self.queue, self.prompt = queue.Queue(), True

        def put(self, value):
            if self.prompt:
                self.prompt = False
            else:
                self.queue.put(value)

        def end(self):
            self.queue.put(None)

    tokens, failed = Tokens(), []

    def run():
        try:  # the mask says no padding: random ids may be the pad id
            model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=max_new_tokens,
                           min_new_tokens=max_new_tokens, do_sample=False, streamer=tokens, eos_token_id=None)
        except BaseException as e:
            failed.append(e)
            tokens.end()

    thread = threading.Thread(target=run)
    thread.start()
    while (token := tokens.queue.get()) is not None:
        yield token
    thread.join()
    if failed:
        raise failed[0]


def hf_model(model: FoldedLM, directory):
    """MODEL exported to DIRECTORY as `foldscale export --format hf` writes it (no tokenizer: the
    prompts are ids), loaded back through transformers in MODEL's dtype and device."""
    from foldscale import hf
    model.save_pretrained(directory)
    hf.write_hf(model.cfg, directory)
    param = next(model.parameters())
    return hf.load(directory, dtype=param.dtype)[0].to(param.device)


@contextlib.contextmanager
def flash_decoding():
    """model.FLASH_DECODING on inside."""
    before, model_module.FLASH_DECODING = model_module.FLASH_DECODING, True
    try:
        yield
    finally:
        model_module.FLASH_DECODING = before


def with_flash_decoding(generate):
    def run(ids):
        with flash_decoding():
            yield from generate(ids)
    return run


def profile_step(model: FoldedLM, device, compile, tokens=10):
    """Print the kernels of one new token: TOKENS one-token feeds through the step (compiled in
    mode COMPILE, or eager), without the CUDA graph, under torch.profiler (profile_run)."""
    decoder = StreamDecoder(model, compile=compile, use_graph=False)
    ids = torch.randint(0, model.cfg.vocab_size, (1, 1), device=device)
    for _ in range(3):  # compiled already (the warm-up); the cache is allocated here
        decoder.feed(ids)
    figures = profile_run(lambda: decoder.feed(ids), tokens, top=25)
    if "kernels_per_step" in figures:
        print(f"one token, compile={compile}, flash decoding {model_module.FLASH_DECODING}: "
              f"{figures['kernels_per_step']:.0f} kernels, "
              f"{1000 * sum(figures['gpu_ms_per_step'].values()):.0f} us of kernel time, GPU busy {figures['gpu_busy']:.2f}")


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="350m")
    p.add_argument("--prompts", default="10000,100000")
    p.add_argument("--new-tokens", "--new_tokens", type=int, default=256)
    p.add_argument("--compile", action=argparse.BooleanOptionalAction, default=None,
                   help="add the torch.compile row (default: on a GPU)")
    p.add_argument("--compile-modes", default=DECODE_COMPILE_MODE,
                   help=f"torch.compile modes of the compiled rows (default: the decoder's, {DECODE_COMPILE_MODE}), "
                        "e.g. max-autotune-no-cudagraphs,default")
    p.add_argument("--hf", action="store_true", help="add the row of transformers' generate() on an HF export")
    p.add_argument("--flash-decoding", "--flash_decoding", action="store_true",
                   help="add the compiled row with flash attention's variable-length kernel for the new row")
    p.add_argument("--profile", action="store_true", help="print the kernels of one new token, their count and time")
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
    steps = {"cached": False, **{"compiled" if m == DECODE_COMPILE_MODE else f"compiled {m}": m for m in modes}}
    paths = {path: functools.partial(stream_generate, model, max_new_tokens=args.new_tokens, temperature=0,
                                     compile=on) for path, on in steps.items()}
    if args.flash_decoding and modes:
        paths["compiled, flash decoding"] = with_flash_decoding(functools.partial(
            stream_generate, model, max_new_tokens=args.new_tokens, temperature=0, compile=modes[0]))
    paths["uncached"] = lambda ids: uncached_generate(model, ids, args.new_tokens)
    if args.hf:
        paths["hf generate"] = functools.partial(hf_generate, hf_model(model, Path(tempfile.mkdtemp())),
                                                 max_new_tokens=args.new_tokens)
    for path in [name for name in paths if name != "uncached"]:  # warm-up, once per process: allocate, tune, compile
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
        profile_step(model, device, modes[0] if modes else False)
        if args.flash_decoding and modes:
            with flash_decoding():
                profile_step(model, device, modes[0])
    print(f"\n{device_name()}, {args.model} ({cfg.num_params() / 1e6:.0f}M, l={cfg.segment_len}), "
          f"{'bf16' if cuda else 'fp32'}, batch 1, {args.new_tokens} new tokens, greedy")
    print_table(rows, ["prompt_tokens", "path", "prompt_tok_s", "new_tok_s", "peak_gib"])
    speed = {(r["prompt_tokens"], r["path"]): r["new_tok_s"] for r in rows}
    for n, path in speed:
        if path.startswith("compiled") or path == "hf generate":
            print(f"prompt {n}: {path} / cached new tokens/s = {speed[n, path] / speed[n, 'cached']:.2f}x")
    write_json(args.json, rows, model=args.model)


if __name__ == "__main__":
    main()
