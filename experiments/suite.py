"""The long-context suite (issue 15): is an answer stated segments back in real text found?

Tasks, one module each in experiments/longctx/: `passkey` (a 5-digit key at any depth),
`multikey` (RULER: k name -> 7-digit number needles, one asked, at least one distractor closer
to the question), `qa1` and `qa2` (BABILong: bAbI facts about a small cast in real text, one or
two supporting facts). Filler is real text from a token store (--data, default the built-in
corpus): its train split for training, its val split for evaluation.

For each task a FoldedLM is trained on the answer tokens only, from scratch or fine-tuned from
a model exported after launch/pretrain.py (--init DIR), with a curriculum over the number of
segments capped at --max-train-segments (gradients through the state over every segment of a
sequence, or the last --bptt-segments). Every model is then scored by exact match of the answer (argmax
of every answer token) in rows m of --eval-multiples: the needle ends at least m segments
before the question (m * l tokens of filler plus up to l more), at any offset within a
segment, after up to min(m + 1, --max-prefix-segments) segments of filler. Beside the folded
model: the same weights with the state cut (local-only; past one segment it can only guess,
which shows the task measures memory) and with --baseline a full-attention GPT of window
max_train_segments x l, trained the same way from scratch (n/a where a document does not fit
its window). --far-multiples adds rows scored on --far-samples documents. Documents are read
chunk by chunk under no_grad, so a million-token row needs no more memory than a short one.

    python -m experiments.suite --state-gate --state-norm --tasks qa2 --baseline
    python -m experiments.suite --quick          # CPU, seconds
"""
import argparse
import dataclasses
import math
import shutil
import sys
import time
from pathlib import Path

import numpy as np
import torch

from tools.benchlib import device_name, print_table, write_json
from experiments.longctx import TASKS, probe, text
from experiments.longctx.train import TrainArgs, exact_match, segment_step, train
from foldscale.config import ModelConfig
from foldscale.flags import add_fields, check, from_args
from foldscale.data import Tokenizer, TokenStore, default_store
from foldscale.model import FoldedLM

QUICK = dict(d_model=32, n_head=2, n_local=1, n_global=1, segment_len=32, batch_size=4, steps=6,
             max_train_segments=16, log_every=3, window=3, eval_multiples="1,2,4", eval_samples=4,
             eval_batch=4, far_multiples="", device="cpu")


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--tasks", default=",".join(TASKS), help=f"comma list of {', '.join(TASKS)}")
    p.add_argument("--data", help="token store with a tokenizer (default: the built-in corpus)")
    p.add_argument("--init", help="fine-tune this exported model (foldscale export) instead of training "
                                  "from scratch; its config replaces the model flags")
    add_fields(p, ModelConfig, skip=("vocab_size", "use_state"), d_model=256, n_head=4, n_local=2, n_global=2,
               segment_len=64, bptt_segments=None)  # None: every segment of a sequence (--max-train-segments)
    p.add_argument("--keys", type=int, default=4, help="needles of the multikey task")
    p.add_argument("--aligned-answers", action="store_true",
                   help="end every training row's answer at the step's last token, as before session 8 (default: "
                        "each row's answer up to l - 1 tokens earlier, so a step's rows do not all cross a "
                        "segment boundary in their answer together)")
    p.add_argument("--mix-keys", action="store_true",
                   help="train multikey on stories of 1 to --keys needles (uniform); it is scored on --keys")
    add_fields(p, TrainArgs, minutes=1.5, min_lr_ratio=0.1)
    p.add_argument("--eval-multiples", default="1,2,4,8,16,32,64,128,256,512,1024")
    p.add_argument("--eval-samples", type=int, default=100)
    p.add_argument("--eval-batch", type=int, default=100)
    p.add_argument("--far-multiples", default="", help="rows scored on --far-samples documents, e.g. 16384")
    p.add_argument("--far-samples", type=int, default=16)
    p.add_argument("--max-prefix-segments", type=int, default=text.MAX_PREFIX_SEGMENTS,
                   help="cap on the filler before the needle in evaluation, in segments")
    p.add_argument("--short-prefix", action="store_true",
                   help="also score every row with under one segment of filler before the needle: "
                        "separates the distance to the needle from the age of the state it is written into")
    p.add_argument("--probe", action="store_true",
                   help="also report why needles are missed (experiments/longctx/probe.py; every row already "
                        "splits exact match by whether the answer crosses a segment boundary): accuracy by the "
                        "needle's offset in its segment, what the model answered where it missed (rows up to "
                        "1024 x l), the needle's footprint in the state and the gate over distance, the "
                        "gradient reaching its segment")
    p.add_argument("--probe-misses", type=int, default=20,
                   help="with --probe: the misses of each row read again alone and listed (where the story "
                        "names what was answered is counted over them)")
    p.add_argument("--save", help="save the trained folded model here (foldscale's exported format, the store's "
                                  "tokenizer beside it): --init DIR goes on training it or, with --steps 0, scores it")
    p.add_argument("--resume", metavar="DIR",
                   help="let training span several calls of this command (e.g. device commands of 10 minutes): "
                        "each call trains --minutes, saves its state to DIR/TASK_MODEL.pt and, if --steps (or "
                        "--final-steps) are not done yet, stops without scoring (exit status 75); the same command "
                        "goes on from there, step for step as one run, and scores once training is done")
    p.add_argument("--baseline", action="store_true",
                   help="also train and score full attention over --max-train-segments x l tokens: a plain GPT "
                        "of the folded model's blocks, with --init starting from the init's blocks (its "
                        "global blocks after its local ones)")
    p.add_argument("--baseline-only", action="store_true",
                   help="train and score only that baseline (no folded model), e.g. beside a folded run of the same seed")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    p.add_argument("--json", help="write the table, configs, seeds and training summaries here")
    p.add_argument("--quick", action="store_true", help=f"CPU smoke test in seconds; sets {QUICK} where not given")
    if "--quick" in (sys.argv[1:] if argv is None else argv):
        p.set_defaults(**QUICK)  # defaults: what the command line sets itself stays
    args = p.parse_args(argv)
    if args.quick:
        torch.set_num_threads(1)  # toy tensors gain nothing from threads, which spin on a busy CPU
    unknown = set(args.tasks.split(",")) - set(TASKS)
    if unknown:
        p.error(f"unknown tasks {sorted(unknown)}; choose from {', '.join(TASKS)}")
    if args.baseline_only and (args.save or args.probe):
        p.error("--baseline-only trains no folded model: --save and --probe are for the folded model")
    if args.resume and args.steps is None and args.final_steps is None:
        p.error("--resume needs --steps or --final-steps: a learning rate scheduled over --minutes would start "
                "again with each call")
    check(p, TrainArgs, args)
    return args


def start_segments(task, l: int, args) -> int:
    """The curriculum's first stage: room for twice the longest of 200 stories, so that filler
    surrounds the pieces from the start."""
    rng = np.random.default_rng(0)
    longest = max(task.story(rng).size() for _ in range(200))
    start = max(args.start_segments, math.ceil(2 * longest / l))
    if start > args.max_train_segments:
        raise SystemExit(f"{task.name}: stories need up to {longest} tokens, {start} segments of {l} "
                         f"with filler; raise --max-train-segments or --segment-len")
    return start


def batch_maker(task, corpus, tail: int = 0):
    """make_batch(n, length, generator) for the trainer: n training documents of `length` tokens,
    each answer ending up to `tail` tokens before the end (text.training_docs)."""
    def make_batch(n, length, generator):
        rng = np.random.default_rng(int(torch.randint(2**62, (), generator=generator)))
        docs = text.training_docs(task, corpus, n, length, rng, tail)
        return tuple(torch.from_numpy(x) for x in text.batch(docs, 0, length))
    return make_batch


def exact(model, docs, batch_size, device, label, step=None) -> torch.Tensor:
    """(n,) bool: exact match of each document."""
    return torch.cat([exact_match(model, docs[i:i + batch_size], device, label=label, step=step)
                      for i in range(0, len(docs), batch_size)])


def run_task(name, store, args, device) -> tuple[list[dict] | None, dict, dict, dict]:
    """Train the task's models, score every row: (rows, training summaries, model configs, probes).
    rows is None where --resume training stopped before its steps were done."""
    train_corpus, val_corpus = text.Corpus(store, "train"), text.Corpus(store, "val")
    tokenizer = train_corpus.tokenizer
    task = TASKS[name](tokenizer, args.keys) if name == "multikey" else TASKS[name](tokenizer)
    train_task = TASKS[name](tokenizer, args.keys, mix=True) if name == "multikey" and args.mix_keys else task
    torch.manual_seed(args.seed)
    bptt = args.bptt_segments or args.max_train_segments  # default: through every segment of a sequence
    if args.init:
        folded = FoldedLM.from_pretrained(args.init)
        exported = Path(args.init) / "tokenizer.model"  # foldscale export copies the run's tokenizer
        store.check_compatible(folded.cfg.vocab_size, Tokenizer(exported).hash if exported.is_file() else None)
        folded.cfg = dataclasses.replace(folded.cfg, bptt_segments=bptt)
    else:
        folded = FoldedLM(from_args(ModelConfig, args, vocab_size=store.vocab_size, bptt_segments=bptt))
    folded = folded.to(device)
    cfg, l = folded.cfg, folded.cfg.segment_len
    targs = from_args(TrainArgs, args)
    targs.start_segments = start_segments(task, l, args)
    print(f"{name}: {cfg.num_params():,} parameters, l={l}, curriculum {targs.start_segments} -> "
          f"{targs.max_train_segments} segments, {targs.minutes} min{' from ' + args.init if args.init else ''}",
          flush=True)
    make_batch = batch_maker(train_task, train_corpus, 0 if args.aligned_answers else l - 1)
    models, summaries = {}, {}
    checkpoint = (lambda model: Path(args.resume) / f"{name}_{model}.pt") if args.resume else (lambda model: None)
    goes_on = lambda summary: args.resume and not (summary["done"] or args.last_call)  # scored in a later call
    if not args.baseline_only:
        summaries["folded"] = train(folded, make_batch, targs, l, device, args.seed, f"{name} folded",
                                    checkpoint("folded"))
        if goes_on(summaries["folded"]):
            return None, summaries, {}, {}
        if args.save:
            save = Path(args.save) / name if len(args.tasks.split(",")) > 1 else Path(args.save)
            folded.save_pretrained(save)
            shutil.copyfile(train_corpus.tokenizer.path, save / "tokenizer.model")
            print(f"{name}: saved the trained folded model to {save}", flush=True)
        local = FoldedLM(cfg.local_only()).to(device).eval()
        local.load_state_dict(folded.state_dict())
        models = {"folded": folded, "local_only": local}
    if args.baseline or args.baseline_only:
        torch.manual_seed(args.seed)
        window = targs.max_train_segments * l
        full = FoldedLM.from_pretrained(args.init).as_full_attention(window) if args.init \
            else FoldedLM(cfg.full_attention(window))
        full = full.to(device)
        summaries["full_attention"] = train(full, make_batch, targs, l, device, args.seed, f"{name} full",
                                            checkpoint("full_attention"))
        if goes_on(summaries["full_attention"]):
            return None, summaries, {}, {}
        models["full_attention"] = full
    configs = {k: m.cfg.to_dict() for k, m in models.items()}

    steps = {key: segment_step(model, targs, device) for key, model in models.items()}
    near = [int(m) for m in args.eval_multiples.split(",") if m]
    far = [int(m) for m in args.far_multiples.split(",") if m]
    rows, t0 = [], time.perf_counter()
    caps = [args.max_prefix_segments] + ([1] if args.short_prefix else [])
    for cap in caps:
        for m in near + far:
            n = args.far_samples if m in far and m not in near else args.eval_samples
            docs = [text.eval_doc(task, val_corpus, args.seed + 1000, m, l, i, cap) for i in range(n)]
            row = {"task": name, "multiple": m, "prefix_cap": cap,
                   "distance": round(float(np.mean([d.distance for d in docs]))), "samples": n}
            for key, model in models.items():
                fits = model.cfg.recurrent or max(d.end for d in docs) <= model.cfg.segment_len
                right = exact(model, docs, args.eval_batch, device, f"{name} {m} x l {key}",
                              steps[key]) if fits else None
                row[key] = None if right is None else right.sum().item() / right.numel()  # exact: 95 of 100 is 0.95
                if key == "folded":  # free: the documents' layout splits the scores
                    row["folded_by_answer_split"] = probe.by_answer_split(docs, right.numpy(), l)
                if key == "folded" and args.probe:
                    row["folded_by_offset"] = probe.by_offset(docs, right.numpy(), l)
                    row["folded_by_answer_source"] = probe.by_answer_source(docs, right.numpy(), tokenizer)
                    if m <= 1024:  # each miss is read again alone: a million-token row would take minutes
                        row["folded_misses"] = probe.misses(model, docs, right.numpy(), tokenizer, device,
                                                            most=args.probe_misses)
                        row["folded_misses_named_in"] = probe.named_counts(row["folded_misses"])
            row["chance"] = task.chance
            rows.append(row)
            scores = ", ".join(f"{k} {row[k]}" for k in models)
            if "folded_by_answer_split" in row:
                split = row["folded_by_answer_split"]
                scores += (f" | folded, answer within a segment {split['within']['exact']}, crossing one "
                           f"{split['crossing']['exact']} of {split['crossing']['docs']}")
            if args.probe:
                scores += f" | by offset {row['folded_by_offset']} | by answer source " + ", ".join(
                    f"{k} {v['exact']} of {v['docs']}" for k, v in row["folded_by_answer_source"].items())
                scores += f" | misses answered what is named in {row.get('folded_misses_named_in')}" + "".join(
                    f" | {x['answer']} -> {x['answered']}" for x in row.get("folded_misses", [])[:3])
            print(f"{name} {m} x l (distance {row['distance']:,}, prefix < {cap} segments): {scores} | "
                  f"{(time.perf_counter() - t0) / 60:.1f} min", flush=True)
    probes = {}
    if args.probe and "folded" in models and cfg.recurrent:
        after = [k for k in (0, 1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024, 4096, 16384) if k <= max(near + far)]
        probes["footprint"] = probe.footprint(folded, task, val_corpus, device, args.seed + 2000, after)
        probes["gradient"] = probe.gradient(folded, task, val_corpus, device, args.seed + 3000,
                                            [k for k in (1, 2, 4, 8, 16, 30) if k < targs.max_train_segments])
        for key, table in probes.items():
            print(f"{name} probe: {key}")
            print_table(table, list(table[0]))
    return rows, summaries, configs, probes


def main(argv=None):
    args = parse_args(argv)
    device = torch.device("cuda" if args.device == "auto" and torch.cuda.is_available()
                          else "cpu" if args.device == "auto" else args.device)
    torch.backends.cuda.matmul.allow_tf32 = True
    if args.data:
        store_path = args.data
    elif args.quick:
        store_path = default_store(vocab_size=512, max_files=25, num_proc=1)
    else:
        store_path = default_store()
    store = TokenStore.open(store_path)
    print(f"long-context suite on {device_name() if device.type == 'cuda' else 'CPU'}, filler from {store.path}",
          flush=True)
    rows, summaries, configs, probes = [], {}, {}, {}
    unfinished = []
    for name in args.tasks.split(","):
        task_rows, summaries[name], configs[name], probes[name] = run_task(name, store, args, device)
        if task_rows is None:
            unfinished.append(name)
        else:
            rows += task_rows
    if unfinished:
        print(f"training of {', '.join(unfinished)} goes on in the next call of this command (saved in {args.resume}); "
              "nothing is scored until it is done", flush=True)
        raise SystemExit(75)
    columns = ["task", "multiple", *(["prefix_cap"] if args.short_prefix else []), "distance",
               *([] if args.baseline_only else ["folded", "local_only"]),
               *(["full_attention"] if args.baseline or args.baseline_only else []), "chance"]
    print_table([{k: "n/a" if v is None else v for k, v in r.items()} for r in rows], columns)
    write_json(args.json, rows, suite="long-context", seed=args.seed, eval_seed=args.seed + 1000,
               store=str(store.path), store_fingerprint=store.fingerprint, args=vars(args), models=configs,
               train=summaries, probes=probes)
    return rows


if __name__ == "__main__":
    main()
