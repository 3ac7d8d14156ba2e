"""Elastic resume through launch/pretrain.py as a user runs it (issues 14 and 29): N -> N/2 -> N
ranks. One run does --steps steps on N ranks x B streams; the other does a third of them on N
ranks, the next third on N/2 ranks x 2B streams and the rest on N ranks again, each leg after the
first resumed with `--resume auto` (the streams re-dealt, ZeRO 1-2 re-sharded through DeepSpeed's
universal checkpoint). Every (step, global stream) must read the same segments in both runs, and
every step's loss agree within --tolerance. ZeRO 0-2: a ZeRO-3 checkpoint resumes only on the
ranks that wrote it.

    python -m tools.elastic --gpus 8 --launcher deepspeed     # 8 -> 4 -> 8 GPUs, ZeRO-2, bf16
    python -m tools.elastic --gpus 8 --launcher mpirun
    python -m tools.elastic --quick                           # CPU, gloo: 2 -> 1 -> 2 ranks, fp32
"""
import argparse
import json
import tempfile
import time
from pathlib import Path

import torch

from tools.benchlib import (add_launch_args, command_line, device_name, dp_ds_config, launch_pretrain, metrics,
                            print_table, synthetic_store, write_json)
from tools.parity import PARITY_MODEL, documents_stay_in_order, placement


def elastic(args, work: Path, gpu: bool) -> list[dict]:
    store = synthetic_store(work / "store", PARITY_MODEL["vocab_size"], n_docs=400, doc_len=6 * PARITY_MODEL["segment_len"])
    (work / "model.json").write_text(json.dumps(PARITY_MODEL))
    full, half, third = args.gpus, args.gpus // 2, args.steps // 3
    streams = full * args.streams
    rows = []
    for stage in map(int, args.stages.split(",")):
        configs = {}
        for ranks in (full, half):
            cfg = dp_ds_config(stage, streams // ranks, 1, gpu)
            cfg["scheduler"]["params"]["total_num_steps"] = args.steps  # one schedule for every leg
            configs[ranks] = work / f"z{stage}_r{ranks}.json"
            configs[ranks].write_text(json.dumps(cfg))
        straight, split = work / f"z{stage}_straight", work / f"z{stage}_split"
        legs = [(straight, full, args.steps), (split, full, third), (split, half, 2 * third), (split, full, args.steps)]
        redealt = []
        for i, (out, ranks, steps) in enumerate(legs):
            t0 = time.perf_counter()
            console = launch_pretrain(
                ranks, args.launcher if ranks > 1 else "python", args.port + 10 * stage + i, out,
                ["--ds-config", str(configs[ranks]), "--model", str(work / "model.json"), "--data", str(store.path),
                 "--steps", str(steps), "--log-every", "1", "--eval-every", str(10 * args.steps),
                 "--save-every", str(10 * args.steps), "--log-placement"] + (["--resume", "auto"] if i > 1 else []),
                args.timeout)
            redealt += [line for line in console.splitlines() if "re-dealing" in line][:1]  # rank 0's
            print(f"ZeRO-{stage}: {out.name} to step {steps} on {ranks} rank(s) x {streams // ranks} streams, "
                  f"{time.perf_counter() - t0:.0f} s", flush=True)
        print("\n".join(redealt), flush=True)
        a, b = metrics(straight, "train/loss"), metrics(split, "train/loss")
        rel = {s: abs(b[s] - a[s]) / abs(a[s]) for s in a if s in b}
        where_a, where_b = placement(straight), placement(split)
        row = {"zero": stage, "launcher": args.launcher, "ranks": f"{full} -> {half} -> {full}", "streams": streams,
               "steps": len(rel), "max_rel_diff_before": max(rel[s] for s in rel if s <= third),
               "max_rel_diff": max(rel.values()), "same_segments": where_a == where_b,
               "segments_checked": len(where_b), "documents_in_order": documents_stay_in_order(where_b),
               "redealt": len(redealt)}
        row["ok"] = (row["max_rel_diff"] <= args.tolerance and row["same_segments"] and row["documents_in_order"]
                     and len(a) == len(b) == args.steps and len(where_b) == args.steps * streams and len(redealt) == 2)
        rows.append(row)
    return rows


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_launch_args(p)
    p.set_defaults(stages="2", steps=12, port=29700)
    p.add_argument("--streams", type=int, default=4, help="streams per rank on N ranks (twice that on N/2)")
    p.add_argument("--tolerance", type=float, default=0.02, help="largest relative loss difference")
    p.add_argument("--quick", action="store_true", help="CPU smoke test: --gpus gloo ranks (2), 6 steps, ZeRO 2")
    args = p.parse_args(argv)
    if args.quick:
        # fp32 on the CPU: the loss is normalised by the step's tokens on all ranks, so N/2 ranks'
        # losses are N ranks' up to the order of float sums
        args.steps, args.streams, args.tolerance = 6, 2, 1e-6
    if args.gpus < 2 or args.gpus % 2:
        p.error(f"--gpus {args.gpus}: give an even number of ranks, 2 or more (the middle leg runs on half)")
    if 3 in map(int, args.stages.split(",")):
        p.error("--stages: a ZeRO-3 checkpoint resumes only on the number of ranks that wrote it; give 0, 1 or 2")
    with tempfile.TemporaryDirectory() as tmp:
        rows = elastic(args, Path(args.work or tmp), torch.cuda.is_available())
    print(f"\n{device_name()}, elastic, {command_line()}")
    print_table(rows, list(rows[0]))
    write_json(args.json, rows, mode="elastic")
    if not all(r["ok"] for r in rows):
        raise SystemExit("elastic: the resumed run did not match the uninterrupted one (see the table)")
    return rows


if __name__ == "__main__":
    main()
