"""Training and scoring shared by the suite and experiments/passkey.py: a curriculum over the
number of segments, the answer-only loss and exact match, all walking sequences through the
package's one segment loop (`foldscale.model.segments`)."""
import dataclasses
import math
import time
from typing import NamedTuple

import torch
import torch.nn.functional as F

from experiments.longctx import text
from foldscale.model import FoldedLM, segments


class Score(NamedTuple):
    loss: torch.Tensor  # summed cross-entropy over the answer tokens
    n_tokens: int  # answer tokens counted
    exact: torch.Tensor  # (B,) bool: every answer token of the row right by argmax
    state: torch.Tensor | None  # after the last complete segment, to carry into the next call


def score(model: FoldedLM, ids: torch.Tensor, targets: torch.Tensor, bptt: int = 0, state=None) -> Score:
    """Walk ids (B, T) on the model's device segment by segment and score the positions where
    targets (B, T), kept on the CPU, are not -100.

    Gradients flow back through the state over the last `bptt` segments (0: all of them).
    Only segments that hold a target compute a loss (the CPU targets say which, so the host
    never waits for the GPU); under no_grad nothing of a segment outlives it but the state.
    """
    l = model.cfg.segment_len
    n_seg = -(-ids.shape[1] // l)
    loss = torch.zeros((), device=ids.device)
    exact = torch.ones(ids.shape[0], dtype=torch.bool, device=ids.device)
    cuda = ids.device.type == "cuda"
    for i, out in enumerate(segments(model, ids, l, state=state, bptt=bptt or n_seg)):
        t = targets[:, i * l:(i + 1) * l]
        if (t != -100).any():
            t = (t.pin_memory() if cuda else t).to(ids.device, non_blocking=cuda)
            logits = out.logits.to(torch.promote_types(out.logits.dtype, torch.float32))
            loss = loss + F.cross_entropy(logits.flatten(0, 1), t.flatten(), reduction="sum")
            exact &= ((logits.argmax(-1) == t) | (t == -100)).all(dim=1)
        if out.state is not None and out.state.shape[1] == l:
            state = out.state
    return Score(loss, int((targets != -100).sum()), exact, state)


@torch.no_grad()
def exact_match(model: FoldedLM, docs: list, device, chunk_tokens: int = 16384, label: str = "") -> torch.Tensor:
    """(B,) bool: is every answer token of each document right by argmax? The documents are
    read chunk by chunk and only up to the last answer: memory does not grow with their length.
    A line with the rate and the time left every 30 s."""
    l = model.cfg.segment_len
    chunk = l * max(1, chunk_tokens // l)
    end = max(d.end for d in docs)
    state, exact = None, torch.ones(len(docs), dtype=torch.bool, device=device)
    t0 = last = time.perf_counter()
    for a in range(0, end, chunk):
        ids, targets = (torch.from_numpy(x) for x in text.batch(docs, a, min(end, a + chunk)))
        ids = (ids.pin_memory() if device.type == "cuda" else ids).to(device, non_blocking=True)
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda"):
            s = score(model, ids, targets, state=state)
        state, exact = s.state, exact & s.exact
        if time.perf_counter() - last > 30:
            last, done = time.perf_counter(), a + ids.shape[1]
            rate = done / (last - t0)
            print(f"  {label}: {done:,}/{end:,} tokens x {len(docs)}, {rate:,.0f} tokens/s, "
                  f"{(end - done) / rate / 60:.1f} min left", flush=True)
    return exact.cpu()


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
    """Backpropagate through the state over the last this many segments (0: all)."""
    min_lr_ratio: float = 1.0
    """Cosine decay of the learning rate over the time budget down to lr * this (1: constant)."""
    advance_at: float = 0.95
    """Exact-answer training accuracy over the last `window` steps that unlocks the next stage."""
    window: int = 50
    log_every: int = 25
    """Steps between progress lines, which are also when the curriculum gate is checked."""
    max_bad_steps: int = 10
    """Non-finite gradients in a row (each step skipped) before training stops with an error."""


def add_train_args(parser, **defaults):
    """A --dashed flag (and its --underscore alias) per TrainArgs field."""
    for f in dataclasses.fields(TrainArgs):
        kind = int if f.name == "steps" else type(f.default)
        flags = [f"--{f.name.replace('_', '-')}"] + ([f"--{f.name}"] if "_" in f.name else [])
        parser.add_argument(*flags, dest=f.name, type=kind, default=defaults.get(f.name, f.default))


def train_args(args) -> TrainArgs:
    return TrainArgs(**{f.name: getattr(args, f.name) for f in dataclasses.fields(TrainArgs)})


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


def train(model: FoldedLM, make_batch, args: TrainArgs, l: int, device, seed: int, name: str) -> dict:
    """Train on sequences of up to args.max_train_segments * l tokens with a curriculum over the
    number of segments (of the folded model's length l, also for a baseline).

    `make_batch(n, length, generator)` returns CPU (ids, targets), both (n, length), targets
    -100 except at the answer. Returns a summary: steps, minutes, the stages reached and when.
    """
    generator = torch.Generator().manual_seed(seed + 1)
    opt = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=args.weight_decay,
                            fused=device.type == "cuda")
    max_segments, recent = args.start_segments, []
    stages = [{"segments": args.start_segments, "step": 0, "minutes": 0.0}]
    step, tokens, skipped, bad_in_a_row, t0 = 0, 0, 0, 0, time.perf_counter()
    budget = args.minutes * 60
    model.train()
    while time.perf_counter() - t0 < budget and (args.steps is None or step < args.steps):
        n_seg = sample_segments(max_segments, args.start_segments, generator)
        length = int(torch.randint((n_seg - 1) * l + 1, n_seg * l + 1, (), generator=generator))
        ids, targets = make_batch(args.batch_size, length, generator)
        ids = (ids.pin_memory() if device.type == "cuda" else ids).to(device, non_blocking=True)
        progress = step / args.steps if args.steps else (time.perf_counter() - t0) / budget
        for group in opt.param_groups:
            group["lr"] = lr_at(args, step, progress)
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda"):
            s = score(model, ids, targets, args.bptt)
        loss = s.loss / max(s.n_tokens, 1)
        loss.backward()
        norm = torch.nn.utils.clip_grad_norm_(model.parameters(), args.grad_clip)
        if torch.isfinite(norm):  # a host sync a step: one non-finite gradient would poison every weight
            opt.step()
            bad_in_a_row = 0
        else:
            skipped, bad_in_a_row = skipped + 1, bad_in_a_row + 1
            print(f"[{name}] step {step + 1}: non-finite gradient, step skipped ({skipped} so far)", flush=True)
            if bad_in_a_row >= args.max_bad_steps:
                raise FloatingPointError(f"{name}: {bad_in_a_row} non-finite gradients in a row at step {step + 1}; "
                                         "lower --lr or raise --warmup-steps")
        opt.zero_grad(set_to_none=True)
        step, tokens = step + 1, tokens + ids.numel()
        if n_seg == max_segments:
            recent = (recent + [s.exact.float().mean()])[-args.window:]
        if step % args.log_every == 0:  # the only host sync: the GPU runs ahead between log lines
            acc = torch.stack(recent).mean().item() if recent else 0.0
            elapsed = time.perf_counter() - t0
            print(f"[{name}] step {step} | stage {max_segments} seg | loss {loss.item():.3f} | "
                  f"acc@{max_segments} {acc:.3f} | lr {opt.param_groups[0]['lr']:.2e} | "
                  f"{tokens / elapsed:,.0f} tok/s | {elapsed / 60:.1f}/{args.minutes:.1f} min", flush=True)
            if len(recent) == args.window and acc >= args.advance_at and max_segments < args.max_train_segments:
                max_segments = min(2 * max_segments, args.max_train_segments)
                recent = []
                stages.append({"segments": max_segments, "step": step, "minutes": round(elapsed / 60, 2)})
                print(f"[{name}] accuracy {acc:.3f} at {stages[-2]['segments']} segments -> "
                      f"stage {max_segments} segments", flush=True)
    model.eval()
    return {"steps": step, "minutes": round((time.perf_counter() - t0) / 60, 2), "tokens": tokens,
            "stages": stages, "max_segments": max_segments, "skipped_steps": skipped}
