"""The largest folded model that trains on a 24 GiB card: DeepSpeed with ds_configs/24gb.json
(ZeRO offload + activation checkpointing, through launch/pretrain.py) against plain PyTorch
AdamW (fp32 weights, bf16 autocast, activation checkpointing too, no DeepSpeed), under the same
cap (torch.cuda.set_per_process_memory_fraction). Each trial runs in its own process.

    python -m benchmarks.bench_24gb --json benchmarks/results/24gb.json
    python -m benchmarks.bench_24gb --quick           # CPU smoke test at toy size (no cap)
"""
import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

# (name, d_model, n_head, blocks per stack); segment_len 1024, vocab 32000.
DS_LADDER = [("3b preset", 2560, 20, 20), ("d3072x48", 3072, 24, 24), ("d3584x48", 3584, 28, 24)]
TORCH_LADDER = [("d1536x24", 1536, 12, 12), ("d2048x20", 2048, 16, 10), ("d2048x24", 2048, 16, 12), ("d2048x32", 2048, 16, 16)]


def model_json(work, name, d, heads, blocks, quick):
    cfg = dict(vocab_size=512, d_model=32, n_head=4, n_local=1, n_global=1, segment_len=16) if quick else \
        dict(vocab_size=32000, d_model=d, n_head=heads, n_local=blocks, n_global=blocks, segment_len=1024)
    path = work / f"{name}.json"
    path.write_text(json.dumps(cfg))
    return path


def torch_trial(model_path, streams, steps, cap_gib):
    """One process: plain PyTorch training steps, one per segment; prints a JSON line."""
    import functools

    import torch

    from benchmarks.benchlib import train_by_segment
    from foldscale.config import ModelConfig
    from foldscale.engine import cap_memory
    from foldscale.model import FoldedLM
    cuda = torch.cuda.is_available()
    if cuda:
        cap_memory(cap_gib)
    cfg = ModelConfig.from_json(model_path)
    device = torch.device("cuda" if cuda else "cpu")
    model = FoldedLM(cfg).to(device).train()
    model.set_activation_checkpointing(functools.partial(torch.utils.checkpoint.checkpoint, use_reentrant=False))
    ids = torch.randint(0, cfg.vocab_size, (streams, (steps + 1) * cfg.segment_len + 1), device=device)
    tok_s = train_by_segment(model, ids[:, :-1], ids[:, 1:], device)
    print(json.dumps({"tokens_per_s": tok_s, "tflops": tok_s * cfg.flops_per_token() / 1e12,
                      "peak_gib": torch.cuda.max_memory_allocated() / 2**30 if cuda else None}))


def failure(p) -> dict:
    if "OutOfMemoryError" in p.stderr or "out of memory" in p.stderr:
        return {"status": "GPU OOM"}
    if p.returncode < 0:  # killed by a signal: the kernel's OOM killer, when host memory runs out
        return {"status": f"killed by signal {-p.returncode} (host memory?)"}
    lines = p.stderr.strip().splitlines()
    return {"status": "failed: " + (lines[-1][:200] if lines else f"exit {p.returncode}")}


def run_ds(model_path, store, work, steps, cap_gib, quick):
    from benchmarks.benchlib import speed_ds_config
    out = work / ("run-" + model_path.stem)
    ds = speed_ds_config(ROOT / "ds_configs" / ("cpu.json" if quick else "24gb.json"), work / "ds.json")
    cmd = [sys.executable, str(ROOT / "launch" / "pretrain.py"), "--ds-config", str(ds), "--model", str(model_path),
           "--data", str(store), "--out", str(out), "--steps", str(steps), "--log-every", "1",
           "--save-every", str(10**9), "--eval-every", str(10**9), "--gpu-mem-gib", str(cap_gib)]
    p = subprocess.run(cmd, capture_output=True, text=True)
    if p.returncode != 0 or not (out / "metrics.jsonl").is_file():
        return failure(p)
    last = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()][-1]
    return {"status": "ok", "tokens_per_s": last["train/tokens_per_s"], "tflops": last["train/tflops_per_gpu"],
            "peak_gib": last.get("memory/peak_allocated_gib")}


def run_torch(model_path, streams, steps, cap_gib):
    p = subprocess.run([sys.executable, "-m", "benchmarks.bench_24gb", "--trial", str(model_path),
                        "--streams", str(streams), "--steps", str(steps), "--cap-gib", str(cap_gib)],
                       capture_output=True, text=True, cwd=ROOT)
    if p.returncode != 0:
        return failure(p)
    return {"status": "ok", **json.loads(p.stdout.strip().splitlines()[-1])}


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--cap-gib", "--cap_gib", type=float, default=24.0)
    p.add_argument("--steps", type=int, default=4, help="DeepSpeed optimizer steps (each 8 x 2 x 1024 tokens)")
    p.add_argument("--streams", type=int, default=2)
    p.add_argument("--systems", default="deepspeed,plain", help="which ladders to climb")
    p.add_argument("--json")
    p.add_argument("--quick", action="store_true")
    p.add_argument("--trial", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.trial:
        return torch_trial(args.trial, args.streams, args.steps, args.cap_gib)
    from benchmarks.benchlib import device_name, print_table, synthetic_store, write_json
    from foldscale.config import ModelConfig
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        store = synthetic_store(work / "store", 512 if args.quick else 32000, 64, 8192).path
        ladders = [(system, ladder[:1] if args.quick else ladder) for system, ladder in
                   (("deepspeed 24gb.json", DS_LADDER), ("plain PyTorch AdamW", TORCH_LADDER))
                   if system.split()[0].lower() in args.systems]
        for system, ladder in ladders:
            for name, d, heads, blocks in ladder:
                path = model_json(work, name, d, heads, blocks, args.quick)
                params = ModelConfig.from_json(path).num_params() / 1e9
                t0 = time.time()
                result = (run_ds(path, store, work, args.steps, args.cap_gib, args.quick)
                          if system.startswith("deepspeed") else run_torch(path, args.streams, args.steps, args.cap_gib))
                rows.append({"system": system, "model": name, "params_B": params, **result,
                             "trial_s": time.time() - t0})
                print(rows[-1], flush=True)
                if result["status"] != "ok":
                    break  # the next size up will not fit either
    print(f"\n{device_name()}, cap {args.cap_gib} GiB, segment_len 1024, 2 streams per micro-step")
    print_table(rows, ["system", "model", "params_B", "status", "tokens_per_s", "tflops", "peak_gib", "trial_s"])
    write_json(args.json, rows, cap_gib=args.cap_gib)


if __name__ == "__main__":
    main()
