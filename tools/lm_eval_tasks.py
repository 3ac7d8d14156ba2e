"""The long-context suite's documents as lm-evaluation-harness tasks over local files.

    python -m tools.lm_eval_tasks --out tasks --segment-len 512 --multiples 1,16,64 --samples 100
    python -m tools.lm_eval_foldscale --model foldscale \\
        --model_args pretrained=models/x-hf,trust_remote_code=True,dtype=float32 \\
        --include_path tasks --tasks foldscale_suite --batch_size 1

For each task (passkey, multikey, qa1, qa2) and row m, the documents are the suite's
(`experiments.longctx.text.eval_doc` with the suite's seeds: `experiments.suite --seed S` scores
the same ones): a loglikelihood task whose context is the document up to the answer and whose
target is the answer, so lm-eval's `acc` (is_greedy: every answer token right by argmax given the
true prefix) is the suite's exact match. --text FILE adds `foldscale_ppl`, loglikelihood_rolling
over the file's paragraphs (word and byte perplexity, bits per byte).

lm-eval reads text and tokenizes it again (the `foldscale` model type: context and answer apart,
see tools/lm_eval_foldscale.py for why); a document whose text tokenizes to other tokens than the
suite laid out (filler cut inside a word) could score differently, so it is left out and counted
in the line printed per row.
"""
import argparse
import json
from pathlib import Path

import numpy as np

from experiments.longctx import TASKS, text
from foldscale.data import TokenStore, default_store

YAML = """task: {name}
tag: foldscale_suite
dataset_path: json
dataset_kwargs:
  data_files:
    test: {data}
test_split: test
output_type: loglikelihood
doc_to_text: "{{{{context}}}}"
doc_to_target: "{{{{answer}}}}"
target_delimiter: ""
metric_list:
  - metric: acc
    aggregation: mean
    higher_is_better: true
"""
PPL_YAML = """task: foldscale_ppl
dataset_path: json
dataset_kwargs:
  data_files:
    test: {data}
test_split: test
output_type: loglikelihood_rolling
doc_to_text: ""
doc_to_target: "{{{{text}}}}"
metric_list:
  - metric: word_perplexity
  - metric: byte_perplexity
  - metric: bits_per_byte
"""


def lm_eval_pair(tokenizer, context: np.ndarray, answer: np.ndarray) -> dict | None:
    """{context, answer} as text, or None where their text tokenizes to other tokens (the model
    type `foldscale` of tools/lm_eval_foldscale.py tokenizes the two apart)."""
    ctx, ans = tokenizer.decode(context.tolist()), tokenizer.decode(answer.tolist())
    if tokenizer.encode(ctx) != context.tolist() or tokenizer.encode(ans) != answer.tolist():
        return None
    return {"context": ctx, "answer": ans}


def write(out, store: TokenStore, tasks, multiples, samples: int, segment_len: int, seed: int,
          max_prefix: int, keys: int = 4) -> list[dict]:
    """Write OUT/<task>_<m>.jsonl + .yaml for each task and row; returns one dict per row."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    corpus = text.Corpus(store, "val")
    rows = []
    for name in tasks:
        task = TASKS[name](corpus.tokenizer, keys) if name == "multikey" else TASKS[name](corpus.tokenizer)
        for m in multiples:
            docs = [text.eval_doc(task, corpus, seed + 1000, m, segment_len, i, max_prefix) for i in range(samples)]
            pairs = []
            for i, doc in enumerate(docs):
                at, answer = doc.piece("answer")
                pair = lm_eval_pair(corpus.tokenizer, doc.tokens(0, at), answer)
                if pair is not None:
                    pairs.append({"index": i, **pair})
            task_name = f"foldscale_{name}_{m}"
            data = out / f"{task_name}.jsonl"
            data.write_text("".join(json.dumps(p) + "\n" for p in pairs))
            (out / f"{task_name}.yaml").write_text(YAML.format(name=task_name, data=data.resolve()))
            rows.append({"task": task_name, "documents": len(pairs), "left_out": samples - len(pairs),
                         "distance": round(float(np.mean([d.distance for d in docs])))})
            print(f"{task_name}: {len(pairs)} documents (mean distance {rows[-1]['distance']:,} tokens), "
                  f"{samples - len(pairs)} left out (lm-eval would tokenize their text differently)", flush=True)
    return rows


def write_perplexity(out, text_file) -> Path:
    """OUT/foldscale_ppl.{jsonl,yaml}: the file's blank-line-separated paragraphs, one document each."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    paragraphs = [p for p in Path(text_file).read_text(encoding="utf-8").split("\n\n") if p.strip()]
    data = out / "foldscale_ppl.jsonl"
    data.write_text("".join(json.dumps({"text": p}) + "\n" for p in paragraphs))
    (out / "foldscale_ppl.yaml").write_text(PPL_YAML.format(data=data.resolve()))
    print(f"foldscale_ppl: {len(paragraphs)} documents of {text_file}", flush=True)
    return data


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", required=True, help="Directory for the JSONL and YAML files (lm_eval --include_path).")
    ap.add_argument("--data", help="Token store whose val split is the filler (default: the built-in corpus).")
    ap.add_argument("--tasks", default="passkey,multikey,qa1,qa2")
    ap.add_argument("--multiples", default="1,4,16", help="Rows m: the needle at least m segments before the question.")
    ap.add_argument("--samples", type=int, default=100, help="Documents per row.")
    ap.add_argument("--segment-len", type=int, required=True, help="The model's segment length l.")
    ap.add_argument("--seed", type=int, default=0, help="experiments.suite's --seed: the same documents.")
    ap.add_argument("--max-prefix-segments", type=int, default=text.MAX_PREFIX_SEGMENTS, help="As experiments.suite's.")
    ap.add_argument("--keys", type=int, default=4, help="multikey: needles per document, as experiments.suite's.")
    ap.add_argument("--text", help="A text file: also write foldscale_ppl (perplexity over its paragraphs).")
    args = ap.parse_args(argv)
    unknown = [t for t in args.tasks.split(",") if t not in TASKS]
    if unknown:
        ap.error(f"--tasks: unknown {unknown}; choose from {', '.join(TASKS)}")
    store = TokenStore.open(args.data or default_store())
    write(args.out, store, args.tasks.split(","), [int(m) for m in args.multiples.split(",")], args.samples,
          args.segment_len, args.seed, args.max_prefix_segments, args.keys)
    if args.text:
        write_perplexity(args.out, args.text)


if __name__ == "__main__":
    main()
