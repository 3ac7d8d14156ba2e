"""Training and scoring shared by the suite and experiments/passkey.py: a curriculum over the
number of segments, the answer-only loss and exact match. Built from the package's pieces: the
one segment loop (`foldscale.model.segments`) and the model's own loss, ModelConfig's
bptt_segments, engine.param_groups for weight decay, and Trainer's rule for a non-finite step
(trainer.NonFiniteGuard). Optimizer and schedule are plain torch: one process, a small model."""
import dataclasses
import functools
import math
import os
import time
from pathlib import Path
from typing import NamedTuple

import torch
import torch.nn.functional as F

from experiments.longctx import text
from foldscale.config import ConfigError
from foldscale.engine import param_groups
from foldscale.flags import flag
from foldscale.model import FoldedLM, segments
from foldscale.trainer import NonFiniteGuard, TrainingError


class Score(NamedTuple):
    loss: torch.Tensor  # summed cross-entropy over the answer tokens
    n_tokens: int  # answer tokens counted
    exact: torch.Tensor  # (B,) bool: every answer token of the row right by argmax
    state: torch.Tensor | None  # after the last complete segment, to carry into the next call


def _record_norm(norms: dict, i: int, grad):
    if grad is not None:  # None: a compiled step's gradient that is not defined (no path to the loss)
        norms[i] = grad.float().norm()


def score(model: FoldedLM, ids: torch.Tensor, targets: torch.Tensor, state=None, step=None,
          state_grads: dict | None = None, reset: torch.Tensor | None = None) -> Score:
    """Walk ids (B, T) on the model's device segment by segment (`segments`, through `step`,
    default the model) and score the positions where targets (B, T), kept on the CPU, are not
    -100, with the model's own loss. Gradients flow back through the state over the last
    cfg.bptt_segments segments. Only segments that hold a target are checked for exact match
    (the CPU targets say which, so the host never waits for the GPU); under no_grad nothing of
    a segment outlives it but the state. reset (B, n_segments) bool, on the device, marks where
    a document starts (Streams). With a dict `state_grads`, the backward pass fills it
    with {segment i: norm of the gradient reaching the state segment i carried out} (0-d fp32
    tensors on the device, no host sync)."""
    l = model.cfg.segment_len
    holds = [bool((targets[:, a:a + l] != -100).any()) for a in range(0, targets.shape[1], l)]
    cuda = ids.device.type == "cuda"
    on_device = (targets.pin_memory() if cuda else targets).to(ids.device, non_blocking=cuda)
    loss = torch.zeros((), device=ids.device)
    exact = torch.ones(ids.shape[0], dtype=torch.bool, device=ids.device)
    for i, out in enumerate(segments(model if step is None else step, ids, l, on_device, state, reset,
                                     bptt=model.cfg.bptt_segments)):
        loss = loss + out.token_loss.sum()
        if holds[i]:
            t = on_device[:, i * l:(i + 1) * l]
            exact &= ((out.logits.argmax(-1) == t) | (t == -100)).all(dim=1)
        if out.state is not None:
            state = out.state
            if state_grads is not None and state.requires_grad:
                state.register_hook(functools.partial(_record_norm, state_grads, i))
    return Score(loss, int((targets != -100).sum()), exact, state)


@torch.no_grad()
def exact_match(model: FoldedLM, docs: list, device, chunk_tokens: int = 16384, label: str = "",
                step=None) -> torch.Tensor:
    """(B,) bool: is every answer token of each document right by argmax? The documents are
    read chunk by chunk and only up to the last answer, in whole segments (the filler goes on
    past an answer, unscored), so that every segment has one shape for a compiled `step`; memory
    does not grow with their length. A model that carries no state (local-only, full attention)
    skips the chunks without an answer: nothing in them can reach one. A line with the rate and
    the time left every 30 s."""
    l = model.cfg.segment_len
    chunk = l * max(1, chunk_tokens // l)
    end = -(-max(d.end for d in docs) // l) * l
    state, exact = None, torch.ones(len(docs), dtype=torch.bool, device=device)
    carries = model.cfg.recurrent and model.cfg.use_state  # else a segment depends on itself alone
    t0 = last = time.perf_counter()
    for a in range(0, end, chunk):
        ids, targets = (torch.from_numpy(x) for x in text.batch(docs, a, min(end, a + chunk)))
        if not carries and (targets == -100).all():
            continue
        ids = (ids.pin_memory() if device.type == "cuda" else ids).to(device, non_blocking=True)
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda"):
            s = score(model, ids, targets, state=state, step=step)
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
    """Sequences per step."""
    lr: float = 1e-3
    """Peak learning rate (AdamW)."""
    warmup_steps: int = 100
    """Linear warm-up of the learning rate over this many steps."""
    weight_decay: float = 0.1
    """AdamW's decoupled weight decay, on matrices only (not on norms, biases, S0 or the embedding: engine.param_groups)."""
    grad_clip: float = 1.0
    """Clip the gradient's global norm to this."""
    minutes: float = 8.0
    """Wall-time budget for training; evaluation comes after it."""
    save_every: float = 2.0
    """With a checkpoint (suite --resume), also save it at the first log line this many minutes after
    the last save: a run killed in the middle of a call goes on from there."""
    steps: int | None = None
    """Stop after this many steps even if time is left; the schedule then follows steps, not time."""
    final_steps: int | None = None
    """Stop after this many steps at the last stage (max_train_segments) instead of after --steps:
    every seed then trains as long at the length it is scored for, however fast it climbs. The
    learning rate stays at its peak until the last stage and decays over these steps or over
    the time left when the stage began, whichever ends first (a run that the time budget
    cuts short still ends at lr * min_lr_ratio). A run that spans calls (a checkpoint) follows
    the time only in its last_call: a decay over one call's time would start again with the next."""
    stream_segments: int = 0
    """At the last stage, every other step reads streams instead of fresh sequences: each row
    reads documents one after another, up to this many segments long (log-uniform), one
    max_train_segments window a step, its state carried from step to step (detached between
    steps, S0 at each document's start). The state is then trained on gaps far longer than
    back-propagation reaches, as a folded model is pretrained. 0: off."""
    start_segments: int = 2
    """The curriculum's first stage, in segments (raised to fit the task's stories)."""
    max_train_segments: int = 32
    """Training sequences are never longer than this many segments of the folded model."""
    min_lr_ratio: float = 1.0
    """Cosine decay of the learning rate over the budget down to lr * this (1: constant)."""
    advance_at: float = 0.95
    """Exact-answer training accuracy over the last `window` steps that unlocks the next stage."""
    stage_patience: int = 0
    """Move on to the next stage after this many steps at a stage even below advance_at, so a task
    whose accuracy levels off under the gate still reaches max_train_segments in bounded time
    (bAbI qa2 stayed at 0.90-0.93 at 10 segments for 675-1,575 steps); the stage's record keeps the
    accuracy it left with. 0: wait for advance_at however long it takes."""
    window: int = 50
    """Steps of the curriculum's moving accuracy."""
    log_every: int = 25
    """Steps between progress lines, which are also when the curriculum gate is checked."""
    max_bad_steps: int = 10
    """Non-finite gradients in a row (each step skipped) before training stops with an error."""
    bf16: bool = True
    """Autocast the forward to bf16 on a GPU (weights and optimizer stay fp32); --no-bf16 runs fp32."""
    explain_non_finite: int = 3
    """Take the first this many steps with a non-finite gradient again, eager, under autograd's
    anomaly detection, and print the backward function that made the NaN (and, from anomaly
    mode, where the forward called it)."""
    compile: bool = True
    """torch.compile the segment step on a GPU (every segment has one shape: sequences are padded
    to whole segments after the answer); ignored on the CPU."""
    last_call: bool = False
    """With a checkpoint (suite --resume): this call is the run's last. It is scored where its time
    ends even if --steps (or --final-steps) are not done, and the record says how many steps it took."""

    def __post_init__(self):
        least = dict(batch_size=1, warmup_steps=1, window=1, log_every=1, max_bad_steps=1, start_segments=1,
                     max_train_segments=1, final_steps=1, steps=0, stream_segments=0, stage_patience=0,
                     explain_non_finite=0, weight_decay=0, minutes=0)
        for name, value in dataclasses.asdict(self).items():
            if name in least and value is not None and value < least[name]:
                raise ConfigError(f"{flag(name)[0]} must be >= {least[name]}, not {value}")
            if name in ("lr", "grad_clip", "save_every") and not value > 0:
                raise ConfigError(f"{flag(name)[0]} must be positive, not {value}")
        if not 0 <= self.min_lr_ratio <= 1:
            raise ConfigError(f"--min-lr-ratio must be in [0, 1], not {self.min_lr_ratio}")


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


def segment_step(model: FoldedLM, args: TrainArgs, device):
    """What runs one segment: the model, compiled on a GPU unless args.compile is off. Each shape,
    grad mode and model variant is a graph of its own: the suite needs more than dynamo's default 8."""
    if not (args.compile and device.type == "cuda"):
        return model
    torch._dynamo.config.recompile_limit = max(torch._dynamo.config.recompile_limit, 64)
    return torch.compile(model, dynamic=False)


def non_finite_grads(model, most: int = 6) -> list[str]:
    """Names of the parameters whose gradient holds a NaN or an infinity, in the model's order."""
    bad = [n for n, p in model.named_parameters() if p.grad is not None and not torch.isfinite(p.grad).all()]
    return bad[:most] + ([f"... {len(bad) - most} more"] if len(bad) > most else [])


def state_grad_profile(state_grads: dict) -> list[float]:
    """The norms `score` collected, in segment order (the earliest carried state first)."""
    return [float(v) for v in torch.stack([state_grads[i] for i in sorted(state_grads)]).tolist()] if state_grads else []


def describe_profile(profile: list[float]) -> str:
    """The gradient reaching the state through time: its norm at the latest and the earliest
    carried state, and the growth per segment going back (above 1: it explodes through time)."""
    if len(profile) < 2 or not all(math.isfinite(v) and v > 0 for v in profile):
        return f"state grad by segment {['%.2g' % v for v in profile]}"
    growth = (profile[0] / profile[-1]) ** (1 / (len(profile) - 1))
    return f"state grad {profile[-1]:.2e} (latest) .. {profile[0]:.2e} (earliest), x{growth:.2f}/segment, max {max(profile):.2e}"


def explain_non_finite(model: FoldedLM, ids: torch.Tensor, targets: torch.Tensor, bf16: bool, state=None,
                       reset=None) -> str:
    """Take the step's forward and backward again, eager, under autograd's anomaly detection
    (the weights are those of the failed step: its update is skipped). Returns the first module
    whose forward output was not finite, which backward function first made a NaN, and the
    gradient reaching the state segment by segment; anomaly mode also prints where the forward
    called that function, a traceback into foldscale/model.py. The model's gradients are cleared
    again afterwards."""
    model.zero_grad(set_to_none=True)
    bad_forward, grads = [], {}

    def check(module, _, out):
        t = out[0] if isinstance(out, tuple) else out
        if not bad_forward and torch.is_tensor(t) and t.is_floating_point() and not torch.isfinite(t).all():
            bad_forward.append(next(n for n, m in model.named_modules() if m is module) or "model")

    hooks = [m.register_forward_hook(check) for m in model.modules()]
    try:
        with torch.autograd.detect_anomaly(check_nan=True), \
                torch.autocast(ids.device.type, dtype=torch.bfloat16, enabled=bf16):
            s = score(model, ids, targets, state, state_grads=grads, reset=reset)
            (s.loss / max(s.n_tokens, 1)).backward()
    except RuntimeError as e:
        verdict = str(e).splitlines()[0]
    else:
        bad = non_finite_grads(model)
        verdict = (f"no backward function made a NaN, yet {bad} are not finite (an infinity, or a gradient hook)"
                   if bad else "the eager step's gradient is finite: the compiled step's kernels, or not reproducible")
    finally:
        for h in hooks:
            h.remove()
        model.zero_grad(set_to_none=True)
    forward = f"forward not finite first in {bad_forward[0]}" if bad_forward else "forward finite"
    return f"{forward}; {verdict}; {describe_profile(state_grad_profile(grads))}"


def whole_segments(ids: torch.Tensor, targets: torch.Tensor, l: int) -> tuple[torch.Tensor, torch.Tensor]:
    """ids and targets padded on the right to a multiple of l (token 0, target -100): after the
    answer, so causal attention leaves every scored position as it was."""
    pad = -ids.shape[1] % l
    return F.pad(ids, (0, pad)), F.pad(targets, (0, pad), value=-100)


class Streams:
    """`rows` streams of documents, each read one after another in windows of whole segments of l
    tokens: a document is make_batch(1, length, generator), its length drawn log-uniformly from
    min_segments to max_segments segments, padded to whole segments (`whole_segments`), so that
    every document starts at a segment's start."""

    def __init__(self, make_batch, rows: int, l: int, min_segments: int, max_segments: int,
                 generator: torch.Generator):
        self.make_batch, self.l, self.generator = make_batch, l, generator
        self.bounds = (math.log(min_segments), math.log(max_segments + 1))
        self.docs = [None] * rows  # (ids, targets) of the document each row reads, and how far
        self.pos = [0] * rows

    def _document(self):
        low, high = self.bounds
        n = int(math.exp(low + (high - low) * float(torch.rand((), generator=self.generator))))
        length = int(torch.randint((n - 1) * self.l + 1, n * self.l + 1, (), generator=self.generator))
        ids, targets = whole_segments(*self.make_batch(1, length, self.generator), self.l)
        return ids[0], targets[0]

    def window(self, n_segments: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """The next n_segments segments of every row: ids, targets (rows, n_segments * l) and
        reset (rows, n_segments), true where a document starts."""
        width = n_segments * self.l
        ids = torch.empty(len(self.docs), width, dtype=torch.long)
        targets = torch.empty_like(ids)
        reset = torch.zeros(len(self.docs), n_segments, dtype=torch.bool)
        for r in range(len(self.docs)):
            filled = 0
            while filled < width:
                if self.docs[r] is None or self.pos[r] == len(self.docs[r][0]):
                    self.docs[r], self.pos[r] = self._document(), 0
                    reset[r, filled // self.l] = True
                doc_ids, doc_targets = self.docs[r]
                n = min(width - filled, len(doc_ids) - self.pos[r])
                ids[r, filled:filled + n] = doc_ids[self.pos[r]:self.pos[r] + n]
                targets[r, filled:filled + n] = doc_targets[self.pos[r]:self.pos[r] + n]
                filled, self.pos[r] = filled + n, self.pos[r] + n
        return ids, targets, reset


# TrainArgs that may change between the calls of one resumed run: they change no step's result
PER_CALL = ("minutes", "save_every", "log_every", "compile", "max_bad_steps", "explain_non_finite", "last_call")


def identity(model: FoldedLM, args: TrainArgs, seed: int, name: str) -> dict:
    """What a checkpoint must match to go on: the run's name, seed, model config and TrainArgs."""
    return {"name": name, "seed": seed, "model": model.cfg.to_dict(),
            "args": {k: v for k, v in dataclasses.asdict(args).items() if k not in PER_CALL}}


def save_checkpoint(path: Path, state: dict):
    """torch.save to a temporary file, then rename: a run killed while saving keeps the last checkpoint."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    torch.save(state, tmp)
    os.replace(tmp, path)


def load_checkpoint(path: Path, expected: dict) -> dict:
    state = torch.load(path, map_location="cpu", weights_only=False)
    if state.get("identity") != expected:
        saved = state.get("identity") or {}
        differ = sorted(k for k in expected if saved.get(k) != expected[k])
        differ += sorted(f"args.{k}" for k in expected["args"] if saved.get("args", {}).get(k) != expected["args"][k])
        raise TrainingError(f"{path} is another run's checkpoint ({', '.join(differ)} differ): give this run "
                            "its own --resume directory, or delete the file to start over")
    return state


def train(model: FoldedLM, make_batch, args: TrainArgs, l: int, device, seed: int, name: str,
          checkpoint: Path | None = None) -> dict:
    """Train on sequences of up to args.max_train_segments * l tokens with a curriculum over the
    number of segments (of the folded model's length l, also for a baseline, whose segments
    are its whole window), back-propagating through the state over the model's bptt_segments.

    `make_batch(n, length, generator)` returns CPU (ids, targets), both (n, length), targets
    -100 except at the answer. Returns a summary: steps, minutes, the stages reached and when,
    and `done`: False where the time budget ended the run before its --steps (or --final-steps).

    With a `checkpoint` path the run can span several calls (each one args.minutes long, e.g.
    each device command): a call saves everything the next step depends on there when it ends
    and every args.save_every minutes (weights, optimizer, data generator, curriculum, streams),
    and a call that finds it goes on from it; the steps are the same as one uninterrupted run's.
    The learning rate must then follow steps (--steps or --final-steps): a schedule over time
    would start again with each call (only args.last_call anneals --final-steps by its time too).
    """
    generator = torch.Generator().manual_seed(seed + 1)
    opt = torch.optim.AdamW(param_groups(model, args.weight_decay), lr=args.lr, fused=device.type == "cuda")
    guard = NonFiniteGuard(args.max_bad_steps, "lower --lr or raise --warmup-steps",
                           log=lambda message: print(f"[{name}] {message}", flush=True), what="gradient")
    step_fn = segment_step(model, args, device)
    max_segments, recent, through_time = args.start_segments, [], []
    carries = model.cfg.recurrent and model.cfg.use_state
    streams, stream_state, stream_steps, stream_right = None, None, 0, []
    stages = [{"segments": args.start_segments, "step": 0, "minutes": 0.0}]
    step, tokens, skipped, t0, last = 0, 0, 0, time.perf_counter(), (0.0, 0)
    budget = args.minutes * 60
    final_at = 0 if args.start_segments >= args.max_train_segments else None  # the step the last stage began
    final_t = 0.0  # and the time (of this call)
    before = 0.0  # minutes trained in earlier calls
    if checkpoint is not None and args.steps is None and args.final_steps is None:
        raise ValueError("a run saved to a checkpoint needs --steps or --final-steps: a learning rate "
                         "scheduled over the time budget would start again with each call")
    me = identity(model, args, seed, name)
    if checkpoint is not None and checkpoint.is_file():
        saved = load_checkpoint(checkpoint, me)
        model.load_state_dict(saved["model"])
        opt.load_state_dict(saved["optimizer"])
        generator.set_state(saved["generator"])
        step, tokens, skipped, before = saved["step"], saved["tokens"], saved["skipped"], saved["minutes"]
        max_segments, stages, final_at, through_time = (saved["max_segments"], saved["stages"], saved["final_at"],
                                                        saved["through_time"])
        recent = [torch.tensor(x, device=device) for x in saved["recent"]]
        stream_steps, last = saved["stream_steps"], (0.0, tokens)
        if saved["streams"] is not None:
            streams = Streams(make_batch, args.batch_size, model.cfg.segment_len, args.start_segments,
                              args.stream_segments, generator)
            streams.docs, streams.pos = saved["streams"]["docs"], saved["streams"]["pos"]
            stream_state = None if saved["streams"]["state"] is None else saved["streams"]["state"].to(device)
        print(f"[{name}] going on from {checkpoint}: step {step}, stage {max_segments} segments, "
              f"{before:.1f} min trained before", flush=True)
    model.train()
    saved_at = 0.0  # seconds into this call

    def save():
        save_checkpoint(checkpoint, {
            "identity": me, "model": model.state_dict(), "optimizer": opt.state_dict(),
            "generator": generator.get_state(), "step": step, "tokens": tokens, "skipped": skipped,
            "minutes": before + (time.perf_counter() - t0) / 60, "max_segments": max_segments, "stages": stages,
            "final_at": final_at, "through_time": through_time, "recent": [float(x) for x in recent],
            "stream_steps": stream_steps,
            "streams": None if streams is None else {"docs": streams.docs, "pos": streams.pos,
                                                     "state": None if stream_state is None else stream_state.cpu()}})

    def done() -> bool:
        if args.final_steps is not None:
            return final_at is not None and step - final_at >= args.final_steps
        return args.steps is not None and step >= args.steps

    while time.perf_counter() - t0 < budget and not done():
        if streams is None and final_at is not None and args.stream_segments and carries:
            streams = Streams(make_batch, args.batch_size, model.cfg.segment_len, args.start_segments,
                              args.stream_segments, generator)
        streaming = streams is not None and step % 2 == 1
        reset = None
        if streaming:
            n_seg = args.max_train_segments
            ids, targets, reset = streams.window(n_seg)
            reset = reset.to(device, non_blocking=True)
        else:
            n_seg = sample_segments(max_segments, args.start_segments, generator)
            length = int(torch.randint((n_seg - 1) * l + 1, n_seg * l + 1, (), generator=generator))
            ids, targets = whole_segments(*make_batch(args.batch_size, length, generator), model.cfg.segment_len)
        ids = (ids.pin_memory() if device.type == "cuda" else ids).to(device, non_blocking=True)
        elapsed = time.perf_counter() - t0
        if args.final_steps is None:
            progress = step / args.steps if args.steps else elapsed / budget
        elif final_at is None:  # constant until the last stage, then decaying over its steps or its time
            progress = 0.0
        else:
            progress = (step - final_at) / args.final_steps
            if checkpoint is None or args.last_call:  # this call's time is the run's
                progress = max(progress, (elapsed - final_t) / max(budget - final_t, 1e-9))
        for group in opt.param_groups:
            group["lr"] = lr_at(args, step, progress)
        grads = {}
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda" and args.bf16):
            s = score(model, ids, targets, stream_state if streaming else None, step_fn, grads, reset)
        start = stream_state if streaming else None  # the state this step started from
        if streaming:  # the next window goes on from here; rows that read no answer do not count
            stream_state, stream_steps = s.state.detach(), stream_steps + 1
            answered = (targets != -100).any(dim=1).to(device, non_blocking=True)
            stream_right.append(torch.stack([(s.exact & answered).sum(), answered.sum()]))
        loss = s.loss / max(s.n_tokens, 1)
        loss.backward()
        norm = torch.nn.utils.clip_grad_norm_(model.parameters(), args.grad_clip)
        finite = bool(torch.isfinite(norm))  # a host sync a step: one bad gradient would poison every weight
        if not finite:
            print(f"[{name}] step {step + 1}: loss {loss.item():.4g}, non-finite gradient in "
                  f"{non_finite_grads(model)}; {describe_profile(state_grad_profile(grads))}", flush=True)
            if skipped < args.explain_non_finite:
                print(f"[{name}] step {step + 1} again, eager, under anomaly detection: "
                      f"{explain_non_finite(model, ids, targets, device.type == 'cuda' and args.bf16, start, reset)}",
                      flush=True)
        if guard.apply(finite, step + 1):
            opt.step()
        else:
            skipped += 1
        opt.zero_grad(set_to_none=True)
        step, tokens = step + 1, tokens + ids.numel()
        if n_seg == max_segments and not streaming:
            recent = (recent + [s.exact.float().mean()])[-args.window:]
        if step % args.log_every == 0:  # the only host sync: the GPU runs ahead between log lines
            acc = torch.stack(recent).mean().item() if recent else 0.0
            elapsed = time.perf_counter() - t0
            rate = (tokens - last[1]) / (elapsed - last[0])  # over the last log_every steps
            last = (elapsed, tokens)
            profile = state_grad_profile(grads)
            if len(profile) >= 2:
                through_time.append({"step": step, "segments": n_seg, "latest": profile[-1], "earliest": profile[0],
                                     "max": max(profile)})
            streamed = ""
            if stream_right:  # exact answers in the streams since the last line
                right, answers = torch.stack(stream_right).sum(0).tolist()
                streamed, stream_right = f" | streams {right / max(answers, 1):.3f} of {answers}", []
            print(f"[{name}] step {step} | stage {max_segments} seg | loss {loss.item():.3f} | "
                  f"acc@{max_segments} {acc:.3f}{streamed} | lr {opt.param_groups[0]['lr']:.2e} | "
                  f"{rate:,.0f} tok/s | {elapsed / 60:.1f}/{args.minutes:.1f} min | {describe_profile(profile)}", flush=True)
            waited = args.stage_patience and step - stages[-1]["step"] >= args.stage_patience
            if len(recent) == args.window and (acc >= args.advance_at or waited) and max_segments < args.max_train_segments:
                max_segments = min(2 * max_segments, args.max_train_segments)
                recent = []
                stages[-1]["left_at"] = round(acc, 4)
                stages.append({"segments": max_segments, "step": step, "minutes": round(before + elapsed / 60, 2)})
                final_at, final_t = (step, elapsed) if max_segments == args.max_train_segments else (None, 0.0)
                why = "" if acc >= args.advance_at else \
                    f" (below {args.advance_at} after --stage-patience {args.stage_patience} steps)"
                print(f"[{name}] accuracy {acc:.3f} at {stages[-2]['segments']} segments{why} -> "
                      f"stage {max_segments} segments", flush=True)
            if checkpoint is not None and elapsed - saved_at >= args.save_every * 60:
                save()
                saved_at = elapsed
    minutes = before + (time.perf_counter() - t0) / 60
    if checkpoint is not None:
        save()
        if not done():
            print(f"[{name}] the time budget ({args.minutes} min) ended this call at step {step}: saved to "
                  f"{checkpoint}; the same command goes on from there", flush=True)
    elif args.final_steps is not None and not done():
        print(f"[{name}] warning: the time budget ({args.minutes} min) ended the run "
              f"{'before the last stage' if final_at is None else f'after {step - final_at} of --final-steps {args.final_steps}'}"
              f": it is not trained as long at {args.max_train_segments} segments as asked (raise --minutes, or go on "
              "with --resume)", flush=True)
    model.eval()
    return {"steps": step, "final_stage_steps": None if final_at is None else step - final_at,
            "minutes": round(minutes, 2), "tokens": tokens, "done": done() or args.steps is None and args.final_steps is None,
            "stages": stages, "max_segments": max_segments, "last_lr": opt.param_groups[0]["lr"],
            "skipped_steps": skipped, "stream_steps": stream_steps, "state_grad_through_time": through_time}
