import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from experiments import context_use
from foldscale.config import ModelConfig
from foldscale.data import write_store
from foldscale.data.sampler import SegmentStreamSampler

ROOT = Path(__file__).resolve().parents[1]


def test_variants_share_the_shape_and_differ_only_where_they_should():
    cfg = ModelConfig(n_local=2, n_global=3, segment_len=16, bptt_segments=4)
    v = context_use.variants(cfg, [8, 1])
    assert v["folded"] == cfg
    assert v["local_only"].use_state is False and v["local_only"].num_params() == cfg.num_params()
    assert list(v) == ["folded", "local_only", "full_8l", "full_1l"]
    for name, window in (("full_8l", 128), ("full_1l", 16)):
        full = v[name]
        assert (full.n_local, full.n_global, full.segment_len, full.bptt_segments) == (5, 0, window, 1)
        assert full.num_params() == cfg.num_params() - cfg.segment_len * cfg.d_model  # all but S0


@pytest.fixture
def store(tmp_path):
    """Three training documents, of 20, 100 and 50 tokens."""
    return write_store([np.arange(20), np.arange(100), np.arange(50)], tmp_path / "store", vocab_size=128,
                       val_fraction=0.0)


def test_real_fraction_counts_the_sampler_padding(store):
    lengths = store.doc_lengths[store.docs("train")]
    targets = (lengths - 1).sum()
    for window in (16, 64, 1000):
        positions = sum(-(-n // window) * window for n in lengths)
        assert context_use.real_fraction(store, window) == pytest.approx(targets / positions)
    assert context_use.real_fraction(store, 64) < context_use.real_fraction(store, 16)


def test_plan_gives_every_model_the_real_tokens_of_the_folded_model(store):
    cfg = ModelConfig(vocab_size=128, d_model=32, n_head=2, n_local=1, n_global=1, segment_len=8, bptt_segments=2)
    runs = context_use.plan(context_use.variants(cfg, [4, 1]), store, streams=8, steps=100)
    assert list(runs) == ["folded", "local_only", "full_4l", "full_1l", "full_4l_flops"]

    def real_tokens(name):
        r = runs[name]
        return r["steps"] * r["streams"] * r["cfg"].segment_len * r["cfg"].bptt_segments \
            * context_use.real_fraction(store, r["cfg"].segment_len)
    for name in ("local_only", "full_4l", "full_1l"):
        assert real_tokens(name) == pytest.approx(real_tokens("folded"), rel=0.01)
    assert runs["full_1l"]["streams"] == 16 and runs["full_1l"]["steps"] == 100
    # a window of 32 pads more than one of 8: 4.87 streams of 32 read the real tokens of 8 x 2 x 8
    # positions; rounded up to 5, 97 steps read as many as 100 steps of the folded model
    assert (runs["full_4l"]["streams"], runs["full_4l"]["steps"]) == (5, 97)
    full, flops = runs["full_4l"], runs["full_4l_flops"]
    assert flops["cfg"] == full["cfg"] and flops["streams"] == full["streams"]
    folded_flops = cfg.flops_per_token() * 8 * 8 * 2 * 100
    full_flops = full["cfg"].flops_per_token() * full["streams"] * 32 * flops["steps"]
    # the folded model costs 1.08x full attention a position here (one global block, which runs only qkv
    # on the memory rows), less than the window of 32 loses to padding: fewer steps than at equal tokens
    assert flops["steps"] < full["steps"] and full_flops == pytest.approx(folded_flops, rel=0.01)


@pytest.fixture
def marked_store(tmp_path):
    """Twelve training documents of 20..200 tokens, document i made of token i + 1 only, so a
    segment read names its document."""
    lengths = np.random.default_rng(0).integers(20, 200, 12)
    return write_store([np.full(n, i + 1) for i, n in enumerate(lengths)], tmp_path / "marked", vocab_size=128,
                       val_fraction=0.0)


def segments_read(store, cfg, streams, steps):
    """(document, segment) of every segment the trainer's sampler gives STEPS steps of STREAMS."""
    sampler = SegmentStreamSampler(store, "train", 0, 1, streams, cfg.segment_len, seed=0)
    read = []
    for _ in range(steps):
        for batch in [next(sampler) for _ in range(cfg.bptt_segments)]:
            read += [(int(ids[0]), int(s)) for ids, s in zip(batch.ids, batch.seg_index) if ids[0]]
    return read


@pytest.mark.parametrize("segment_len,bptt,streams", [(8, 2, 3), (16, 1, 5), (32, 4, 2)])
def test_epoch_steps_is_the_last_step_before_a_segment_is_read_twice(marked_store, segment_len, bptt, streams):
    cfg = ModelConfig(vocab_size=128, segment_len=segment_len, bptt_segments=bptt)
    steps = context_use.epoch_steps(cfg, marked_store, streams, seed=0)
    first = segments_read(marked_store, cfg, streams, steps)
    assert steps > 0 and len(first) == len(set(first))
    again = segments_read(marked_store, cfg, streams, steps + 1)
    assert len(again) > len(set(again))


def test_a_token_budget_past_one_epoch_is_refused_with_the_budget_that_fits(marked_store):
    cfg = ModelConfig(vocab_size=128, d_model=32, n_head=2, n_local=1, n_global=2, segment_len=8, bptt_segments=2)
    configs = context_use.variants(cfg, [4])
    most = context_use.max_steps(configs, marked_store, 3, seed=0)
    assert context_use.within_one_epoch(context_use.plan(configs, marked_store, 3, most))
    over = context_use.plan(configs, marked_store, 3, most + 1)
    assert not context_use.within_one_epoch(over)
    # the equal-FLOPs run reads the most tokens, so it is the one that runs out first
    assert over["full_4l_flops"]["steps"] > over["full_4l_flops"]["epoch_steps"]
    assert over["folded"]["steps"] <= over["folded"]["epoch_steps"]
    per_step = context_use.real_tokens_per_step(cfg, marked_store, 3)
    assert context_use.budget_steps(configs, marked_store, 3, 0, None, "max") == most
    assert context_use.budget_steps(configs, marked_store, 3, 0, None, str(most * per_step)) == most
    with pytest.raises(context_use.EpochError, match=r"full_4l_flops would read .* past one epoch.*--train-tokens max"):
        context_use.budget_steps(configs, marked_store, 3, 0, None, str((most + 1) * per_step))
    with pytest.raises(context_use.EpochError, match=f"the most that keeps every run within one epoch is {most:,} steps"):
        context_use.budget_steps(configs, marked_store, 3, 0, most + 1, None)


@pytest.mark.e2e
def test_the_cli_refuses_a_budget_past_one_epoch_in_one_line(marked_store):
    proc = subprocess.run([sys.executable, "-m", "experiments.context_use", "--model", "tiny", "--data",
                           str(marked_store.path), "--streams", "3", "--train-tokens", "1e9", "--plan"],
                          cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 1 and proc.stderr.startswith("context_use: ") and "past one epoch" in proc.stderr
    assert len(proc.stderr.strip().splitlines()) == 1


def test_finished_runs_are_not_trained_again(tmp_path, store, monkeypatch):
    cfg = ModelConfig(vocab_size=128, d_model=32, n_head=2, n_local=1, n_global=1, segment_len=8)
    runs = {name: {"cfg": cfg, "streams": 2, "steps": 10} for name in ("folded", "local_only")}
    (tmp_path / "folded" / "run").mkdir(parents=True)
    (tmp_path / "folded" / "run" / "metrics.jsonl").write_text('{"step": 10, "train/loss": 2.0}\n')
    (tmp_path / "local_only" / "run").mkdir(parents=True)  # interrupted at step 4: goes on
    (tmp_path / "local_only" / "run" / "metrics.jsonl").write_text('{"step": 4, "train/loss": 3.0}\n')
    launched = []

    class Done:
        returncode = 0

        def poll(self):
            return 0

    monkeypatch.setattr(context_use, "launch", lambda name, *a: launched.append(name) or Done())
    args = type("Args", (), {"ds_config": str(ROOT / "ds_configs" / "cpu.json"), "jobs": 2, "poll": 0.0, "reuse": None})
    context_use.train_all(runs, args, tmp_path)
    assert launched == ["local_only"]


@pytest.mark.parametrize("compile_", [False, True])
def test_every_run_is_compiled_when_asked(tmp_path, monkeypatch, compile_):
    cfg = ModelConfig(vocab_size=128, d_model=32, n_head=2, n_local=1, n_global=1, segment_len=8)
    commands = []
    monkeypatch.setattr(context_use.subprocess, "Popen", lambda cmd, **kw: commands.append(cmd))
    args = type("Args", (), {"data": "STORE", "seed": 0, "compile": compile_})
    context_use.launch("folded", {"cfg": cfg, "streams": 2, "steps": 10}, {}, args, tmp_path)
    assert commands[0][1].endswith("pretrain.py") and ("--compile" in commands[0]) == compile_


def test_evaluations_in_processes_of_their_own_are_evaluates_numbers(tmp_path):
    """Each model and each context cut evaluated in its own process gives what `evaluate` gives
    for them together, buckets in the folded model's l also for the model of a longer window."""
    import torch
    from foldscale.evaluate import evaluate
    from foldscale.model import FoldedLM
    rng = np.random.default_rng(0)
    store = write_store([rng.integers(0, 128, n) for n in (300, 90, 200, 40, 260, 120)], tmp_path / "store",
                        vocab_size=128, val_fraction=0.5)
    cfg = ModelConfig(vocab_size=128, d_model=32, n_head=2, n_local=1, n_global=1, segment_len=8)
    models = {}
    for i, (name, c) in enumerate(context_use.variants(cfg, [4]).items()):
        torch.manual_seed(i)
        models[name] = FoldedLM(c).eval()
        models[name].save_pretrained(tmp_path / name / "export")
    args = type("Args", (), {"data": str(store.path), "jobs": 2, "max_tokens": 500, "eval_streams": 3})
    result, cut = context_use.evaluate_all(list(models), 8, tmp_path, args, "cpu", [1, 4])
    together = evaluate(models, store, "val", 500, 3, progress=False)
    assert result == together
    assert [m["model"] for m in result["models"]] == ["folded", "local_only", "full_4l"]
    assert "4-7" in result["models"][2]["by_position"]  # in units of 8 tokens, not full_4l's 32
    for k in (1, 4):
        alone = evaluate({"folded": models["folded"]}, store, "val", 500, 3, context=8 * k, progress=False)
        assert cut[k] == alone["models"][0] and cut[k]["loss"] != result["models"][0]["loss"]


def test_a_model_flag_not_given_keeps_the_presets_value():
    args = context_use.parse_args(["--model", "paper", "--state-gate-hard", "--no-state-norm", "--bptt-segments", "8"])
    given = {k: v for k in context_use.MODEL_FIELDS if (v := getattr(args, k, None)) is not None}
    assert given == {"state_gate_hard": True, "state_norm": False, "bptt_segments": 8}


def result(folded, local, full, full_flops=None, l=10):
    labels = ["0", "1", "2-3", "4-7"]
    model = lambda name, losses: {"model": name, "by_position": dict(zip(labels, losses)),  # noqa: E731
                                  "tokens_by_position": dict(zip(labels, [10, 10, 20, 40]))}
    models = [model("folded", folded), model("local_only", local), model("full_8l", full), model("full_1l", local)]
    if full_flops:
        models.append(model("full_8l_flops", full_flops))
    return {"position_unit": l, "models": models}


def test_reach_is_the_last_bucket_with_the_margin():
    report = context_use.analyse(result([3.0, 2.0, 2.0, 2.0], [3.0, 2.5, 2.03, 2.01], [2.9, 1.9, 1.8, 1.9],
                                        [2.5, 1.6, 1.6, 1.6]), 0.01)
    assert [r["bucket"] for r in report["rows"]] == ["0", "1", "2-3", "4-7"]
    assert report["reach_bucket"] == "2-3" and report["reach_tokens"] == 20  # 2.03 -> 2.0 is 1.5%; 4-7 is 0.5%
    assert report["rows"][1]["gain_vs_local"] == pytest.approx(0.2)
    assert report["rows"][1]["gap_to_full"] == pytest.approx(0.1 / 1.9)  # to the first window
    assert report["rows"][1]["gap_to_full_flops"] == pytest.approx(0.4 / 1.6)
    assert report["full"] == ["full_8l", "full_1l", "full_8l_flops"] and report["rows"][1]["full_1l"] == 2.5


def test_no_reach_when_the_state_never_helps():
    report = context_use.analyse(result([3.0, 2.0], [3.0, 2.0], [3.0, 2.0]), 0.01)
    assert report["reach_bucket"] is None and report["reach_tokens"] is None
    assert report["rows"][0]["gap_to_full_flops"] is None


@pytest.mark.e2e
def test_quick_run_on_the_cpu(tmp_path):
    """The whole experiment at toy size, as `python -m experiments.context_use --quick`."""
    out = tmp_path / "table.json"
    env = {**os.environ, "FOLDSCALE_CACHE": str(tmp_path / "cache"), "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([sys.executable, "-m", "experiments.context_use", "--quick", "--json", str(out),
                           "--work", str(tmp_path / "runs"), "--plot", str(tmp_path / "u.png")],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=1200)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    record = json.loads(out.read_text())
    rows, names = record["rows"], ["folded", "local_only", "full_4l", "full_1l", "full_4l_flops"]
    assert rows[0]["bucket"] == "0" and all(r["folded"] > 0 and r["local_only"] > 0 and r["full_4l_flops"] > 0
                                            for r in rows)
    assert sum(r["tokens"] for r in rows) > 1000
    assert [t["model"] for t in record["training"]] == names
    training = {t["model"]: t for t in record["training"]}
    assert all(0 <= t["padding"] < 0.5 and t["real_tokens"] > 0 and t["steps"] > 0 for t in training.values())
    assert training["full_4l_flops"]["pflops"] == pytest.approx(training["folded"]["pflops"], rel=0.05)
    assert training["full_4l"]["real_tokens"] == pytest.approx(training["folded"]["real_tokens"], rel=0.1)
    assert training["full_4l"]["steps"] < training["full_4l_flops"]["steps"]
    for name in names:
        assert (tmp_path / "runs" / name / "export" / "model.safetensors").is_file()
    assert "better than" in proc.stdout and (tmp_path / "u.png").read_bytes()[:4] == b"\x89PNG"
    assert [c["context_tokens"] for c in record["context_cuts"]] == [16, 64, "all"]
    assert record["context_cuts"][-1]["worse_than_all"] == 0 and all(c["loss_past"] > 0 for c in record["context_cuts"])
    parts = record["by_offset"]  # each model's loss in each eighth of its own segment
    assert [p["part"] for p in parts] == [f"{i}/8" for i in range(8)] and all(p[n] > 0 for p in parts for n in names)
    assert all(p["gain_vs_local"] == pytest.approx((p["local_only"] - p["folded"]) / p["local_only"]) for p in parts)
    assert "loss by offset within each model's own segment" in proc.stdout
