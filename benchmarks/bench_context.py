"""Peak GPU memory and training tokens/s against document length: the folded model trains on a
stream of segments with the carried state (memory must stay flat), the full-attention baseline
(ModelConfig.full_attention) trains with its window set to the whole document (memory grows
until it runs out).

    python -m benchmarks.bench_context --model 125m --lengths 1024,4096,16384,65536,262144,1048576 \
        --plot benchmarks/results/context.png --json benchmarks/results/context.json
    python -m benchmarks.bench_context --quick        # CPU smoke test at toy size

Plain PyTorch (bf16 autocast, fused AdamW, one step per segment, batch of --streams documents), one process.
"""
import argparse

import torch

from tools.benchlib import device_name, print_table, train_by_segment, write_json
from foldscale.config import ModelConfig
from foldscale.model import FoldedLM


def train_on(cfg, length, streams, device, n_docs=1):
    """Train on `streams` random documents of `length` tokens, `n_docs` after another, one step
    per segment (a baseline's segment is the whole document). Returns (tokens/s, peak GiB)."""
    torch.manual_seed(0)
    model = FoldedLM(cfg).to(device).train()
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
    ids = torch.randint(0, cfg.vocab_size, (streams, length * n_docs + 1), device=device)
    tok_s = train_by_segment(model, ids[:, :-1], ids[:, 1:], device)
    peak = torch.cuda.max_memory_allocated() / 2**30 if device.type == "cuda" else float("nan")
    return tok_s, peak


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="125m")
    p.add_argument("--lengths", default="1024,4096,16384,65536,262144,1048576")
    p.add_argument("--streams", type=int, default=4)
    p.add_argument("--baseline-steps", "--baseline_steps", type=int, default=4,
                   help="steps timed for the baseline (one per document)")
    p.add_argument("--plot")
    p.add_argument("--json")
    p.add_argument("--quick", action="store_true")
    args = p.parse_args()
    if args.quick:
        args.model, args.lengths, args.streams = "tiny", "32,128", 2
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    folded = ModelConfig.load(args.model)
    rows = []
    for length in map(int, args.lengths.split(",")):
        row = {"doc_tokens": length}
        row["folded_tok_s"], row["folded_peak_gib"] = train_on(folded, length, args.streams, device)
        try:
            row["baseline_tok_s"], row["baseline_peak_gib"] = train_on(
                folded.full_attention(length), length, args.streams, device, n_docs=args.baseline_steps)
        except torch.OutOfMemoryError:
            row["baseline_tok_s"], row["baseline_peak_gib"] = "OOM", "OOM"
        torch.cuda.empty_cache() if device.type == "cuda" else None
        rows.append(row)
        print(row, flush=True)
    print(f"\n{device_name()}, model {args.model} ({folded.num_params() / 1e6:.0f}M), {args.streams} streams, "
          f"folded l={folded.segment_len}; baseline window = document length")
    print_table(rows, ["doc_tokens", "folded_tok_s", "folded_peak_gib", "baseline_tok_s", "baseline_peak_gib"])
    peaks = [r["folded_peak_gib"] for r in rows]
    if device.type == "cuda":
        print(f"folded peak memory spread: {(max(peaks) - min(peaks)) / min(peaks):.2%} of the smallest")
    write_json(args.json, rows, model=args.model, streams=args.streams)
    if args.plot:
        plot(rows, folded, args.model, args.plot)


def plot(rows, folded, model, path):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, (a, b) = plt.subplots(1, 2, figsize=(10, 4))
    xs = [r["doc_tokens"] for r in rows]
    for key, label in (("folded", f"folded (l={folded.segment_len})"), ("baseline", "full attention, window = doc")):
        pts = [(x, r[f"{key}_peak_gib"], r[f"{key}_tok_s"]) for x, r in zip(xs, rows)
               if not isinstance(r[f"{key}_peak_gib"], str)]
        a.plot([x for x, _, _ in pts], [m for _, m, _ in pts], marker="o", label=label)
        b.plot([x for x, _, _ in pts], [t for _, _, t in pts], marker="o", label=label)
    for ax, ylabel in ((a, "peak GPU memory (GiB)"), (b, "training tokens/s")):
        ax.set_xscale("log", base=2)
        ax.set_xlabel("document length (tokens)")
        ax.set_ylabel(ylabel)
        ax.grid(alpha=0.3)
        ax.legend()
    fig.suptitle(f"{model} on {device_name()}: baseline points stop where it ran out of memory")
    fig.tight_layout()
    fig.savefig(path, dpi=120)


if __name__ == "__main__":
    main()
