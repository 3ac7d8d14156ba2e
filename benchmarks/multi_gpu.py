"""Data-parallel scaling through launch/pretrain.py, as a user launches it (issue 14): tokens/s
of each preset and stage on 1 GPU and on N, at the fast configuration (32k tokens per
micro-step x 4 accumulation steps): per-GPU efficiency = rate(N) / (N rate(1)). Loss parity
across world sizes is a correctness check: tools/parity.py.

    python -m benchmarks.multi_gpu --gpus 2 --presets 350m,1b --stages 2,3 --compile
    python -m benchmarks.multi_gpu --quick      # CPU, gloo: 2 ranks against 1, tiny preset
"""
import argparse
import json
import tempfile
from pathlib import Path

import torch

from tools.benchlib import (add_launch_args, command_line, device_name, dp_ds_config, launch_pretrain, metrics,
                            print_table, synthetic_store, write_json)


def steady_rate(out: Path, skip: int) -> tuple[float, float | None]:
    """Mean tokens/s (and MFU) over the logged steps after the first `skip` (compilation, warm-up)."""
    rates, mfu = metrics(out, "train/tokens_per_s"), metrics(out, "train/mfu")
    steps = [s for s in sorted(rates) if s > skip]
    return sum(rates[s] for s in steps) / len(steps), (sum(mfu[s] for s in steps) / len(steps) if mfu else None)


def scaling(args, work: Path, gpu: bool) -> list[dict]:
    from foldscale.config import ModelConfig
    rows = []
    for preset in args.presets.split(","):
        cfg = ModelConfig.load(preset)
        store = synthetic_store(work / f"store_{cfg.vocab_size}", cfg.vocab_size, n_docs=200,
                                doc_len=8 * cfg.segment_len)
        streams = max(1, args.tokens // cfg.segment_len)
        for stage in map(int, args.stages.split(",")):
            rate = {}
            for ranks in (1, args.gpus):
                cfg_path = work / f"{preset}_z{stage}.json"
                cfg_path.write_text(json.dumps(dp_ds_config(stage, streams, args.accum, gpu, lr=3e-4)))
                out = work / f"{preset}_z{stage}_r{ranks}"
                launch_pretrain(ranks, args.launcher if ranks > 1 else "python", args.port + stage * 10 + ranks, out,
                                ["--ds-config", str(cfg_path), "--model", preset, "--data", str(store.path),
                                 "--steps", str(args.steps), "--log-every", "1", "--eval-every", str(10 * args.steps),
                                 "--save-every", str(10 * args.steps)] + (["--compile"] if args.compile else []),
                                args.timeout)
                rate[ranks] = steady_rate(out, args.skip)
                print(f"{preset} ZeRO-{stage} {ranks} GPU(s): {rate[ranks][0]:,.0f} tokens/s", flush=True)
            rows.append({"preset": preset, "zero": stage, "compile": args.compile, "tokens_per_gpu_step": streams * cfg.segment_len * args.accum,
                         "tok_s_1": rate[1][0], f"tok_s_{args.gpus}": rate[args.gpus][0],
                         "mfu_1": rate[1][1], f"mfu_{args.gpus}": rate[args.gpus][1],
                         "per_gpu_efficiency": rate[args.gpus][0] / (args.gpus * rate[1][0])})
    return rows


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_launch_args(p)
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
        rows = scaling(args, Path(args.work or tmp), torch.cuda.is_available())
    print(f"\n{device_name()}, scaling, {args.gpus} ranks, {command_line()}")
    print_table(rows, list(rows[0]))
    write_json(args.json, rows, mode="scaling")
    return rows


if __name__ == "__main__":
    main()
