"""The long-context suite (experiments/suite.py, experiments/longctx/): documents are laid out as
they claim, answers are scored as they are tokenized, the local-only ablation cannot see a
needle, and the runner works end to end, from scratch and from a pretrained export."""
import dataclasses
import json
import os
import re
import subprocess
import sys
import tarfile
from pathlib import Path

import numpy as np
import pytest
from safetensors import safe_open
import torch
import torch.nn.functional as F

from experiments import suite
from experiments.longctx import TASKS, probe, text
from experiments.longctx.babi import PLACES
from experiments.longctx import train as train_module
from experiments.longctx.train import (Streams, TrainArgs, describe_profile, exact_match, lr_at, score,
                                       state_grad_profile, train)
from foldscale.trainer import TrainingError
from foldscale.config import ModelConfig
from foldscale.data import StoreError, TokenStore, default_store
from foldscale.model import FoldedLM, LMOutput, segments

ROOT = Path(__file__).resolve().parents[1]
L = 8
BUILT_IN = dict(vocab_size=512, max_files=25, num_proc=1)  # what --quick reads


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    path = tmp_path_factory.mktemp("cache")
    default_store(cache_dir=path, **BUILT_IN)
    return path


@pytest.fixture(scope="module")
def store(cache):
    return TokenStore.open(default_store(cache_dir=cache, **BUILT_IN))


@pytest.fixture(scope="module")
def corpus(store):
    return text.Corpus(store, "val")


def task(name, corpus):
    return TASKS[name](corpus.tokenizer)


def docs(name, corpus, multiple, n, seed=0):
    t = task(name, corpus)
    return [text.eval_doc(t, corpus, seed, multiple, L, i, max_prefix=4) for i in range(n)]


def decoded(corpus, doc, roles=("support", "distractor")):
    """The document's pieces of these roles as text, in document order."""
    return [(role, corpus.tokenizer.decode(t).strip()) for role, _, t in doc.pieces if role in roles]


@pytest.mark.parametrize("name", TASKS)
@pytest.mark.parametrize("multiple", [1, 3])
def test_pieces_lie_where_the_document_says_at_every_offset(name, corpus, multiple):
    needle_offsets, question_offsets = set(), set()
    for d in docs(name, corpus, multiple, 150):
        ids = d.tokens(0, d.end + L)
        for role, pos, tokens in d.pieces:
            assert np.array_equal(ids[pos:pos + len(tokens)], tokens), role
        needle, tokens = [(p, t) for r, p, t in d.pieces if r == "support"][-1]
        question = d.piece("question")[0]
        assert multiple * L <= d.distance == question - needle - len(tokens)
        assert (needle + len(tokens) - 1) // L < question // L  # the whole needle is in an earlier segment
        assert d.piece("answer")[0] == question + len(d.piece("question")[1]) and d.end == d.piece("answer")[0] + len(
            d.piece("answer")[1])
        needle_offsets.add(needle % L)
        question_offsets.add(question % L)
    assert needle_offsets == question_offsets == set(range(L))


def test_filler_is_the_splits_text_in_order_without_eos(store, corpus):
    d = docs("passkey", corpus, 2, 1)[0]
    n_filler = d.end + 5000 - sum(len(t) for _, _, t in d.pieces)
    ids = d.tokens(0, d.end + 5000)  # past the end of the split: its documents again, reshuffled
    keep = np.ones(len(ids), bool)
    for _, pos, tokens in d.pieces:
        keep[pos:pos + len(tokens)] = False
    f, tok = d.filler, corpus.tokenizer
    assert all(store.doc(int(i))[-1] == tok.eos_id for i in corpus.ids)  # prepared stores end documents in eos
    blank = tok.encode("\n\n")
    stream = np.concatenate([np.concatenate([store.doc(int(corpus.ids[k]))[:-1], blank])[s:]
                             for k, s in zip(f.order, f.skip)])
    assert len(stream) >= n_filler and np.array_equal(ids[keep], stream[:n_filler])
    assert tok.eos_id not in ids[keep] and set(corpus.ids) == set(store.docs("val"))
    assert np.array_equal(f.take(0, n_filler), np.concatenate([f.take(a, min(a + 37, n_filler))
                                                               for a in range(0, n_filler, 37)]))


@pytest.mark.parametrize("name", TASKS)
def test_chunks_read_as_the_whole_and_targets_are_the_answer(name, corpus):
    ds = docs(name, corpus, 2, 3)
    end = max(d.end for d in ds)
    ids, targets = text.batch(ds, 0, end)
    pieces = [text.batch(ds, a, min(a + 13, end)) for a in range(0, end, 13)]
    assert np.array_equal(ids, np.concatenate([p[0] for p in pieces], 1))
    assert np.array_equal(targets, np.concatenate([p[1] for p in pieces], 1))
    for row, d in enumerate(ds):
        at, answer = d.piece("answer")
        assert np.array_equal(np.flatnonzero(targets[row] != -100), np.arange(at - 1, at - 1 + len(answer)))
        assert np.array_equal(targets[row, at - 1:at - 1 + len(answer)], ids[row, at:at + len(answer)])


@pytest.mark.parametrize("name", TASKS)
def test_the_scored_answer_is_how_the_text_tokenizes(name, corpus):
    tok = corpus.tokenizer
    for d in docs(name, corpus, 1, 30):
        question, answer = d.piece("question")[1], d.piece("answer")[1]
        assert tok.encode(tok.decode(question) + tok.decode(answer)) == list(question) + list(answer)


def test_passkey_states_the_key_it_asks(corpus):
    for d in docs("passkey", corpus, 1, 20):
        key = corpus.tokenizer.decode(d.piece("answer")[1])
        (role, needle), = decoded(corpus, d)
        assert re.fullmatch(r"\d{5}", key) and needle == f"The pass key is {key}. Remember it. {key} is the pass key."


def test_multikey_asks_one_of_k_with_a_distractor_closer(corpus):
    asked_ranks = set()
    for d in docs("multikey", corpus, 1, 60):
        found = [(role, *re.fullmatch(r"One of the special magic numbers for (\w+) is: (\d{7})\.", s).groups())
                 for role, s in decoded(corpus, d)]
        name = re.search(r"number for (\w+)\?", corpus.tokenizer.decode(d.piece("question")[1])).group(1)
        assert len(found) == 4 and len({n for _, n, _ in found}) == 4 and len({v for _, _, v in found}) == 4
        rank = [n for _, n, _ in found].index(name)
        assert found[rank][0] == "support" and [r for r, _, _ in found].count("support") == 1
        assert found[rank][2] == corpus.tokenizer.decode(d.piece("answer")[1])
        assert rank < 3  # at least one distractor between the needle and the question
        asked_ranks.add(rank)
    assert asked_ranks == {0, 1, 2}  # nor is the asked needle always the first


def test_multikey_for_training_mixes_one_to_k_needles_and_asks_a_stated_one(corpus):
    rng, counts = np.random.default_rng(0), set()
    mixed = TASKS["multikey"](corpus.tokenizer, 4, mix=True)
    for d in text.training_docs(mixed, corpus, 200, 400, rng):
        found = [(role, *re.fullmatch(r"One of the special magic numbers for (\w+) is: (\d{7})\.", s).groups())
                 for role, s in decoded(corpus, d)]
        name = re.search(r"number for (\w+)\?", corpus.tokenizer.decode(d.piece("question")[1])).group(1)
        asked, = [(n, v) for role, n, v in found if role == "support"]
        assert asked == (name, corpus.tokenizer.decode(d.piece("answer")[1]))
        assert len({n for _, n, _ in found}) == len(found)
        if len(found) > 1:  # a distractor closer to the question, as in the scored stories
            assert found[-1][0] == "distractor"
        counts.add(len(found))
    assert counts == {1, 2, 3, 4}
    scored = task("multikey", corpus)
    assert all(len(story.before + story.after) == 3 for story in (scored.story(rng) for _ in range(50)))


def simulate(facts, question):
    """bAbI's world, read from the facts' text: where a person or a thing is."""
    where, holder, left = {}, {}, {}
    for line in facts:
        who, verb, what = re.fullmatch(r"(\w+) (went back to|went to|journeyed to|travelled to|moved to|"
                                       r"picked up|got|grabbed|took|dropped|put down|discarded|left) the (\w+)\.",
                                       line).groups()
        if verb in ("picked up", "got", "grabbed", "took"):
            assert what not in holder, f"{who} takes the {what}, held by {holder.get(what)}"
            holder[what] = who
        elif verb in ("dropped", "put down", "discarded", "left"):
            assert holder.pop(what) == who
            left[what] = where.get(who)
        else:
            where[who] = what
    asked = re.fullmatch(r"Question: Where is (the )?(\w+)\? Answer:", question).group(2)
    return where.get(holder[asked]) if asked in holder else left.get(asked, where.get(asked))


@pytest.mark.parametrize("name", ["qa1", "qa2"])
def test_babi_answers_follow_from_the_facts_and_need_the_supporting_ones(name, corpus):
    answers = []
    for d in docs(name, corpus, 1, 80):
        facts = [s for _, s in decoded(corpus, d)]
        question = corpus.tokenizer.decode(d.piece("question")[1]).strip()
        answer = corpus.tokenizer.decode(d.piece("answer")[1]).strip()
        assert simulate(facts, question) == answer
        without = [s for role, s in decoded(corpus, d) if role != "support"]
        assert simulate(without, question) != answer  # the supporting facts are needed
        answers.append(answer)
    assert set(answers) == set(PLACES)


@pytest.mark.parametrize("name", ["qa1", "qa2"])
def test_babi_shortcuts_score_about_chance(name, corpus):
    """Reading the document as a list of facts, answering with the last place named, or with
    the first place named in a fact about the asked person or thing, is right about 1 in 6."""
    last = first = 0
    ds = docs(name, corpus, 1, 300)
    for d in ds:
        facts = [s for _, s in decoded(corpus, d)]
        asked = re.search(r"Where is (?:the )?(\w+)\?", corpus.tokenizer.decode(d.piece("question")[1])).group(1)
        answer = corpus.tokenizer.decode(d.piece("answer")[1]).strip()
        places = [p for f in facts for p in PLACES if f.endswith(f" {p}.")]
        last += places[-1] == answer
        mine = [p for f in facts for p in PLACES if f.endswith(f" {p}.") and asked in f]
        first += bool(mine) and mine[0] == answer
    assert last / len(ds) < 0.25 and first / len(ds) < 0.25


@pytest.mark.parametrize("name", TASKS)
def test_seeds_reproduce_and_differ(name, corpus):
    t = task(name, corpus)
    a, b = (text.eval_doc(t, corpus, 0, 2, L, 5, 4) for _ in range(2))
    assert np.array_equal(a.tokens(0, a.end), b.tokens(0, b.end))
    for other in (text.eval_doc(t, corpus, 1, 2, L, 5, 4), text.eval_doc(t, corpus, 0, 2, L, 6, 4)):
        assert not np.array_equal(other.tokens(0, 200), a.tokens(0, 200))
    rng = lambda: np.random.default_rng(7)  # noqa: E731
    x, y = (text.batch(text.training_docs(t, corpus, 3, 40 * L, rng()), 0, 40 * L) for _ in range(2))
    assert np.array_equal(x[0], y[0]) and np.array_equal(x[1], y[1])


def test_training_documents_fill_the_length_with_the_needle_at_any_depth(corpus):
    t = task("qa2", corpus)
    ds = text.training_docs(t, corpus, 200, 40 * L, np.random.default_rng(0))
    assert all(d.end == 40 * L for d in ds)
    depths = [[p for r, p, _ in d.pieces if r == "support"][-1] for d in ds]
    assert min(depths) < 10 * L and max(depths) > 30 * L
    with pytest.raises(ValueError, match="stories need more"):
        text.training_docs(t, corpus, 1, 2 * L, np.random.default_rng(0))


def test_a_tail_puts_each_rows_answer_at_its_own_offset(store, corpus):
    """With tail L - 1 the rows of one batch end their answers at every offset of the last
    segment, filler after them; with no tail every answer ends on the last token."""
    t = task("passkey", corpus)
    ds = text.training_docs(t, corpus, 200, 40 * L, np.random.default_rng(0), tail=L - 1)
    assert {40 * L - d.end for d in ds} == set(range(L))
    ids, targets = suite.batch_maker(t, text.Corpus(store, "train"), tail=L - 1)(64, 40 * L, torch.Generator())
    last = [int(row.nonzero().max()) for row in targets != -100]
    assert ids.shape == targets.shape == (64, 40 * L) and len(set(last)) > L // 2 and max(last) == 40 * L - 2  # the last answer token is predicted one position before it
    ids, targets = suite.batch_maker(t, text.Corpus(store, "train"))(8, 40 * L, torch.Generator())
    assert all(int(row.nonzero().max()) == 40 * L - 2 for row in targets != -100)


def passkey_batches(store, corpus):
    return suite.batch_maker(task("passkey", corpus), text.Corpus(store, "train"))


def train_toy(model, args, store, corpus) -> dict:
    """The suite's trainer on passkey batches, on the CPU, seed 0."""
    return train(model, passkey_batches(store, corpus), args, L, torch.device("cpu"), 0, "toy")


def toy(vocab, local_only=False):
    torch.manual_seed(0)
    cfg = ModelConfig(vocab_size=vocab, d_model=32, n_head=2, n_local=1, n_global=2, segment_len=L)
    m = FoldedLM(cfg)
    if local_only:
        weights, m = m.state_dict(), FoldedLM(cfg.local_only())
        m.load_state_dict(weights)
    return m.double().eval()


@pytest.mark.parametrize("name", TASKS)
def test_local_only_cannot_see_the_needle_the_folded_model_can(name, store, corpus):
    d = docs(name, corpus, 1, 1)[0]
    ids = d.tokens(0, d.end)
    changed = ids.copy()
    rng = np.random.default_rng(0)
    for role, pos, tokens in d.pieces:
        if role == "support":
            changed[pos:pos + len(tokens)] = rng.integers(5, store.vocab_size, len(tokens))
    assert (changed != ids).sum() > 3
    at = d.piece("answer")[0]
    for local_only, same in ((True, True), (False, False)):
        m = toy(store.vocab_size, local_only)
        with torch.no_grad():
            a, b = (m.forward_stream(torch.from_numpy(x)[None]).logits[0, at - 1:d.end - 1] for x in (ids, changed))
        assert torch.equal(a, b) == same


class Oracle(torch.nn.Module):
    """Reads `ids` (B, T + 1) segment by segment and predicts every next token, except at the
    (row, position) pairs of `wrong`."""

    def __init__(self, ids, vocab, wrong=()):
        super().__init__()
        self.cfg = ModelConfig(vocab_size=vocab, d_model=8, n_head=2, segment_len=L)
        self.ids, self.vocab, self.wrong, self.pos = torch.from_numpy(ids), vocab, wrong, 0

    def forward(self, ids, state=None, reset=None, targets=None):
        B, t = ids.shape
        assert torch.equal(ids, self.ids[:, self.pos:self.pos + t])  # the walk reads in order
        nxt = self.ids[:, self.pos + 1:self.pos + t + 1].clone()
        for row, p in self.wrong:
            if self.pos <= p < self.pos + t:
                nxt[row, p - self.pos] = (nxt[row, p - self.pos] + 1) % self.vocab
        self.pos += t
        logits = F.one_hot(nxt, self.vocab).float()
        token_loss = None if targets is None else F.cross_entropy(logits.transpose(1, 2), targets, reduction="none")
        return LMOutput(logits, None, torch.zeros(B, L, 8), None, token_loss)


@pytest.mark.parametrize("name", ["multikey", "qa2"])
def test_exact_match_needs_every_answer_token_and_nothing_else(name, store, corpus):
    ds = docs(name, corpus, 2, 4)
    end = max(d.end for d in ds)
    ids = text.batch(ds, 0, end + L + 1)[0]
    at, answer = ds[0].piece("answer")
    last = at + len(answer) - 2  # predicts the answer's last token
    before_question = ds[1].piece("question")[0] - 1
    cases = [((), [True] * 4), (((0, last),), [False, True, True, True]),
             (((1, before_question), (2, ds[2].end - 1)), [True] * 4)]  # not answers: not scored
    for wrong, expected in cases:
        oracle = Oracle(ids, store.vocab_size, wrong)
        assert exact_match(oracle, ds, torch.device("cpu"), chunk_tokens=3 * L).tolist() == expected
        assert oracle.pos == -(-end // L) * L  # to the end of the last answer's segment, no further


@pytest.mark.parametrize("local_only", [True, False])
def test_exact_match_equals_argmax_over_the_whole_document(local_only, store, corpus):
    """Chunked, and for a model that carries nothing skipping the chunks without an answer,
    exact match is still the argmax of forward_stream over the whole documents; only the
    local-only model skips."""
    model = toy(store.vocab_size, local_only)
    ds = docs("passkey", corpus, 4, 6)
    end = -(-max(d.end for d in ds) // L) * L
    ids, targets = (torch.from_numpy(x) for x in text.batch(ds, 0, end))
    with torch.no_grad():
        right = model.forward_stream(ids).logits.argmax(-1)
    answer = targets != -100
    expected = ((right == targets) | ~answer).all(dim=1)
    read = []
    model.register_forward_pre_hook(lambda m, inputs: read.append(1))
    assert exact_match(model, ds, torch.device("cpu"), chunk_tokens=2 * L).tolist() == expected.tolist()
    chunks_with_answers = {a // (2 * L) for a in answer.any(dim=0).nonzero().flatten().tolist()}
    assert len(read) == (2 * len(chunks_with_answers) if local_only else end // L)


@pytest.mark.e2e
def test_quick_run_writes_a_sane_table(tmp_path, cache, store):
    """`python -m experiments.suite --quick --baseline` from the repository root, on the
    built-in corpus that --quick reads (built once by the fixture)."""
    out = tmp_path / "suite.json"
    env = {**os.environ, "FOLDSCALE_CACHE": str(cache), "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([sys.executable, "-m", "experiments.suite", "--quick", "--baseline", "--json", str(out)],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    record = json.loads(out.read_text())
    assert record["command"] == f"python -m experiments.suite --quick --baseline --json {out}"
    assert record["date"] and record["store"] == str(store.path) and record["eval_seed"] == 1000
    args, rows = record["args"], record["rows"]
    assert [(r["task"], r["multiple"]) for r in rows] == [(t, m) for t in TASKS for m in (1, 2, 4)]
    val = text.Corpus(store, "val")
    l = record["models"]["passkey"]["folded"]["segment_len"]
    for r in rows:
        assert r["chance"] == TASKS[r["task"]].chance and r["samples"] == args["eval_samples"]
        assert r["distance"] >= r["multiple"] * l
        assert 0 <= r["folded"] <= 1 and 0 <= r["local_only"] <= 1
        split = r["folded_by_answer_split"]  # the same score, split by whether the answer crosses a boundary
        assert split["within"]["docs"] + split["crossing"]["docs"] == r["samples"]
        assert sum(x["exact"] * x["docs"] for x in split.values() if x["docs"]) == pytest.approx(r["folded"] * r["samples"])
        t = TASKS[r["task"]](val.tokenizer)
        longest = max(text.eval_doc(t, val, 1000, r["multiple"], l, i, args["max_prefix_segments"]).end
                      for i in range(r["samples"]))
        window = record["models"][r["task"]]["full_attention"]["segment_len"]
        assert (r["full_attention"] is None) == (longest > window)
    assert any(r["full_attention"] is None for r in rows) and any(r["full_attention"] is not None for r in rows)
    for name in TASKS:
        models = record["models"][name]
        assert models["local_only"] == {**models["folded"], "use_state": False} and models["folded"]["use_state"]
        assert models["full_attention"]["n_global"] == 0 and models["full_attention"]["segment_len"] == 16 * l
        assert record["train"][name]["folded"]["steps"] == record["train"][name]["full_attention"]["steps"] == 6
    table = proc.stdout[proc.stdout.index("task "):]
    assert "local_only" in table and "n/a" in table and "0.167" in table and len(table.splitlines()) == 2 + len(rows)


@pytest.mark.e2e
def test_fine_tunes_a_model_pretrained_with_launch_pretrain(tmp_path, cache, store):
    """The researcher's path at toy size: launch/pretrain.py, foldscale export, then the suite
    with --init, which takes the exported model (its shape, not the --quick one)."""
    model = dict(vocab_size=store.vocab_size, d_model=48, n_head=4, n_local=1, n_global=1, segment_len=32,
                 state_gate=True, state_norm=True)
    (tmp_path / "model.json").write_text(json.dumps(model))
    ds = json.loads((ROOT / "ds_configs" / "cpu.json").read_text())
    ds["train_micro_batch_size_per_gpu"], ds["scheduler"]["params"]["warmup_num_steps"] = 2, 1
    (tmp_path / "ds.json").write_text(json.dumps(ds))
    env = {**os.environ, "DS_ACCELERATOR": "cpu", "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    run = subprocess.run([sys.executable, str(ROOT / "launch" / "pretrain.py"),
                          "--ds-config", str(tmp_path / "ds.json"), "--model", str(tmp_path / "model.json"),
                          "--data", str(store.path), "--out", str(tmp_path / "run"),
                          "--steps", "2", "--save-every", "2", "--eval-every", "3"],
                         env=env, capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    from foldscale.export import export
    export(tmp_path / "run", tmp_path / "export")
    out = tmp_path / "suite.json"
    suite.main(["--quick", "--tasks", "passkey", "--data", str(store.path), "--init", str(tmp_path / "export"),
                "--json", str(out)])
    record = json.loads(out.read_text())
    # the exported shape, trained with the suite's bptt (every segment of --quick's 16)
    assert record["models"]["passkey"]["folded"] == ModelConfig(**model, bptt_segments=16).to_dict()
    assert record["train"]["passkey"]["folded"]["steps"] == 6 and len(record["rows"]) == 3

    FoldedLM(ModelConfig(**{**model, "vocab_size": 300})).save_pretrained(tmp_path / "other")
    with pytest.raises(StoreError, match="vocab_size 300"):
        suite.main(["--quick", "--tasks", "passkey", "--data", str(store.path), "--init", str(tmp_path / "other")])


def test_quick_fills_in_only_what_the_command_line_leaves_unset():
    quick = suite.parse_args(["--quick", "--max-train-segments", "32", "--steps", "0"])
    assert (quick.max_train_segments, quick.steps, quick.d_model) == (32, 0, suite.QUICK["d_model"])
    assert suite.parse_args(["--quick"]).max_train_segments == suite.QUICK["max_train_segments"]
    assert suite.parse_args([]).d_model == 256


@pytest.mark.parametrize("flags, message", [
    (["--warmup-steps", "0"], "--warmup-steps must be >= 1, not 0"),
    (["--stage-patience", "-1"], "--stage-patience must be >= 0, not -1"),
    (["--lr", "0"], "--lr must be positive, not 0.0"),
    (["--min-lr-ratio", "1.5"], "--min-lr-ratio must be in [0, 1], not 1.5"),
    (["--final-steps", "0"], "--final-steps must be >= 1, not 0"),
])
def test_training_flags_out_of_range_are_a_usage_error(flags, message, capsys):
    with pytest.raises(SystemExit) as refused:
        suite.parse_args(["--quick", *flags])
    assert refused.value.code == 2 and message in capsys.readouterr().err
    suite.parse_args(["--quick", "--steps", "0", "--stage-patience", "0"])  # the edges are fine


def test_a_saved_model_goes_on_where_it_stopped(tmp_path, store):
    """--save writes the trained weights and the store's tokenizer; --init DIR --steps 0 scores
    that model unchanged (saved again, the weights are the same bytes), not a fresh one."""
    common = ["--quick", "--tasks", "passkey", "--data", str(store.path), "--state-gate", "--state-norm"]
    suite.main(common + ["--save", str(tmp_path / "a")])
    suite.main(common + ["--init", str(tmp_path / "a"), "--steps", "0", "--save", str(tmp_path / "b")])
    a, b = FoldedLM.from_pretrained(tmp_path / "a"), FoldedLM.from_pretrained(tmp_path / "b")
    assert (tmp_path / "a" / "model.safetensors").read_bytes() == (tmp_path / "b" / "model.safetensors").read_bytes()
    torch.manual_seed(0)
    fresh = FoldedLM(a.cfg)
    assert not torch.equal(a.s0, fresh.s0) and a.cfg.state_gate and b.cfg == a.cfg
    assert (tmp_path / "a" / "tokenizer.model").read_bytes() == Path(store.tokenizer_path).read_bytes()


def test_suite_probe_records_why_each_row_was_missed(tmp_path, store):
    """--probe adds to each row exact match by the piece that names the answer (every document
    counted once) and up to --probe-misses misses, each with what the model answered and where
    the story names it, counted in folded_misses_named_in."""
    out = tmp_path / "probe.json"
    suite.main(["--quick", "--tasks", "qa2", "--data", str(store.path), "--steps", "0", "--probe",
                "--probe-misses", "3", "--eval-multiples", "1", "--eval-samples", "6", "--far-multiples", "",
                "--json", str(out)])
    row = json.loads(out.read_text())["rows"][0]
    sources = row["folded_by_answer_source"]
    assert sum(v["docs"] for v in sources.values()) == 6 and set(sources) <= set(probe.NAMED_IN)
    wrong = round(6 * (1 - row["folded"]))
    assert len(row["folded_misses"]) == min(3, wrong) > 0  # an untrained model misses
    assert sum(row["folded_misses_named_in"].values()) == len(row["folded_misses"])
    assert all(x["answered_in"] in probe.NAMED_IN and x["answered"] for x in row["folded_misses"])


def test_probe_footprint_is_zero_where_the_state_cannot_hold_the_needle(store, corpus):
    """The footprint is the needle's trace in the state: none past its own segment for the
    local-only ablation (every segment starts from S0), some for the folded model, whose
    swapped twin differs only in the needle."""
    t = task("passkey", corpus)
    doc = docs("passkey", corpus, 2, 1)[0]
    twin = probe.swapped(t, doc, np.random.default_rng(1))
    needle = doc.piece("support")[0]
    differs = np.flatnonzero(doc.tokens(0, doc.end) != twin.tokens(0, doc.end))
    assert len(differs) and needle <= differs.min() and differs.max() < needle + len(doc.piece("support")[1])
    rows = {}
    for local_only in (True, False):
        rows[local_only] = probe.footprint(toy(store.vocab_size, local_only).float(), t, corpus, torch.device("cpu"),
                                           seed=0, after=[0, 1, 3], n_docs=3)
    assert [r["footprint_mean"] for r in rows[True]][1:] == [0.0, 0.0]
    assert all(r["footprint_mean"] > 0 for r in rows[False])


def test_probe_counts_hard_gates_at_exactly_one(store, corpus):
    """gate_at_1 is the share of the state's channels kept bit for bit: all of them when the hard
    gate is pushed to 1, none when it is pushed to 0; a sigmoid gate never reaches 1 exactly.
    shut_since_needle keeps only channels at 1 in every segment after the needle's."""
    t = task("passkey", corpus)
    shares = {}
    for hard, bias in ((True, 10.0), (True, -10.0), (False, 10.0)):
        torch.manual_seed(0)
        model = FoldedLM(ModelConfig(vocab_size=store.vocab_size, d_model=32, n_head=2, n_local=1, n_global=2,
                                     segment_len=L, state_gate=True, state_gate_hard=hard)).double().eval()
        torch.nn.init.zeros_(model.carry.gate.weight)
        torch.nn.init.constant_(model.carry.gate.bias, bias)
        rows = probe.footprint(model, t, corpus, torch.device("cpu"), seed=0, after=[0, 2], n_docs=2)
        shares[hard, bias] = [(r["gate_at_1"], r["gate_above_0.99"], r["shut_since_needle"]) for r in rows]
    assert shares == {(True, 10.0): [(1.0, 1.0, 1.0)] * 2, (True, -10.0): [(0.0, 0.0, 1.0), (0.0, 0.0, 0.0)],
                      (False, 10.0): [(0.0, 1.0, 1.0), (0.0, 1.0, 0.0)]}  # k = 0: no segment since the needle


def test_probe_by_offset_buckets_needles_by_where_they_end_in_a_segment(corpus):
    ds = docs("passkey", corpus, 1, 12)
    ends = [(probe.needle_end(d) - 1) % L for d in ds]
    exact = [e < L // 2 for e in ends]  # right exactly when the needle ended in the first half
    parts = probe.by_offset(ds, exact, L, bins=2)
    assert parts == [1.0 if any(e < L // 2 for e in ends) else None, 0.0 if any(e >= L // 2 for e in ends) else None]


def test_probe_by_answer_split_separates_answers_that_cross_a_segment_boundary(corpus):
    ds = docs("passkey", corpus, 1, 80)
    crossing = []
    for d in ds:
        at, answer = d.piece("answer")
        first, last = at - 1, at + len(answer) - 2  # the positions that predict the answer's first and last token
        crossing.append(first // L != last // L)
        assert probe.answer_crosses(d, L) == crossing[-1]
    assert 0 < sum(crossing) < len(ds)
    split = probe.by_answer_split(ds, crossing, L)  # right exactly where the answer crosses
    assert split == {"within": {"exact": 0.0, "docs": len(ds) - sum(crossing)},
                     "crossing": {"exact": 1.0, "docs": sum(crossing)}}


def test_probe_misses_reports_the_argmax_answer_of_the_missed_documents(store, corpus):
    """What exact match scored wrong, read again alone: fewer digits right than the answer has, and
    the same argmax as the whole batch read at once; documents scored right are left out."""
    model, ds = toy(store.vocab_size), docs("passkey", corpus, 2, 6)
    cpu = torch.device("cpu")
    exact = exact_match(model, ds, cpu)
    assert not exact.any()  # an untrained model
    missed = probe.misses(model, ds, exact.numpy(), corpus.tokenizer, cpu, most=4)
    assert len(missed) == 4
    end = max(d.end for d in ds)
    logits = model.forward_stream(torch.from_numpy(text.batch(ds, 0, end)[0])).logits
    for d, x, row in zip(ds, missed, logits):
        at, answer = d.piece("answer")
        assert x["answer"] == corpus.tokenizer.decode(answer.tolist()) and x["digits_right"] < len(answer)
        assert x["predicted"] == corpus.tokenizer.decode(row[at - 1:at - 1 + len(answer)].argmax(-1).tolist())
        seq = torch.from_numpy(text.batch([d], 0, at)[0])  # greedy, over the whole document each time
        for _ in answer:
            seq = torch.cat([seq, model.forward_stream(seq).logits[:, -1:].argmax(-1)], dim=1)
        assert x["answered"] == corpus.tokenizer.decode(seq[0, at:].tolist())
        assert (x["needle_segment"], x["needle_offset"]) == divmod(probe.needle_end(d) - 1, L)
        assert x["question_segment"] == d.piece("question")[0] // L > x["needle_segment"]
        assert x["answer_segment"] * L + x["answer_offset"] == at - 1
    skip = [True, False, True, False, True, False]
    assert [x["answer"] for x in probe.misses(model, ds, skip, corpus.tokenizer, cpu)] == \
        [corpus.tokenizer.decode(d.piece("answer")[1].tolist()) for d, s in zip(ds, skip) if not s]


def test_probe_named_in_tells_which_piece_names_the_answer(corpus):
    """qa2: the place asked for is named by the needle when the holder's move comes last, by the
    earlier supporting fact when the take does, unless a move after the needle names it again;
    a word nowhere in the story is "not in the story"; by_answer_source splits exact match so."""
    tok, ds = corpus.tokenizer, docs("qa2", corpus, 1, 40)
    sources = []
    for d in ds:
        answer = tok.decode(d.piece("answer")[1].tolist()).strip()
        at = d.piece("support")[0]
        after = [tok.decode(t.tolist()) for r, p, t in d.pieces if r == "distractor" and p > at]
        expected = ("distractor after the needle" if any(answer in a for a in after) else
                    "needle" if answer in tok.decode(d.piece("support")[1].tolist()) else "support")
        sources.append(probe.named_in(d, answer, tok))
        assert sources[-1] == expected
        assert probe.named_in(d, "zebra", tok) == "not in the story"
        assert probe.named_in(d, answer[:-2], tok) == probe.named_in(d, answer + "xy", tok) == expected  # cut, run on
    assert {"needle", "support"} <= set(sources)  # both orders of the two facts occur
    split = probe.by_answer_source(ds, [s == "needle" for s in sources], tok)
    assert split["needle"] == {"exact": 1.0, "docs": sources.count("needle")}
    assert split["support"] == {"exact": 0.0, "docs": sources.count("support")}
    missed = [{"answered_in": s} for s in sources]
    assert probe.named_counts(missed) == {s: sources.count(s) for s in set(sources)}


@pytest.mark.parametrize("bad_steps, fails", [({2}, False), (set(range(1, 100)), True)])
def test_a_non_finite_gradient_skips_the_step_and_too_many_stop_training(store, corpus, bad_steps, fails):
    """A step whose gradient is not finite changes no weight; max_bad_steps of them in a row stop
    training with an error that says what to change."""
    model = toy(store.vocab_size).float().train()
    calls = {"n": 0}

    def poison(grad):  # the embedding's gradient is NaN on the steps in bad_steps
        calls["n"] += 1
        return grad * float("nan") if calls["n"] in bad_steps else grad
    model.tok_emb.weight.register_hook(poison)
    args = TrainArgs(batch_size=2, steps=4, minutes=5, start_segments=16, max_train_segments=16, max_bad_steps=3,
                     log_every=100)
    if fails:
        with pytest.raises(TrainingError, match="3 non-finite gradients in a row.*--lr"):
            train_toy(model, args, store, corpus)
        return
    summary = train_toy(model, args, store, corpus)
    assert summary["steps"] == 4 and summary["skipped_steps"] == 1
    assert all(torch.isfinite(p).all() for p in model.parameters())


class NaNInBackward(torch.autograd.Function):
    """The identity whose backward is NaN: a stand-in for a layer that overflows there."""

    @staticmethod
    def forward(ctx, x):
        return x.clone()

    @staticmethod
    def backward(ctx, grad):
        return grad * float("nan")


def test_a_non_finite_gradient_is_explained_by_the_backward_function_that_made_it(store, corpus, capsys):
    """The first skipped step is taken again under anomaly detection, which names the function
    whose backward made the NaN; the step is still skipped and the weights stay finite."""
    model = toy(store.vocab_size).float().train()
    model.norm.register_forward_hook(lambda module, inputs, out: NaNInBackward.apply(out))
    args = TrainArgs(batch_size=2, steps=2, minutes=5, start_segments=16, max_train_segments=16, max_bad_steps=5,
                     log_every=100, explain_non_finite=1)
    summary = train_toy(model, args, store, corpus)
    out = capsys.readouterr().out
    assert summary["skipped_steps"] == 2
    assert out.count("again, eager, under anomaly detection: forward finite; "
                     "Function 'NaNInBackwardBackward' returned nan") == 1
    assert all(torch.isfinite(p).all() for p in model.parameters())


def test_a_non_finite_forward_is_traced_to_the_first_module_that_made_it(store, corpus, capsys):
    """An infinity made in the forward pass where no loss counts it (after the answer) leaves the
    loss finite and the gradient not: the explanation names the module whose output it was."""
    model = toy(store.vocab_size).float().train()

    def overflow_after_the_answer(module, inputs, out):
        return out.index_fill(1, torch.tensor([out.shape[1] - 1]), float("inf"))

    model.global_blocks[0].mlp.register_forward_hook(overflow_after_the_answer)
    args = TrainArgs(batch_size=2, steps=1, minutes=5, start_segments=16, max_train_segments=16, max_bad_steps=5,
                     log_every=100, explain_non_finite=1)
    summary = train_toy(model, args, store, corpus)
    out = capsys.readouterr().out
    assert summary["skipped_steps"] == 1
    assert "under anomaly detection: forward not finite first in global_blocks.0.mlp;" in out


def test_the_gradient_through_time_is_measured_at_every_carried_state(store, corpus):
    """score's state_grads gets the norm of the gradient reaching every carried state that the
    gradient flows back into (every segment's but the last, within bptt), equal to autograd's.
    (With the paper's carry, no gate or norm, the state is the global stack's output itself, so
    its gradient also holds the segment's own loss: the recipe models are gated.)"""
    torch.manual_seed(0)
    model = FoldedLM(ModelConfig(vocab_size=store.vocab_size, d_model=32, n_head=2, n_local=1, n_global=2,
                                 segment_len=L, state_gate=True, state_norm=True, state_gate_hard=True))
    ids, targets = passkey_batches(store, corpus)(2, 16 * L, torch.Generator())
    for bptt, carried in ((16, list(range(15))), (2, [14])):
        model.cfg = dataclasses.replace(model.cfg, bptt_segments=bptt)
        grads = {}
        score(model, ids, targets, state_grads=grads).loss.backward()
        assert sorted(grads) == carried
        states = list(segments(model, ids, L, targets, bptt=bptt))
        for out in states:
            if out.state.requires_grad:
                out.state.retain_grad()
        sum(out.token_loss.sum() for out in states).backward()
        expected = [float(states[i].state.grad.norm()) for i in carried]
        assert state_grad_profile(grads) == pytest.approx(expected, rel=1e-5)
        model.zero_grad(set_to_none=True)
    assert "/segment" in describe_profile([4.0, 2.0, 1.0]) and "x2.00/segment" in describe_profile([4.0, 2.0, 1.0])


def test_final_steps_trains_that_many_steps_at_the_last_stage(store, corpus):
    """With --final-steps the budget is counted from the step the last stage begins, so every
    seed trains as long at the length it is scored for; the learning rate decays over those steps."""
    model = toy(store.vocab_size).float().train()
    args = TrainArgs(batch_size=2, minutes=5, start_segments=16, max_train_segments=32, final_steps=3, advance_at=0.0,
                     window=1, log_every=2, lr=1e-3, warmup_steps=1, min_lr_ratio=0.1)
    summary = train_toy(model, args, store, corpus)
    assert [s["segments"] for s in summary["stages"]] == [16, 32] and summary["stages"][1]["step"] == 2
    assert summary["steps"] == 5 and summary["final_stage_steps"] == 3
    assert lr_at(args, 4, 0.0) == pytest.approx(1e-3) and lr_at(args, 4, 2 / 3) < 0.5e-3


def test_stage_patience_moves_on_below_the_gate_and_none_waits_for_it(store, corpus):
    """A gate no run can pass (accuracy above 1): without --stage-patience the curriculum stays at
    its first stage; with it the run moves on after that many steps and records where it left."""
    for patience, segments in ((0, [16]), (4, [16, 32])):
        model = toy(store.vocab_size).float().train()
        args = TrainArgs(batch_size=2, minutes=5, steps=6, start_segments=16, max_train_segments=32,
                         advance_at=1.01, stage_patience=patience, window=1, log_every=2, lr=1e-3, warmup_steps=1)
        summary = train_toy(model, args, store, corpus)
        assert [s["segments"] for s in summary["stages"]] == segments
    assert summary["stages"][1]["step"] == 4 and 0.0 <= summary["stages"][0]["left_at"] <= 1.0


def test_a_last_stage_cut_short_by_time_still_anneals_the_learning_rate(store, corpus):
    """--final-steps far beyond what the time allows: the decay follows the time left instead,
    so the run still ends near lr * min_lr_ratio rather than at its peak."""
    model = toy(store.vocab_size).float().train()
    args = TrainArgs(batch_size=2, minutes=0.05, start_segments=16, max_train_segments=16, final_steps=10**6,
                     lr=1e-3, warmup_steps=1, min_lr_ratio=0.1, log_every=10**6)
    summary = train_toy(model, args, store, corpus)
    assert summary["steps"] >= 3 and summary["final_stage_steps"] == summary["steps"]
    assert summary["last_lr"] < 0.4e-3


class Clock:
    """time for train(): each reading one second after the last, so a budget ends after a set number
    of readings, the same on any machine."""

    def __init__(self):
        self.now = 0.0

    def perf_counter(self):
        self.now += 1.0
        return self.now


@pytest.mark.parametrize("stream_segments,schedule", [(0, dict(steps=10)), (64, dict(steps=10)), (0, dict(final_steps=8))])
def test_a_run_resumed_from_its_checkpoint_takes_the_same_steps(tmp_path, monkeypatch, store, corpus, stream_segments,
                                                                schedule):
    """A run cut by its time budget saves everything the next step depends on; the next call goes on
    from there (its model's own weights do not matter) and ends with the weights, curriculum and
    learning rate of one uninterrupted run, streams included. A call after the last step trains no more.
    With --final-steps the first call's short budget does not anneal the learning rate: the run goes on."""
    args = TrainArgs(batch_size=2, minutes=60, start_segments=16, max_train_segments=32, advance_at=0.0, window=1,
                     log_every=2, lr=1e-3, warmup_steps=2, min_lr_ratio=0.1, stream_segments=stream_segments, **schedule)
    batches, cpu, path = passkey_batches(store, corpus), torch.device("cpu"), tmp_path / "run.pt"
    whole = toy(store.vocab_size).float().train()
    expected = train(whole, batches, args, L, cpu, 0, "toy", tmp_path / "whole.pt")
    monkeypatch.setattr(train_module, "time", Clock())
    first = train(toy(store.vocab_size).float().train(), batches, dataclasses.replace(args, minutes=16 / 60), L, cpu, 0,
                  "toy", path)
    monkeypatch.undo()
    assert not first["done"] and 2 < first["steps"] < 10 and path.is_file()
    assert (torch.load(path, weights_only=False)["streams"] is not None) == bool(stream_segments)
    torch.manual_seed(1)
    resumed = FoldedLM(whole.cfg).train()
    for _ in range(2):  # the second call finds the run done
        summary = train(resumed, batches, args, L, cpu, 0, "toy", path)
        assert summary["done"] and summary["steps"] == 10 and summary["last_lr"] == expected["last_lr"]
        assert [(s["segments"], s["step"]) for s in summary["stages"]] == \
            [(s["segments"], s["step"]) for s in expected["stages"]] == [(16, 0), (32, 2)]
        assert summary["stream_steps"] == expected["stream_steps"] == (4 if stream_segments else 0)
        for (name, a), b in zip(whole.state_dict().items(), resumed.state_dict().values()):
            assert torch.equal(a, b), name


@pytest.mark.parametrize("last_call", [False, True])
def test_only_the_last_call_of_a_resumed_run_anneals_by_its_time(tmp_path, store, corpus, last_call):
    """--final-steps far beyond what one call allows: a call that the run goes on from keeps the
    learning rate its steps give (near the peak); the last call anneals it over its own time."""
    args = TrainArgs(batch_size=2, minutes=0.05, start_segments=16, max_train_segments=16, final_steps=10**6,
                     lr=1e-3, warmup_steps=1, min_lr_ratio=0.1, log_every=10**6, last_call=last_call)
    summary = train(toy(store.vocab_size).float().train(), passkey_batches(store, corpus), args, L,
                    torch.device("cpu"), 0, "toy", tmp_path / "run.pt")
    assert summary["steps"] >= 3 and not summary["done"]
    assert summary["last_lr"] < 0.4e-3 if last_call else summary["last_lr"] > 0.99e-3


def test_a_run_killed_mid_call_goes_on_from_its_last_periodic_save(tmp_path, monkeypatch, store, corpus):
    """Besides at the end of a call, the state is saved every save_every minutes (at a log line):
    a run that dies between saves goes on from the last one and still ends as one uninterrupted run."""
    args = TrainArgs(batch_size=2, steps=10, minutes=60, start_segments=16, max_train_segments=32, advance_at=0.0,
                     window=1, log_every=2, lr=1e-3, warmup_steps=2, min_lr_ratio=0.1, save_every=3 / 60)
    batches, cpu, path = passkey_batches(store, corpus), torch.device("cpu"), tmp_path / "run.pt"
    whole = toy(store.vocab_size).float().train()
    train(whole, batches, args, L, cpu, 0, "toy")
    made = []

    def dies_at_step_8(n, length, generator):
        made.append(n)
        if len(made) == 8:
            raise KeyboardInterrupt("killed")
        return batches(n, length, generator)
    monkeypatch.setattr(train_module, "time", Clock())
    with pytest.raises(KeyboardInterrupt):
        train(toy(store.vocab_size).float().train(), dies_at_step_8, args, L, cpu, 0, "toy", path)
    monkeypatch.undo()
    assert 2 <= torch.load(path, weights_only=False)["step"] < 8  # saved at a log line before it died
    resumed = toy(store.vocab_size).float().train()
    assert train(resumed, batches, args, L, cpu, 0, "toy", path)["steps"] == 10
    for (name, a), b in zip(whole.state_dict().items(), resumed.state_dict().values()):
        assert torch.equal(a, b), name


def test_a_checkpoint_of_another_run_is_refused(tmp_path, store, corpus):
    """Going on from a checkpoint written with another learning rate (or seed, model, task) would
    mix two runs: it stops with an error naming what differs, and the checkpoint stays."""
    args = TrainArgs(batch_size=2, steps=1, minutes=5, start_segments=16, max_train_segments=16)
    batches, cpu, path = passkey_batches(store, corpus), torch.device("cpu"), tmp_path / "run.pt"
    train(toy(store.vocab_size).float().train(), batches, args, L, cpu, 0, "toy", path)
    saved = path.read_bytes()
    with pytest.raises(TrainingError, match=r"args\.lr differ.*own --resume"):
        train(toy(store.vocab_size).float().train(), batches, dataclasses.replace(args, lr=2e-3), L, cpu, 0, "toy", path)
    with pytest.raises(TrainingError, match="seed differ"):
        train(toy(store.vocab_size).float().train(), batches, args, L, cpu, 1, "toy", path)
    with pytest.raises(ValueError, match="--steps or --final-steps"):
        train(toy(store.vocab_size).float().train(), batches, dataclasses.replace(args, steps=None), L, cpu, 0, "toy", path)
    assert path.read_bytes() == saved


def test_the_suite_scores_a_resumed_run_only_once_its_training_is_done(tmp_path, monkeypatch, store):
    """suite --resume: a call whose time ends before --steps saves, scores nothing and exits 75;
    the same command goes on and scores the run, trained its whole --steps."""
    out = tmp_path / "out.json"
    command = ["--quick", "--tasks", "passkey", "--data", str(store.path), "--resume", str(tmp_path / "ckpt"),
               "--json", str(out)]
    monkeypatch.setattr(train_module, "time", Clock())
    with pytest.raises(SystemExit) as stopped:
        suite.main(command + ["--minutes", str(4 / 60)])
    assert stopped.value.code == 75 and not out.exists() and (tmp_path / "ckpt" / "passkey_folded.pt").is_file()
    suite.main(command + ["--minutes", str(4 / 60), "--last-call"])  # scored where its time ended
    monkeypatch.undo()
    summary = json.loads(out.read_text())["train"]["passkey"]["folded"]
    assert 2 < summary["steps"] < suite.QUICK["steps"] and not summary["done"]  # went on, not done
    suite.main(command)
    summary = json.loads(out.read_text())["train"]["passkey"]["folded"]
    assert summary["steps"] == suite.QUICK["steps"] and summary["done"]
    with pytest.raises(SystemExit) as refused:  # a schedule over time cannot be resumed
        suite.parse_args(["--resume", str(tmp_path / "ckpt")])
    assert refused.value.code == 2


def test_streams_read_documents_one_after_another_from_segment_starts():
    """Each row's windows, put together, are its documents in order, each padded to whole
    segments; reset marks exactly the segments where a document starts; lengths stay in bounds."""
    made = []

    def make_batch(n, length, generator):  # document k: tokens 1000 k + 1, 1000 k + 2, ...; an answer at its end
        made.append(length)
        ids = torch.arange(1, length + 1).add(1000 * len(made)).view(1, -1)
        targets = torch.full_like(ids, -100)
        targets[0, -1] = 7
        return ids, targets

    streams = Streams(make_batch, rows=3, l=4, min_segments=2, max_segments=20, generator=torch.Generator().manual_seed(0))
    windows = [streams.window(5) for _ in range(12)]
    ids = torch.cat([w[0] for w in windows], dim=1)
    reset = torch.cat([w[2] for w in windows], dim=1)
    assert ids.shape == (3, 12 * 5 * 4) and reset.shape == (3, 12 * 5) and reset[:, 0].all()
    assert all(4 < n <= 20 * 4 for n in made) and len(set(made)) > 3
    for r in range(3):
        starts = reset[r].nonzero().flatten().tolist()
        for a, b in zip(starts, starts[1:]):
            doc = ids[r, a * 4:b * 4]
            k = int(doc[0]) // 1000
            n = made[k - 1]
            assert torch.equal(doc[:n], torch.arange(1, n + 1) + 1000 * k)  # the document, whole
            assert (doc[n:] == 0).all() and len(doc) == -(-n // 4) * 4  # then padding to its segment's end
    targets = torch.cat([w[1] for w in windows], dim=1)
    assert (targets == 7).sum() >= len(made) - 3  # every finished document's answer is read


def test_the_last_stage_alternates_fresh_sequences_and_streams_that_carry_their_state(store, corpus, monkeypatch):
    """With stream_segments, every other step at the last stage reads the streams' next window
    from the state the previous stream window left (S0 where a document starts)."""
    model = toy(store.vocab_size).float().train()
    calls = []
    real = train_module.score

    def spy(model, ids, targets, state=None, step=None, state_grads=None, reset=None):
        out = real(model, ids, targets, state, step, state_grads, reset)
        calls.append((state, reset, out.state))
        return out

    monkeypatch.setattr(train_module, "score", spy)
    args = TrainArgs(batch_size=2, steps=5, minutes=5, start_segments=16, max_train_segments=16, stream_segments=64,
                     log_every=100)
    summary = train_toy(model, args, store, corpus)
    assert summary["stream_steps"] == 2
    assert [reset is not None for _, reset, _ in calls] == [False, True, False, True, False]
    assert calls[0][0] is None and calls[1][0] is None and calls[1][1][:, 0].all()  # the first window starts documents
    assert torch.equal(calls[3][0], calls[1][2].detach())  # the second goes on from the first's state


def test_a_time_budget_that_cuts_the_last_stage_short_says_so(store, corpus, capsys):
    model = toy(store.vocab_size).float().train()
    args = TrainArgs(batch_size=2, minutes=1e-9, start_segments=16, max_train_segments=32, final_steps=3)
    summary = train_toy(model, args, store, corpus)
    assert summary["final_stage_steps"] is None
    assert "warning: the time budget (1e-09 min) ended the run before the last stage" in capsys.readouterr().out


@pytest.mark.e2e
def test_the_retrieval_session_climbs_then_finishes_and_brings_back_bf16_models(tmp_path):
    """bash experiments/retrieval_session.sh OUT --quick, three times: the first call trains both tasks
    from scratch (multikey with --mix-keys), scores and packs them in bf16; each next one goes on from
    the round before, on the same machine or, given back what came back, on a fresh one."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "SEEDS": "0", "DS_ACCELERATOR": "cpu", "PYTHONPATH": str(ROOT),
           "BACK": str(tmp_path / "none")}

    def session(work, out, **more):
        proc = subprocess.run(["bash", "experiments/retrieval_session.sh", str(tmp_path / out), "--quick"],
                              cwd=ROOT, env={**env, "WORK": str(tmp_path / work), **more}, capture_output=True,
                              text=True, timeout=600)
        assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
        return proc.stdout
    assert "climb: passkey multikey x seeds 0" in session("w", "out1")
    climbed = json.loads((tmp_path / "w" / "multikey_climb_seed0.json").read_text())
    assert climbed["args"]["mix_keys"] and climbed["args"]["save"].endswith("multikey_climb_seed0")
    assert [row["multiple"] for row in climbed["rows"]] == [1, 2]
    assert sorted(p.name for p in (tmp_path / "out1").glob("*.tar")) == [
        "multikey_climb_seed0.tar", "passkey_climb_seed0.tar", "runs.tar"]
    # a fresh machine: WORK is empty, BACK holds what the first call brought back
    assert "finish1: passkey multikey x seeds 0" in session("fresh", "out2", BACK=str(tmp_path / "out1"))
    finished = json.loads((tmp_path / "fresh" / "passkey_finish1_seed0.json").read_text())
    assert finished["args"]["init"].endswith("passkey_climb_seed0") and finished["args"]["lr"] == 3e-4
    assert finished["args"]["start_segments"] == json.loads(
        (tmp_path / "w" / "passkey_climb_seed0.json").read_text())["train"]["passkey"]["folded"]["max_segments"]
    assert [row["multiple"] for row in finished["rows"]] == [1, 2, 4]
    assert "finish2: passkey multikey x seeds 0" in session("fresh", "out3")
    again = json.loads((tmp_path / "fresh" / "multikey_finish2_seed0.json").read_text())
    assert again["args"]["init"].endswith("multikey_finish1_seed0") and again["args"]["mix_keys"]
    assert sorted(p.name for p in (tmp_path / "out3").glob("*.tar")) == [
        "multikey_finish2_seed0.tar", "passkey_finish2_seed0.tar", "runs.tar"]
    for out, name in (("out2", "passkey_finish1_seed0"), ("out3", "multikey_finish2_seed0")):
        with tarfile.open(tmp_path / out / f"{name}.tar") as tar:
            tar.extractall(tmp_path / "back", filter="data")
        model = FoldedLM.from_pretrained(tmp_path / "back" / name)
        with safe_open(tmp_path / "back" / name / "model.safetensors", "pt") as f:
            assert {f.get_slice(k).get_dtype() for k in f.keys()} == {"BF16"}
        assert model.cfg.state_gate_hard and (tmp_path / "back" / name / "tokenizer.model").is_file()
    with tarfile.open(tmp_path / "out3" / "runs.tar") as tar:
        assert {"passkey_climb_seed0.log", "multikey_finish2_seed0.json"} <= set(tar.getnames())


@pytest.mark.e2e
def test_the_retrieval_session_stops_on_a_damaged_model_brought_back(tmp_path):
    """A tar in BACK that cannot be unpacked stops the call before any training, naming the file."""
    (tmp_path / "back").mkdir()
    (tmp_path / "back" / "passkey_climb_seed0.tar").write_bytes(b"not a tar archive\n" * 64)
    proc = subprocess.run(["bash", "experiments/retrieval_session.sh", str(tmp_path / "out"), "--quick"], cwd=ROOT,
                          env={**os.environ, "WORK": str(tmp_path / "w"), "BACK": str(tmp_path / "back")},
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 1 and f"cannot unpack {tmp_path / 'back' / 'passkey_climb_seed0.tar'}" in proc.stderr
    assert not list((tmp_path / "w").glob("*.log"))
