"""Issue 27's scaling table: context_use runs at several training budgets, gathered into one record.

Each input is the --json of one `experiments.context_use` run (one preset at one --train-tokens,
folded, local-only, full attention 4l at equal tokens and at equal FLOPs, all on one token store).
The record (`experiments/results/targets/text.json`) holds per run the overall losses, the gain
over local-only and the gap to full attention at equal FLOPs in every position bucket and in four
bucket ranges, the gain of full attention at equal tokens over local-only by range (what context
within its window buys at all, at this model size and budget), whether it meets the issue's target
(`target`: TARGET_GAIN below), and, per preset and range, the training tokens where the gap to
full attention (the mean over a budget's training seeds) changes sign, interpolated in log tokens
(or extrapolated from the two largest budgets, and marked so, where it has not changed sign yet),
and the gap taken apart into what full attention's extra tokens buy it and what the state buys
(`gap_parts_by_range`). The plot shows, per preset, the gain and the gap of each range against
training tokens. A preset's run with a recipe option changed (context_use's model config flags) is
a preset of its own, named by the fields that differ.

    python -m experiments.text_table RUN.json ... --json experiments/results/targets/text.json --plot text.png
"""
import argparse
import json
import math
import sys
from pathlib import Path

from foldscale.config import FoldscaleError, ModelConfig
from tools.benchlib import print_table

RANGES = [(0, 4), (4, 16), (16, 64), (64, None)]
"""Bucket ranges in segments of l: the first ends at full attention's window (4l); the target's
reach is 64l."""
TARGET_GAIN = 0.03
"""Issue 27's target: the folded model this much better than local-only in every range past full
attention's window, out to 64l and beyond, and no worse than full attention at equal FLOPs in any
bucket past that window."""


class TableError(FoldscaleError):
    """Run records that cannot make one table; the message says which and why."""


def range_label(lo: int, hi: int | None) -> str:
    return f"{lo}l+" if hi is None else f"{lo}-{hi}l"


def load_run(path) -> dict:
    """A context_use record, refused unless it has what the table needs."""
    try:
        record = json.loads(Path(path).read_text())
    except (OSError, ValueError) as e:
        raise TableError(f"{path}: not a readable JSON record ({e})") from None
    if record.get("task") != "context_use" or "corpus" not in record:
        raise TableError(f"{path}: not a record of `python -m experiments.context_use` with a corpus entry "
                         "(made before issue 27's --train-tokens): run it again")
    return record


def by_range(rows: list[dict], l: int, model: str) -> dict[str, float]:
    """MODEL's token-weighted loss over each bucket range that has tokens."""
    out = {}
    for lo, hi in RANGES:
        inside = [r for r in rows if r["from_token"] // l >= lo and (hi is None or r["from_token"] // l < hi)]
        if inside:
            out[range_label(lo, hi)] = sum(r[model] * r["tokens"] for r in inside) / sum(r["tokens"] for r in inside)
    return out


def summarise(record: dict) -> dict:
    """One run of the table, in issue 27's keys, plus the bucket ranges and the reach."""
    overall, rows, l = record["overall"], record["rows"], record["model"]["segment_len"]
    ref = next(name for name in overall if name.startswith("full_"))
    flops = f"{ref}_flops"
    local, full, full_flops = (by_range(rows, l, m) for m in ("local_only", ref, flops))
    folded_range = by_range(rows, l, "folded")
    gain = {k: (local[k] - v) / local[k] for k, v in folded_range.items()}
    window = int(ref.removeprefix("full_").removesuffix("l"))
    far = [gain[k] for lo, hi in RANGES if lo >= window and (k := range_label(lo, hi)) in gain]
    tokens = {t["model"]: t["real_tokens"] for t in record["training"]}
    return {
        "preset": record["args"]["model"], "recipe": recipe(record["args"]["model"], record["model"]),
        "seed": record["args"]["seed"], "budget": record["args"]["train_tokens"] or f"{record['args']['steps']} steps",
        "segment_len": l, "full_window": ref,
        "train_tokens": tokens["folded"],
        "full_flops_reads": tokens[flops] / tokens["folded"],  # real tokens for the folded model's FLOPs
        "epochs": max(t["epochs"] for t in record["training"]),
        "overall": {"folded": overall["folded"], "local_only": overall["local_only"],
                    "full_equal_tokens": overall[ref], "full_equal_flops": overall[flops]},
        "gain_vs_local_by_bucket": {r["bucket"]: r["gain_vs_local"] for r in rows},
        "gap_to_full_flops_by_bucket": {r["bucket"]: r["gap_to_full_flops"] for r in rows},
        "gain_vs_local_by_range": gain,
        "gap_to_full_flops_by_range": {k: (v - full_flops[k]) / full_flops[k] for k, v in folded_range.items()},
        "full_gain_vs_local_by_range": {k: (v - full[k]) / v for k, v in local.items()},
        # the gap taken apart, both parts in units of full attention's loss at equal FLOPs (gap =
        # tokens - state): what full attention's extra tokens buy it, what the state buys the folded
        # model over full attention at equal tokens
        "gap_parts_by_range": {k: {"tokens": (full[k] - full_flops[k]) / full_flops[k],
                                   "state": (full[k] - v) / full_flops[k]} for k, v in folded_range.items()},
        "target": {"gain_vs_local": range_label(*RANGES[-1]) in gain and min(far, default=0) >= TARGET_GAIN,
                   "gap_to_full_flops": all(r["gap_to_full_flops"] <= 0 for r in rows if r["from_token"] >= window * l)},
        "reach_tokens": record["reach_tokens"], "context_cuts": record.get("context_cuts"),
        "device": record["device"], "date": record["date"], "command": record["command"],
    }


def recipe(preset: str, model: dict) -> str:
    """The folded model's bptt_segments and every other config field that differs from its preset
    (context_use's model flags), e.g. `bptt_segments=4 state_gate_hard=true`."""
    base = ModelConfig.load(preset).to_dict()
    changed = [k for k, v in model.items() if k not in ("vocab_size", "bptt_segments") and v != base[k]]
    return " ".join(f"{k}={json.dumps(model[k])}" for k in ["bptt_segments", *changed])


def name(run: dict) -> str:
    """The preset and its recipe, e.g. `default bptt_segments=4 state_gate_hard=true`."""
    return f"{run['preset']} {run['recipe']}"


def curve(runs: list[dict], key: str, label: str) -> list[tuple[float, float]]:
    """(training tokens, value of run[key][label]) per training budget, both the mean over the
    budget's seeds, in order of tokens."""
    budgets = {}
    for r in runs:
        if label in r[key]:
            budgets.setdefault(r["budget"], []).append((r["train_tokens"], r[key][label]))
    return sorted(tuple(sum(v) / len(v) for v in zip(*points)) for points in budgets.values())


def crossings(runs: list[dict]) -> list[dict]:
    """Per preset (with its recipe) and range, the training tokens where the gap to full attention
    at equal FLOPs (the mean over seeds) changes sign between two budgets, interpolated linearly in
    log tokens; where it has not changed sign but the two largest budgets bring it closer to zero,
    the tokens where the line through them crosses zero (`extrapolated`: a line through two points
    says what the trend would give, not where the crossing is)."""
    out = []
    for preset in dict.fromkeys(map(name, runs)):
        mine = [r for r in runs if name(r) == preset]
        for label in dict.fromkeys(k for r in mine for k in r["gap_to_full_flops_by_range"]):
            points = curve(mine, "gap_to_full_flops_by_range", label)
            found = False
            for (t0, g0), (t1, g1) in zip(points, points[1:]):
                if g0 * g1 < 0:
                    found = True
                    x = math.log(t0) + (math.log(t1) - math.log(t0)) * g0 / (g0 - g1)
                    out.append({"preset": preset, "range": label, "train_tokens": round(math.exp(x)),
                                "folded": "ahead" if g1 < 0 else "behind", "extrapolated": False})
            if not found and len(points) > 1 and 0 < abs(g1) < abs(g0):
                x = math.log(t1) + (math.log(t1) - math.log(t0)) * g1 / (g0 - g1)
                out.append({"preset": preset, "range": label, "train_tokens": round(math.exp(x)),
                            "folded": "ahead" if g1 > 0 else "behind", "extrapolated": True})
    return out


def table(paths: list, corpus: str | None = None) -> dict:
    """The record of issue 27 from the context_use records at PATHS (one corpus)."""
    records = [load_run(p) for p in paths]
    if not records:
        raise TableError("no run records given")
    prints = {r["corpus"]["fingerprint"] for r in records}
    if len(prints) > 1:
        raise TableError(f"the runs read {len(prints)} different token stores ({', '.join(sorted(prints))}): "
                         "give the records of one corpus")
    runs = sorted((summarise(r) for r in records), key=lambda r: (name(r), r["train_tokens"], r["seed"]))
    return {"device": " / ".join(dict.fromkeys(r["device"] for r in runs)), "date": max(r["date"] for r in runs),
            "corpus": corpus or records[0]["corpus"]["source"], "corpus_fingerprint": prints.pop(),
            "corpus_tokens": records[0]["corpus"]["tokens"],
            "corpus_train_tokens": records[0]["corpus"]["train_tokens"], "runs": runs,
            "crossings": crossings(runs)}


def plot(record: dict, path):
    """Per preset: gain vs local-only and gap to full attention at equal FLOPs against training
    tokens, one line per bucket range through the mean over seeds, a dot per seed."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    presets = list(dict.fromkeys(map(name, record["runs"])))
    fig, axes = plt.subplots(len(presets), 2, figsize=(10, 3.6 * len(presets)), squeeze=False)
    for row, preset in zip(axes, presets):
        runs = [r for r in record["runs"] if name(r) == preset]
        for ax, key, what in ((row[0], "gain_vs_local_by_range", "gain vs local-only"),
                              (row[1], "gap_to_full_flops_by_range", "gap to full attention, equal FLOPs")):
            for label in dict.fromkeys(k for r in runs for k in r[key]):
                (line,) = ax.plot(*zip(*[(t, 100 * v) for t, v in curve(runs, key, label)]), label=label)
                ax.scatter([r["train_tokens"] for r in runs if label in r[key]],
                           [100 * r[key][label] for r in runs if label in r[key]], color=line.get_color(), s=12)
            ax.axhline(0, color="gray", lw=0.8)
            ax.set_xscale("log")
            ax.set_xlabel("training tokens (folded model)")
            ax.set_ylabel("%")
            ax.set_title(f"{preset} (l={runs[0]['segment_len']}): {what}")
            ax.grid(alpha=0.3)
            ax.legend(title="positions", fontsize=8)
    fig.suptitle(f"{record['corpus']}: gain > 0 and gap < 0 favour the carried state")
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("runs", nargs="+", help="context_use --json records")
    p.add_argument("--corpus", help="the corpus's name in the record (default: the store's source)")
    p.add_argument("--json", help="where the record goes (issue 27: experiments/results/targets/text.json)")
    p.add_argument("--plot", help="PNG of gain and gap against training tokens")
    args = p.parse_args(argv)
    record = table(args.runs, args.corpus)
    print_table([{"preset": name(r), "train_tokens": r["train_tokens"], "seed": r["seed"], "epochs": r["epochs"],
                  **r["overall"], **{f"gain {k}": v for k, v in r["gain_vs_local_by_range"].items()},
                  **{f"gap {k}": v for k, v in r["gap_to_full_flops_by_range"].items()},
                  **{f"met: {k}": v for k, v in r["target"].items()}} for r in record["runs"]],
                ["preset", "train_tokens", "seed", "epochs", "folded", "local_only", "full_equal_tokens",
                 "full_equal_flops", *[f"{w} {range_label(*r)}" for w in ("gain", "gap") for r in RANGES],
                 "met: gain_vs_local", "met: gap_to_full_flops"])
    print("\nwhat context buys at all: full attention (equal tokens) against local-only")
    print_table([{"preset": name(r), "train_tokens": r["train_tokens"], "seed": r["seed"], "full": r["full_window"],
                  "reads at equal FLOPs": f"{r['full_flops_reads']:.2f}x",
                  **{f"gain {k}": v for k, v in r["full_gain_vs_local_by_range"].items()}} for r in record["runs"]],
                ["preset", "train_tokens", "seed", "full", "reads at equal FLOPs",
                 *[f"gain {range_label(*r)}" for r in RANGES]])
    print("\nwhy the gap to full attention at equal FLOPs (gap = tokens - state, in units of its loss): what "
          "its extra tokens buy full attention, and what the state buys over full attention at equal tokens")
    print_table([{"preset": name(r), "train_tokens": r["train_tokens"], "seed": r["seed"],
                  **{f"{part} {k}": v[part] for k, v in r["gap_parts_by_range"].items() for part in ("tokens", "state")}}
                 for r in record["runs"]],
                ["preset", "train_tokens", "seed", *[f"{part} {range_label(*r)}" for r in RANGES
                                                     for part in ("tokens", "state")]])
    for c in record["crossings"]:
        how = ("would change sign, were the line through the two largest budgets to go on, near" if c["extrapolated"]
               else "changes sign near")
        print(f"{c['preset']}, {c['range']}: the gap to full attention at equal FLOPs {how} "
              f"{c['train_tokens']:,} training tokens (folded {c['folded']} after it)")
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(record, indent=1) + "\n")
    if args.plot:
        plot(record, args.plot)
    return record


if __name__ == "__main__":
    try:
        main()
    except FoldscaleError as e:
        sys.exit(f"text_table: {e}")
