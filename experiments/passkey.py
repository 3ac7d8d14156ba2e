"""Passkey retrieval: does the carried state remember a 5-digit key across D tokens of filler?

Each sequence is `KEY d1..d5 <D filler tokens> QUERY d1..d5`; the loss counts only the five
answer digits. A small FoldedLM is trained with backpropagation through every segment of a
sequence (or the last --bptt), under a curriculum over the number of segments (2 -> 4 -> ...
-> --max_train_segments), then evaluated at distances far past the training length. The same weights with the state cut
(`use_state=False`, the local-only ablation) must fall to chance (1e-5) once the key is in an
earlier segment: that is what shows the test measures memory. `--baseline` also trains a plain
GPT whose window covers the longest training sequence, with the same time budget.

    python tools/passkey.py --state_norm --state_gate --min_lr_ratio 0.1 --minutes 6    # one H100
    python tools/passkey.py --quick                                                     # CPU smoke test

Plain PyTorch (AdamW, bf16 autocast on GPU), one process.
"""
import argparse
import dataclasses
import math
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

from benchlib import device_name, print_table, write_json  # noqa: E402
from foldscale.config import ModelConfig  # noqa: E402
from foldscale.model import FoldedLM  # noqa: E402

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


def answer_logits(model: FoldedLM, ids: torch.Tensor, bptt: int = 0) -> torch.Tensor:
    """Logits (B, 5, V) at the five answer positions (QUERY and d1..d4), segment by segment.

    Under grad the loss backpropagates through the last `bptt` segments' states counted back
    from the end (0: through every segment); under no_grad only one segment's activations are
    alive, so memory does not grow with the distance. The answer positions are the last six
    tokens but one, known from the sequence length alone (no host sync), and may straddle two
    segments.
    """
    T, seg = ids.shape[1], model.cfg.segment_len
    first = T - KEY_LEN - 1  # position of QUERY
    n_seg = -(-T // seg)
    state, pieces = None, []
    for i, start in enumerate(range(0, T, seg)):
        if bptt and state is not None and n_seg - i == bptt:
            state = state.detach()  # the gradient stops here: `bptt` segments before the end
        out = model(ids[:, start:start + seg], state=state)
        state = out.state
        lo, hi = max(first, start), min(T - 1, start + seg)
        if lo < hi:
            pieces.append(out.logits[:, lo - start:hi - start])
    return torch.cat(pieces, dim=1)


def score(model: FoldedLM, ids: torch.Tensor, targets: torch.Tensor, bptt: int = 0):
    """(mean cross-entropy over answer digits, (B,) bool: all five digits right by argmax)."""
    logits = answer_logits(model, ids, bptt).float()  # (B, 5, V)
    answer = targets[:, -KEY_LEN - 1:-1]  # (B, 5)
    loss = F.cross_entropy(logits.flatten(0, 1), answer.flatten())
    exact = (logits.argmax(-1) == answer).all(dim=1)
    return loss, exact


@dataclasses.dataclass
class TrainArgs:
    batch_size: int = 64
    lr: float = 1e-3
    warmup_steps: int = 100
    weight_decay: float = 0.1
    grad_clip: float = 1.0
    minutes: float = 8.0
    """Wall-time budget for training; evaluation comes after it."""
    steps: int | None = None
    """Stop after this many steps even if time is left."""
    start_segments: int = 2
    max_train_segments: int = 32
    """Training sequences are never longer than this many segments of the folded model."""
    bptt: int = 0
    """Backpropagate through the state for this many segments before the answer (0: all)."""
    min_lr_ratio: float = 1.0
    """Cosine decay of the learning rate over the time budget down to lr * this (1: constant)."""
    advance_at: float = 0.95
    """Exact-key training accuracy over the last `window` steps that unlocks the next stage."""
    window: int = 50
    log_every: int = 25
    """Steps between progress lines, which are also when the curriculum gate is checked."""


def sample_segments(max_segments: int, start_segments: int, generator: torch.Generator) -> int:
    """Half the steps at the stage's longest length, half spread over shorter ones: the gate then
    watches the hardest length while earlier lengths are not forgotten."""
    if max_segments <= start_segments or torch.rand((), generator=generator) < 0.5:
        return max_segments
    return int(torch.randint(start_segments, max_segments + 1, (), generator=generator))


def lr_at(args: TrainArgs, step: int, progress: float) -> float:
    """Linear warm-up over warmup_steps, then cosine from lr to lr * min_lr_ratio as `progress`
    (the fraction of the time or step budget spent) goes from 0 to 1."""
    cosine = args.min_lr_ratio + (1 - args.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * min(progress, 1.0)))
    return args.lr * min(1.0, (step + 1) / args.warmup_steps) * cosine


def train(model: FoldedLM, vocab: Vocab, args: TrainArgs, l: int, device, seed: int, name: str) -> dict:
    """Train on passkey sequences of up to args.max_train_segments * l tokens with a curriculum
    over the number of segments (of the folded model's length l, also for a baseline). Returns a
    summary: steps, minutes, the stages reached and when."""
    generator = torch.Generator().manual_seed(seed + 1)
    opt = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=args.weight_decay,
                            fused=device.type == "cuda")
    max_segments, recent, stages = args.start_segments, [], [{"segments": args.start_segments, "step": 0, "minutes": 0.0}]
    step, tokens, t0 = 0, 0, time.perf_counter()
    budget = args.minutes * 60
    model.train()
    while time.perf_counter() - t0 < budget and (args.steps is None or step < args.steps):
        n_seg = sample_segments(max_segments, args.start_segments, generator)
        length = int(torch.randint((n_seg - 1) * l + 1, n_seg * l + 1, (), generator=generator))
        distance = max(1, length - sequence_len(0))
        ids, targets = (x.to(device) for x in make_batch(args.batch_size, distance, vocab, generator))
        progress = step / args.steps if args.steps else (time.perf_counter() - t0) / budget
        for group in opt.param_groups:
            group["lr"] = lr_at(args, step, progress)
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda"):
            loss, exact = score(model, ids, targets, args.bptt)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), args.grad_clip)
        opt.step()
        opt.zero_grad(set_to_none=True)
        step, tokens = step + 1, tokens + ids.numel()
        if n_seg == max_segments:
            recent = (recent + [exact.float().mean()])[-args.window:]
        if step % args.log_every == 0:  # the only host sync: the GPU runs ahead between log lines
            acc = torch.stack(recent).mean().item() if recent else 0.0
            elapsed = time.perf_counter() - t0
            print(f"[{name}] step {step} | stage {max_segments} seg | loss {loss.item():.3f} | "
                  f"acc@{max_segments} {acc:.3f} | lr {opt.param_groups[0]['lr']:.2e} | {tokens / elapsed:,.0f} tok/s | "
                  f"{elapsed / 60:.1f}/{args.minutes:.1f} min", flush=True)
            if len(recent) == args.window and acc >= args.advance_at and max_segments < args.max_train_segments:
                max_segments = min(2 * max_segments, args.max_train_segments)
                recent = []
                stages.append({"segments": max_segments, "step": step, "minutes": round(elapsed / 60, 2)})
                print(f"[{name}] accuracy {acc:.3f} at {stages[-2]['segments']} segments -> "
                      f"stage {max_segments} segments", flush=True)
    model.eval()
    return {"steps": step, "minutes": round((time.perf_counter() - t0) / 60, 2), "tokens": tokens,
            "stages": stages, "max_segments": max_segments}


@torch.no_grad()
def evaluate(model: FoldedLM, vocab: Vocab, distance: int, samples: int, batch_size: int, device, seed: int) -> float:
    """Exact-key accuracy at one distance; the same sequences for every model (fixed seed)."""
    generator = torch.Generator().manual_seed(seed)
    right = 0
    for start in range(0, samples, batch_size):
        n = min(batch_size, samples - start)
        ids, targets = (x.to(device) for x in make_batch(n, distance, vocab, generator))
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda"):
            right += int(score(model, ids, targets)[1].sum())
    return right / samples


QUICK = dict(d_model=32, n_head=2, n_local=1, n_global=1, segment_len=8, batch_size=8, steps=30,
             max_train_segments=4, log_every=10, window=10, eval_multiples="1,2,4,8", eval_samples=16,
             device="cpu")


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--vocab_size", type=int, default=32)
    p.add_argument("--d_model", type=int, default=256)
    p.add_argument("--n_head", type=int, default=4)
    p.add_argument("--n_local", type=int, default=2)
    p.add_argument("--n_global", type=int, default=2)
    p.add_argument("--segment_len", type=int, default=64)
    p.add_argument("--state_norm", action="store_true", help="RMS-normalise the carried state (ModelConfig.state_norm)")
    p.add_argument("--state_gate", action="store_true", help="gated carry of the state (ModelConfig.state_gate)")
    for f in dataclasses.fields(TrainArgs):
        kind = int if f.name == "steps" else type(f.default)
        p.add_argument(f"--{f.name}", type=kind, default=f.default)
    p.add_argument("--eval_multiples", default="1,2,4,8,16,32,64,128,256,512,1024",
                   help="distances D as multiples of segment_len")
    p.add_argument("--eval_samples", type=int, default=100)
    p.add_argument("--eval_batch", type=int, default=100)
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
    return args


def main(argv=None):
    args = parse_args(argv)
    device = torch.device("cuda" if args.device == "auto" and torch.cuda.is_available()
                          else "cpu" if args.device == "auto" else args.device)
    torch.backends.cuda.matmul.allow_tf32 = True
    vocab = Vocab(args.vocab_size)
    train_args = TrainArgs(**{f.name: getattr(args, f.name) for f in dataclasses.fields(TrainArgs)})
    l = args.segment_len
    cfg = ModelConfig(vocab_size=vocab.size, d_model=args.d_model, n_head=args.n_head, n_local=args.n_local,
                      n_global=args.n_global, segment_len=l, state_norm=args.state_norm, state_gate=args.state_gate)
    print(f"passkey on {device_name() if device.type == 'cuda' else 'CPU'}: {cfg.num_params():,} parameters, "
          f"l={l}, training up to {args.max_train_segments} segments for {args.minutes} min", flush=True)

    models, summaries = {}, {}
    torch.manual_seed(args.seed)
    models["folded"] = FoldedLM(cfg).to(device)
    summaries["folded"] = train(models["folded"], vocab, train_args, l, device, args.seed, "folded")
    if args.baseline:
        window = args.max_train_segments * l
        base_cfg = dataclasses.replace(cfg, n_local=args.n_local + args.n_global, n_global=0, segment_len=window)
        torch.manual_seed(args.seed)
        models["full_attention"] = FoldedLM(base_cfg).to(device)
        summaries["full_attention"] = train(models["full_attention"], vocab, train_args, l, device, args.seed,
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
        models["folded"].cfg.use_state = False
        row["local_only"] = run(models["folded"])
        models["folded"].cfg.use_state = True
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
