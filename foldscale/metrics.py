"""Training metrics: loss by position in the document, throughput, MFU, memory, TensorBoard."""
import math
import os
import resource
import time

import torch

N_BUCKETS = 16
PEAK_TFLOPS = float(os.environ.get("FOLDSCALE_PEAK_TFLOPS", 800.0))
"""bf16 matrix-product ceiling used for MFU: 800 TFLOP/s, measured on the H100 (8192^3)."""


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
        """token_loss, targets (B, t); seg_index (B,)."""
        b = bucket_of(seg_index)
        self.sums.index_add_(0, b, token_loss.detach().double().sum(1))
        self.counts.index_add_(0, b, (targets != -100).double().sum(1))

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

    def __init__(self, flops_per_token: float, total_steps: int, start_step: int):
        self.flops_per_token, self.total_steps = flops_per_token, total_steps
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
            out["mfu"] = out["tflops_per_gpu"] / PEAK_TFLOPS
        self.t0, self.step0, self.tokens = now, step, 0
        return out


def format_eta(seconds: float) -> str:
    if not math.isfinite(seconds):
        return "?"
    m, s = divmod(int(seconds), 60)
    h, m = divmod(m, 60)
    return f"{h}h{m:02d}m" if h else f"{m}m{s:02d}s"


class Writer:
    """TensorBoard scalars and figures; only rank 0 writes, the others hold a no-op."""

    def __init__(self, log_dir, rank: int):
        self.tb = None
        if rank == 0:
            from torch.utils.tensorboard import SummaryWriter
            self.tb = SummaryWriter(log_dir=str(log_dir))

    def scalars(self, values: dict[str, float], step: int):
        if self.tb:
            for tag, v in values.items():
                self.tb.add_scalar(tag, v, step)

    def figure(self, tag: str, fig, step: int):
        if self.tb:
            self.tb.add_figure(tag, fig, step)

    def close(self):
        if self.tb:
            self.tb.close()
