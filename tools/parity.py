"""Loss parity and stream placement across world sizes, through launch/pretrain.py as a user
launches it (issues 14 and 29): for each ZeRO stage, N ranks x B streams against 1 rank x N*B streams.
Streams are numbered globally, so both runs read the same segments into the same streams; the
loss of every step must agree within --tolerance, and the placement logs must show every stream
reading the same segments in both runs, each document's segments in order in one stream.

    python -m tools.parity --gpus 2 --stages 1,2,3 --steps 60 --launcher deepspeed
    python -m tools.parity --gpus 2 --stages 2 --steps 60 --launcher mpirun
    python -m tools.parity --gpus 8 --streams 2 --stages 2,3 --steps 60    # 8 GPUs x 2 against 1 x 16
    python -m tools.parity --quick                 # CPU, gloo: 2 ranks x 2 streams against 1 x 4
    python -m tools.parity --quick --gpus 4        # 4 ranks x 2 against 1 x 8
"""
import argparse
import json
import tempfile
import time
from pathlib import Path

import torch

from tools.benchlib import (add_launch_args, command_line, device_name, dp_ds_config, launch_pretrain, metrics,
                            print_table, synthetic_store, write_json)

PARITY_MODEL = dict(vocab_size=512, d_model=128, n_head=4, n_local=2, n_global=2, segment_len=64)


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
            cfg_path.write_text(json.dumps(dp_ds_config(stage, streams, 1, gpu)))
            out = work / f"z{stage}_r{ranks}"
            t0 = time.perf_counter()
            launch_pretrain(ranks, args.launcher if ranks > 1 else "python", args.port + stage * 10 + ranks, out,
                            ["--ds-config", str(cfg_path), "--model", str(work / "model.json"),
                             "--data", str(store.path), "--steps", str(args.steps), "--log-every", "1",
                             "--eval-every", str(10 * args.steps), "--save-every", str(10 * args.steps),
                             "--log-placement"], args.timeout)
            runs[ranks] = out
            print(f"ZeRO-{stage}: {ranks} rank(s) x {streams} streams, {time.perf_counter() - t0:.0f} s", flush=True)
        one, many = metrics(runs[1], "train/loss"), metrics(runs[args.gpus], "train/loss")
        rel = [abs(many[s] - one[s]) / abs(one[s]) for s in one]
        where_one, where_many = placement(runs[1]), placement(runs[args.gpus])
        row = {"zero": stage, "launcher": args.launcher, "gpus": args.gpus, "steps": len(one), "first_loss": one[1],
               "last_loss_1": one[max(one)], f"last_loss_{args.gpus}": many[max(many)], "max_rel_diff": max(rel),
               "same_segments": where_one == where_many, "documents_in_order": documents_stay_in_order(where_many)}
        row["ok"] = (row["max_rel_diff"] <= args.tolerance and row["same_segments"] and row["documents_in_order"]
                     and len(one) == len(many) == args.steps)
        rows.append(row)
    return rows


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_launch_args(p)
    p.add_argument("--streams", type=int, default=8, help="streams per rank of the multi-rank run")
    p.add_argument("--tolerance", type=float, default=0.02, help="largest relative loss difference")
    p.add_argument("--quick", action="store_true", help="CPU smoke test: --gpus gloo ranks (2), 6 steps, ZeRO 2")
    args = p.parse_args(argv)
    if args.quick:
        # fp32 on the CPU: the loss is normalised by the step's tokens on all ranks, so one rank's
        # losses are N ranks' up to the order of float sums
        args.stages, args.steps, args.streams, args.tolerance = "2", 6, 2, 1e-6
    with tempfile.TemporaryDirectory() as tmp:
        rows = parity(args, Path(args.work or tmp), torch.cuda.is_available())
    print(f"\n{device_name()}, parity, {args.gpus} ranks, {command_line()}")
    print_table(rows, list(rows[0]))
    write_json(args.json, rows, mode="parity")
    if not all(r["ok"] for r in rows):
        raise SystemExit("parity: a run did not match (see the table)")
    return rows


if __name__ == "__main__":
    main()
