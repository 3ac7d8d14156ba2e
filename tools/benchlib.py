"""What every benchmark, experiment and tool shares: a synthetic token store, a table, a JSON
record, a profile of a few steps, plain PyTorch training segment by segment, and
launch/pretrain.py run as a user runs it (on N ranks, with a DeepSpeed config made from a shipped one)."""
import datetime
import json
import os
import platform
import re
import shlex
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import torch

from foldscale.config import read_json
from foldscale.metrics import read_metrics
from foldscale.model import segments


def synthetic_store(path, vocab_size: int, n_docs: int, doc_len: int, seed: int = 0):
    """Random documents of about doc_len tokens: throughput does not depend on the text."""
    from foldscale.data import TokenStore, write_store
    if not (Path(path) / "meta.json").is_file():
        rng = np.random.default_rng(seed)
        docs = [rng.integers(4, vocab_size, size=int(doc_len * rng.uniform(0.75, 1.25))) for _ in range(n_docs)]
        write_store(docs, path, vocab_size=vocab_size, val_fraction=0.05)
    return TokenStore.open(path)


def device_name() -> str:
    if torch.cuda.is_available():
        return torch.cuda.get_device_name()
    return f"CPU ({platform.processor() or platform.machine()})"


def command_line() -> str:
    """How this process was started, as `python -m package.module ARGS` when run that way."""
    spec = getattr(sys.modules["__main__"], "__spec__", None)
    program = ["-m", spec.name] if spec is not None else sys.argv[:1]
    return shlex.join(["python", *program, *sys.argv[1:]])


def print_table(rows: list[dict], columns: list[str]):
    def fmt(v):
        if isinstance(v, float):
            return f"{v:,.3g}" if abs(v) < 100 else f"{v:,.0f}"
        return str(v)
    cells = [[fmt(r.get(c, "")) for c in columns] for r in rows]
    widths = [max(len(c), *(len(row[i]) for row in cells)) for i, c in enumerate(columns)]
    print(" | ".join(c.ljust(w) for c, w in zip(columns, widths)))
    print("-+-".join("-" * w for w in widths))
    for row in cells:
        print(" | ".join(v.ljust(w) for v, w in zip(row, widths)))


def write_json(path, rows: list[dict], **meta):
    """PATH (if given): {"date", "device", "torch", "command", **meta, "rows": rows}."""
    if path:
        record = {"date": datetime.date.today().isoformat(), "device": device_name(),
                  "torch": torch.__version__, "command": command_line(), **meta, "rows": rows}
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        Path(path).write_text(json.dumps(record, indent=2) + "\n")


def speed_ds_config(path, out, **overrides) -> Path:
    """A copy of the DeepSpeed JSON at PATH, written to OUT, with OVERRIDES, train_batch_size left
    to be derived and no learning-rate schedule: a few timed steps are shorter than any warm-up,
    and speed does not depend on the rate."""
    cfg = read_json(path, "no such DeepSpeed config; see ds_configs/")
    for key in ("scheduler", "train_batch_size"):
        cfg.pop(key, None)
    Path(out).write_text(json.dumps({**cfg, **overrides}, indent=2) + "\n")
    return Path(out)


def cuda_sync():
    if torch.cuda.is_available():
        torch.cuda.synchronize()


KERNEL_KINDS = [("matmul", ("gemm", "nvjet", "cutlass", "sm90_xmma", "splitk")), ("attention", ("flash", "fmha", "sdpa")),
                ("loss (liger)", ("liger", "cross_entropy")), ("fused elementwise (triton)", ("triton",)),
                ("optimizer", ("adam", "multi_tensor")), ("communication", ("nccl",)),
                ("copy/fill", ("memcpy", "memset", "copy", "fill"))]
# CUDA runtime calls that make the host wait for the GPU: while it waits, nothing new is queued.
HOST_SYNCS = ("cudaStreamSynchronize", "cudaDeviceSynchronize", "cudaEventSynchronize")


def profile_run(step, steps: int, trace=None, top: int = 20) -> dict:
    """Run step() STEPS times under torch.profiler and print the top TOP GPU kernels (by their GPU
    time; on a GPU) and CPU operators (by their own host time). TRACE (a path ending .json.gz), if
    given, gets the Chrome trace (chrome://tracing, ui.perfetto.dev). Returns figures for a table
    row: host_syncs_per_step (HOST_SYNCS calls) and profiled_step_ms, and on a GPU gpu_ms_per_step
    by kernel kind (KERNEL_KINDS), kernels_per_step (copies and fills included) and gpu_busy, the
    share of wall time the GPU ran kernels: well under 1 is time the host left it idle."""
    from torch.profiler import ProfilerActivity, profile
    cuda = torch.cuda.is_available()
    cuda_sync()
    with profile(activities=[ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])) as prof:
        t0 = time.perf_counter()
        for _ in range(steps):
            step()
        cuda_sync()
        wall_ms = 1000 * (time.perf_counter() - t0) / steps
    if trace:
        Path(trace).parent.mkdir(parents=True, exist_ok=True)
        prof.export_chrome_trace(str(trace))
    events = prof.key_averages()
    if cuda:
        print(events.table(sort_by="self_cuda_time_total", row_limit=top))
    print(events.table(sort_by="self_cpu_time_total", row_limit=top))
    ms, kernels = {kind: 0.0 for kind, _ in KERNEL_KINDS} | {"other": 0.0}, 0
    for e in events:
        if e.device_type == torch.autograd.DeviceType.CUDA:  # kernels, not the operators that launch them
            name = e.key.lower()
            kind = next((kind for kind, keys in KERNEL_KINDS if any(k in name for k in keys)), "other")
            ms[kind] += e.self_device_time_total / 1000 / steps
            kernels += e.count
    syncs = sum(e.count for e in events if e.key in HOST_SYNCS) - cuda  # less the cuda_sync() ending the profile
    figures = {"host_syncs_per_step": syncs / steps, "profiled_step_ms": wall_ms}
    if cuda:
        figures.update(gpu_busy=sum(ms.values()) / wall_ms, gpu_ms_per_step=ms, kernels_per_step=kernels / steps)
    return figures


def time_steps(step, steps: int, warmup: int, name: str, profile_dir=None,
               profile_steps: int = 2) -> tuple[float, dict]:
    """Seconds per step() over STEPS timed steps, after WARMUP untimed ones (compilation, allocation,
    kernel selection), and with PROFILE_DIR PROFILE_STEPS more under the profiler (profile_run;
    its trace PROFILE_DIR/NAME.json.gz), which would slow the timed ones. Returns (seconds per step,
    the profile's figures or {})."""
    for i in range(warmup):
        t0 = time.perf_counter()
        step()
        cuda_sync()
        print(f"{name}: warm-up step {i + 1}/{warmup} in {time.perf_counter() - t0:.1f} s", flush=True)
    t0 = time.perf_counter()
    for _ in range(steps):
        step()
    cuda_sync()
    dt = (time.perf_counter() - t0) / steps
    if profile_dir is None:
        return dt, {}
    print(f"{name}: profiling {profile_steps} step(s)", flush=True)
    trace = Path(profile_dir) / (re.sub(r"[^A-Za-z0-9.]+", "_", name).strip("_") + ".json.gz")
    return dt, profile_run(step, profile_steps, trace)


def train_by_segment(model, ids, targets, device) -> float:
    """Plain PyTorch: one AdamW step per segment of `model.segments`' loop (bptt 1: the state is
    carried detached), bf16 autocast on a GPU. Returns trained tokens/s, leaving out the first
    step, which pays for allocation and kernel selection."""
    cuda = device.type == "cuda"
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=cuda)

    def step(*args, **kwargs):
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=cuda):
            return model(*args, **kwargs)
    t0, tokens = None, 0
    for i, out in enumerate(segments(step, ids, model.cfg.segment_len, targets)):
        out.loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        if i == 0:
            cuda_sync()
            t0 = time.perf_counter()
        else:
            tokens += out.token_loss.numel()
    cuda_sync()
    return tokens / (time.perf_counter() - t0) if tokens else float("nan")


ROOT = Path(__file__).resolve().parents[1]


def add_launch_args(p, several: bool = False):
    """The flags of a tool that runs launch/pretrain.py on 1 and N ranks (launch_pretrain); with
    SEVERAL, --gpus lists several N (2,4,8)."""
    if several:
        p.add_argument("--gpus", type=lambda s: [int(n) for n in s.split(",")], default=[2],
                       help="ranks of the multi-rank runs, e.g. 2,4,8")
    else:
        p.add_argument("--gpus", type=int, default=2, help="ranks of the multi-rank run")
    p.add_argument("--stages", default="1,2,3", help="ZeRO stages")
    p.add_argument("--launcher", choices=["deepspeed", "mpirun"], default="deepspeed")
    p.add_argument("--steps", type=int, default=60)
    p.add_argument("--port", type=int, default=29600)
    p.add_argument("--timeout", type=float, default=560)
    p.add_argument("--work", help="keep runs here (default: a temporary directory)")
    p.add_argument("--json")


def dp_ds_config(stage: int, streams: int, accum: int, gpu: bool, lr: float = 1e-3) -> dict:
    base = json.loads((ROOT / "ds_configs" / ("dp-zero2.json" if gpu else "cpu.json")).read_text())
    base.update(train_micro_batch_size_per_gpu=streams, gradient_accumulation_steps=accum,
                zero_optimization={**base.get("zero_optimization", {}), "stage": stage})
    base["scheduler"]["params"]["warmup_num_steps"] = 5
    base["optimizer"]["params"]["lr"] = lr
    base.pop("train_batch_size", None)
    return base


def launch_pretrain(ranks: int, launcher: str, port: int, out: Path, args: list[str], timeout: float) -> str:
    """Run pretrain on `ranks` processes in a process group of its own (a timeout or an interrupt
    of this process kills every child, which would otherwise keep the port and the GPU memory);
    returns its console. OUT is started afresh (--overwrite) unless ARGS resume it, so a kept
    --work can be run again."""
    fresh = [] if "--resume" in args else ["--overwrite"]
    script = [str(ROOT / "launch" / "pretrain.py"), *args, "--out", str(out), *fresh]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]),
           "FOLDSCALE_MPI_PORT": str(port),
           "OMPI_ALLOW_RUN_AS_ROOT": "1", "OMPI_ALLOW_RUN_AS_ROOT_CONFIRM": "1"}
    if launcher == "deepspeed":
        cmd = [shutil.which("deepspeed") or "deepspeed", "--num_gpus", str(ranks), "--master_port", str(port), *script]
    elif launcher == "mpirun":
        cmd = ["mpirun", "-n", str(ranks), sys.executable, *script]
    else:
        cmd = [sys.executable, *script]
    out.mkdir(parents=True, exist_ok=True)
    log = out / "console.log"
    start = log.stat().st_size if log.is_file() else 0
    with open(log, "a") as f:
        p = subprocess.Popen(cmd, env=env, stdout=f, stderr=subprocess.STDOUT, start_new_session=True)
        try:
            p.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            os.killpg(p.pid, signal.SIGKILL)
            p.wait()
        except KeyboardInterrupt:  # a session script's `timeout -s INT`: leave no rank behind
            os.killpg(p.pid, signal.SIGKILL)
            raise
    text = log.read_bytes()[start:].decode(errors="replace")  # this launch's part
    if p.returncode != 0:
        raise SystemExit(f"{' '.join(cmd)} failed ({p.returncode}):\n{text[-3000:]}")
    return text


def metrics(out: Path, key: str) -> dict[int, float]:
    """{step: value} of metric KEY in run directory OUT."""
    return {r["step"]: r[key] for r in read_metrics(out) if key in r}
