"""Pretrain a folded model.

    deepspeed launch/pretrain.py --ds-config ds_configs/24gb.json [--model PRESET|model.json]
        [--data STORE] [--out RUN_DIR] [--steps N] [--resume auto|PATH]
    mpirun -n 2 python launch/pretrain.py --ds-config ds_configs/cpu.json ...
    python launch/pretrain.py --ds-config ds_configs/cpu.json          # one process

With no --data, the built-in corpus (the Python standard library's source) is built once and used.
Flags are spelled with dashes; the underscore spellings (--ds_config) work too.
"""
import argparse
import ctypes
import os
import sys
from pathlib import Path

from foldscale import checkpoint as ckpt
from foldscale.config import PRESETS, ConfigError, DataConfig, FoldscaleError, ModelConfig, TrainConfig
from foldscale.data import TokenStore, default_store
from foldscale.engine import close_distributed, init_distributed, load_ds_config
from foldscale.flags import add_fields, flag, from_args
from foldscale.rundir import claimed
from foldscale.trainer import Trainer

STOPPED_BY_SIGNAL = 130
"""Exit status of a run stopped by SIGINT/SIGTERM after saving its checkpoint (128 + SIGINT, as
shells report a Ctrl-C). The deepspeed launcher turns any Ctrl-C into its own status 1."""


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument(*flag("ds_config"), required=True, help="DeepSpeed JSON: batch, ZeRO, precision, optimizer")
    p.add_argument("--model", default="default", help="a preset (foldscale info PRESET) or a model .json")
    p.add_argument("--data", help="token store from `foldscale prepare` (default: the built-in corpus)")
    p.add_argument("--resume", help="'auto' (the newest checkpoint in --out that verifies, skipping damaged ones "
                                    "with a warning) or a checkpoint dir")
    p.add_argument("--overwrite", action="store_true",
                   help="start afresh in an --out that holds an earlier run, deleting its checkpoints and metrics")
    p.add_argument("--local_rank", type=int, default=-1, help=argparse.SUPPRESS)  # from the deepspeed launcher
    p.add_argument(*flag("collective_timeout"), type=float, default=600.0,
                   help="seconds before a collective fails (so a dead rank stops the others)")
    p.add_argument(*flag("bptt_segments"), type=int, help="override the model's bptt_segments")
    add_fields(p, TrainConfig)
    return p.parse_args(argv)


def run(args) -> bool:
    """Train; True when the run was stopped by a signal (after saving its checkpoint)."""
    train_cfg = from_args(TrainConfig, args)
    rank, world_size = init_distributed(args.collective_timeout, train_cfg.gpu_mem_gib)
    ds_config = load_ds_config(args.ds_config, world_size, train_cfg.steps, extend_from=_schedule_to_extend(args))
    # --data is hashed in full (~1 s per GB); the built-in corpus is verified by default_store()
    store = TokenStore.open(args.data).verify() if args.data else TokenStore.open(default_store())
    # A preset is a shape: its vocabulary comes with the data. A model .json must match the data.
    vocab = store.vocab_size if args.model in PRESETS else None
    model_cfg = ModelConfig.load(args.model, bptt_segments=args.bptt_segments, vocab_size=vocab)
    store.check_compatible(model_cfg.vocab_size)
    with claimed(train_cfg.out, rank, args.resume, args.overwrite):
        trainer = Trainer(model_cfg, DataConfig(str(store.path)), train_cfg, ds_config, store, rank, world_size,
                          resume=args.resume)
        try:
            trainer.train()
            if trainer.stopping:
                trainer.log(f"stopped cleanly, checkpoint saved: exit status {STOPPED_BY_SIGNAL} (under the "
                            "deepspeed launcher, its own 1)")
            else:
                trainer.log(f"done at step {trainer.step}. Export and evaluate it with: foldscale export "
                            f"{train_cfg.out} --out MODEL_DIR && foldscale eval MODEL_DIR --data {store.path}")
        finally:
            trainer.close()
    return trainer.stopping


def _schedule_to_extend(args) -> dict | None:
    """With --extend-schedule, the resolved scheduler of the checkpoint --resume takes."""
    if not args.extend_schedule:
        return None
    if not args.resume:
        raise ConfigError("--extend-schedule goes on with a checkpoint's schedule: add --resume auto")
    root = ckpt.run_checkpoints(args.out)
    path = Path(args.resume) if args.resume != "auto" else ckpt.newest_complete(root)
    if path is None:
        raise ConfigError(f"--extend-schedule: no checkpoint in {root} to go on from")
    return ckpt.read_config(path, "ds_config.json").get("scheduler", {})


def main(argv=None):
    args = parse_args(argv)
    try:
        stopped = run(args)
    except FoldscaleError as e:
        print(f"pretrain: error: {e}", file=sys.stderr, flush=True)
        sys.exit(2)
    finally:
        close_distributed()
    if stopped:
        sys.exit(STOPPED_BY_SIGNAL)


def leave(status) -> None:
    """Exit with STATUS (as sys.exit takes it) without the interpreter's teardown. By then the
    checkpoint is saved, the logs are closed and the process group is left; what teardown still
    destroys is library threads (gloo's, DeepSpeed's). In CPU runs of 2-4 ranks one of them now and
    then aborted a rank that had finished ("terminate called without an active exception", about
    1 run in 40), and with it the whole job.

    Under mpirun (MPICH's hydra) a rank whose connection to the launcher closes before it says
    goodbye makes the launcher kill the ranks still running (signal 9). MPICH says goodbye
    (PMI_Finalize) in a C atexit handler, after MPI_Finalize, so a run that ends as planned
    finalizes MPI and leaves through C's exit(), which runs those handlers and not the
    interpreter's teardown. A rank that fails does not: there the launcher stopping the others at
    once is what we want."""
    if isinstance(status, str):
        print(status, file=sys.stderr)
    sys.stdout.flush()
    sys.stderr.flush()
    code = status if isinstance(status, int) else 0 if status is None else 1
    mpi = sys.modules.get("mpi4py.MPI")  # imported by DeepSpeed's MPI discovery under mpirun
    if code in (0, STOPPED_BY_SIGNAL) and mpi is not None and mpi.Is_initialized() and not mpi.Is_finalized():
        mpi.Finalize()
        ctypes.CDLL(None).exit(code)
    os._exit(code)


if __name__ == "__main__":
    try:
        main()
        leave(0)
    except SystemExit as e:
        leave(e.code)
