"""Training metrics: loss by position in the document, throughput, MFU, memory, TensorBoard."""
import json
import math
import resource
import time
from pathlib import Path

import torch

N_BUCKETS = 16


def bucket_first(b: int) -> int:
    """The first segment index of bucket b."""
    return 0 if b == 0 else 2 ** (b - 1)


def bucket_label(b: int) -> str:
    """Segment-index buckets 0, 1, 2-3, 4-7, ...: the last one is open-ended."""
    if b <= 1:
        return str(b)
    lo, hi = bucket_first(b), 2 ** b - 1
    return f"{lo}+" if b == N_BUCKETS - 1 else f"{lo}-{hi}"


def bucket_of(seg_index: torch.Tensor) -> torch.Tensor:
    """(B,) segment index within the document -> bucket, without leaving the device."""
    b = torch.floor(torch.log2(seg_index.clamp(min=1).double())).long() + 1
    return torch.where(seg_index == 0, 0, b).clamp(max=N_BUCKETS - 1)


class PositionLoss:
    """Sums of loss and counted tokens per segment-index bucket, kept on the device."""

    def __init__(self, device):
        self.sums = torch.zeros(N_BUCKETS, dtype=torch.float64, device=device)
        self.counts = torch.zeros(N_BUCKETS, dtype=torch.float64, device=device)

    def add(self, token_loss, targets, seg_index):
        """token_loss, targets (B, k * t): k segments of t tokens per row; seg_index (B, k), or (B,)
        when k = 1, the index of each segment within its document."""
        seg_index = seg_index.reshape(token_loss.shape[0], -1)  # (B, k)
        b = bucket_of(seg_index.flatten())
        per_segment = token_loss.shape[:1] + seg_index.shape[1:] + (-1,)  # (B, k, t)
        self.sums.index_add_(0, b, token_loss.detach().double().view(per_segment).sum(2).flatten())
        self.counts.index_add_(0, b, (targets != -100).double().view(per_segment).sum(2).flatten())

    def merge(self, other: "PositionLoss"):
        self.sums += other.sums
        self.counts += other.counts

    def summary(self, all_reduce=None) -> tuple[float, dict[str, float]]:
        """(mean loss over all counted tokens, {bucket label: mean loss} over buckets that saw
        tokens), summed over ranks first when `all_reduce` is given (one collective)."""
        both = torch.stack([self.sums, self.counts])
        if all_reduce is not None:
            all_reduce(both)
        sums, counts = both.tolist()
        table = {bucket_label(b): s / c for b, (s, c) in enumerate(zip(sums, counts)) if c > 0}
        return sum(sums) / max(sum(counts), 1), table


def peak_memory_gib() -> dict[str, float]:
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        return {"allocated": torch.cuda.max_memory_allocated() / 2**30,
                "reserved": torch.cuda.max_memory_reserved() / 2**30}
    return {"host_rss": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20}


def plot_position_loss(series: dict[str, dict[str, float]], title="loss by position in the document"):
    """A matplotlib figure: one line per model, x = segment-index bucket."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    labels = [bucket_label(b) for b in range(N_BUCKETS)]
    fig, ax = plt.subplots(figsize=(7, 4))
    for name, table in series.items():
        xs = [i for i, lab in enumerate(labels) if lab in table]
        ax.plot(xs, [table[labels[i]] for i in xs], marker="o", label=name)
    ax.set_xticks(range(N_BUCKETS), labels, rotation=45)
    ax.set_xlabel("segment index within the document")
    ax.set_ylabel("cross-entropy (nats/token)")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    return fig


class Throughput:
    """Tokens/s, model TFLOP/s and MFU between two calls of `rate`, and the ETA."""

    def __init__(self, flops_per_token: float, total_steps: int, start_step: int, peak_tflops: float):
        self.flops_per_token, self.total_steps, self.peak_tflops = flops_per_token, total_steps, peak_tflops
        self.t0, self.step0, self.tokens = time.perf_counter(), start_step, 0

    def add(self, tokens: int):
        self.tokens += tokens

    def restart(self, step: int):
        """Leave out of the rate what just happened (evaluation, checkpointing)."""
        self.t0, self.step0, self.tokens = time.perf_counter(), step, 0

    def rate(self, step: int, gpus: int) -> dict[str, float]:
        now = time.perf_counter()
        dt = max(now - self.t0, 1e-9)
        tok_s = self.tokens / dt
        out = {"tokens_per_s": tok_s, "eta_s": (self.total_steps - step) * dt / max(step - self.step0, 1)}
        tflops = tok_s * self.flops_per_token / 1e12
        out["tflops_per_gpu"] = tflops / gpus
        if torch.cuda.is_available():
            out["mfu"] = out["tflops_per_gpu"] / self.peak_tflops
        self.t0, self.step0, self.tokens = now, step, 0
        return out


def format_eta(seconds: float) -> str:
    if not math.isfinite(seconds):
        return "?"
    m, s = divmod(int(seconds), 60)
    h, m = divmod(m, 60)
    return f"{h}h{m:02d}m" if h else f"{m}m{s:02d}s"


class Logger:
    """One output of a run's numbers. `log` gets {name: value} at a step ("train/loss", ...)."""

    def log(self, step: int, values: dict[str, float]):
        raise NotImplementedError

    def message(self, text: str):
        """A line for the person watching (warnings, checkpoints): only the console shows it."""

    def figure(self, step: int, tag: str, fig):
        pass

    def rewind(self, step: int):
        """The run goes on from `step` (a resume): forget what was logged after it, so that every
        step is logged once."""

    def close(self):
        pass


CONSOLE = {"train/loss": "loss {:.4f}", "train/tokens_per_s": "{:,.0f} tok/s",
           "train/tflops_per_gpu": "{:.2f} TFLOP/s per rank", "train/mfu": "{:.1%} MFU", "val/loss": "val loss {:.4f}"}


class ConsoleLogger(Logger):
    """One line per log: `step 10/500 | loss 2.3456 | 12,345 tok/s | ... | eta 1m05s`."""

    def __init__(self, total_steps: int):
        self.total_steps = total_steps

    def log(self, step, values):
        parts = [f"step {step}/{self.total_steps}"]
        parts += [fmt.format(values[key]) for key, fmt in CONSOLE.items() if key in values]
        by_segment = {k.split("/", 1)[1]: v for k, v in values.items() if k.startswith("val_by_segment/")}
        if by_segment:
            parts.append("by segment: " + ", ".join(f"{k}: {v:.3f}" for k, v in by_segment.items()))
        if "train/eta_s" in values:
            parts.append(f"eta {format_eta(values['train/eta_s'])}")
        self.message(" | ".join(parts))

    def message(self, text):
        print(text, flush=True)


def read_metrics(run_dir) -> list[dict]:
    """RUN/metrics.jsonl as JsonlLogger writes it, one dict per log; a line still being written is
    left out, and a run that has logged nothing yet gives []."""
    path = Path(run_dir) / "metrics.jsonl"
    lines = path.read_text().splitlines() if path.is_file() else []
    return [json.loads(line) for line in lines if line.endswith("}")]


class JsonlLogger(Logger):
    """RUN/metrics.jsonl: one JSON object per log, {"step": N, name: value, ...}, unrounded."""

    def __init__(self, path):
        self.path = Path(path)

    def log(self, step, values):
        with open(self.path, "a") as f:
            f.write(json.dumps({"step": step, **values}) + "\n")

    def rewind(self, step):
        if self.path.is_file():
            lines = self.path.read_text().splitlines(keepends=True)
            self.path.write_text("".join(line for line in lines if json.loads(line)["step"] <= step))


class TensorBoardLogger(Logger):
    """RUN/tensorboard: scalars and figures; the writer opens at the first use, after a rewind."""

    def __init__(self, log_dir):
        self.log_dir, self.tb, self.purge_step = log_dir, None, None

    def _writer(self):
        if self.tb is None:
            from torch.utils.tensorboard import SummaryWriter
            self.tb = SummaryWriter(log_dir=str(self.log_dir), purge_step=self.purge_step)
        return self.tb

    def log(self, step, values):
        for tag, v in values.items():
            self._writer().add_scalar(tag, v, step)

    def figure(self, step, tag, fig):
        self._writer().add_figure(tag, fig, step)

    def rewind(self, step):
        self.purge_step = step + 1  # TensorBoard hides events at and after it written before

    def close(self):
        if self.tb is not None:
            self.tb.close()


class MetricsLogger(Logger):
    """Every output of a run behind one interface. Only rank 0 writes: the others get none."""

    def __init__(self, loggers: list[Logger]):
        self.loggers = loggers

    @classmethod
    def for_run(cls, out, rank: int, total_steps: int) -> "MetricsLogger":
        if rank != 0:
            return cls([])
        Path(out).mkdir(parents=True, exist_ok=True)
        return cls([ConsoleLogger(total_steps), JsonlLogger(Path(out) / "metrics.jsonl"),
                    TensorBoardLogger(Path(out) / "tensorboard")])

    def log(self, step, values):
        for logger in self.loggers:
            logger.log(step, values)

    def message(self, text):
        for logger in self.loggers:
            logger.message(text)

    def figure(self, step, tag, make):
        """make() builds the matplotlib figure, on rank 0 only."""
        if self.loggers:
            fig = make()
            for logger in self.loggers:
                logger.figure(step, tag, fig)

    def rewind(self, step):
        for logger in self.loggers:
            logger.rewind(step)

    def close(self):
        for logger in self.loggers:
            logger.close()
