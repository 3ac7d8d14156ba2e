"""Pretrain a folded model.

    deepspeed launch/pretrain.py --ds_config ds_configs/24gb.json [--model PRESET|model.json]
        [--data STORE] [--out RUN_DIR] [--steps N] [--resume auto|PATH]
    mpirun -n 2 python launch/pretrain.py --ds_config ds_configs/cpu.json ...
    python launch/pretrain.py --ds_config ds_configs/cpu.json          # one process

With no --data, the built-in corpus (the Python standard library's source) is built once and used.
"""
import argparse
import dataclasses
import sys

from foldscale.config import PRESETS, ConfigError, DataConfig, ModelConfig, TrainConfig
from foldscale.data import StoreError, TokenStore, default_store
from foldscale.engine import init_distributed, load_ds_config
from foldscale.trainer import Trainer, TrainingError


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--ds_config", required=True, help="DeepSpeed JSON: batch, ZeRO, precision, optimizer")
    p.add_argument("--model", default="default", help="a preset (foldscale info PRESET) or a model .json")
    p.add_argument("--data", help="token store from `foldscale prepare` (default: the built-in corpus)")
    p.add_argument("--out", default=TrainConfig.out, help="run directory: checkpoints, TensorBoard")
    p.add_argument("--resume", help="'auto' (newest complete checkpoint in --out, if any) or a checkpoint dir")
    p.add_argument("--local_rank", type=int, default=-1, help=argparse.SUPPRESS)  # from the deepspeed launcher
    p.add_argument("--collective_timeout", type=float, default=600.0,
                   help="seconds before a collective fails (so a dead rank stops the others)")
    for f in ("steps", "log_every", "eval_every", "eval_segments", "save_every", "keep_last", "max_bad_steps", "seed"):
        p.add_argument(f"--{f}", type=int, default=getattr(TrainConfig, f))
    p.add_argument("--compile", action="store_true", help="torch.compile the model (GPU)")
    p.add_argument("--bptt_segments", type=int, help="override the model's bptt_segments")
    p.add_argument("--streams_per_rank", type=int,
                   help="must equal the DeepSpeed JSON's train_micro_batch_size_per_gpu if given")
    return p.parse_args(argv)


def open_store(data):
    return TokenStore.open(data if data else default_store())


def main(argv=None):
    args = parse_args(argv)
    try:
        train_cfg = TrainConfig(**{f.name: getattr(args, f.name) for f in dataclasses.fields(TrainConfig)})
        data_cfg = DataConfig(store=args.data, streams_per_rank=args.streams_per_rank, seed=args.seed)
        model_cfg = ModelConfig.load(args.model, bptt_segments=args.bptt_segments)
        rank, world_size = init_distributed(args.collective_timeout)
        ds_config = load_ds_config(args.ds_config, world_size, train_cfg.steps, data_cfg.streams_per_rank)
        store = open_store(args.data)
        if args.model in PRESETS:
            model_cfg.vocab_size = store.vocab_size  # a preset is a shape; the vocabulary comes with the data
        store.check_compatible(model_cfg.vocab_size)
        trainer = Trainer(model_cfg, data_cfg, train_cfg, ds_config, store, rank, world_size)
        if args.resume:
            trainer.resume(args.resume)
        trainer.train()
        trainer.close()
    except (ConfigError, StoreError, TrainingError) as e:
        print(f"pretrain: error: {e}", file=sys.stderr, flush=True)
        sys.exit(2)


if __name__ == "__main__":
    main()
