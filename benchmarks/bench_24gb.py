"""A 24 GiB card: how fast the 3b trains there, and the largest folded model that trains at all.

Each DeepSpeed trial is one process of
    python launch/pretrain.py --ds-config CONFIG --model M.json --data SYNTHETIC --steps 2 --log-every 1 \
        --gpu-mem-gib 24
timed on its last optimizer step (pretrain's own tokens/s and MFU for that step). The process is
stopped once that step is logged, before the final checkpoint (tens of GB at these sizes). Systems:
- `24gb`: ds_configs/24gb.json (ZeRO-2, CPU Adam, fp32 gradient accumulation on the GPU) on the 3b.
- `zero3`: ds_configs/24gb-zero3.json (ZeRO-3, parameters and optimizer on the host, the model
  built partitioned) up a ladder of d4096 models past 6B, until one fails. If the first rung fails
  for host memory, it is tried once more with the optimizer's host buffers unpinned (exact sizes,
  slower copies). If the 3b runs out of GPU memory, it is tried once more with one stream fewer
  and the same tokens per step.
- `plain`: PyTorch AdamW without DeepSpeed (fp32 weights, bf16 autocast, the same activation
  checkpointing), one optimizer step per segment; not in the default run.
Every trial records its status (ok, GPU OOM, host memory, timeout), tokens/s, MFU, peak GPU memory
and peak host RSS. A time budget bounds the whole run; a trial that would not fit in it is skipped.

    python -m benchmarks.bench_24gb --json benchmarks/results/24gb.json   # one H100: about 8 minutes
    python -m benchmarks.bench_24gb --quick                               # CPU, toy sizes, no cap
"""
import argparse
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SEGMENT, VOCAB = 1024, 32000

# system: (DeepSpeed config, ladder of (name, d_model, n_head, blocks per stack), seconds a trial may take)
SYSTEMS = {
    "24gb": ("24gb.json", [("3b preset", 2560, 20, 20)], 300),
    "zero3": ("24gb-zero3.json", [("d4096x30", 4096, 32, 15), ("d4096x32", 4096, 32, 16)], 330),
    "plain": (None, [("d1536x24", 1536, 12, 12), ("d2048x20", 2048, 16, 10), ("d2048x24", 2048, 16, 12),
                     ("d2048x32", 2048, 16, 16)], 150),
}


def model_json(work, name, d, heads, blocks, quick) -> Path:
    cfg = dict(vocab_size=512, d_model=32, n_head=4, n_local=1, n_global=1, segment_len=16) if quick else \
        dict(vocab_size=VOCAB, d_model=d, n_head=heads, n_local=blocks, n_global=blocks, segment_len=SEGMENT)
    path = work / f"{name.replace(' ', '_')}.json"
    path.write_text(json.dumps(cfg))
    return path


def trial_config(name, work, quick, change: dict) -> tuple[Path, str]:
    """ds_configs/NAME without its schedule (benchlib.speed_ds_config), at toy batch sizes with
    --quick, and with CHANGE: {"unpinned": True} (the optimizer's host buffers) or {"streams": N}
    (N streams per micro-step, accumulation scaled to keep the tokens per step). Returns the file
    and a label saying what was changed."""
    from tools.benchlib import speed_ds_config
    out = work / f"ds-{Path(name).stem}{''.join(f'-{k}{v}' for k, v in change.items())}.json"
    cfg = json.loads(speed_ds_config(ROOT / "ds_configs" / name, out).read_text())
    if quick:
        cfg.update(train_micro_batch_size_per_gpu=2, gradient_accumulation_steps=2)
    label = f"deepspeed {name}"
    if change.get("unpinned"):
        cfg["zero_optimization"]["offload_optimizer"]["pin_memory"] = False
        label += ", optimizer host buffers unpinned"
    if change.get("streams"):
        tokens = cfg["train_micro_batch_size_per_gpu"] * cfg["gradient_accumulation_steps"]
        cfg.update(train_micro_batch_size_per_gpu=change["streams"],
                   gradient_accumulation_steps=max(1, round(tokens / change["streams"])))
        label += f", {change['streams']} streams x {cfg['gradient_accumulation_steps']}"
    out.write_text(json.dumps(cfg, indent=2) + "\n")
    return out, label


def retry(system, status, change, ds_cfg, rows) -> dict | None:
    """The one retry a failed trial gets, if any (see the module's docstring)."""
    if system == "zero3" and status == "host memory" and not change and not any(
            r["status"] == "ok" and "24gb-zero3" in r["system"] for r in rows):
        return {"unpinned": True}
    streams = ds_cfg.get("train_micro_batch_size_per_gpu", 1)
    if system == "24gb" and status == "GPU OOM" and not change and streams > 1:
        return {"streams": streams - 1}
    return None


def run_process(cmd, log: Path, timeout: float, finished=lambda: False) -> dict:
    """Run CMD in its own process group, output to LOG, until it exits, FINISHED() is true (then
    it is killed: what was wanted is written) or TIMEOUT seconds pass. Returns its exit code, how
    it ended, its peak resident host memory (the kernel's rusage of that child) and the largest
    drop of the host's available memory while it ran (which counts pinned memory however the
    driver maps it)."""
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}
    with open(log, "w") as out:
        p = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, cwd=ROOT, start_new_session=True, env=env)
    try:  # the kernel's OOM killer then takes the trial, never the bench or the shell that started it
        Path(f"/proc/{p.pid}/oom_score_adj").write_text("1000")
    except OSError:
        pass
    t0, ended, available = time.time(), "exited", host_memory_gib().get("MemAvailable", 0.0)
    lowest, shown = available, t0
    while True:
        pid, status, usage = os.wait4(p.pid, os.WNOHANG)
        if pid:
            break
        lowest = min(lowest, host_memory_gib().get("MemAvailable", lowest))
        if time.time() - shown > 30:  # a sign of life: the trial's latest line
            shown, lines = time.time(), log.read_text(errors="replace").strip().splitlines()
            print(f"    {time.time() - t0:.0f} s: {lines[-1][:150] if lines else ''}", flush=True)
        if finished() or time.time() - t0 > timeout:
            ended = "finished" if finished() else "timeout"
            os.killpg(p.pid, signal.SIGKILL)
            pid, status, usage = os.wait4(p.pid, 0)
            time.sleep(2)  # the driver hands back its pinned host memory and GPU memory
            break
        time.sleep(0.5)
    p.returncode = os.waitstatus_to_exitcode(status)  # reaped here, so that rusage is this child's
    return {"rc": p.returncode, "ended": ended, "host_rss_gib": usage.ru_maxrss / 2**20,
            "host_used_gib": available - lowest, "seconds": time.time() - t0}


def failure(run: dict, log: Path) -> str:
    text = log.read_text(errors="replace")[-20000:]
    if run["ended"] == "timeout":
        return f"timeout after {run['seconds']:.0f} s"
    if "OutOfMemoryError" in text or "CUDA out of memory" in text:
        return "GPU OOM"
    if run["rc"] == -signal.SIGKILL or any(s in text for s in ("CUDA error: out of memory", "Cannot allocate memory",
                                                                "MemoryError", "std::bad_alloc")):
        return "host memory"  # the OOM killer's SIGKILL, or a refused pinned or plain host allocation
    if run["rc"] < 0:
        return f"killed by signal {-run['rc']}"
    lines = [line for line in text.strip().splitlines() if line.strip()]
    return "failed: " + (lines[-1][:200] if lines else f"exit {run['rc']}")


def metrics_at(path: Path, step: int) -> dict | None:
    """The metrics line pretrain wrote for STEP into PATH (a metrics.jsonl), if it is there."""
    from foldscale.metrics import read_metrics
    return next((r for r in read_metrics(path.parent) if r["step"] == step), None)


def run_ds(model_path, ds_path, store, work, logs, steps, cap_gib, timeout) -> dict:
    out = work / f"run-{model_path.stem}-{ds_path.stem}"
    cmd = [sys.executable, str(ROOT / "launch" / "pretrain.py"), "--ds-config", str(ds_path),
           "--model", str(model_path), "--data", str(store), "--out", str(out), "--steps", str(steps),
           "--log-every", "1", "--save-every", str(10**9), "--eval-every", str(10**9), "--gpu-mem-gib", str(cap_gib)]
    log = logs / f"{out.name}.log"
    run = run_process(cmd, log, timeout, lambda: metrics_at(out / "metrics.jsonl", steps) is not None)
    last = metrics_at(out / "metrics.jsonl", steps)
    result = {"host_rss_gib": run["host_rss_gib"], "host_used_gib": run["host_used_gib"], "log": str(log)}
    if last is None:
        return {**result, "status": failure(run, log)}
    measured = {"tokens_per_s": last["train/tokens_per_s"], "tflops": last["train/tflops_per_gpu"],
                "mfu": last.get("train/mfu"), "gpu_alloc_gib": last.get("memory/peak_allocated_gib"),
                "gpu_reserved_gib": last.get("memory/peak_reserved_gib")}
    return {**result, "status": "ok", **{k: v for k, v in measured.items() if v is not None}}


def torch_trial(model_path, streams, steps, cap_gib):
    """One process: plain PyTorch training steps, one per segment; prints a JSON line."""
    import functools

    import torch

    from tools.benchlib import train_by_segment
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
    tflops = tok_s * cfg.flops_per_token() / 1e12
    print(json.dumps({"tokens_per_s": tok_s, "tflops": tflops, "mfu": tflops / 800 if cuda else None,
                      "gpu_alloc_gib": torch.cuda.max_memory_allocated() / 2**30 if cuda else None,
                      "gpu_reserved_gib": torch.cuda.max_memory_reserved() / 2**30 if cuda else None}))


def run_torch(model_path, logs, streams, steps, cap_gib, timeout) -> dict:
    log = logs / f"plain-{model_path.stem}.log"
    run = run_process([sys.executable, "-m", "benchmarks.bench_24gb", "--trial", str(model_path), "--streams",
                       str(streams), "--steps", str(steps), "--cap-gib", str(cap_gib)], log, timeout)
    result = {"host_rss_gib": run["host_rss_gib"], "host_used_gib": run["host_used_gib"], "log": str(log)}
    lines = [line for line in log.read_text(errors="replace").splitlines() if line.startswith("{")]
    if run["rc"] != 0 or not lines:
        return {**result, "status": failure(run, log)}
    return {**result, "status": "ok", **{k: v for k, v in json.loads(lines[-1]).items() if v is not None}}


def build_cpu_adam():
    """DeepSpeed compiles its CPU Adam on first use (about a minute on a fresh machine): once, here,
    so that no trial's time includes it."""
    t0 = time.time()
    print("building DeepSpeed's CPU Adam (about a minute on a fresh machine)", flush=True)
    build = "from deepspeed.ops.op_builder import CPUAdamBuilder; CPUAdamBuilder().load()"
    p = subprocess.run([sys.executable, "-c", build], cwd=ROOT, capture_output=True, text=True)
    outcome = "done" if p.returncode == 0 else "FAILED: " + p.stderr.strip()[-500:]
    print(f"  {outcome} in {time.time() - t0:.0f} s", flush=True)


PINNED_PROBE = """
import re, torch
from pathlib import Path
from foldscale.engine import exact_pinned_memory
rss = lambda: int(re.search(r"VmRSS:\\s+(\\d+)", Path("/proc/self/status").read_text()).group(1)) * 1024
exact_pinned_memory()
torch.empty(1, pin_memory=True)
before = rss()
block = torch.empty(80 * 2**20, dtype=torch.uint8, pin_memory=True)
print((rss() - before) / 2**20)
"""


def pinned_block_mib() -> float | None:
    """Host memory taken by an 80 MiB pinned tensor after engine.exact_pinned_memory(): 80 where
    this PyTorch pins at the size asked for, 128 where it rounds up to a power of two (then
    DeepSpeed's offload buffers take up to twice their size)."""
    p = subprocess.run([sys.executable, "-c", PINNED_PROBE], cwd=ROOT, capture_output=True, text=True)
    try:
        return float(p.stdout.strip().splitlines()[-1])
    except (ValueError, IndexError):
        return None


def host_memory_gib() -> dict:
    try:
        info = dict(line.split(":", 1) for line in Path("/proc/meminfo").read_text().splitlines())
    except OSError:
        return {}
    return {k: int(info[k].split()[0]) / 2**20 for k in ("MemTotal", "MemAvailable")}


def climb(system, args, work, logs, store, deadline) -> list[dict]:
    """SYSTEM's ladder, smallest first, until a rung fails (after its one retry, if it gets one)."""
    from foldscale.config import ModelConfig
    config, ladder, cap_s = SYSTEMS[system]
    rows, rungs = [], [(rung, {}) for rung in (ladder[:1] if args.quick else ladder)]
    while rungs:
        (name, d, heads, blocks), change = rungs.pop(0)
        path = model_json(work, name, d, heads, blocks, args.quick)
        model = ModelConfig.from_json(path)
        ds, label = trial_config(config, work, args.quick, change) if config else (None, "plain PyTorch AdamW")
        ds_cfg = json.loads(ds.read_text()) if ds else {}
        row = {"system": label, "model": name, "params_B": model.num_params() / 1e9,
               "tokens_per_step": ds_cfg.get("train_micro_batch_size_per_gpu", args.streams)
               * ds_cfg.get("gradient_accumulation_steps", 1) * model.segment_len}
        timeout, t0 = min(cap_s, deadline - time.time() - 15), time.time()
        if timeout < 60:
            result = {"status": "skipped: time budget"}
        else:
            print(f"{label}, {name} ({row['params_B']:.2f}B): up to {timeout:.0f} s", flush=True)
            result = run_ds(path, ds, store, work, logs, args.steps, args.cap_gib, timeout) if ds else \
                run_torch(path, logs, args.streams, args.steps, args.cap_gib, timeout)
        rows.append({**row, **result, "trial_s": time.time() - t0})
        print("  " + ", ".join(f"{k} {v:.4g}" if isinstance(v, float) else f"{k} {v}" for k, v in rows[-1].items()
                               if k not in ("system", "model", "log")), flush=True)
        if result["status"] != "ok":
            if "log" in result:
                print("  last lines of its log:\n    " + "\n    ".join(
                    Path(result["log"]).read_text(errors="replace").strip().splitlines()[-8:]), flush=True)
            again = retry(system, result["status"], change, ds_cfg, rows)
            rungs = [((name, d, heads, blocks), again)] if again else []  # a bigger rung would fail too
    return rows


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--cap-gib", "--cap_gib", type=float, default=24.0)
    p.add_argument("--steps", type=int, default=2, help="optimizer steps per trial; the last is timed")
    p.add_argument("--streams", type=int, default=2, help="streams per step of the plain PyTorch trials")
    p.add_argument("--systems", default="24gb,zero3", help=f"which of {', '.join(SYSTEMS)} to run")
    p.add_argument("--budget-s", type=float, default=480, help="seconds for the whole run (trials past it are skipped)")
    p.add_argument("--json")
    p.add_argument("--log-dir", "--log_dir", help="keep each trial's output here (default: only failures' last lines)")
    p.add_argument("--quick", action="store_true", help="CPU, toy sizes, every system's first rung")
    p.add_argument("--trial", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.trial:
        return torch_trial(args.trial, args.streams, args.steps, args.cap_gib)
    from tools.benchlib import device_name, print_table, synthetic_store, write_json
    deadline = time.time() + args.budget_s
    systems = [s for s in SYSTEMS if s in args.systems.split(",") or (args.quick and s == "plain")]
    host, rows = host_memory_gib(), []
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        logs = Path(args.log_dir) if args.log_dir else work
        logs.mkdir(parents=True, exist_ok=True)
        store = synthetic_store(work / "store", 512 if args.quick else VOCAB, 256, 8192).path
        if not args.quick and any(SYSTEMS[s][0] for s in systems):
            build_cpu_adam()
            host["pinned_80mib_block_mib"] = pinned_block_mib()
            print(f"an 80 MiB pinned block takes {host['pinned_80mib_block_mib']} MiB of host memory", flush=True)
        for system in systems:
            rows += climb(system, args, work, logs, store, deadline)
    host_text = ", host {MemTotal:.0f} GiB ({MemAvailable:.0f} GiB available at the start)".format(**host) \
        if "MemTotal" in host else ""
    print(f"\n{device_name()}, cap {args.cap_gib} GiB{host_text}; the last of {args.steps} optimizer steps timed; "
          "MFU against 800 TFLOP/s (DESIGN.md §1, activation recomputation not counted)")
    print_table(rows, ["system", "model", "params_B", "tokens_per_step", "status", "tokens_per_s", "mfu", "tflops",
                       "gpu_alloc_gib", "gpu_reserved_gib", "host_rss_gib", "host_used_gib", "trial_s"])
    write_json(args.json, [{k: v for k, v in r.items() if k != "log"} for r in rows], cap_gib=args.cap_gib,
               steps=args.steps, budget_s=args.budget_s, host_memory_gib=host)


if __name__ == "__main__":
    main()
