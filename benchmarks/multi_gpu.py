"""Data parallelism through launch/pretrain.py, as a user launches it (issue 14).

`parity`: for each ZeRO stage, N ranks x B streams against 1 rank x N*B streams. Streams are
numbered globally, so both runs read the same segments into the same streams; the loss of every
step must agree within --tolerance, and the placement logs must show every stream reading the
same segments in both runs, each document's segments in order in one stream.
`scaling`: tokens/s of each preset and stage on 1 GPU and on N, at the fast configuration
(32k tokens per micro-step x 4 accumulation steps): per-GPU efficiency = rate(N) / (N rate(1)).

    python -m benchmarks.multi_gpu parity --gpus 2 --stages 1,2,3 --steps 60 --launcher deepspeed
    python -m benchmarks.multi_gpu parity --gpus 2 --stages 2 --steps 60 --launcher mpirun
    python -m benchmarks.multi_gpu scaling --gpus 2 --presets 350m,1b --stages 2,3 --compile
    python -m benchmarks.multi_gpu parity --quick       # CPU, gloo: 2 ranks against 1
"""
import argparse
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

from benchmarks.benchlib import command_line, device_name, print_table, synthetic_store, write_json

ROOT = Path(__file__).resolve().parents[1]
PARITY_MODEL = dict(vocab_size=512, d_model=128, n_head=4, n_local=2, n_global=2, segment_len=64)


def ds_config(stage: int, streams: int, accum: int, gpu: bool, lr: float = 1e-3) -> dict:
    base = json.loads((ROOT / "ds_configs" / ("dp-zero2.json" if gpu else "cpu.json")).read_text())
    base.update(train_micro_batch_size_per_gpu=streams, gradient_accumulation_steps=accum,
                zero_optimization={**base.get("zero_optimization", {}), "stage": stage})
    base["scheduler"]["params"]["warmup_num_steps"] = 5
    base["optimizer"]["params"]["lr"] = lr
    base.pop("train_batch_size", None)
    return base


def launch(ranks: int, launcher: str, port: int, out: Path, args: list[str], timeout: float) -> str:
    """Run pretrain on `ranks` processes in a process group of its own (a timeout kills every
    child, which would otherwise keep the port and the GPU memory); returns its console."""
    script = [str(ROOT / "launch" / "pretrain.py"), *args, "--out", str(out)]
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
    with open(log, "w") as f:
        p = subprocess.Popen(cmd, env=env, stdout=f, stderr=subprocess.STDOUT, start_new_session=True)
        try:
            p.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            os.killpg(p.pid, signal.SIGKILL)
            p.wait()
    text = log.read_text()
    if p.returncode != 0:
        raise SystemExit(f"{' '.join(cmd)} failed ({p.returncode}):\n{text[-3000:]}")
    return text


def metrics(out: Path, key: str) -> dict[int, float]:
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    return {r["step"]: r[key] for r in rows if key in r}


def placement(out: Path) -> dict[tuple[int, int], tuple]:
    """{(step, global stream): (segment indices, token checksums)} over every rank's log."""
    table = {}
    for path in (out / "placement").glob("rank*.jsonl"):
        for line in path.read_text().splitlines():
            record = json.loads(line)
            for s in record["streams"]:
                table[record["step"], s["stream"]] = (tuple(s["seg_index"]), tuple(s["crc"]))
    return table


def documents_stay_in_order(table: dict) -> bool:
    """Every stream reads segment i + 1 of a document right after segment i, or starts a new
    document at segment 0: a document never moves to another stream or rank mid-way."""
    streams = {}
    for (step, stream), (seg, _) in sorted(table.items()):
        streams.setdefault(stream, []).extend(seg)
    return all(b == a + 1 or b == 0 for seq in streams.values() for a, b in zip(seq, seq[1:]))


def parity(args, work: Path, gpu: bool) -> list[dict]:
    store = synthetic_store(work / "store", PARITY_MODEL["vocab_size"], n_docs=400, doc_len=6 * PARITY_MODEL["segment_len"])
    (work / "model.json").write_text(json.dumps(PARITY_MODEL))
    rows = []
    for stage in map(int, args.stages.split(",")):
        runs = {}
        for ranks, streams in ((1, args.gpus * args.streams), (args.gpus, args.streams)):
            cfg_path = work / f"z{stage}_r{ranks}.json"
            cfg_path.write_text(json.dumps(ds_config(stage, streams, 1, gpu)))
            out = work / f"z{stage}_r{ranks}"
            t0 = time.perf_counter()
            launch(ranks, args.launcher if ranks > 1 else "python", args.port + stage * 10 + ranks, out,
                   ["--ds-config", str(cfg_path), "--model", str(work / "model.json"), "--data", str(store.path),
                    "--steps", str(args.steps), "--log-every", "1", "--eval-every", str(10 * args.steps),
                    "--save-every", str(10 * args.steps), "--log-placement"], args.timeout)
            runs[ranks] = out
            print(f"ZeRO-{stage}: {ranks} rank(s) x {streams} streams, {time.perf_counter() - t0:.0f} s", flush=True)
        one, many = metrics(runs[1], "train/loss"), metrics(runs[args.gpus], "train/loss")
        rel = [abs(many[s] - one[s]) / abs(one[s]) for s in one]
        where_one, where_many = placement(runs[1]), placement(runs[args.gpus])
        row = {"zero": stage, "launcher": args.launcher, "steps": len(one), "first_loss": one[1],
               "last_loss_1": one[max(one)], f"last_loss_{args.gpus}": many[max(many)], "max_rel_diff": max(rel),
               "same_segments": where_one == where_many, "documents_in_order": documents_stay_in_order(where_many)}
        row["ok"] = (row["max_rel_diff"] <= args.tolerance and row["same_segments"] and row["documents_in_order"]
                     and len(one) == len(many) == args.steps)
        rows.append(row)
    return rows


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
                cfg_path.write_text(json.dumps(ds_config(stage, streams, args.accum, gpu, lr=3e-4)))
                out = work / f"{preset}_z{stage}_r{ranks}"
                launch(ranks, args.launcher if ranks > 1 else "python", args.port + stage * 10 + ranks, out,
                       ["--ds-config", str(cfg_path), "--model", preset, "--data", str(store.path),
                        "--steps", str(args.steps), "--log-every", "1", "--eval-every", str(10 * args.steps),
                        "--save-every", str(10 * args.steps)] + (["--compile"] if args.compile else []), args.timeout)
                rate[ranks] = steady_rate(out, args.skip)
                print(f"{preset} ZeRO-{stage} {ranks} GPU(s): {rate[ranks][0]:,.0f} tokens/s", flush=True)
            rows.append({"preset": preset, "zero": stage, "compile": args.compile, "tokens_per_gpu_step": streams * cfg.segment_len * args.accum,
                         "tok_s_1": rate[1][0], f"tok_s_{args.gpus}": rate[args.gpus][0],
                         "mfu_1": rate[1][1], f"mfu_{args.gpus}": rate[args.gpus][1],
                         "per_gpu_efficiency": rate[args.gpus][0] / (args.gpus * rate[1][0])})
    return rows


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("mode", choices=["parity", "scaling"])
    p.add_argument("--gpus", type=int, default=2, help="ranks of the multi-rank run")
    p.add_argument("--stages", default="1,2,3")
    p.add_argument("--launcher", choices=["deepspeed", "mpirun"], default="deepspeed")
    p.add_argument("--steps", type=int, default=60)
    p.add_argument("--streams", type=int, default=8, help="parity: streams per rank of the multi-rank run")
    p.add_argument("--tolerance", type=float, default=0.02, help="parity: largest relative loss difference")
    p.add_argument("--presets", default="350m")
    p.add_argument("--tokens", type=int, default=32768, help="scaling: tokens per GPU per micro-step")
    p.add_argument("--accum", type=int, default=4)
    p.add_argument("--skip", type=int, default=4, help="scaling: logged steps left out (compilation, warm-up)")
    p.add_argument("--compile", action="store_true")
    p.add_argument("--port", type=int, default=29600)
    p.add_argument("--timeout", type=float, default=560)
    p.add_argument("--work", help="keep runs here (default: a temporary directory)")
    p.add_argument("--json")
    p.add_argument("--quick", action="store_true", help="CPU smoke test: parity of 2 gloo ranks, 6 steps, ZeRO 2")
    args = p.parse_args(argv)
    gpu = torch.cuda.is_available()
    if args.quick:
        # fp32 on the CPU: the loss is normalised by the step's tokens on all ranks, so one rank's
        # losses are N ranks' up to the order of float sums
        args.mode, args.stages, args.steps, args.streams, args.tolerance = "parity", "2", 6, 2, 1e-6
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(args.work or tmp)
        rows = parity(args, work, gpu) if args.mode == "parity" else scaling(args, work, gpu)
    print(f"\n{device_name()}, {args.mode}, {args.gpus} ranks, {command_line()}")
    print_table(rows, list(rows[0]))
    write_json(args.json, rows, mode=args.mode, command=command_line())
    if args.mode == "parity" and not all(r["ok"] for r in rows):
        raise SystemExit("parity: a run did not match (see the table)")
    return rows


if __name__ == "__main__":
    main()
