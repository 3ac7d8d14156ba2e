"""Issue 26's headline: bAbI in real text, fine-tuned from a pretrained backbone, in one record.

Each input is the --json of one `experiments.suite` run of one task and one seed: the fine-tuned
runs (`--init BACKBONE`) as positional arguments, the from-scratch runs (the same command from a
random initialisation of the backbone's shape) after --scratch. The record
(`experiments/results/targets/babi.json`) holds, per task, the folded model's exact match at
1024 x l and 16384 x l for every fine-tuning seed, the best local-only score past one segment
(which should be chance), the backbone (its config, parameters and pretraining), the recipe, and
every run's steps, curriculum stages ([segments, the step it began]) and rows (each score with its
95% Wilson interval), the from-scratch ones beside.

    python -m experiments.babi_table RUNS/qa1_seed*.json --scratch RUNS/qa1_scratch.json \\
        --backbone RUNS/backbone --pretrain RUNS/pretrain --json experiments/results/targets/babi.json
"""
import argparse
import json
import math
import sys
from pathlib import Path

from foldscale.config import FoldscaleError, ModelConfig
from foldscale.metrics import read_metrics
from tools.benchlib import print_table

HEADLINE = "1024,16384"
"""The rows of the record's keys TASK_MULTIPLE, in segments of l (the issue's: qa1_1024, qa1_16384)."""
TARGETS = {"qa1": 0.95, "qa2": 0.90}
"""Exact match at 1024 x l that every fine-tuning seed must reach (issue 26)."""
RECIPE = ("lr", "warmup_steps", "weight_decay", "batch_size", "steps", "final_steps", "minutes",
          "max_train_segments", "advance_at", "stage_patience", "min_lr_ratio", "eval_samples", "far_samples")
"""The suite's flags that make the recipe. The curriculum's first stage is not among them (the suite
raises --start-segments to fit each task's stories): each run's `stages` says where it began."""


class TableError(FoldscaleError):
    """Suite records that cannot make one table; the message says which and why."""


def load_run(path) -> dict:
    """A suite record of one task, refused unless it is one."""
    try:
        record = json.loads(Path(path).read_text())
    except (OSError, ValueError) as e:
        raise TableError(f"{path}: not a readable JSON record ({e})") from None
    if record.get("suite") != "long-context" or len(record["args"]["tasks"].split(",")) != 1:
        raise TableError(f"{path}: not the record of `python -m experiments.suite --tasks TASK --json ...` "
                         "for one task")
    return record


def fraction(x: float | None) -> float | None:
    """A score as the fraction it is: records before session 15 hold float32 means (95 of 100: 0.94999999)."""
    return None if x is None else round(x, 6)


def wilson(score: float | None, n: int, z: float = 1.96) -> list[float] | None:
    """The 95% Wilson interval of an exact-match SCORE on N documents: 95 of 100 is [0.888, 0.978],
    so a score at a target by a document or two is no evidence either way."""
    if score is None or not n:
        return None
    centre, half = score + z * z / (2 * n), z * math.sqrt(score * (1 - score) / n + z * z / (4 * n * n))
    return [round((centre - half) / (1 + z * z / n), 3), round((centre + half) / (1 + z * z / n), 3)]


def score(record: dict, multiple: int, model: str = "folded") -> float | None:
    """MODEL's exact match in the row MULTIPLE (the full prefix), None when the run has no such row."""
    return next((fraction(r[model]) for r in record["rows"] if r["multiple"] == multiple and r.get("prefix_cap", 0) != 1
                 and r[model] is not None), None)


def backbone_summary(backbone, pretrain) -> dict:
    """The backbone's config and parameters, and what its pretraining run logged last."""
    cfg = ModelConfig.from_json(Path(backbone) / "config.json")
    summary = {"config": cfg.to_dict(), "params": cfg.num_params()}
    logs = read_metrics(pretrain) if pretrain else []
    train = [m for m in logs if "train/loss" in m]
    val = [m for m in logs if "val/loss" in m]
    if train:
        summary.update(steps=train[-1]["step"], tokens=train[-1].get("train/tokens_seen"),
                       train_loss=train[-1]["train/loss"], tokens_per_s=train[-1].get("train/tokens_per_s"))
    if val:
        summary["val_loss"] = val[-1]["val/loss"]
    return summary


def table(runs: list, scratch: list, backbone=None, pretrain=None, headline: str = HEADLINE,
          reference: list = ()) -> dict:
    """The record of issue 26 from suite records (fine-tuned RUNS, from-scratch SCRATCH, and the
    full-attention REFERENCE fine-tuned from the same backbone, `--baseline-only`), with the
    folded model's scores of every seed in the rows HEADLINE as TASK_MULTIPLE and the reference's
    rows inside its window as TASK_full_attention."""
    fine = [load_run(p) for p in runs]
    if not fine:
        raise TableError("no fine-tuned run records given")
    base = [load_run(p) for p in scratch]
    full = [load_run(p) for p in reference]
    if any(not r["args"].get("baseline_only") for r in full):
        raise TableError("a reference run is not `python -m experiments.suite --baseline-only ...`")
    others = base + full
    stores = {r["store_fingerprint"] for r in fine + others}
    if len(stores) > 1:
        raise TableError(f"the runs read {len(stores)} different token stores: give the records of one store")
    tasks = list(dict.fromkeys(r["args"]["tasks"] for r in fine))
    seeds = sorted({r["seed"] for r in fine})
    record = {"device": " / ".join(sorted({r["device"] for r in fine + others})),
              "date": max(r["date"] for r in fine + others), "seeds": seeds}
    for task in tasks:
        mine = {r["seed"]: r for r in fine if r["args"]["tasks"] == task}
        if sorted(mine) != seeds:
            raise TableError(f"{task}: runs for seeds {sorted(mine)}, but the runs cover seeds {seeds}: "
                             "give every seed of every task")
        for m in map(int, headline.split(",")):
            record[f"{task}_{m}"] = [score(mine[s], m) for s in seeds]
    for r in full:
        record[f"{r['args']['tasks']}_full_attention"] = {
            str(row["multiple"]): row["full_attention"] for row in r["rows"] if row["full_attention"] is not None}
    record["local_only_max_past_1l"] = max(
        (fraction(r["local_only"]) for rec in fine for r in rec["rows"]
         if r["multiple"] > 1 and r["local_only"] is not None), default=None)
    record["targets"] = {f"{task}_1024 >= {TARGETS[task]}, every seed": all(
        x is not None and x >= TARGETS[task] for x in record[f"{task}_1024"])
        for task in tasks if task in TARGETS and f"{task}_1024" in record}
    if backbone:
        record["backbone"] = backbone_summary(backbone, pretrain)
    record["recipe"] = {task: {k: v for k, v in next(r for r in fine if r["args"]["tasks"] == task)["args"].items()
                               if k in RECIPE} for task in tasks}  # per task: qa2 may climb with --stage-patience
    record["runs"] = [run_entry(r, init, model) for init, model, records in (
        ("backbone", "folded", fine), ("scratch", "folded", base), ("backbone", "full_attention", full)) for r in records]
    return record


def run_entry(r: dict, init: str, model: str) -> dict:
    """One run of the record: how MODEL of the suite record R (started from INIT) trained, and its rows."""
    trained = r["train"][r["args"]["tasks"]][model]
    return {"task": r["args"]["tasks"], "init": init, "model": model, "seed": r["seed"], "steps": trained["steps"],
            "final_stage_steps": trained["final_stage_steps"], "max_segments": trained["max_segments"],
            "skipped_steps": trained["skipped_steps"],
            "stages": [[x["segments"], x["step"]] for x in trained["stages"]],
            "rows": [{"multiple": row["multiple"], "samples": row["samples"], "score": fraction(row[model]),
                      "ci95": wilson(fraction(row[model]), row["samples"]),
                      "local_only": fraction(row.get("local_only")), "chance": row["chance"]} for row in r["rows"]]}


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("runs", nargs="+", help="suite --json records of the fine-tuned runs (one task and seed each)")
    p.add_argument("--scratch", nargs="*", default=[], help="suite --json records of the from-scratch runs")
    p.add_argument("--reference", nargs="*", default=[],
                   help="suite --baseline-only --json records: full attention fine-tuned from the backbone")
    p.add_argument("--backbone", help="the exported backbone (its config.json)")
    p.add_argument("--pretrain", help="the backbone's launch/pretrain.py run directory (its metrics.jsonl)")
    p.add_argument("--headline", default=HEADLINE, help="rows of the keys TASK_MULTIPLE (default: %(default)s)")
    p.add_argument("--json", help="where the record goes (issue 26: experiments/results/targets/babi.json)")
    args = p.parse_args(argv)
    record = table(args.runs, args.scratch, args.backbone, args.pretrain, args.headline, args.reference)
    multiples = sorted({row["multiple"] for run in record["runs"] for row in run["rows"]})
    print_table([{"task": r["task"], "init": r["init"], "model": r["model"], "seed": r["seed"], "steps": r["steps"],
                  "max_segments": r["max_segments"],
                  **{f"{row['multiple']} x l": row["score"] for row in r["rows"]},
                  "local_only past 1 x l": max((row["local_only"] for row in r["rows"]
                                                if row["multiple"] > 1 and row["local_only"] is not None), default=None)}
                 for r in record["runs"]],
                ["task", "init", "model", "seed", "steps", "max_segments", *[f"{m} x l" for m in multiples],
                 "local_only past 1 x l"])
    print("headline:", json.dumps({k: v for k, v in record.items() if k not in ("runs", "backbone", "recipe")}))
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(record, indent=1) + "\n")
    return record


if __name__ == "__main__":
    try:
        main()
    except FoldscaleError as e:
        sys.exit(f"babi_table: {e}")
