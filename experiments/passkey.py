"""Passkey retrieval, the original synthetic form: does the carried state remember a 5-digit
key across D tokens of filler?

Each sequence is `KEY d1..d5 <D filler tokens> QUERY d1..d5` over a 32-token vocabulary, the key
always at the start and the filler random tokens; the loss counts only the five answer digits.
The long-context suite (experiments/suite.py) holds the hard forms: the key at any depth in
real text, several keys, bAbI facts. A small FoldedLM is trained with the suite's curriculum
trainer (experiments/longctx/train.py: backpropagation through every segment of a sequence, or
the last --bptt-segments, over 2 -> 4 -> ... -> --max-train-segments segments), then evaluated at
distances far past the training length. The same weights with the state cut
(`ModelConfig.local_only()`) must fall to chance (1e-5) once the key is in an earlier segment:
that is what shows the test measures memory. `--baseline` also trains a plain GPT
(`ModelConfig.full_attention`) whose window covers the longest training sequence, with the
same time budget.

    python -m experiments.passkey --state-norm --state-gate --min-lr-ratio 0.1 --minutes 6    # one H100
    python -m experiments.passkey --quick                                                     # CPU smoke test

Plain PyTorch (AdamW, bf16 autocast on GPU), one process.
"""
import argparse
import dataclasses
import time

import torch

from tools.benchlib import device_name, print_table, write_json
from experiments.longctx.train import TrainArgs, score, train
from foldscale.config import ModelConfig
from foldscale.flags import add_fields, check, from_args
from foldscale.model import FoldedLM

KEY_LEN = 5
PAD, FIRST_DIGIT, FIRST_FILLER = 0, 1, 11  # digits are tokens 1..10, filler 11..V-3


@dataclasses.dataclass(frozen=True)
class Vocab:
    """Token layout: pad 0, digits 1..10, filler 11..size-3, KEY size-2, QUERY size-1."""
    size: int = 32

    def __post_init__(self):
        if self.size < FIRST_FILLER + 4:
            raise ValueError(f"vocab size {self.size} leaves fewer than 2 filler tokens; use >= 15")

    @property
    def key(self) -> int:
        return self.size - 2

    @property
    def query(self) -> int:
        return self.size - 1


def sequence_len(distance: int) -> int:
    return 1 + KEY_LEN + distance + 1 + KEY_LEN


def make_batch(n: int, distance: int, vocab: Vocab, generator: torch.Generator):
    """n sequences `KEY key <distance filler> QUERY key`, all of length sequence_len(distance).

    Returns (ids, targets), both (n, T) int64. targets are -100 except at QUERY and the first four
    answer digits, whose targets are the five key digits: the model is scored on the answer only.
    The filler is drawn from several tokens so that "copy the token before QUERY" cannot work.
    """
    key = torch.randint(FIRST_DIGIT, FIRST_DIGIT + 10, (n, KEY_LEN), generator=generator)
    filler = torch.randint(FIRST_FILLER, vocab.key, (n, distance), generator=generator)
    key_mark = torch.full((n, 1), vocab.key)
    query_mark = torch.full((n, 1), vocab.query)
    ids = torch.cat([key_mark, key, filler, query_mark, key], dim=1)  # (n, T)
    targets = torch.full_like(ids, -100)
    targets[:, -KEY_LEN - 1:-1] = key
    return ids, targets


@torch.no_grad()
def evaluate(model: FoldedLM, vocab: Vocab, distance: int, samples: int, batch_size: int, device, seed: int) -> float:
    """Exact-key accuracy at one distance; the same sequences for every model (fixed seed)."""
    generator = torch.Generator().manual_seed(seed)
    right = 0
    for start in range(0, samples, batch_size):
        n = min(batch_size, samples - start)
        ids, targets = make_batch(n, distance, vocab, generator)
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda"):
            right += int(score(model, ids.to(device), targets).exact.sum())
    return right / samples


QUICK = dict(d_model=32, n_head=2, n_local=1, n_global=1, segment_len=8, batch_size=8, steps=30,
             max_train_segments=4, log_every=10, window=10, eval_multiples="1,2,4,8", eval_samples=16,
             device="cpu")


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_fields(p, ModelConfig, skip=("use_state",), vocab_size=32, d_model=256, n_head=4, n_local=2, n_global=2,
               segment_len=64, bptt_segments=None)  # None: every segment of a sequence (--max-train-segments)
    add_fields(p, TrainArgs)
    p.add_argument("--eval-multiples", "--eval_multiples", default="1,2,4,8,16,32,64,128,256,512,1024",
                   help="distances D as multiples of segment_len")
    p.add_argument("--eval-samples", "--eval_samples", type=int, default=100)
    p.add_argument("--eval-batch", "--eval_batch", type=int, default=100)
    p.add_argument("--baseline", action="store_true",
                   help="also train a full-attention GPT (window = max_train_segments * segment_len)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    p.add_argument("--json", default=None, help="write the table, config and training summary here")
    p.add_argument("--quick", action="store_true", help=f"CPU smoke test in seconds; sets {QUICK}")
    args = p.parse_args(argv)
    if args.quick:
        vars(args).update(QUICK)
        torch.set_num_threads(1)  # toy tensors gain nothing from threads, which spin on a busy CPU
    check(p, TrainArgs, args)
    return args


def main(argv=None):
    args = parse_args(argv)
    device = torch.device("cuda" if args.device == "auto" and torch.cuda.is_available()
                          else "cpu" if args.device == "auto" else args.device)
    torch.backends.cuda.matmul.allow_tf32 = True
    vocab = Vocab(args.vocab_size)
    targs = from_args(TrainArgs, args)
    cfg = from_args(ModelConfig, args, bptt_segments=args.bptt_segments or args.max_train_segments)
    l = cfg.segment_len
    print(f"passkey on {device_name() if device.type == 'cuda' else 'CPU'}: {cfg.num_params():,} parameters, "
          f"l={l}, training up to {args.max_train_segments} segments for {args.minutes} min", flush=True)

    def batch_of_length(n, length, generator):
        return make_batch(n, max(1, length - sequence_len(0)), vocab, generator)

    models, summaries = {}, {}
    torch.manual_seed(args.seed)
    models["folded"] = FoldedLM(cfg).to(device)
    summaries["folded"] = train(models["folded"], batch_of_length, targs, l, device, args.seed, "folded")
    models["local_only"] = FoldedLM(cfg.local_only()).to(device).eval()
    models["local_only"].load_state_dict(models["folded"].state_dict())
    if args.baseline:
        torch.manual_seed(args.seed)
        models["full_attention"] = FoldedLM(cfg.full_attention(args.max_train_segments * l)).to(device)
        summaries["full_attention"] = train(models["full_attention"], batch_of_length, targs, l, device, args.seed,
                                            "full_attention")

    rows = []
    multiples = [int(m) for m in args.eval_multiples.split(",")]
    t0 = time.perf_counter()
    for i, m in enumerate(multiples):
        distance = m * l
        row = {"distance": distance, "multiple": m}
        eval_seed = args.seed + 1000 + m
        run = lambda model: evaluate(model, vocab, distance, args.eval_samples, args.eval_batch, device, eval_seed)  # noqa: E731
        row["folded"] = run(models["folded"])
        row["local_only"] = run(models["local_only"])
        if args.baseline:
            fits = sequence_len(distance) <= models["full_attention"].cfg.segment_len
            row["full_attention"] = run(models["full_attention"]) if fits else None
        rows.append(row)
        print(f"eval D={distance} ({m} l): " + ", ".join(f"{k} {v}" for k, v in row.items() if k not in ("distance", "multiple"))
              + f" | {(time.perf_counter() - t0) / 60:.1f} min, {i + 1}/{len(multiples)}", flush=True)

    columns = ["distance", "multiple", "folded", "local_only"] + (["full_attention"] if args.baseline else [])
    print_table([{k: "n/a" if v is None else v for k, v in r.items()} for r in rows], columns)
    write_json(args.json, rows, task="passkey", seed=args.seed, data_seed=args.seed + 1,
               eval_seeds={m: args.seed + 1000 + m for m in multiples}, chance=10.0 ** -KEY_LEN,
               args=vars(args), model=cfg.to_dict(),
               baseline_model=models["full_attention"].cfg.to_dict() if args.baseline else None,
               train=summaries, eval_minutes=round((time.perf_counter() - t0) / 60, 2))
    return rows


if __name__ == "__main__":
    main()
