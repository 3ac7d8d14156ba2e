"""Training throughput, model TFLOP/s and MFU through the real DeepSpeed engine and trainer loop:
each folded preset side by side with its full-attention baseline (ModelConfig.full_attention:
the same blocks, all local, window 2l), in one run.

    python -m benchmarks.bench_throughput --presets 125m,350m,1b --json benchmarks/results/throughput.json
    python -m benchmarks.bench_throughput --presets 350m --compile --no-baseline --kernels torch,liger
    python -m benchmarks.bench_throughput --quick     # CPU smoke test at toy size

MFU = model FLOPs (ModelConfig.flops_per_token, DESIGN.md §1: 6 x matmul parameters with the
global stack counted twice, plus causal attention) x trained tokens/s / --peak-tflops (800:
the bf16 ceiling measured on the H100). Tokens counted are all positions of every segment.
With several --kernels (FoldedLM.set_kernels) each model runs with each, in one run, and
vs_torch is its tokens/s over the same model's with kernels=torch.
The learning-rate schedule is left out of the DeepSpeed JSON: speed does not depend on it.
"""
import argparse
import contextlib
import gc
import itertools
import os
import tempfile
import time
from pathlib import Path

import torch

from tools.benchlib import cuda_sync, device_name, print_table, speed_ds_config, synthetic_store, write_json
from foldscale.config import DataConfig, FoldscaleError, ModelConfig, TrainConfig
from foldscale.engine import init_distributed, load_ds_config
from foldscale.kernels import check as check_kernels
from foldscale.metrics import PositionLoss
from foldscale.trainer import Trainer


def profiler(enabled):
    if not enabled:
        return contextlib.nullcontext()
    from torch.profiler import ProfilerActivity, profile
    return profile(activities=[ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if torch.cuda.is_available() else []))


KERNEL_KINDS = [("matmul", ("gemm", "nvjet", "cutlass", "sm90_xmma", "splitk")), ("attention", ("flash", "fmha", "sdpa")),
                ("fused elementwise (triton)", ("triton",)), ("optimizer", ("adam", "multi_tensor")),
                ("communication", ("nccl",)), ("copy/fill", ("memcpy", "memset", "copy", "fill"))]


def kernel_breakdown(prof, steps: int, wall_s: float) -> dict:
    """GPU kernel time per optimizer step by kind (ms) and the share of wall time the GPU was busy."""
    ms = {kind: 0.0 for kind, _ in KERNEL_KINDS} | {"other": 0.0}
    for e in prof.key_averages():
        if e.device_type == torch.autograd.DeviceType.CUDA:  # kernels, not the operators that launch them
            t = e.self_device_time_total / 1000 / steps
            name = e.key.lower()
            ms[next((kind for kind, keys in KERNEL_KINDS if any(k in name for k in keys)), "other")] += t
    return {**ms, "gpu_busy": sum(ms.values()) / (1000 * wall_s / steps)}


def measure(name, cfg, ds_path, tokens_per_rank, grad_accum, steps, warmup, work, rank, world, compile_,
            peak_tflops, profile=False, kernels="torch"):
    streams = max(1, tokens_per_rank // cfg.segment_len)
    ds_file = speed_ds_config(ds_path, work / "ds.json", train_micro_batch_size_per_gpu=streams,
                              gradient_accumulation_steps=grad_accum)
    ds = load_ds_config(ds_file, world, steps + warmup)
    store = synthetic_store(work / f"store-v{cfg.vocab_size}", cfg.vocab_size, 512, 16 * 1024)
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
    # Compile each model afresh, with static shapes as in a training run of one model: a second
    # model's shapes would otherwise turn on dynamic shapes (and PyTorch 2.11's inductor then
    # failed an assertion in its tiling analysis for the 125m after the 350m).
    torch._dynamo.reset()
    train_cfg = TrainConfig(out=str(work / name), steps=steps + warmup, log_every=10**9, eval_every=10**9,
                            save_every=10**9, compile=compile_, kernels=kernels, peak_tflops=peak_tflops)
    trainer = Trainer(cfg, DataConfig(str(store.path)), train_cfg, ds, store, rank, world)
    trainer.engine.module.set_kernels(kernels)  # before the first (compiled) forward
    window = PositionLoss(trainer.device)
    for _ in range(warmup):
        trainer.train_step(window)
    window = PositionLoss(trainer.device)
    cuda_sync()
    t0 = time.perf_counter()
    with profiler(profile) as prof:
        for _ in range(steps):
            trainer.train_step(window)
        cuda_sync()
    dt = time.perf_counter() - t0
    if profile and rank == 0:
        print(prof.key_averages().table(sort_by="self_cuda_time_total" if torch.cuda.is_available()
                                        else "self_cpu_time_total", row_limit=25))
        if torch.cuda.is_available():
            print(f"{name}: GPU kernel ms per optimizer step by kind "
                  + ", ".join(f"{k} {v:.1%}" if k == "gpu_busy" else f"{k} {v:.1f}"
                              for k, v in kernel_breakdown(prof, steps, dt).items()))
    tok_s = steps * trainer.tokens_per_step / dt
    tflops = tok_s * cfg.flops_per_token() / 1e12 / world
    row = {"model": name, "kernels": kernels, "params_M": cfg.num_params() / 1e6, "l": cfg.segment_len,
           "streams": streams, "tokens_per_s": tok_s, "tflops_per_gpu": tflops, "step_ms": 1000 * dt / steps,
           "loss": window.summary()[0]}
    if torch.cuda.is_available():
        row["mfu"] = tflops / peak_tflops
        row["peak_mem_gib"] = torch.cuda.max_memory_allocated() / 2**30
    trainer.close()
    trainer.engine.destroy()
    del trainer, window
    gc.collect()
    return row


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--presets", default="125m,350m,1b")
    p.add_argument("--ds-config", "--ds_config", default="ds_configs/dp-zero2.json")
    p.add_argument("--tokens-per-rank", "--tokens_per_rank", default="8192",
                   help="tokens per micro-step per rank (a list: each)")
    p.add_argument("--grad-accum", "--grad_accum", default="1",
                   help="micro-steps per optimizer step, amortising the optimizer as nanoGPT's 40 do (a list: each)")
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--compile", action="store_true", help="engine.compile() (torch.compile) each model")
    p.add_argument("--no-baseline", "--no_baseline", action="store_true")
    p.add_argument("--peak-tflops", "--peak_tflops", type=float, default=TrainConfig.peak_tflops,
                   help="per-GPU matrix-product ceiling for MFU (800: bf16 measured on the H100)")
    p.add_argument("--profile", action="store_true", help="print the top kernels of the timed steps")
    p.add_argument("--kernels", default="torch",
                   help="torch, liger or both (torch,liger): each model runs with each, side by side")
    p.add_argument("--quick", action="store_true", help="toy sizes on the CPU (smoke test)")
    p.add_argument("--json", help="also write the table here")
    args = p.parse_args()
    if args.quick:
        args.presets, args.ds_config, args.tokens_per_rank, args.steps, args.warmup = "tiny", "ds_configs/cpu.json", "64", 2, 1
    kernel_list = args.kernels.split(",")
    try:
        for kernels in kernel_list:
            check_kernels(kernels)
    except FoldscaleError as e:
        p.error(str(e))
    rank, world = init_distributed()
    rows = []
    settings = [(int(t), int(g)) for t in args.tokens_per_rank.split(",") for g in args.grad_accum.split(",")]
    with tempfile.TemporaryDirectory() as tmp:
        for preset, (tokens, accum) in itertools.product(args.presets.split(","), settings):
            folded = ModelConfig.load(preset)
            pairs = [(f"{preset} folded", folded)]
            if not args.no_baseline:
                pairs.append((f"{preset} baseline (full attention, window 2l)",
                              folded.full_attention(2 * folded.segment_len)))
            for (name, cfg), kernels in itertools.product(pairs, kernel_list):
                row = measure(name, cfg, args.ds_config, tokens, accum, args.steps, args.warmup, Path(tmp),
                              rank, world, args.compile, args.peak_tflops, args.profile, kernels)
                row.update(tokens_per_micro_step=tokens, grad_accum=accum)
                torch_row = next((r for r in rows if r["kernels"] == "torch" and r["model"] == name
                                  and r["tokens_per_micro_step"] == tokens and r["grad_accum"] == accum), None)
                if len(kernel_list) > 1 and torch_row is not None:
                    row["vs_torch"] = row["tokens_per_s"] / torch_row["tokens_per_s"]
                rows.append(row)
                if rank == 0:
                    print(f"{name}, kernels={kernels}: {row['tokens_per_s']:,.0f} tok/s, "
                          f"{row['tflops_per_gpu']:.1f} TFLOP/s"
                          + (f", MFU {row['mfu']:.1%}" if "mfu" in row else "")
                          + (f", {row['vs_torch']:.3f}x torch" if "vs_torch" in row else ""), flush=True)
    if rank == 0:
        print(f"\n{device_name()}, {world} rank(s), {args.ds_config}, compile={args.compile}, "
              f"MFU against {args.peak_tflops:.0f} TFLOP/s; step = one optimizer step")
        print_table(rows, ["model", "kernels", "params_M", "l", "streams", "tokens_per_micro_step", "grad_accum",
                           "tokens_per_s", "vs_torch", "tflops_per_gpu", "mfu", "step_ms", "peak_mem_gib", "loss"])
        write_json(args.json, rows, ds_config=args.ds_config, world_size=world, compile=args.compile,
                   peak_tflops=args.peak_tflops, kernels=kernel_list)


if __name__ == "__main__":
    os.environ.setdefault("PYTHONUNBUFFERED", "1")
    main()
