"""How much context does the folded model really use? Loss by distance on real text.

Three models of one shape are trained for the same number of tokens on one token store, each
through `launch/pretrain.py` (the DeepSpeed trainer), then exported and evaluated on exactly the
same held-out documents (what `foldscale eval --compare` does):

    folded          the preset as it is
    local_only      the same with use_state=False: every segment starts from S0
    full_Wl         n_global=0, the same blocks all local, window W x l (no carried state), for each
                    W of --windows (the first is the reference for the gap)

The report is the loss in each position bucket (segment index p // l of a token at position
p), the largest distance at which the folded model is still >= --margin (1%) better than the
local-only ablation, and its gap to full attention. A gain at position p does not say the help
comes from p tokens back, so --reach also reads the documents with the folded model's context
cut to K segments (a fresh state every K segments, `foldscale eval --context`): the loss on
tokens past the largest K shows how far back the model's useful context reaches.

    python tools/context_use.py --model default --data STORE --steps 1000 --json tools/results/context_use.json
    python tools/context_use.py --quick              # CPU smoke test in about a minute
"""
import argparse
import dataclasses
import json
import os
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import torch  # noqa: E402

from benchlib import device_name, print_table, write_json  # noqa: E402
from foldscale.config import ModelConfig, read_json  # noqa: E402
from foldscale.data import TokenStore  # noqa: E402
from foldscale.evaluate import evaluate  # noqa: E402
from foldscale.export import export  # noqa: E402
from foldscale.metrics import N_BUCKETS, bucket_first, bucket_label, plot_position_loss  # noqa: E402
from foldscale.model import FoldedLM  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]


def variants(cfg: ModelConfig, windows: list[int]) -> dict[str, ModelConfig]:
    full = {f"full_{w}l": dataclasses.replace(cfg, n_local=cfg.n_local + cfg.n_global, n_global=0,
                                              segment_len=w * cfg.segment_len, bptt_segments=1) for w in windows}
    return {"folded": cfg, "local_only": dataclasses.replace(cfg, use_state=False), **full}


def launch(name: str, cfg: ModelConfig, ds: dict, args, work: Path) -> tuple[subprocess.Popen, Path]:
    """Start one training run; its console goes to WORK/NAME/train.log."""
    run = work / name
    run.mkdir(parents=True, exist_ok=True)
    cfg.to_json(run / "model.json")
    (run / "ds.json").write_text(json.dumps(ds, indent=2))
    cmd = [sys.executable, str(ROOT / "launch" / "pretrain.py"), "--ds_config", str(run / "ds.json"),
           "--model", str(run / "model.json"), "--data", args.data, "--out", str(run / "run"),
           "--steps", str(args.steps), "--save_every", str(args.steps), "--eval_every", str(args.steps + 1),
           "--log_every", str(max(1, args.steps // 20)), "--seed", str(args.seed)]
    log = run / "train.log"
    return subprocess.Popen(cmd, stdout=open(log, "w"), stderr=subprocess.STDOUT, cwd=ROOT), log


def train_all(configs: dict[str, ModelConfig], args, work: Path):
    """Train every variant for the same tokens per step, --jobs at a time, showing progress."""
    base = read_json(args.ds_config, "no such DeepSpeed config")
    tokens_per_step = args.streams * configs["folded"].segment_len * configs["folded"].bptt_segments
    queue, running = list(configs.items()), {}
    t0 = time.perf_counter()
    while queue or running:
        while queue and len(running) < args.jobs:
            name, cfg = queue.pop(0)
            streams, rest = divmod(tokens_per_step, cfg.segment_len * cfg.bptt_segments)
            if rest or streams < 1:
                raise SystemExit(f"{name}: {tokens_per_step} tokens per step is not a whole number of "
                                 f"{cfg.segment_len * cfg.bptt_segments}-token micro-batches; change --streams")
            ds = {**base, "train_micro_batch_size_per_gpu": streams, "gradient_accumulation_steps": 1}
            ds.pop("train_batch_size", None)
            running[name] = launch(name, cfg, ds, args, work)
            time.sleep(1)  # each lone process picks a free port: do not race them
        time.sleep(args.poll)
        for name, (proc, log) in list(running.items()):
            lines = log.read_text().splitlines()
            progress = next((x for x in reversed(lines) if x.startswith("step ")), "starting")
            print(f"[{name} {(time.perf_counter() - t0) / 60:.1f} min] {progress}", flush=True)
            if proc.poll() is not None:
                del running[name]
                if proc.returncode:
                    print("\n".join(lines[-30:]), file=sys.stderr)
                    raise SystemExit(f"{name}: training failed (exit {proc.returncode}); log in {log}")
    return tokens_per_step * args.steps


def analyse(result: dict, margin: float) -> dict:
    """Gains by bucket and the largest distance where folded beats local-only by >= margin; the
    gap is to the first full-attention model."""
    by_name = {r["model"]: r for r in result["models"]}
    folded, local = by_name["folded"]["by_position"], by_name["local_only"]["by_position"]
    others = {k: v["by_position"] for k, v in by_name.items() if k.startswith("full_")}
    full = next(iter(others.values()))
    counts = by_name["folded"]["tokens_by_position"]
    l, rows, reach = result["position_unit"], [], None
    for b in range(N_BUCKETS):
        label = bucket_label(b)
        if label not in folded:
            continue
        gain = (local[label] - folded[label]) / local[label]
        rows.append({"bucket": label, "from_token": bucket_first(b) * l, "tokens": counts[label],
                     "folded": folded[label], "local_only": local[label],
                     **{k: v.get(label) for k, v in others.items()}, "gain_vs_local": gain,
                     "gap_to_full": (folded[label] - full[label]) / full[label] if label in full else None})
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


QUICK = dict(model="tiny", steps=30, streams=8, windows="4,1", reach="1,4", max_tokens=20000, eval_streams=8, poll=2.0,
             ds_config=str(ROOT / "ds_configs" / "cpu.json"))


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="default", help="preset or model .json (the folded model)")
    p.add_argument("--bptt_segments", type=int, default=None, help="override the folded model's bptt_segments")
    p.add_argument("--data", help="token store (default: the built-in corpus)")
    p.add_argument("--ds_config", default=None,
                   help="DeepSpeed JSON (default: ds_configs/dp-zero1.json on a GPU, cpu.json otherwise)")
    p.add_argument("--steps", type=int, default=1000)
    p.add_argument("--streams", type=int, default=32, help="streams of the folded model per step")
    p.add_argument("--windows", default="8", help="full-attention windows in segments of l, e.g. 8,1")
    p.add_argument("--margin", type=float, default=0.01, help="relative gain that counts as using the context")
    p.add_argument("--reach", default="1,2,4,8,16,32",
                   help="context cuts K (segments) for the folded model; '' skips this part")
    p.add_argument("--max_tokens", type=int, default=500_000, help="held-out tokens evaluated")
    p.add_argument("--eval_streams", type=int, default=16)
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
    cfg = ModelConfig.load(args.model, bptt_segments=args.bptt_segments)
    cfg.vocab_size = store.vocab_size
    configs = variants(cfg, [int(w) for w in args.windows.split(",")])
    work = Path(args.work)
    print(f"context use: {args.model} (l={cfg.segment_len}, {cfg.num_params():,} parameters), "
          f"{args.steps} steps, {len(configs)} models, on {device_name()}", flush=True)
    t0 = time.perf_counter()
    tokens = train_all(configs, args, work)
    train_minutes = (time.perf_counter() - t0) / 60
    models = {}
    for name in configs:
        export(work / name / "run", work / name / "export")
        models[name] = FoldedLM.from_pretrained(work / name / "export")
    device = "cuda" if gpu else "cpu"
    result = evaluate(models, store, "val", args.max_tokens, args.eval_streams, device)
    report = analyse(result, args.margin)
    if args.reach:
        report["reach"] = reach(models["folded"], result["models"][0], store, args, device)
    print(f"\n{result['tokens']:,} held-out tokens of {result['documents']} documents; every model trained "
          f"on {tokens:,} tokens; position buckets in segments of l = {result['position_unit']} tokens")
    print_table(report["rows"], ["bucket", "from_token", "tokens", "folded", "local_only", *report["full"],
                                 "gain_vs_local", "gap_to_full"])
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
               tokens_per_model=tokens, train_minutes=round(train_minutes, 2), margin=args.margin,
               reach_bucket=report["reach_bucket"], reach_tokens=report["reach_tokens"],
               context_cuts=report.get("reach"),
               evaluation={k: v for k, v in result.items() if k != "models"},
               overall={r["model"]: r["loss"] for r in result["models"]},
               args={k: v for k, v in vars(args).items()}, command=" ".join(["python"] + sys.argv))
    return report


if __name__ == "__main__":
    os.environ.setdefault("PYTHONUNBUFFERED", "1")
    main()
