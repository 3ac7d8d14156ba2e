"""How much context does the folded model really use? Loss by distance on real text.

Models of one shape are trained on one token store, each through `launch/pretrain.py` (the
DeepSpeed trainer), then exported and evaluated on exactly the same held-out documents (what
`foldscale eval --compare` does):

    folded          the preset as it is
    local_only      ModelConfig.local_only(): every segment starts from S0
    full_Wl         ModelConfig.full_attention(W x l): the same blocks all local, window W x l, no
                    carried state, for each W of --windows (the first is the reference for the gap;
                    by default bptt_segments, whose rows are the folded model's, then 8)
    full_Wl_flops   the reference again, trained for the folded model's training FLOPs

Every model trains on the folded model's number of real (non-padding) tokens. The sampler pads a
document's last segment, so a window of 8l pads up to 8l tokens per document where the folded
model pads up to l: at equal positions the baseline would read fewer real tokens (8.5% fewer on
the built-in corpus, BENCHMARKS.md). Each model's streams are set from the padding its window
gives on the store, rounded to whole streams, and its steps make up the rounding; the measured
padding and real tokens are reported. full_Wl_flops trains the reference with its streams for
as many steps as make flops_per_token x positions read (padding included) equal the folded
model's.

A stream is one document read per step, `row_tokens` (window x bptt_segments) of it at a time, so
at equal tokens per step a longer row means fewer documents per step. That alone costs a model
as much as the whole gap of the window-8l baseline (BENCHMARKS.md, "Fair baselines"), so the
default reference reads the folded model's rows: window bptt_segments x l, as many streams.

The report is the loss in each position bucket (segment index p // l of a token at position
p), the largest distance at which the folded model is still >= --margin (1%) better than the
local-only ablation, and its gap to full attention at equal tokens and at equal FLOPs. A gain at
position p does not say the help comes from p tokens back, so --reach also reads the documents
with the folded model's context cut to K segments (a fresh state every K segments, `foldscale
eval --context`): the loss on tokens past the largest K shows how far back its context reaches.

    python -m experiments.context_use --model default --data STORE --steps 1000 --json experiments/results/context_use.json
    python -m experiments.context_use --quick         # CPU smoke test in a few minutes
"""
import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import torch

from tools.benchlib import device_name, print_table, write_json
from foldscale.config import ModelConfig, read_json
from foldscale.data import TokenStore
from foldscale.evaluate import evaluate
from foldscale.export import export
from foldscale.metrics import N_BUCKETS, bucket_first, bucket_label, plot_position_loss, read_metrics
from foldscale.model import FoldedLM

ROOT = Path(__file__).resolve().parents[1]


def variants(cfg: ModelConfig, windows: list[int]) -> dict[str, ModelConfig]:
    full = {f"full_{w}l": cfg.full_attention(w * cfg.segment_len) for w in windows}
    return {"folded": cfg, "local_only": cfg.local_only(), **full}


def real_fraction(store: TokenStore, window: int) -> float:
    """Share of training positions that hold a real target when every training document is read
    in windows of `window` tokens, its last window padded, as the sampler reads it."""
    n = store.doc_lengths[store.docs("train")].astype(np.float64)
    return float((n - 1).sum() / (np.ceil(n / window) * window).sum())


def row_tokens(cfg: ModelConfig) -> int:
    """Consecutive tokens of its document a stream reads per step."""
    return cfg.segment_len * cfg.bptt_segments


def plan(configs: dict[str, ModelConfig], store: TokenStore, streams: int, steps: int) -> dict[str, dict]:
    """{run name: {"cfg", "streams", "steps"}}. Every model reads about the folded model's real
    (non-padding) tokens per step, in whole streams, for as many steps as make its real tokens
    equal; NAME_flops is the first full-attention model again, for the folded run's training FLOPs
    (flops_per_token x positions read, padding included)."""
    def real(cfg):
        return row_tokens(cfg) * real_fraction(store, cfg.segment_len)

    folded = configs["folded"]
    per_step = streams * real(folded)
    runs = {}
    for name, cfg in configs.items():
        s = max(1, round(per_step / real(cfg)))
        runs[name] = {"cfg": cfg, "streams": s, "steps": round(steps * per_step / (s * real(cfg)))}
    ref = next(name for name in configs if name.startswith("full_"))
    cfg, s = runs[ref]["cfg"], runs[ref]["streams"]
    flops = folded.flops_per_token() * streams * row_tokens(folded) * steps
    runs[f"{ref}_flops"] = {"cfg": cfg, "streams": s, "steps": round(flops / (cfg.flops_per_token() * s * row_tokens(cfg)))}
    return runs


def launch(name: str, run: dict, base_ds: dict, args, work: Path) -> subprocess.Popen:
    """Start one training run in WORK/NAME; its console goes to train.log, its metrics to run/metrics.jsonl."""
    d = work / name
    d.mkdir(parents=True, exist_ok=True)
    run["cfg"].to_json(d / "model.json")
    ds = {**base_ds, "train_micro_batch_size_per_gpu": run["streams"], "gradient_accumulation_steps": 1}
    ds.pop("train_batch_size", None)
    (d / "ds.json").write_text(json.dumps(ds, indent=2))
    steps = run["steps"]
    cmd = [sys.executable, str(ROOT / "launch" / "pretrain.py"), "--ds-config", str(d / "ds.json"),
           "--model", str(d / "model.json"), "--data", args.data, "--out", str(d / "run"),
           "--steps", str(steps), "--save-every", str(steps), "--eval-every", str(steps + 1),
           "--log-every", str(max(1, steps // 20)), "--seed", str(args.seed)]
    return subprocess.Popen(cmd, stdout=open(d / "train.log", "w"), stderr=subprocess.STDOUT, cwd=ROOT)


def metrics(work: Path, name: str) -> list[dict]:
    """The run's metrics.jsonl: one {"step": N, "train/loss": ...} per log."""
    return read_metrics(work / name / "run")


def train_all(runs: dict[str, dict], args, work: Path):
    """Train every run, --jobs at a time, with a progress line per run every --poll seconds."""
    base = read_json(args.ds_config, "no such DeepSpeed config")
    queue, running = list(runs), {}
    t0 = time.perf_counter()
    while queue or running:
        while queue and len(running) < args.jobs:
            name = queue.pop(0)
            running[name] = launch(name, runs[name], base, args, work)
            time.sleep(1)  # each lone process picks a free port: do not race them
        time.sleep(args.poll)
        for name, proc in list(running.items()):
            last = next((m for m in reversed(metrics(work, name)) if "train/loss" in m), None)
            progress = (f"step {last['step']}/{runs[name]['steps']} loss {last['train/loss']:.4f}"
                        if last else "starting")
            print(f"[{name} {(time.perf_counter() - t0) / 60:.1f} min] {progress}", flush=True)
            if proc.poll() is not None:
                del running[name]
                if proc.returncode:
                    log = work / name / "train.log"
                    print("\n".join(log.read_text().splitlines()[-30:]), file=sys.stderr)
                    raise SystemExit(f"{name}: training failed (exit {proc.returncode}); log in {log}")


def training_rows(runs: dict[str, dict], work: Path) -> list[dict]:
    """What each run read and cost, from its metrics.jsonl: positions (padding included), the
    padding fraction, real tokens, training FLOPs, and the last logged training loss."""
    rows = []
    for name, run in runs.items():
        last = [m for m in metrics(work, name) if "train/loss" in m][-1]
        positions, pad = last["train/tokens_seen"], last["train/padding_fraction"]
        cfg = run["cfg"]
        rows.append({"model": name, "window": cfg.segment_len, "streams": run["streams"],
                     "row_tokens": row_tokens(cfg), "steps": last["step"],
                     "positions": positions, "padding": pad, "real_tokens": round(positions * (1 - pad)),
                     "pflops": positions * cfg.flops_per_token() / 1e15, "train_loss": last["train/loss"]})
    return rows


def analyse(result: dict, margin: float) -> dict:
    """Gains by bucket and the largest distance where folded beats local-only by >= margin; the
    gaps are to the first full-attention model, at equal tokens and at equal FLOPs."""
    by_name = {r["model"]: r["by_position"] for r in result["models"]}
    folded, local = by_name["folded"], by_name["local_only"]
    others = {k: v for k, v in by_name.items() if k.startswith("full_")}
    ref = next(iter(others))
    references = {"gap_to_full": others[ref], "gap_to_full_flops": others.get(f"{ref}_flops", {})}
    counts = next(r["tokens_by_position"] for r in result["models"] if r["model"] == "folded")
    l, rows, reach = result["position_unit"], [], None
    for b in range(N_BUCKETS):
        label = bucket_label(b)
        if label not in folded:
            continue
        gain = (local[label] - folded[label]) / local[label]
        rows.append({"bucket": label, "from_token": bucket_first(b) * l, "tokens": counts[label],
                     "folded": folded[label], "local_only": local[label],
                     **{k: v.get(label) for k, v in others.items()}, "gain_vs_local": gain,
                     **{k: (folded[label] - v[label]) / v[label] if label in v else None
                        for k, v in references.items()}})
        if gain >= margin:
            reach = rows[-1]
    return {"rows": rows, "full": list(others), "reach_bucket": reach and reach["bucket"],
            "reach_tokens": reach and reach["from_token"]}


def far_loss(entry: dict, l: int, start: int) -> float:
    """Mean loss of one evaluated model over the buckets that begin at token `start` or later."""
    buckets = [bucket_label(b) for b in range(N_BUCKETS) if bucket_first(b) * l >= start]
    pairs = [(entry["by_position"][k], entry["tokens_by_position"][k]) for k in buckets if k in entry["by_position"]]
    return sum(x * n for x, n in pairs) / sum(n for _, n in pairs)


def reach(model: FoldedLM, unlimited: dict, store, args, device) -> list[dict]:
    """The folded model's loss on tokens past the largest cut, with its context cut to K segments."""
    l, ks = model.cfg.segment_len, sorted(int(k) for k in args.reach.split(","))
    start = max(ks) * l
    base = far_loss(unlimited, l, start)
    rows = []
    for k in ks + [None]:
        entry = unlimited if k is None else evaluate({"folded": model}, store, "val", args.max_tokens,
                                                     args.eval_streams, device, k * l)["models"][0]
        loss = far_loss(entry, l, start)
        rows.append({"context_segments": k or "all", "context_tokens": k * l if k else "all",
                     "loss_past": loss, "worse_than_all": (loss - base) / base})
    return rows


QUICK = dict(model="tiny", steps=60, streams=8, windows="4,1", reach="1,4", max_tokens=20000, eval_streams=8,
             poll=2.0, ds_config=str(ROOT / "ds_configs" / "cpu.json"))


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="default", help="preset or model .json (the folded model)")
    p.add_argument("--bptt-segments", "--bptt_segments", type=int, default=None,
                   help="override the folded model's bptt_segments")
    p.add_argument("--data", help="token store (default: the built-in corpus)")
    p.add_argument("--ds-config", "--ds_config", default=None,
                   help="DeepSpeed JSON (default: ds_configs/dp-zero1.json on a GPU, cpu.json otherwise)")
    p.add_argument("--steps", type=int, default=1000)
    p.add_argument("--streams", type=int, default=32, help="streams of the folded model per step")
    p.add_argument("--windows", help="full-attention windows in segments of l, e.g. 4,8,1; the first is the "
                   "reference (default: the folded model's bptt_segments, then 8)")
    p.add_argument("--margin", type=float, default=0.01, help="relative gain that counts as using the context")
    p.add_argument("--reach", default="1,2,4,8,16,32",
                   help="context cuts K (segments) for the folded model; '' skips this part")
    p.add_argument("--max-tokens", "--max_tokens", type=int, default=500_000, help="held-out tokens evaluated")
    p.add_argument("--eval-streams", "--eval_streams", type=int, default=16)
    p.add_argument("--jobs", type=int, default=3, help="training runs at once (they share the GPU)")
    p.add_argument("--poll", type=float, default=30.0, help="seconds between progress lines")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--work", default="runs/context_use", help="run directories go here")
    p.add_argument("--json")
    p.add_argument("--plot")
    p.add_argument("--quick", action="store_true", help=f"CPU smoke test; sets {QUICK}")
    args = p.parse_args(argv)
    if args.quick:
        vars(args).update(QUICK)
    gpu = torch.cuda.is_available()
    args.ds_config = args.ds_config or str(ROOT / "ds_configs" / ("dp-zero1.json" if gpu else "cpu.json"))
    if args.data is None:
        from foldscale.data import default_store
        args.data = str(default_store(max_files=40 if args.quick else None, vocab_size=512 if args.quick else 8192))
    store = TokenStore.open(args.data)
    cfg = ModelConfig.load(args.model, bptt_segments=args.bptt_segments, vocab_size=store.vocab_size)
    windows = [int(w) for w in args.windows.split(",")] if args.windows else list(dict.fromkeys([cfg.bptt_segments, 8]))
    runs = plan(variants(cfg, windows), store, args.streams, args.steps)
    work = Path(args.work)
    print(f"context use: {args.model} (l={cfg.segment_len}, {cfg.num_params():,} parameters), "
          f"{args.steps} steps, {len(runs)} runs, on {device_name()}", flush=True)
    t0 = time.perf_counter()
    train_all(runs, args, work)
    train_minutes = (time.perf_counter() - t0) / 60
    training = training_rows(runs, work)
    models = {}
    for name in runs:
        export(work / name / "run", work / name / "export")
        models[name] = FoldedLM.from_pretrained(work / name / "export")
    device = "cuda" if gpu else "cpu"
    result = evaluate(models, store, "val", args.max_tokens, args.eval_streams, device)
    report = analyse(result, args.margin)
    if args.reach:
        report["reach"] = reach(models["folded"], result["models"][0], store, args, device)
    print("\ntraining (streams = documents per step; positions include padding; FLOPs = flops_per_token x positions):")
    print_table(training, ["model", "window", "streams", "row_tokens", "steps", "positions", "padding",
                           "real_tokens", "pflops", "train_loss"])
    print(f"\n{result['tokens']:,} held-out tokens of {result['documents']} documents; position buckets in "
          f"segments of l = {result['position_unit']} tokens")
    print_table(report["rows"], ["bucket", "from_token", "tokens", "folded", "local_only", *report["full"],
                                 "gain_vs_local", "gap_to_full", "gap_to_full_flops"])
    print("overall loss: " + ", ".join(f"{r['model']} {r['loss']:.4f}" for r in result["models"]))
    if report["reach_bucket"] is None:
        print(f"the folded model is nowhere >= {args.margin:.0%} better than the local-only ablation")
    else:
        print(f"the folded model is still >= {args.margin:.0%} better than local-only at bucket "
              f"{report['reach_bucket']} (tokens from position {report['reach_tokens']:,} on)")
    if args.reach:
        start = max(int(k) for k in args.reach.split(",")) * cfg.segment_len
        print(f"\nfolded model with its context cut to K segments: loss on tokens from position {start:,} on")
        print_table(report["reach"], ["context_segments", "context_tokens", "loss_past", "worse_than_all"])
        costly = [r for r in report["reach"] if r["worse_than_all"] >= args.margin]
        print(f"cut to {costly[-1]['context_tokens']:,} tokens the loss is {costly[-1]['worse_than_all']:.1%} worse: "
              f"the model uses more context than that" if costly else
              f"even cut to {report['reach'][0]['context_tokens']:,} tokens the loss is < {args.margin:.0%} worse")
    if args.plot:
        fig = plot_position_loss({r["model"]: r["by_position"] for r in result["models"]},
                                 title=f"{args.model}: loss by position (segments of {result['position_unit']})")
        fig.savefig(args.plot, dpi=120)
    write_json(args.json, report["rows"], task="context_use", model=cfg.to_dict(), steps=args.steps,
               training=training, train_minutes=round(train_minutes, 2), margin=args.margin,
               reach_bucket=report["reach_bucket"], reach_tokens=report["reach_tokens"],
               context_cuts=report.get("reach"),
               evaluation={k: v for k, v in result.items() if k != "models"},
               overall={r["model"]: r["loss"] for r in result["models"]}, args=vars(args))
    return report


if __name__ == "__main__":
    os.environ.setdefault("PYTHONUNBUFFERED", "1")
    main()
