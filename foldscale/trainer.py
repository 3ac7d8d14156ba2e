"""The training loop: segments in, carried state across steps, logs, checkpoints, resume."""
import json
import math
import signal
import time
import zlib
from pathlib import Path

import torch
import torch.distributed as dist

from foldscale import checkpoint as ckpt
from foldscale.config import DataConfig, FoldscaleError, ModelConfig, TrainConfig
from foldscale.data import Batch, SegmentStreamSampler
from foldscale.engine import build_engine, build_model
from foldscale.metrics import MetricsLogger, PositionLoss, Throughput, peak_memory_gib, plot_position_loss


class TrainingError(FoldscaleError):
    """The run cannot go on (e.g. non-finite losses); the last good checkpoint is intact."""


def all_reduce_sum(t: torch.Tensor) -> torch.Tensor:
    dist.all_reduce(t, op=dist.ReduceOp.SUM)
    return t


class NonFiniteGuard:
    """The one rule for a step whose loss or gradient is not finite, for Trainer and for a loop
    with a plain torch model and optimizer: the step's update is skipped, and MAX_BAD_STEPS such
    steps in a row stop training with a TrainingError ending in FIX (what to do about it).

        guard = NonFiniteGuard(max_bad_steps, "lower --lr", log=print)
        loss.backward()
        norm = torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        if guard.apply(torch.isfinite(norm), step):  # one host sync a step
            optimizer.step()
            scheduler.step()
        optimizer.zero_grad()
    """

    def __init__(self, max_bad_steps: int, fix: str, log=print, what: str = "loss"):
        self.max_bad_steps, self.fix, self.log, self.what = max_bad_steps, fix, log, what
        self.bad_in_a_row = 0

    def apply(self, finite, step: int, what: str | None = None) -> bool:
        """FINITE (a 0-d bool tensor, read here, or a bool): whether step STEP's WHAT (default:
        the guard's) is finite (on every rank: a caller with several ranks all-reduces it first).
        Returns whether to apply the step's update."""
        if bool(finite):
            self.bad_in_a_row = 0
            return True
        what = what or self.what
        self.bad_in_a_row += 1
        self.log(f"warning: non-finite {what} at step {step}: its update is skipped "
                 f"({self.bad_in_a_row}/{self.max_bad_steps} in a row)")
        if self.bad_in_a_row >= self.max_bad_steps:
            plural = what + ("es" if what.endswith("s") else "s")
            raise TrainingError(f"{self.bad_in_a_row} non-finite {plural} in a row at step {step}; {self.fix}")
        return False


def placement(batch: Batch, rank: int, step: int) -> dict:
    """What each of this rank's streams read: its global stream number, the segments' indices
    within their documents, and a checksum of their tokens (comparable across world sizes)."""
    B = batch.ids.shape[0]
    ids, seg = batch.ids.view(B, batch.seg_index.shape[1], -1).cpu().numpy(), batch.seg_index.cpu().tolist()
    return {"step": step, "streams": [{"stream": rank * B + b, "seg_index": seg[b],
                                       "crc": [zlib.crc32(row.tobytes()) for row in ids[b]]} for b in range(B)]}


def take(sampler: SegmentStreamSampler, k: int) -> Batch:
    """The next k segments of every stream as one Batch: ids and targets (B, k * l), reset and
    seg_index (B, k)."""
    batches = [next(sampler) for _ in range(k)]
    return Batch(torch.cat([b.ids for b in batches], dim=1), torch.cat([b.targets for b in batches], dim=1),
                 torch.stack([b.reset for b in batches], dim=1), torch.stack([b.seg_index for b in batches], dim=1),
                 sum(b.n_tokens for b in batches))


class Trainer:
    def __init__(self, model_cfg: ModelConfig, data_cfg: DataConfig, train_cfg: TrainConfig,
                 ds_config: dict, store, rank: int, world_size: int, resume: str | None = None):
        """RESUME (`auto`: the newest checkpoint in the run that verifies, if any; or a checkpoint
        directory) is planned once, here: the checkpoint is found and verified (its files shared
        among the ranks), the engine built to load it (on another number of ranks, from its
        universal form), and loaded."""
        self.model_cfg, self.data_cfg, self.cfg, self.ds_config = model_cfg, data_cfg, train_cfg, ds_config
        self.store, self.rank, self.world_size = store, rank, world_size
        self.out = Path(train_cfg.out)
        self.ckpt_root = ckpt.run_checkpoints(self.out)
        self.logger = MetricsLogger.for_run(self.out, rank, train_cfg.steps)
        resume_from = None
        if resume:
            t0 = time.perf_counter()
            resume_from = ckpt.find(resume, self.ckpt_root, self.log, rank, world_size)
            self.log(f"verified {resume_from} in {time.perf_counter() - t0:.2f} s" if resume_from is not None
                     else f"no checkpoint in {self.ckpt_root}: starting fresh")
        if resume_from is not None:
            ds_config = ckpt.engine_config(resume_from, rank, world_size, ds_config, self._configs(), log=self.log)
        torch.manual_seed(train_cfg.seed)
        self.engine = build_engine(build_model(model_cfg, ds_config), ds_config)
        self.engine.module.set_kernels(train_cfg.kernels)  # before the first forward, which compiles
        if train_cfg.compile:
            self.engine.compile()
        self.device = self.engine.device
        self.streams = ds_config["train_micro_batch_size_per_gpu"]
        self.grad_accum = ds_config["gradient_accumulation_steps"]
        self.sampler = SegmentStreamSampler(store, "train", rank, world_size, self.streams,
                                            model_cfg.segment_len, train_cfg.seed)
        self.state = None  # (B, m, d) carried state of this rank's streams, on the device
        self.step, self.tokens_seen = 0, 0
        self.guard = NonFiniteGuard(train_cfg.max_bad_steps, f"the last good checkpoint is in {self.ckpt_root}. Lower "
                                    "the learning rate or check the data, then resume with --resume auto", self.log)
        self.grad_norm = None  # of the last logged step
        self.saved_step = None  # a step is saved once: re-saving could break its only complete copy
        self.stop_requested = False  # by a signal to this rank
        self.stopping = False  # agreed by all ranks, once a step
        self.train_loss = PositionLoss(self.device)  # since the run (re)started, for the plot
        self.summary = {}  # the latest value of every metric logged
        if resume_from is not None:
            self._load(resume_from)

    def _configs(self) -> dict[str, dict]:
        return ckpt.configs(self.model_cfg, self.cfg, self.data_cfg, self.ds_config)

    def state_dict(self) -> dict:
        return {"step": self.step, "tokens_seen": self.tokens_seen, "world_size": self.world_size}

    def log(self, message: str):
        self.logger.message(message)

    @property
    def tokens_per_step(self) -> int:
        """Tokens of one optimizer step. A token is one position of one stream's segment that the
        model reads, padding included, on any rank: the unit of tokens_seen, tokens/s and MFU."""
        return self.world_size * self.grad_accum * self.streams * self.model_cfg.bptt_segments * self.model_cfg.segment_len

    def train(self) -> dict:
        """Train until cfg.steps, saving every save_every steps, at the end and on SIGTERM/SIGINT.
        Returns the latest value of every metric logged ({"train/loss": ..., "val/loss": ...,
        "train/tokens_per_s": ..., "step": ...}): what a benchmark or experiment reads."""
        previous = {sig: signal.signal(sig, self._request_stop) for sig in (signal.SIGTERM, signal.SIGINT)}
        try:
            self._train()
        finally:
            for sig, handler in previous.items():
                signal.signal(sig, handler)
        return {"step": self.step, **self.summary}

    def _train(self):
        self.out.mkdir(parents=True, exist_ok=True)
        if self.cfg.log_placement:
            (self.out / "placement").mkdir(exist_ok=True)
        self.logger.rewind(self.step)
        self.engine.train()
        speed = Throughput(self.model_cfg.flops_per_token(), self.cfg.steps, self.step, self.cfg.peak_tflops)
        loss_window = PositionLoss(self.device)
        self.log(f"training from step {self.step} to {self.cfg.steps}: {self.world_size} rank(s) x "
                 f"{self.streams} streams x {self.model_cfg.segment_len} tokens, "
                 f"{self.grad_accum} accumulation step(s), bptt {self.model_cfg.bptt_segments}")
        while self.step < self.cfg.steps and not self.stopping:
            self.train_step(loss_window)
            self.step += 1
            speed.add(self.tokens_per_step)
            if self.step % self.cfg.log_every == 0 or self.step == self.cfg.steps:
                self.log_metrics(loss_window, speed.rate(self.step, self.world_size))
                self.train_loss.merge(loss_window)
                loss_window = PositionLoss(self.device)
            if (self.step % self.cfg.eval_every == 0 or self.step == self.cfg.steps) and len(self.store.docs("val")):
                self.evaluate()
                speed.restart(self.step)
            if self.step % self.cfg.save_every == 0:
                self.save()
                speed.restart(self.step)
        if self.step != self.saved_step:
            self.save()
        if self.stopping:
            self.log(f"stopped by signal at step {self.step}; resume with --resume auto")

    def train_step(self, loss_window: PositionLoss):
        """One optimizer step; a step skipped for a non-finite loss or gradient (NonFiniteGuard)
        is taken again on the next micro-batches."""
        while not self.try_step(loss_window):
            pass

    def try_step(self, loss_window: PositionLoss) -> bool:
        """Draw the step's gradient_accumulation_steps micro-batches (bptt_segments consecutive
        segments of every stream each; the carried state comes in detached) and back-propagate
        each. The loss is normalised by the step's target tokens on all ranks (one all-reduce
        before the first backward): each micro-batch back-propagates its summed token loss times
        world_size * grad_accum / global tokens, which DeepSpeed's division by grad_accum and mean
        over ranks turn into the global token mean, so the gradient is the same on any number of
        ranks. One host sync, after the last backward: whether the loss and the gradient are
        finite on every rank, and whether a rank has been asked to stop. Returns whether the
        update was applied."""
        k, grad_accum = self.model_cfg.bptt_segments, self.grad_accum
        batches = [take(self.sampler, k) for _ in range(grad_accum)]
        local = sum(int((b.targets != -100).sum()) for b in batches)  # on the host: the batches are still there
        tokens = all_reduce_sum(torch.tensor(local, device=self.device))
        scale = self.world_size * grad_accum / tokens.clamp(min=1)
        total = torch.zeros((), device=self.device)  # the step's summed token loss on this rank
        for i, batch in enumerate(batches):
            batch = batch.to(self.device)
            out = self.engine.module.forward_stream(batch.ids, batch.targets, self.state, batch.reset, bptt=k,
                                                    keep_logits=False, step=self.engine)
            self.state = out.state
            loss_window.add(out.token_loss, batch.targets, batch.seg_index)
            if self.cfg.log_placement:
                with open(self.out / "placement" / f"rank{self.rank}.jsonl", "a") as f:
                    f.write(json.dumps(placement(batch, self.rank, self.step + 1)) + "\n")
            self.tokens_seen += self.tokens_per_step // grad_accum
            summed = out.loss * out.n_tokens
            total = total + summed.detach()
            if i < grad_accum - 1:
                self.engine.backward(summed * scale)
                self.engine.step()
                continue
            # A non-finite loss anywhere in the step makes this backward's gradient NaN, so that
            # the gradient check below (or DeepSpeed's own) skips the step on every rank.
            poison = torch.where(torch.isfinite(total), 1.0, float("nan"))
            self.engine.backward(summed * scale * poison)
            norm = self._grad_norm()  # the same on every rank: DeepSpeed has summed the gradients
            zero = torch.zeros((), device=self.device)
            flags = torch.stack([~torch.isfinite(total), torch.tensor(self.stop_requested, device=self.device),
                                 zero if norm is None else ~torch.isfinite(norm), zero if norm is None else norm])
            dist.all_reduce(flags, op=dist.ReduceOp.MAX)
            bad_loss, stop, bad_grad, norm_value = flags.tolist()
            self.stopping = bool(stop)  # on every rank at the same step, wherever the signal came
            skipped = self.engine.skipped_steps
            self._step_without_update() if bad_grad else self.engine.step()
            # DeepSpeed's own optimizers skip a non-finite gradient themselves (under fp16 such a
            # skip is the loss scaler's, not a fault)
            bad_grad = self.engine.skipped_steps > skipped and not self.engine.fp16_enabled()
            if not self.guard.apply(not (bad_loss or bad_grad), self.step + 1, "loss" if bad_loss else "gradient"):
                self.state = None if self.state is None else torch.where(torch.isfinite(self.state), self.state, 0)
                return False
            self.grad_norm = None if norm is None else norm_value
        return True

    def _step_without_update(self):
        """engine.step() for a step whose gradient is not finite under a plain torch optimizer
        (ZeRO 0 in fp32), which has no check of its own, through DeepSpeed's path for an fp16
        overflow (engine._take_model_step): for this one step the optimizer gets the overflow
        flag the engine reads and a step that does nothing, and the engine drops the gradients,
        keeps the learning-rate schedule where it is and counts the step in skipped_steps, so its
        counters stay those of the steps applied. DeepSpeed's bf16, fp16 and ZeRO optimizers take
        that path themselves on a non-finite gradient."""
        optimizer = self.engine.optimizer
        optimizer.overflow, optimizer.step = True, lambda closure=None: None
        try:
            self.engine.step()
        finally:
            del optimizer.overflow, optimizer.step

    def _grad_norm(self) -> torch.Tensor | None:
        """Of the step's gradient before clipping, on the device, where a plain torch optimizer
        steps (ZeRO 0 in fp32: the gradients are on the parameters). DeepSpeed's own optimizers
        (ZeRO 1-3, bf16, fp16) check the gradient themselves and hand its norm over after the step."""
        if hasattr(self.engine.optimizer, "overflow"):
            return None
        grads = [p.grad for p in self.engine.module.parameters() if p.grad is not None]
        return torch.nn.utils.get_total_norm(grads) if grads else None

    def log_metrics(self, window: PositionLoss, rate: dict):
        loss, table = window.summary(all_reduce_sum)
        if self.grad_norm is None and self.engine.get_global_grad_norm() is not None:
            self.grad_norm = float(self.engine.get_global_grad_norm())
        values = {"train/loss": loss, "train/perplexity": math.exp(min(loss, 50)),
                  "train/lr": self.engine.get_lr()[0], "train/tokens_per_s": rate["tokens_per_s"],
                  "train/tflops_per_gpu": rate["tflops_per_gpu"], "train/padding_fraction": self.sampler.pad_fraction,
                  "train/tokens_seen": self.tokens_seen, "train/eta_s": rate["eta_s"]}
        if self.grad_norm is not None:
            values["train/grad_norm"] = self.grad_norm
        if self.state is not None:
            values["train/state_norm"] = self.state.float().norm(dim=-1).mean().item()
        if "mfu" in rate:
            values["train/mfu"] = rate["mfu"]
        values.update({f"memory/peak_{k}_gib": v for k, v in peak_memory_gib().items()})
        values.update({f"train_by_segment/{k}": v for k, v in table.items()})
        self.logger.log(self.step, values)
        self.summary.update(values)

    @torch.no_grad()
    def evaluate(self) -> dict[str, float]:
        """Validation loss and loss by segment index on the held-out split, from its start."""
        self.engine.eval()
        sampler = SegmentStreamSampler(self.store, "val", self.rank, self.world_size, self.streams,
                                       self.model_cfg.segment_len, self.cfg.seed)
        batch = take(sampler, self.cfg.eval_segments).to(self.device)
        out = self.engine.module.forward_stream(batch.ids, batch.targets, reset=batch.reset, keep_logits=False,
                                                step=self.engine)
        acc = PositionLoss(self.device)
        acc.add(out.token_loss, batch.targets, batch.seg_index)
        self.engine.train()
        loss, table = acc.summary(all_reduce_sum)
        _, train_table = self.train_loss.summary(all_reduce_sum)
        values = {"val/loss": loss, "val/perplexity": math.exp(min(loss, 50)),
                  **{f"val_by_segment/{k}": v for k, v in table.items()}}
        self.logger.log(self.step, values)
        self.summary.update(values)
        self.logger.figure(self.step, "loss_by_segment",
                           lambda: plot_position_loss({"train (since start)": train_table, "val": table}))
        return table

    def _request_stop(self, signum, frame):
        self.stop_requested = True
        self.log(f"signal {signum}: saving a checkpoint at the end of this step")

    def save(self):
        """Write this step's checkpoint (checkpoint.save); a step is saved once."""
        t0 = time.perf_counter()
        rank_state = {"sampler": self.sampler.state_dict(), "state": None if self.state is None else self.state.cpu()}
        path = ckpt.save(self.engine, self.ckpt_root, self.step, self.rank, self.world_size,
                         trainer_state=self.state_dict(), rank_state=rank_state,
                         configs=self._configs(),
                         tokenizer=getattr(self.store, "tokenizer_path", None), keep_last=self.cfg.keep_last)
        self.log(f"saved checkpoint {path} in {time.perf_counter() - t0:.2f} s")
        self.saved_step = self.step

    def _load(self, path: Path):
        """Load checkpoint PATH (found and verified in __init__, the engine built for it)."""
        t0 = time.perf_counter()
        trainer_state, mine = ckpt.load(self.engine, path, self.rank, self.world_size)
        self.step, self.tokens_seen = trainer_state["step"], trainer_state["tokens_seen"]
        self.sampler.load_state_dict(mine["sampler"])
        self.state = None if mine["state"] is None else mine["state"].to(self.device)
        self.saved_step = self.step
        self.log(f"resumed from {path} at step {self.step} (loaded in {time.perf_counter() - t0:.2f} s)")

    def close(self):
        self.logger.close()
