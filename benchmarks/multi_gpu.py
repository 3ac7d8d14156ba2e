"""Data-parallel scaling through launch/pretrain.py, as a user launches it (issues 14 and 29):
tokens/s of each preset and stage on 1 GPU and on each N of --gpus, at the fast configuration
(32k tokens per micro-step x 4 accumulation steps): per-GPU efficiency = rate(N) / (N rate(1)).
One row per run; the JSON is rewritten after each, so a run stopped part-way keeps the rows it
finished. Loss parity across world sizes is a correctness check: tools/parity.py.

    python -m benchmarks.multi_gpu --gpus 2,4,8 --presets 350m,1b --stages 2,3 --compile
    python -m benchmarks.multi_gpu --quick      # CPU, gloo: 2 ranks against 1, tiny preset
"""
import argparse
import json
import tempfile
import time
from pathlib import Path

import torch

from tools.benchlib import (add_launch_args, command_line, device_name, dp_ds_config, launch_pretrain, metrics,
                            print_table, synthetic_store, write_json)


def steady_rate(out: Path, skip: int) -> tuple[float, float | None]:
    """Mean tokens/s (and MFU) over the logged steps after the first `skip` (compilation, warm-up)."""
    rates, mfu = metrics(out, "train/tokens_per_s"), metrics(out, "train/mfu")
    steps = [s for s in sorted(rates) if s > skip]
    return sum(rates[s] for s in steps) / len(steps), (sum(mfu[s] for s in steps) / len(steps) if mfu else None)


def scaling(args, work: Path, gpu: bool, done=lambda rows: None) -> list[dict]:
    """One row per (preset, stage, GPUs), 1 GPU first; DONE(rows) after each."""
    from foldscale.config import ModelConfig
    rows = []
    for preset in args.presets.split(","):
        cfg = ModelConfig.load(preset)
        streams = max(1, args.tokens // cfg.segment_len)
        # a document for every stream of the largest run in every epoch
        store = synthetic_store(work / f"store_{preset}", cfg.vocab_size, n_docs=max(200, streams * max(args.gpus)),
                                doc_len=8 * cfg.segment_len)
        for stage in map(int, args.stages.split(",")):
            cfg_path = work / f"{preset}_z{stage}.json"
            cfg_path.write_text(json.dumps(dp_ds_config(stage, streams, args.accum, gpu, lr=3e-4)))
            for ranks in (1, *args.gpus):
                out = work / f"{preset}_z{stage}_r{ranks}"
                t0 = time.perf_counter()
                launch_pretrain(ranks, args.launcher if ranks > 1 else "python", args.port + stage * 10 + ranks, out,
                                ["--ds-config", str(cfg_path), "--model", preset, "--data", str(store.path),
                                 "--steps", str(args.steps), "--log-every", "1", "--eval-every", str(10 * args.steps),
                                 "--save-every", str(10 * args.steps)] + (["--compile"] if args.compile else []),
                                args.timeout)
                tok_s, mfu = steady_rate(out, args.skip)
                if ranks == 1:
                    one = tok_s
                rows.append({"preset": preset, "zero": stage, "gpus": ranks, "compile": args.compile, "accum": args.accum,
                             "tokens_per_gpu_step": streams * cfg.segment_len * args.accum, "tok_s": tok_s, "mfu": mfu,
                             "per_gpu_efficiency": tok_s / (ranks * one), "run_s": time.perf_counter() - t0})
                print(f"{preset} ZeRO-{stage} {ranks} GPU(s): {tok_s:,.0f} tokens/s, per-GPU efficiency "
                      f"{rows[-1]['per_gpu_efficiency']:.1%}, {rows[-1]['run_s']:.0f} s", flush=True)
                done(rows)
    return rows


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_launch_args(p, several=True)
    p.add_argument("--presets", default="350m")
    p.add_argument("--tokens", type=int, default=32768, help="tokens per GPU per micro-step")
    p.add_argument("--accum", type=int, default=4)
    p.add_argument("--skip", type=int, default=4, help="logged steps left out (compilation, warm-up)")
    p.add_argument("--compile", action="store_true")
    p.add_argument("--quick", action="store_true", help="CPU smoke test: the tiny preset on 1 and 2 gloo ranks, ZeRO 2")
    args = p.parse_args(argv)
    if args.quick:
        args.presets, args.stages, args.steps, args.tokens, args.accum, args.skip = "tiny", "2", 8, 64, 1, 2
    with tempfile.TemporaryDirectory() as tmp:
        rows = scaling(args, Path(args.work or tmp), torch.cuda.is_available(),
                       done=lambda rows: write_json(args.json, rows, mode="scaling"))
    print(f"\n{device_name()}, scaling, {command_line()}")
    print_table(rows, list(rows[0]))
    return rows


if __name__ == "__main__":
    main()
