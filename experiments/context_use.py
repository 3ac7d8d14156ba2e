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

Every model trains on the folded model's number of real (non-padding) tokens, set by --steps or by
--train-tokens (the folded model's real tokens; `max` is the most that keeps every run within one
epoch). No run reads a document twice: a plan in which any stream would start its second epoch is
refused before training, with the budget that fits. The sampler pads a
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
    python -m experiments.context_use --model paper --data STORE --train-tokens 10e6 --plan  # steps, epochs, ETA
    python -m experiments.context_use --quick         # CPU smoke test in a few minutes

A run whose directory under --work already holds its finished training is not trained again, and an
interrupted one (stopped by SIGTERM, which saves a checkpoint) goes on from its checkpoint, so a
table larger than one device command is made by repeating the command. With --reuse DIR, a run
that another work directory under DIR finished with the same launch.json (model, DeepSpeed config,
data, seed, steps) is linked in instead of trained: a recipe option (--state-gate-hard)
changes the folded model and its local-only ablation but not full attention at equal tokens, nor
at equal FLOPs unless it changes the folded model's FLOPs (the state gate, the state's rows).
"""
import argparse
import dataclasses
import json
import multiprocessing
import os
import shutil
import subprocess
import sys
import time
from concurrent.futures import ProcessPoolExecutor, as_completed
from pathlib import Path

import numpy as np
import torch

from tools.benchlib import device_name, print_table, write_json
from foldscale import checkpoint as ckpt
from foldscale.config import FoldscaleError, ModelConfig, read_json
from foldscale.data import TokenStore
from foldscale.data.sampler import assign_documents
from foldscale.evaluate import OFFSET_PARTS, evaluate
from foldscale.flags import add_fields
from foldscale.export import export
from foldscale.metrics import N_BUCKETS, bucket_first, bucket_label, plot_position_loss, read_metrics
from foldscale.model import FoldedLM

ROOT = Path(__file__).resolve().parents[1]
MODEL_FIELDS = tuple(f.name for f in dataclasses.fields(ModelConfig))


class EpochError(FoldscaleError):
    """A training budget under which some run would read a document twice; the message gives the
    budget that fits."""


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


def epoch_steps(cfg: ModelConfig, store: TokenStore, streams: int, seed: int) -> int:
    """Steps a run of STREAMS streams takes before any stream starts its second epoch: the sampler
    deals the training documents to the streams once per epoch (a document of n tokens is ceil(n / l)
    segments) and every stream reads bptt_segments segments per step."""
    lengths = store.doc_lengths[store.docs("train")]
    segments = -(-lengths // cfg.segment_len)
    return min(int(segments[d].sum()) for d in assign_documents(lengths, streams, seed, 0)) // cfg.bptt_segments


def real_tokens_per_step(cfg: ModelConfig, store: TokenStore, streams: int) -> float:
    """Real (non-padding) training tokens a run of STREAMS streams reads per step, on average."""
    return streams * row_tokens(cfg) * real_fraction(store, cfg.segment_len)


def plan(configs: dict[str, ModelConfig], store: TokenStore, streams: int, steps: int, seed: int = 0) -> dict[str, dict]:
    """{run name: {"cfg", "streams", "steps", "real_tokens", "epoch_steps"}}. Every model reads about
    the folded model's real (non-padding) tokens per step, in whole streams, for as many steps as make
    its real tokens equal; NAME_flops is the first full-attention model again, for the folded run's
    training FLOPs (flops_per_token x positions read, padding included). epoch_steps is the most
    steps the run may take within one epoch (`epoch_steps`)."""
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
    for run in runs.values():
        run["real_tokens"] = run["steps"] * real_tokens_per_step(run["cfg"], store, run["streams"])
        run["epoch_steps"] = epoch_steps(run["cfg"], store, run["streams"], seed)
    return runs


def within_one_epoch(runs: dict[str, dict]) -> bool:
    return all(run["steps"] <= run["epoch_steps"] for run in runs.values())


def max_steps(configs: dict[str, ModelConfig], store: TokenStore, streams: int, seed: int) -> int:
    """The most steps of the folded model for which every run of `plan` stays within one epoch."""
    lo, hi = 0, epoch_steps(configs["folded"], store, streams, seed)
    while lo < hi:  # every run's steps grow with the folded model's
        mid = (lo + hi + 1) // 2
        lo, hi = (mid, hi) if within_one_epoch(plan(configs, store, streams, mid, seed)) else (lo, mid - 1)
    return lo


def budget_steps(configs: dict[str, ModelConfig], store: TokenStore, streams: int, seed: int,
                 steps: int | None, train_tokens: str | None) -> int:
    """The folded model's steps: STEPS, or as many as read TRAIN_TOKENS real tokens (a number such
    as 40e6, or `max`: the most within one epoch). EpochError when some run would pass one epoch."""
    most = max_steps(configs, store, streams, seed)
    per_step = real_tokens_per_step(configs["folded"], store, streams)
    if train_tokens == "max":
        steps = most
    elif train_tokens is not None:
        steps = max(1, round(float(train_tokens) / per_step))
    if steps > most:
        runs = plan(configs, store, streams, steps, seed)
        name, run = next((n, r) for n, r in runs.items() if r["steps"] > r["epoch_steps"])
        train = int(store.doc_lengths[store.docs("train")].sum())
        raise EpochError(f"{name} would read {run['real_tokens'] / 1e6:.1f}M tokens in {run['steps']:,} steps, past "
                         f"one epoch of {store.path}'s train split ({train / 1e6:.1f}M tokens; its {run['streams']} "
                         f"streams run out of documents after {run['epoch_steps']:,} steps): the most that keeps "
                         f"every run within one epoch is {most:,} steps, --train-tokens {most * per_step:.4g} "
                         "(or pass --train-tokens max)")
    return steps


def spec(run: dict, base_ds: dict, args) -> dict:
    """What one training run is (its launch.json): model, DeepSpeed config, data, seed and steps."""
    ds = {**base_ds, "train_micro_batch_size_per_gpu": run["streams"], "gradient_accumulation_steps": 1}
    ds.pop("train_batch_size", None)
    return json.loads(json.dumps({"model": run["cfg"].to_dict(), "ds": ds, "data": str(Path(args.data).resolve()),
                                  "seed": args.seed, "steps": run["steps"]}))


def saved_at(run_dir: Path, steps: int) -> bool:
    """Whether the training in RUN_DIR saved its newest complete checkpoint at STEPS, and it verifies."""
    newest = ckpt.newest_complete(ckpt.run_checkpoints(run_dir))
    try:
        return newest is not None and ckpt.verify(newest)["step"] == steps
    except ckpt.CheckpointError:
        return False


def reuse(runs: dict[str, dict], base_ds: dict, args, work: Path) -> list[str]:
    """Link into WORK every run not there that another work directory beside it (--reuse DIR/*, e.g.
    another row of a table) finished with the same launch.json (`saved_at` its last step), so it is
    not trained again (a recipe row's full attention at equal tokens is the plain row's); its export is
    made anew. Returns the names."""
    linked = []
    for name, run in runs.items():
        if (work / name).exists():
            continue
        want = spec(run, base_ds, args)
        for other in sorted(Path(args.reuse).glob(f"*/{name}")):
            try:
                same = json.loads((other / "launch.json").read_text()) == want
            except (OSError, ValueError):
                continue
            if same and saved_at(other / "run", run["steps"]):
                shutil.copytree(other, work / name, copy_function=os.link, ignore=shutil.ignore_patterns("export"))
                linked.append(f"{name} (from {other})")
                break
    return linked


def launch(name: str, run: dict, base_ds: dict, args, work: Path) -> subprocess.Popen:
    """Start one training run in WORK/NAME, or go on with the one there (--resume auto); its console
    goes to train.log, its metrics to run/metrics.jsonl."""
    d = work / name
    d.mkdir(parents=True, exist_ok=True)
    what = spec(run, base_ds, args)
    run["cfg"].to_json(d / "model.json")
    (d / "ds.json").write_text(json.dumps(what["ds"], indent=2))
    (d / "launch.json").write_text(json.dumps(what, indent=1))
    steps = run["steps"]
    cmd = [sys.executable, str(ROOT / "launch" / "pretrain.py"), "--ds-config", str(d / "ds.json"),
           "--model", str(d / "model.json"), "--data", args.data, "--out", str(d / "run"),
           "--steps", str(steps), "--save-every", str(steps), "--eval-every", str(steps + 1),
           "--log-every", str(max(1, steps // 20)), "--seed", str(args.seed), "--resume", "auto"]
    cmd += ["--compile"] if args.compile else []
    return subprocess.Popen(cmd, stdout=open(d / "train.log", "a"), stderr=subprocess.STDOUT, cwd=ROOT)


def metrics(work: Path, name: str) -> list[dict]:
    """The run's metrics.jsonl: one {"step": N, "train/loss": ...} per log."""
    return read_metrics(work / name / "run")


def last_logged(work: Path, name: str) -> dict | None:
    """The run's last metrics line with a training loss, or None before its first."""
    return next((m for m in reversed(metrics(work, name)) if "train/loss" in m), None)


def train_all(runs: dict[str, dict], args, work: Path):
    """Train every run, --jobs at a time, with a progress line (rate, ETA) per run every --poll
    seconds. A run that already logged its last step in WORK is not trained again."""
    base = read_json(args.ds_config, "no such DeepSpeed config")
    if args.reuse:
        linked = reuse(runs, base, args, work)
        if linked:
            print(f"finished elsewhere with the same plan, linked in: {', '.join(linked)}", flush=True)
    done = [name for name in runs if (last_logged(work, name) or {}).get("step") == runs[name]["steps"]]
    if done:
        print(f"already trained in {work}: {', '.join(done)}", flush=True)
    queue, running, started = [name for name in runs if name not in done], {}, {}
    t0 = time.perf_counter()
    while queue or running:
        while queue and len(running) < args.jobs:
            name = queue.pop(0)
            first = (last_logged(work, name) or {}).get("step", 0)
            running[name] = launch(name, runs[name], base, args, work)
            started[name] = (time.perf_counter(), first)
            time.sleep(1)  # each lone process picks a free port: do not race them
        time.sleep(args.poll)
        for name, proc in list(running.items()):
            last, steps = last_logged(work, name), runs[name]["steps"]
            progress = "starting"
            if last and last["step"] > started[name][1]:
                rate = (last["step"] - started[name][1]) / (time.perf_counter() - started[name][0])
                progress = (f"step {last['step']}/{steps} loss {last['train/loss']:.4f}, {rate:.2f} steps/s, "
                            f"ETA {(steps - last['step']) / rate / 60:.1f} min")
            print(f"[{name} {(time.perf_counter() - t0) / 60:.1f} min] {progress}", flush=True)
            if proc.poll() is not None:
                del running[name]
                if proc.returncode:
                    log = work / name / "train.log"
                    print("\n".join(log.read_text().splitlines()[-30:]), file=sys.stderr)
                    raise SystemExit(f"{name}: training failed (exit {proc.returncode}); log in {log}")


def training_rows(runs: dict[str, dict], work: Path, train_tokens: int) -> list[dict]:
    """What each run read and cost, from its metrics.jsonl: positions (padding included), the
    padding fraction, real tokens, the epochs they make of the TRAIN_TOKENS of the train split,
    training FLOPs, and the last logged training loss."""
    rows = []
    for name, run in runs.items():
        last = [m for m in metrics(work, name) if "train/loss" in m][-1]
        positions, pad = last["train/tokens_seen"], last["train/padding_fraction"]
        cfg = run["cfg"]
        rows.append({"model": name, "window": cfg.segment_len, "streams": run["streams"],
                     "row_tokens": row_tokens(cfg), "steps": last["step"],
                     "positions": positions, "padding": pad, "real_tokens": round(positions * (1 - pad)),
                     "epochs": positions * (1 - pad) / train_tokens, "pflops": positions * cfg.flops_per_token() / 1e15, "train_loss": last["train/loss"]})
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


def offset_rows(result: dict) -> list[dict]:
    """Loss in each part of a model's own segment (OFFSET_PARTS parts; part 0 begins where a token
    sees the segment before only through the state), and the folded model's gain over local-only."""
    by_name = {r["model"]: r["by_offset"] for r in result["models"]}
    rows = []
    for p in range(OFFSET_PARTS):
        row = {"part": f"{p}/{OFFSET_PARTS}", **{name: parts[p] for name, parts in by_name.items()}}
        folded, local = row["folded"], row["local_only"]
        row["gain_vs_local"] = (local - folded) / local if folded is not None and local else None
        rows.append(row)
    return rows


def far_loss(entry: dict, l: int, start: int) -> float:
    """Mean loss of one evaluated model over the buckets that begin at token `start` or later."""
    buckets = [bucket_label(b) for b in range(N_BUCKETS) if bucket_first(b) * l >= start]
    pairs = [(entry["by_position"][k], entry["tokens_by_position"][k]) for k in buckets if k in entry["by_position"]]
    return sum(x * n for x, n in pairs) / sum(n for _, n in pairs)


def evaluate_one(export_dir: str, data: str, max_tokens: int, streams: int, device: str, context: int | None,
                 l_ref: int, threads: int):
    """One exported model's held-out evaluation (evaluate's entry for it), in a process of its own."""
    torch.set_num_threads(threads)
    model = FoldedLM.from_pretrained(export_dir)
    result = evaluate({"model": model}, TokenStore.open(data), "val", max_tokens, streams, device, context, l_ref,
                      progress=False)
    return {k: v for k, v in result.items() if k != "models"}, result["models"][0]


def evaluate_all(names: list[str], l: int, work: Path, args, device: str, cuts: list[int]) -> tuple[dict, dict[int, dict]]:
    """Every run's held-out evaluation, as `evaluate` gives it for them all (buckets in segments of
    L, the folded model's), and the folded model's with its context cut to each of CUTS segments.
    They run --jobs at a time, each in a process of its own: a model reads its documents one
    segment of every stream at a time, and the folded model of l = 12 reads a long document in
    thousands of small steps that leave a GPU mostly idle (74 of the `paper` row's ~220 s of
    evaluations, H100, BENCHMARKS.md session 19)."""
    jobs = [(name, name, None) for name in names] + [(k, "folded", k * l) for k in cuts]
    threads = max(1, (os.cpu_count() or 1) // args.jobs)
    entries, t0 = {}, time.perf_counter()
    with ProcessPoolExecutor(min(args.jobs, len(jobs)), mp_context=multiprocessing.get_context("spawn")) as pool:
        futures = {pool.submit(evaluate_one, str(work / name / "export"), args.data, args.max_tokens,
                               args.eval_streams, device, context, l, threads): (key, name) for key, name, context in jobs}
        for future in as_completed(futures):
            key, name = futures[future]
            common, entry = future.result()
            entries[key] = {**entry, "model": name}
            what = key if isinstance(key, str) else f"folded, context cut to {key} segments"
            print(f"[evaluation {len(entries)}/{len(jobs)} {(time.perf_counter() - t0) / 60:.1f} min] {what}: "
                  f"loss {entries[key]['loss']:.4f}", flush=True)
    return {**common, "context": None, "models": [entries[name] for name in names]}, {k: entries[k] for k in cuts}


def reach(cut: dict[int, dict], unlimited: dict, l: int) -> list[dict]:
    """The folded model's loss on tokens past the largest cut, with its context cut to K segments
    (CUT: K -> its evaluation) and uncut."""
    start = max(cut) * l
    base = far_loss(unlimited, l, start)
    rows = []
    for k in sorted(cut) + [None]:
        loss = far_loss(unlimited if k is None else cut[k], l, start)
        rows.append({"context_segments": k or "all", "context_tokens": k * l if k else "all",
                     "loss_past": loss, "worse_than_all": (loss - base) / base})
    return rows


def print_plan(runs: dict[str, dict], train_tokens: int, rate: float, jobs: int) -> float:
    """Print each run's steps, tokens, epochs and estimated minutes (positions / RATE, plus half a
    minute to start); return the estimated minutes of all runs, JOBS at a time in order."""
    rows, slots = [], [0.0] * jobs
    for name, run in runs.items():
        positions = run["steps"] * run["streams"] * row_tokens(run["cfg"])
        minutes = 0.5 + positions / rate / 60
        slots[slots.index(min(slots))] += minutes
        rows.append({"model": name, "streams": run["streams"], "steps": run["steps"], "epoch_steps": run["epoch_steps"],
                     "real_tokens": round(run["real_tokens"]), "epochs": run["real_tokens"] / train_tokens,
                     "est_minutes": minutes})
    print_table(rows, ["model", "streams", "steps", "epoch_steps", "real_tokens", "epochs", "est_minutes"])
    print(f"estimate: {max(slots):.1f} min of training, {jobs} runs at a time, at {rate:,.0f} positions/s a run",
          flush=True)
    return max(slots)


QUICK = dict(model="tiny", steps=60, streams=8, windows="4,1", reach="1,4", max_tokens=20000, eval_streams=8,
             poll=2.0, ds_config=str(ROOT / "ds_configs" / "cpu.json"))


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="default", help="preset or model .json (the folded model)")
    add_fields(p.add_argument_group("the folded model's config, each field the preset's unless given (a recipe "
                                    "option, e.g. --state-gate-hard)"),
               ModelConfig, skip=("vocab_size", "use_state"), **dict.fromkeys(MODEL_FIELDS))
    p.add_argument("--data", help="token store (default: the built-in corpus)")
    p.add_argument("--ds-config", "--ds_config", default=None,
                   help="DeepSpeed JSON (default: ds_configs/dp-zero1.json on a GPU, cpu.json otherwise)")
    budget = p.add_mutually_exclusive_group()
    budget.add_argument("--steps", type=int, help="the folded model's training steps (default 1000)")
    budget.add_argument("--train-tokens", "--train_tokens",
                        help="the folded model's real training tokens instead of --steps (e.g. 40e6), or `max`: the "
                        "most that keeps every run within one epoch; a budget past one epoch is refused")
    p.add_argument("--streams", type=int, default=32, help="streams of the folded model per step")
    p.add_argument("--windows", help="full-attention windows in segments of l, e.g. 4,8,1; the first is the "
                   "reference (default: the folded model's bptt_segments, then 8)")
    p.add_argument("--margin", type=float, default=0.01, help="relative gain that counts as using the context")
    p.add_argument("--reach", default="1,2,4,8,16,32",
                   help="context cuts K (segments) for the folded model; '' skips this part")
    p.add_argument("--max-tokens", "--max_tokens", type=int, default=500_000, help="held-out tokens evaluated")
    p.add_argument("--eval-streams", "--eval_streams", type=int, default=16)
    p.add_argument("--jobs", type=int, default=3, help="training runs, then evaluations, at once (they share the GPU)")
    p.add_argument("--poll", type=float, default=30.0, help="seconds between progress lines")
    p.add_argument("--rate", type=float, help="training positions per second of one run while --jobs run side by side, "
                   "for the time estimate (default 80k on a GPU: the default preset, 8 at once on an H100, BENCHMARKS.md; "
                   "2k on the CPU)")
    p.add_argument("--compile", action="store_true", help="torch.compile every training run (pretrain.py --compile)")
    p.add_argument("--plan", action="store_true", help="print the runs' steps, tokens, epochs and time estimate, then stop")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--work", default="runs/context_use", help="run directories go here")
    p.add_argument("--reuse", help="a directory of other --work directories: a run finished in one of them "
                   "with the same model, DeepSpeed config, data, seed and steps is linked in, not trained again")
    p.add_argument("--json")
    p.add_argument("--plot")
    p.add_argument("--quick", action="store_true", help=f"CPU smoke test; sets {QUICK}")
    args = p.parse_args(argv)
    if args.quick:
        vars(args).update(QUICK)
    return args


def main(argv=None):
    args = parse_args(argv)
    gpu = torch.cuda.is_available()
    args.ds_config = args.ds_config or str(ROOT / "ds_configs" / ("dp-zero1.json" if gpu else "cpu.json"))
    if args.data is None:
        from foldscale.data import default_store
        args.data = str(default_store(max_files=40 if args.quick else None, vocab_size=512 if args.quick else 8192))
    store = TokenStore.open(args.data)
    cfg = ModelConfig.load(args.model, **{**{k: getattr(args, k, None) for k in MODEL_FIELDS},
                                          "vocab_size": store.vocab_size})  # an unset flag is None: the preset's
    windows = [int(w) for w in args.windows.split(",")] if args.windows else list(dict.fromkeys([cfg.bptt_segments, 8]))
    configs = variants(cfg, windows)
    if args.steps is None and args.train_tokens is None:
        args.steps = 1000
    args.steps = budget_steps(configs, store, args.streams, args.seed, args.steps, args.train_tokens)
    runs = plan(configs, store, args.streams, args.steps, args.seed)
    train_tokens = int(store.doc_lengths[store.docs("train")].sum())
    work = Path(args.work)
    print(f"context use: {args.model} (l={cfg.segment_len}, {cfg.num_params():,} parameters), "
          f"{args.steps} steps, {len(runs)} runs, on {device_name()}; {store.path}: {train_tokens:,} training tokens",
          flush=True)
    print_plan(runs, train_tokens, args.rate or (80_000 if gpu else 2_000), args.jobs)
    if args.plan:
        return runs
    t0 = time.perf_counter()
    train_all(runs, args, work)
    train_minutes = (time.perf_counter() - t0) / 60
    training = training_rows(runs, work, train_tokens)
    for name in runs:
        export(work / name / "run", work / name / "export")
    cuts = sorted(int(k) for k in args.reach.split(",")) if args.reach else []
    result, cut = evaluate_all(list(runs), cfg.segment_len, work, args, "cuda" if gpu else "cpu", cuts)
    report = analyse(result, args.margin)
    if cuts:
        report["reach"] = reach(cut, result["models"][0], cfg.segment_len)
    print("\ntraining (streams = documents per step; positions include padding; FLOPs = flops_per_token x positions):")
    print_table(training, ["model", "window", "streams", "row_tokens", "steps", "positions", "padding",
                           "real_tokens", "pflops", "train_loss"])
    print(f"\n{result['tokens']:,} held-out tokens of {result['documents']} documents; position buckets in "
          f"segments of l = {result['position_unit']} tokens")
    print_table(report["rows"], ["bucket", "from_token", "tokens", "folded", "local_only", *report["full"],
                                 "gain_vs_local", "gap_to_full", "gap_to_full_flops"])
    by_offset = offset_rows(result)
    print(f"\nloss by offset within each model's own segment ({OFFSET_PARTS} parts; in part 0 the segment before "
          "is seen only through the state, and not at all by local-only):")
    print_table(by_offset, ["part", *(r["model"] for r in result["models"]), "gain_vs_local"])
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
    corpus = {"path": str(store.path), "source": store.meta["source"], "fingerprint": store.fingerprint,
              "tokens": store.n_tokens, "train_tokens": train_tokens}
    write_json(args.json, report["rows"], task="context_use", model=cfg.to_dict(), steps=args.steps, corpus=corpus,
               training=training, train_minutes=round(train_minutes, 2), margin=args.margin,
               reach_bucket=report["reach_bucket"], reach_tokens=report["reach_tokens"],
               context_cuts=report.get("reach"), by_offset=by_offset,
               evaluation={k: v for k, v in result.items() if k != "models"},
               overall={r["model"]: r["loss"] for r in result["models"]}, args=vars(args))
    return report


if __name__ == "__main__":
    os.environ.setdefault("PYTHONUNBUFFERED", "1")
    try:
        main()
    except FoldscaleError as e:
        sys.exit(f"context_use: {e}")
