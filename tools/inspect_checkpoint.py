"""What a checkpoint holds and whether it is intact: its step and world size, the model, schedule
and batch it was trained with, its files, and the verdict of the check that resume and export
make (`checkpoint.verify`: every file's size and digest against COMPLETE).

    python -m tools.inspect_checkpoint runs/default                       # its newest checkpoint
    python -m tools.inspect_checkpoint runs/default/checkpoints/step00000500 --json

Exits 0 when the checkpoint verifies, 1 when it does not (the problem is printed), 2 when there
is no such directory or run.
"""
import argparse
import json
import sys
from pathlib import Path

from foldscale import checkpoint as ckpt


def inspect(path) -> dict:
    """{checkpoint, verifies, problem, step, world_size, bytes, files, model, schedule, batch}
    of checkpoint PATH, or of the newest one of run directory PATH."""
    path = Path(path)
    if not path.is_dir():
        raise ckpt.CheckpointError(f"{path}: no such run or checkpoint directory")
    if ckpt.run_checkpoints(path).is_dir():
        path = ckpt.newest(ckpt.run_checkpoints(path))
    info = {"checkpoint": str(path), "verifies": True, "problem": None}
    try:
        record = ckpt.verify(path)
    except ckpt.CheckpointError as e:
        info.update(verifies=False, problem=str(e))
        return info
    files = {name: f["bytes"] for name, f in record["files"].items()}
    ds = ckpt.read_config(path, "ds_config.json")
    info.update(step=record["step"], world_size=record["world_size"], bytes=sum(files.values()), files=files,
                model=ckpt.read_config(path, "model.json"), schedule=ds.get("scheduler"),
                batch={k: ds.get(k) for k in ("train_micro_batch_size_per_gpu", "gradient_accumulation_steps")})
    return info


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("path", help="a run directory (its newest checkpoint) or a checkpoint directory")
    p.add_argument("--json", action="store_true", help="print the record as JSON")
    args = p.parse_args(argv)
    try:
        info = inspect(args.path)
    except ckpt.CheckpointError as e:
        print(f"inspect_checkpoint: error: {e}", file=sys.stderr)
        sys.exit(2)
    if args.json:
        print(json.dumps(info, indent=1))
    elif not info["verifies"]:
        print(f"{info['checkpoint']}: does not verify: {info['problem']}")
    else:
        m = info["model"]
        print(f"{info['checkpoint']}: verifies; step {info['step']}, saved by {info['world_size']} rank(s), "
              f"{len(info['files'])} files, {info['bytes'] / 2**20:,.1f} MiB")
        print(f"model: d_model {m['d_model']}, {m['n_local']} local + {m['n_global']} global blocks, "
              f"l = {m['segment_len']}, bptt {m['bptt_segments']}, vocab {m['vocab_size']}")
        print(f"batch: {info['batch']}; schedule: {json.dumps(info['schedule'])}")
    sys.exit(0 if info["verifies"] else 1)


if __name__ == "__main__":
    main()
