"""What a checkpoint costs: the save a SIGTERM triggers (it must fit a preemption's grace period,
typically 30-120 s) and the resume from it, for the 3b under ds_configs/24gb.json.

Two processes of launch/pretrain.py, as a user runs them, on a synthetic store:
1. trains until its first step is logged, then gets SIGTERM: `sigterm_to_exit_s` is the time from
   the signal to the process's exit (the step under way, the save, the exit), `save_s` the save as
   the trainer logs it (DeepSpeed's files, then every rank hashing its share for COMPLETE).
2. resumes with --resume auto and stops there: `verify_s` (the manifest's checksums), `load_s`
   (DeepSpeed's load and the trainer's state), both as logged, and the whole process.
3. hashes the checkpoint's largest file with sha256 (what COMPLETE recorded before 2026-12-07)
   and with BLAKE3 on every core (now): `sha256_GB_per_s`, `blake3_GB_per_s`.
The files are read back right after they were written, so from the page cache where they fit.
The DeepSpeed JSON is the shipped one with one accumulation step (a checkpoint's size does not
depend on it) and no schedule (benchlib.speed_ds_config).

    python -m benchmarks.bench_checkpoint --json benchmarks/results/checkpoint.json   # one GPU
    python -m benchmarks.bench_checkpoint --quick                                     # CPU, toy model
"""
import argparse
import json
import os
import queue
import re
import signal
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

from foldscale import checkpoint as ckpt
from tools.benchlib import command_line, device_name, print_table, speed_ds_config, synthetic_store, write_json

ROOT = Path(__file__).resolve().parents[1]
VOCAB = 32000
TINY = dict(vocab_size=512, d_model=32, n_head=4, n_local=1, n_global=1, segment_len=16)


def pretrain(work: Path, args: list[str]) -> subprocess.Popen:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))}
    cmd = [sys.executable, str(ROOT / "launch" / "pretrain.py"), "--ds-config", str(work / "ds.json"),
           "--model", str(work / "model.json"), "--data", str(work / "store"), "--out", str(work / "run"),
           "--log-every", "1", "--eval-every", "1000000", "--save-every", "1000000", *args]
    return subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def seconds(pattern: str, text: str) -> float:
    found = re.search(pattern + r" in ([\d.]+) s", text)
    if found is None:
        raise SystemExit(f"bench_checkpoint: no '{pattern} in N s' line in launch/pretrain.py's output:\n{text[-3000:]}")
    return float(found.group(1))


def lines_of(p: subprocess.Popen) -> queue.Queue:
    """P's output lines as they come (None at its end), read by a thread: a silent process (the 3b's
    start builds DeepSpeed's CPU Adam and places 3 billion parameters) cannot block the --timeout."""
    out = queue.Queue()

    def pump():
        for line in p.stdout:
            out.put(line)
        out.put(None)

    threading.Thread(target=pump, daemon=True).start()
    return out


def read_until(p: subprocess.Popen, out: queue.Queue, deadline: float, first_step: bool) -> str:
    """P's output until its first logged step (FIRST_STEP) or its end, echoed; killed past DEADLINE."""
    text = []
    while True:
        try:
            line = out.get(timeout=max(deadline - time.perf_counter(), 0))
        except queue.Empty:
            p.kill()
            raise SystemExit(f"bench_checkpoint: launch/pretrain.py {'logged no step' if first_step else 'did not exit'}"
                             " within --timeout; raise it (the 3b's first step takes minutes)") from None
        if line is None:
            return "".join(text)
        text.append(line)
        print(line, end="", flush=True)
        if first_step and line.startswith("step 1/"):
            return "".join(text)


def measure(work: Path, timeout: float) -> dict:
    p = pretrain(work, ["--steps", "1000000", "--overwrite"])
    out = lines_of(p)
    read_until(p, out, time.perf_counter() + timeout, first_step=True)
    t0 = time.perf_counter()
    p.send_signal(signal.SIGTERM)
    rest = read_until(p, out, t0 + timeout, first_step=False)
    code = p.wait()
    sigterm_to_exit = time.perf_counter() - t0
    if code != 130:  # launch/pretrain.py's STOPPED_BY_SIGNAL: stopped cleanly, checkpoint saved
        raise SystemExit(f"bench_checkpoint: the SIGTERM'd run exited with {code}, not 130")
    checkpoint = ckpt.newest(ckpt.run_checkpoints(work / "run"))
    record = ckpt.verify(checkpoint)
    step, size = record["step"], sum(f["bytes"] for f in record["files"].values())
    t0 = time.perf_counter()
    p = pretrain(work, ["--steps", str(step), "--resume", "auto"])
    resumed = read_until(p, lines_of(p), t0 + timeout, first_step=False)
    p.wait()
    if p.returncode != 0:
        raise SystemExit(f"bench_checkpoint: the resumed run exited with {p.returncode}")
    resume_process = time.perf_counter() - t0
    largest = max((checkpoint / name for name in record["files"]), key=lambda f: f.stat().st_size)
    rates = {}
    for algorithm in ("sha256", ckpt.DIGEST):  # what COMPLETE recorded before BLAKE3, and now
        t0 = time.perf_counter()
        ckpt.digest(largest, algorithm)
        rates[f"{algorithm}_GB_per_s"] = largest.stat().st_size / 1e9 / (time.perf_counter() - t0)
    return {"checkpoint_GB": size / 1e9, "sigterm_to_exit_s": sigterm_to_exit,
            "save_s": seconds("saved checkpoint \\S+", rest), "verify_s": seconds("verified \\S+", resumed),
            "load_s": seconds(r"at step \d+ \(loaded", resumed), "resume_process_s": resume_process, **rates}


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="3b", help="a preset or a model .json (its vocabulary: 32000)")
    p.add_argument("--ds-config", default=str(ROOT / "ds_configs" / "24gb.json"))
    p.add_argument("--timeout", type=float, default=900, help="seconds each process may take")
    p.add_argument("--work", help="keep the run here (default: a temporary directory; the 3b's is ~40 GB)")
    p.add_argument("--json")
    p.add_argument("--quick", action="store_true", help="CPU smoke test: a tiny model under ds_configs/cpu.json")
    args = p.parse_args(argv)
    if args.quick:
        args.ds_config = str(ROOT / "ds_configs" / "cpu.json")
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(args.work or tmp)
        work.mkdir(parents=True, exist_ok=True)
        from foldscale.config import ModelConfig
        model = ModelConfig.from_dict(TINY) if args.quick else ModelConfig.load(args.model, vocab_size=VOCAB)
        model.to_json(work / "model.json")
        synthetic_store(work / "store", model.vocab_size, n_docs=64, doc_len=8 * model.segment_len)
        speed_ds_config(args.ds_config, work / "ds.json", gradient_accumulation_steps=1)
        row = {"model": "tiny" if args.quick else args.model, "ds_config": Path(args.ds_config).name,
               **measure(work, args.timeout)}
    print(f"\n{device_name()}, {command_line()}")
    print_table([row], list(row))
    write_json(args.json, [row])
    return [row]


if __name__ == "__main__":
    main()
