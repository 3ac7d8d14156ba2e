"""Training throughput, model TFLOP/s and MFU through the real DeepSpeed engine and trainer loop:
each folded preset side by side with its full-attention baseline (ModelConfig.full_attention:
the same blocks, all local, window 2l), in one run.

    python -m benchmarks.bench_throughput --presets 125m,350m,1b --json benchmarks/results/throughput.json
    python -m benchmarks.bench_throughput --presets 350m --compile --no-baseline --kernels torch,liger
    python -m benchmarks.bench_throughput --presets 350m --compile --plain --profile runs/profile   # the baseline gap
    python -m benchmarks.bench_throughput --quick     # CPU smoke test at toy size

MFU = model FLOPs (ModelConfig.flops_per_token, DESIGN.md §1: 6 x matmul parameters with the
global stack counted twice, plus causal attention) x trained tokens/s / --peak-tflops (800:
the bf16 ceiling measured on the H100). Tokens counted are all positions of every segment.
With several --kernels (FoldedLM.set_kernels) each model runs with each, in one run, and
vs_torch is its tokens/s over the same model's with kernels=torch. With several --ds-config each
trainer row runs under each, and vs_first_config is its tokens/s over the same row's under the first.
With --plain each model also runs through a plain PyTorch loop (measure_plain: fp32 weights under
bf16 autocast, fused AdamW, as nanoGPT trains), the same tokens and batches: vs_trainer is its
tokens/s over the trainer row's, the cost of Trainer + DeepSpeed alone; against
benchmarks/bench_anchor.py (a nanoGPT-style GPT) the plain row prices the blocks themselves
(RoPE, SwiGLU, RMSNorm against learned positions, GELU, LayerNorm).
With --profile DIR a few more steps of each row run under torch.profiler: a Chrome trace in DIR,
the top kernels and CPU ops printed, and in the table gpu_busy (GPU kernel time over wall time)
and host_syncs_per_step (CUDA synchronize calls: the host waiting for the GPU).
The learning-rate schedule is left out of the DeepSpeed JSON: speed does not depend on it.
"""
import argparse
import gc
import itertools
import os
import tempfile
from pathlib import Path

import torch
from torch.nn.attention import SDPBackend

from tools.benchlib import device_name, print_table, speed_ds_config, synthetic_store, time_steps, write_json
from foldscale.config import DataConfig, FoldscaleError, ModelConfig, TrainConfig
from foldscale.data import SegmentStreamSampler
from foldscale.engine import init_distributed, load_ds_config, param_groups
from foldscale.kernels import check as check_kernels
from foldscale.metrics import PositionLoss
import foldscale.model
from foldscale.model import FoldedLM
from foldscale.trainer import Trainer, take


def measure(name, cfg, ds_path, tokens_per_rank, grad_accum, steps, warmup, work, rank, world, compile_,
            peak_tflops, kernels="torch", profile=None, profile_steps=2):
    """One row through the real trainer: Trainer.train_step on a DeepSpeed engine."""
    streams = max(1, tokens_per_rank // cfg.segment_len)
    ds_file = speed_ds_config(ds_path, work / "ds.json", train_micro_batch_size_per_gpu=streams,
                              gradient_accumulation_steps=grad_accum)
    ds = load_ds_config(ds_file, world, steps + warmup)
    store = synthetic_store(work / f"store-v{cfg.vocab_size}", cfg.vocab_size, 512, 16 * 1024)
    fresh_row()
    train_cfg = TrainConfig(out=str(work / name), steps=steps + warmup, log_every=10**9, eval_every=10**9,
                            save_every=10**9, compile=compile_, kernels=kernels, peak_tflops=peak_tflops)
    trainer = Trainer(cfg, DataConfig(str(store.path)), train_cfg, ds, store, rank, world)
    window = PositionLoss(trainer.device)
    dt, prof = time_steps(lambda: trainer.train_step(window), steps, warmup, f"{name} {kernels} trainer",
                          profile, profile_steps)
    row = speed_row(name, cfg, "trainer", kernels, streams, trainer.tokens_per_step / dt, world, peak_tflops,
                    dt, window.summary()[0], prof)
    trainer.close()
    trainer.engine.destroy()
    del trainer, window
    gc.collect()
    return row


def measure_plain(name, cfg, tokens_per_rank, grad_accum, steps, warmup, work, compile_, peak_tflops,
                  kernels="torch", profile=None, profile_steps=2):
    """The same model, tokens and batches as `measure`, through a plain PyTorch loop as nanoGPT's:
    fp32 weights under bf16 autocast (on a GPU), fused AdamW, gradients clipped at 1.0, batches
    pinned and copied without waiting. No DeepSpeed, no host sync, no loss bookkeeping: the
    difference to the trainer's row is what Trainer + DeepSpeed cost. One rank."""
    streams = max(1, tokens_per_rank // cfg.segment_len)
    store = synthetic_store(work / f"store-v{cfg.vocab_size}", cfg.vocab_size, 512, 16 * 1024)
    fresh_row()
    torch.manual_seed(TrainConfig.seed)
    cuda = torch.cuda.is_available()
    device = torch.device("cuda" if cuda else "cpu")
    model = FoldedLM(cfg).set_kernels(kernels).to(device)
    if compile_:
        model.compile()  # what engine.compile() does to the engine's module
    opt = torch.optim.AdamW(param_groups(model, 0.1), lr=6e-4, betas=(0.9, 0.95), eps=1e-8, fused=cuda)
    sampler = SegmentStreamSampler(store, "train", 0, 1, streams, cfg.segment_len, TrainConfig.seed)
    carried, loss = [None], torch.zeros(2, device=device)  # the state; summed token loss and tokens

    def step():
        for _ in range(grad_accum):
            batch = take(sampler, cfg.bptt_segments).to(device)
            with torch.autocast(device.type, dtype=torch.bfloat16, enabled=cuda):
                out = model.forward_stream(batch.ids, batch.targets, carried[0], batch.reset, keep_logits=False)
            (out.loss / grad_accum).backward()
            carried[0] = out.state
            loss.add_(torch.stack([out.loss.detach() * out.n_tokens, out.n_tokens]))
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
    dt, prof = time_steps(step, steps, warmup, f"{name} {kernels} plain", profile, profile_steps)
    tokens_per_step = grad_accum * streams * cfg.bptt_segments * cfg.segment_len  # Trainer.tokens_per_step's unit
    row = speed_row(name, cfg, "plain", kernels, streams, tokens_per_step / dt, 1, peak_tflops, dt,
                    float(loss[0] / loss[1]), prof)
    del model, opt
    gc.collect()
    return row


def fresh_row():
    """Each row starts with an empty cache and peak, and compiles afresh, with static shapes as in
    a training run of one model: a second model's shapes would otherwise turn on dynamic shapes
    (and PyTorch 2.11's inductor then failed an assertion in its tiling analysis for the 125m after
    the 350m)."""
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
    torch._dynamo.reset()


def speed_row(name, cfg, loop, kernels, streams, tok_s, world, peak_tflops, step_s, loss, prof) -> dict:
    tflops = tok_s * cfg.flops_per_token() / 1e12 / world
    row = {"model": name, "loop": loop, "kernels": kernels, "params_M": cfg.num_params() / 1e6, "l": cfg.segment_len,
           "streams": streams, "tokens_per_s": tok_s, "tflops_per_gpu": tflops, "step_ms": 1000 * step_s,
           "loss": loss, "flops_per_token": cfg.flops_per_token()}
    if torch.cuda.is_available():
        row["mfu"] = tflops / peak_tflops
        row["peak_mem_gib"] = torch.cuda.max_memory_allocated() / 2**30
    return row | prof


COLUMNS = ["model", "loop", "ds_config", "kernels", "attention", "params_M", "l", "streams", "tokens_per_micro_step",
           "grad_accum", "tokens_per_s", "vs_torch", "vs_trainer", "vs_first_config", "tflops_per_gpu", "mfu", "step_ms",
           "peak_mem_gib", "gpu_busy", "host_syncs_per_step", "loss"]


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--presets", default="125m,350m,1b")
    p.add_argument("--ds-config", "--ds_config",
                   help="DeepSpeed JSON (default ds_configs/dp-zero2.json; a list: each, the plain loop once)")
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
    p.add_argument("--plain", action="store_true",
                   help="beside each trainer row, the same model and tokens through a plain PyTorch loop (one rank)")
    p.add_argument("--profile", metavar="DIR",
                   help="after each row's timed steps, profile --profile-steps more: a Chrome trace in DIR, the top "
                        "20 kernels and CPU ops printed, GPU busy and host syncs per step in the table (one rank)")
    p.add_argument("--profile-steps", "--profile_steps", type=int, default=2)
    p.add_argument("--kernels", default="torch",
                   help="torch, liger or both (torch,liger): each model runs with each, side by side")
    p.add_argument("--attention", default="flash", choices=["flash", "cudnn", "flex"],
                   help="flash: foldscale's attention backends (model.ATTENTION_BACKENDS, no cuDNN); cudnn: cuDNN's "
                        "kernels allowed too, which PyTorch then picks on an H100: what leaving them costs; flex: "
                        "a global block's attention as one FlexAttention call (model.FLEX_GLOBAL)")
    p.add_argument("--quick", action="store_true", help="toy sizes on the CPU (smoke test)")
    p.add_argument("--json", help="also write the table here")
    args = p.parse_args()
    if args.quick:
        args.presets, args.tokens_per_rank, args.steps, args.warmup = "tiny", "64", 2, 1
    args.ds_config = args.ds_config or ("ds_configs/cpu.json" if args.quick else "ds_configs/dp-zero2.json")
    kernel_list = args.kernels.split(",")
    try:
        for kernels in kernel_list:
            check_kernels(kernels)
    except FoldscaleError as e:
        p.error(str(e))
    if args.attention == "cudnn":  # read by Attention.forward at each call (or when it is compiled)
        foldscale.model.ATTENTION_BACKENDS.insert(0, SDPBackend.CUDNN_ATTENTION)
    if args.attention == "flex" and not (args.compile and torch.cuda.is_available()):
        p.error("--attention flex needs --compile and a GPU (FlexAttention is fused by torch.compile, and has "
                "no backward on a CPU)")
    foldscale.model.FLEX_GLOBAL = args.attention == "flex"
    rank, world = init_distributed()
    if world > 1 and (args.plain or args.profile):
        p.error("--plain and --profile run on one rank: start with python, not a launcher of several ranks")
    if args.plain and "liger" in kernel_list:
        p.error("--plain runs the model under bf16 autocast, which liger's fused loss is not written for: "
                "use --kernels torch with --plain")
    rows = []
    settings = [(int(t), int(g)) for t in args.tokens_per_rank.split(",") for g in args.grad_accum.split(",")]
    loops = ["trainer", "plain"] if args.plain else ["trainer"]
    meta = dict(ds_config=args.ds_config, world_size=world, compile=args.compile, peak_tflops=args.peak_tflops,
                kernels=kernel_list)
    with tempfile.TemporaryDirectory() as tmp:
        ds_paths = args.ds_config.split(",")
        for preset, ds_path, (tokens, accum) in itertools.product(args.presets.split(","), ds_paths, settings):
            folded = ModelConfig.load(preset)
            pairs = [(f"{preset} folded", folded)]
            if not args.no_baseline:
                pairs.append((f"{preset} baseline (full attention, window 2l)",
                              folded.full_attention(2 * folded.segment_len)))
            for (name, cfg), kernels, loop in itertools.product(pairs, kernel_list, loops):
                if loop == "plain" and ds_path != ds_paths[0]:
                    continue  # the plain loop does not read the DeepSpeed config
                if loop == "trainer":
                    row = measure(name, cfg, ds_path, tokens, accum, args.steps, args.warmup, Path(tmp), rank,
                                  world, args.compile, args.peak_tflops, kernels, args.profile, args.profile_steps)
                else:
                    row = measure_plain(name, cfg, tokens, accum, args.steps, args.warmup, Path(tmp), args.compile,
                                        args.peak_tflops, kernels, args.profile, args.profile_steps)
                row.update(tokens_per_micro_step=tokens, grad_accum=accum, attention=args.attention,
                           ds_config=ds_path if loop == "trainer" else "")
                torch_row = next((r for r in rows if r["kernels"] == "torch" and r["model"] == name
                                  and r["loop"] == loop and r["tokens_per_micro_step"] == tokens
                                  and r["grad_accum"] == accum and r["ds_config"] == row["ds_config"]), None)
                if len(kernel_list) > 1 and torch_row is not None:
                    row["vs_torch"] = row["tokens_per_s"] / torch_row["tokens_per_s"]
                trainer_row = next((r for r in rows if r["loop"] == "trainer" and r["ds_config"] == ds_paths[0]
                                    and r["model"] == name
                                    and r["kernels"] == kernels and r["tokens_per_micro_step"] == tokens
                                    and r["grad_accum"] == accum), None)
                if loop == "plain" and trainer_row is not None:
                    row["vs_trainer"] = row["tokens_per_s"] / trainer_row["tokens_per_s"]
                if loop == "trainer" and ds_path != ds_paths[0] and trainer_row is not None:
                    row["vs_first_config"] = row["tokens_per_s"] / trainer_row["tokens_per_s"]
                rows.append(row)
                if rank == 0:
                    write_json(args.json, rows, **meta)  # after every row: a run stopped early keeps its rows
                    print(f"{name}, {loop}, kernels={kernels}: {row['tokens_per_s']:,.0f} tok/s, "
                          f"{row['tflops_per_gpu']:.1f} TFLOP/s"
                          + (f", MFU {row['mfu']:.1%}" if "mfu" in row else "")
                          + (f", {row['vs_torch']:.3f}x torch" if "vs_torch" in row else "")
                          + (f", {row['vs_trainer']:.3f}x the trainer" if "vs_trainer" in row else ""), flush=True)
    if rank == 0:
        print(f"\n{device_name()}, {world} rank(s), {args.ds_config}, compile={args.compile}, "
              f"MFU against {args.peak_tflops:.0f} TFLOP/s; step = one optimizer step")
        print_table(rows, COLUMNS)


if __name__ == "__main__":
    os.environ.setdefault("PYTHONUNBUFFERED", "1")
    main()
