import json
import math
import os
import subprocess
from pathlib import Path

import pytest

from experiments import text_table
from foldscale.config import ModelConfig

CORPUS = {"path": "/data/prose", "source": "tools.prose_corpus: 970 documents", "fingerprint": "abc",
          "tokens": 54_000_000, "train_tokens": 51_000_000}


def run_record(path, preset, train_tokens, folded, local, full_flops, corpus=CORPUS, seed=0, **fields):
    """A context_use record of the preset with bptt_segments 4 and `fields`, with buckets 0, 1, 2-3,
    4-7 (tokens 10, 10, 20, 40) and losses per bucket."""
    model = ModelConfig.load(preset, bptt_segments=4, **fields).to_dict()
    labels, tokens, l = ["0", "1", "2-3", "4-7"], [10, 10, 20, 40], model["segment_len"]
    rows = [{"bucket": b, "from_token": first * l, "tokens": n, "folded": f, "local_only": lo, "full_4l": 9.0,
             "full_4l_flops": ff, "gain_vs_local": (lo - f) / lo, "gap_to_full_flops": (f - ff) / ff}
            for b, first, n, f, lo, ff in zip(labels, [0, 1, 2, 4], tokens, folded, local, full_flops)]
    record = {"task": "context_use", "date": "2026-12-07", "device": "NVIDIA H100 80GB HBM3", "command": "python -m ...",
              "corpus": corpus, "model": model, "args": {"model": preset, "seed": seed, "train_tokens": f"{train_tokens:g}"},
              "training": [{"model": "folded", "real_tokens": train_tokens, "epochs": 0.2},
                           {"model": "full_4l_flops", "real_tokens": 1.25 * train_tokens, "epochs": 0.25}],
              "overall": {"folded": 3.0, "local_only": 3.1, "full_4l": 3.2, "full_4l_flops": 2.9},
              "reach_tokens": 20, "context_cuts": None, "rows": rows}
    path.write_text(json.dumps(record))
    return path


def test_the_record_has_issue_27s_keys_and_the_crossing(tmp_path):
    paths = [run_record(tmp_path / "a.json", "default", 40_000_000, [3.0, 2.0, 2.0, 2.0], [3.0, 2.1, 2.2, 2.2],
                        [2.9, 1.9, 1.9, 1.8]),  # 40M first: the table sorts by tokens
             run_record(tmp_path / "b.json", "default", 10_000_000, [3.0, 2.0, 2.0, 2.0], [3.0, 2.05, 2.1, 2.1],
                        [2.9, 1.9, 2.2, 2.1]),
             run_record(tmp_path / "c.json", "paper", 10_000_000, [3.0, 2.0, 2.0, 2.0], [3.0, 2.0, 2.0, 2.0],
                        [3.0, 2.0, 2.0, 2.0])]
    out, png = tmp_path / "text.json", tmp_path / "text.png"
    record = text_table.main([*map(str, paths), "--corpus", "prose", "--json", str(out), "--plot", str(png)])
    assert json.loads(out.read_text()) == record and png.read_bytes()[:4] == b"\x89PNG"
    assert (record["corpus"], record["corpus_tokens"], record["device"]) == ("prose", 54_000_000, "NVIDIA H100 80GB HBM3")
    assert record["corpus_fingerprint"] == CORPUS["fingerprint"]
    assert [(r["preset"], r["train_tokens"]) for r in record["runs"]] == [
        ("default", 10_000_000), ("default", 40_000_000), ("paper", 10_000_000)]
    run = record["runs"][1]
    assert run["epochs"] == 0.25 and run["overall"] == {"folded": 3.0, "local_only": 3.1, "full_equal_tokens": 3.2,
                                                        "full_equal_flops": 2.9}
    assert run["gain_vs_local_by_bucket"]["2-3"] == pytest.approx(0.2 / 2.2)
    assert run["gap_to_full_flops_by_bucket"]["4-7"] == pytest.approx(0.2 / 1.8)
    # ranges: 0-4l holds buckets 0, 1 and 2-3, weighted by their tokens (10, 10, 20)
    local = (3.0 * 10 + 2.1 * 10 + 2.2 * 20) / 40
    assert run["gain_vs_local_by_range"]["0-4l"] == pytest.approx((local - 2.25) / local)
    assert run["full_gain_vs_local_by_range"]["0-4l"] == pytest.approx((local - 9.0) / local)  # full_4l: 9.0
    assert run["full_flops_reads"] == pytest.approx(1.25)
    assert list(run["gap_to_full_flops_by_range"]) == ["0-4l", "4-16l"]
    # 4-16l: folded 2.0 against full 2.1 at 10M (-4.8%), against 1.8 at 40M (+11.1%): behind after
    # the crossing, at 10M x 4 ** (0.0476 / (0.0476 + 0.111))
    (cross,) = [c for c in record["crossings"] if c["range"] == "4-16l"]
    g0, g1 = -0.1 / 2.1, 0.2 / 1.8
    assert cross["preset"] == "default bptt_segments=4" and cross["folded"] == "behind"
    assert cross["train_tokens"] == pytest.approx(10e6 * math.exp(math.log(4) * g0 / (g0 - g1)), rel=1e-6)
    assert not [c for c in record["crossings"] if c["preset"].startswith("paper")]  # one budget: no crossing


def test_the_target_and_the_crossing_of_two_seeds(tmp_path):
    """A run meets the gain half of the target with >= 3% in every range past 4l (the 64l+ range
    among them), and the gap half with no bucket past 4l behind full attention at equal FLOPs; the
    crossing goes through the mean of a budget's seeds."""
    far = [1.0] * 8  # buckets 0, 1, 2-3 (range 0-4l), 4-7, 8-15 (4-16l), 16-31, 32-63 (16-64l), 64-127 (64l+)
    labels, tokens = ["0", "1", "2-3", "4-7", "8-15", "16-31", "32-63", "64-127"], [10] * 8

    def record(path, seed, tokens_, folded, local, full):
        path = run_record(path, "default", tokens_, folded[:4], local[:4], full[:4], seed=seed)
        r = json.loads(path.read_text())
        r["rows"] = [{"bucket": b, "from_token": first * 128, "tokens": n, "folded": f, "local_only": lo,
                      "full_4l": 9.0, "full_4l_flops": ff, "gain_vs_local": (lo - f) / lo,
                      "gap_to_full_flops": (f - ff) / ff}
                     for b, first, n, f, lo, ff in zip(labels, [0, 1, 2, 4, 8, 16, 32, 64], tokens, folded, local, full)]
        path.write_text(json.dumps(r))
        return path

    meets = record(tmp_path / "a.json", 0, 10_000_000, far, [1.0] * 3 + [1.04] * 5, [1.0] * 8)
    short = record(tmp_path / "b.json", 1, 10_000_000, far, [1.0] * 3 + [1.04] * 4 + [1.02], [1.0] * 7 + [0.99])
    late = record(tmp_path / "c.json", 0, 40_000_000, far, [1.05] * 8, [1.01] * 8)
    runs = text_table.table([late, short, meets])["runs"]
    assert [(r["train_tokens"], r["seed"]) for r in runs] == [(10_000_000, 0), (10_000_000, 1), (40_000_000, 0)]
    assert runs[0]["target"] == {"gain_vs_local": True, "gap_to_full_flops": True}
    assert runs[1]["target"] == {"gain_vs_local": False, "gap_to_full_flops": False}  # 64l+ short; 64-127 behind
    # 64l+: the two seeds at 10M are 0% and +1.0101% behind: a mean of +0.505%, ahead (-0.99%) at 40M
    (cross,) = [c for c in text_table.crossings(runs) if c["range"] == "64l+"]
    g0, g1 = (0 + 0.01 / 0.99) / 2, -0.01 / 1.01
    assert cross["folded"] == "ahead"
    assert cross["train_tokens"] == pytest.approx(10e6 * math.exp(math.log(4) * g0 / (g0 - g1)), rel=1e-6)


def test_a_gap_closing_without_a_crossing_is_extrapolated_and_taken_apart(tmp_path):
    """Folded behind full attention at equal FLOPs by 10% at 10M and 5% at 40M in 4-16l: the line
    through them reaches zero at 160M, marked extrapolated; a gap that grows or one budget gives
    none. The gap is what full attention's extra tokens buy it less what the state buys."""
    folded = [3.0, 2.0, 2.0, 2.0]
    paths = [run_record(tmp_path / "a.json", "default", 10_000_000, folded, folded, [3.0, 2.0, 2.0, 2.0 / 1.10]),
             run_record(tmp_path / "b.json", "default", 40_000_000, folded, folded, [3.0, 2.0, 2.0, 2.0 / 1.05])]
    record = text_table.table(paths)
    (cross,) = record["crossings"]
    assert (cross["range"], cross["folded"], cross["extrapolated"]) == ("4-16l", "ahead", True)
    assert cross["train_tokens"] == pytest.approx(160e6, rel=1e-6)
    for run in record["runs"]:
        for k, gap in run["gap_to_full_flops_by_range"].items():
            parts = run["gap_parts_by_range"][k]
            assert parts["tokens"] - parts["state"] == pytest.approx(gap)
    assert record["runs"][0]["gap_parts_by_range"]["4-16l"]["state"] == pytest.approx((9.0 - 2.0) / (2.0 / 1.10))
    grows = [run_record(tmp_path / "c.json", "default", 10_000_000, folded, folded, [3.0, 2.0, 2.0, 2.0 / 1.05]),
             run_record(tmp_path / "d.json", "default", 40_000_000, folded, folded, [3.0, 2.0, 2.0, 2.0 / 1.10])]
    assert text_table.table(grows)["crossings"] == []


def test_a_recipe_is_a_line_of_its_own(tmp_path):
    plain = run_record(tmp_path / "a.json", "default", 10_000_000, [3.0] * 4, [3.1] * 4, [3.0] * 4)
    hard = run_record(tmp_path / "b.json", "default", 10_000_000, [3.0] * 4, [3.1] * 4, [2.9] * 4,
                      state_gate=True, state_gate_hard=True)
    record = text_table.table([plain, hard])
    assert [text_table.name(r) for r in record["runs"]] == [
        "default bptt_segments=4", "default bptt_segments=4 state_gate=true state_gate_hard=true"]
    assert not record["crossings"]  # two recipes at one budget each, not one recipe at two


def test_runs_of_two_corpora_or_old_records_are_refused(tmp_path):
    a = run_record(tmp_path / "a.json", "default", 10_000_000, [3.0] * 4, [3.0] * 4, [3.0] * 4)
    b = run_record(tmp_path / "b.json", "default", 40_000_000, [3.0] * 4, [3.0] * 4, [3.0] * 4,
                   corpus={**CORPUS, "fingerprint": "other"})
    with pytest.raises(text_table.TableError, match="2 different token stores"):
        text_table.table([a, b])
    old = json.loads(a.read_text())
    del old["corpus"]
    (tmp_path / "old.json").write_text(json.dumps(old))
    with pytest.raises(text_table.TableError, match="old.json: not a record of .*run it again"):
        text_table.table([tmp_path / "old.json"])


@pytest.mark.e2e
def test_the_session_script_makes_the_table_and_skips_finished_rows(tmp_path):
    """bash experiments/text_session.sh OUT --quick: a toy row on the CPU, then the same command again."""
    root = Path(__file__).resolve().parents[1]
    env = {**os.environ, "FOLDSCALE_CACHE": str(tmp_path / "cache"), "OMP_NUM_THREADS": "1", "WORK": str(tmp_path / "w"),
           "ROWS": "tiny:8000", "BUDGET_S": "1000"}

    def session(out, **more):
        proc = subprocess.run(["bash", "experiments/text_session.sh", str(out), "--quick"], cwd=root,
                              env={**env, **more}, capture_output=True, text=True, timeout=1100)
        assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
        return proc.stdout
    first = session(tmp_path / "a")
    assert first.count("est_minutes") == 1 and "tiny:8000: finished" in first
    record = json.loads((tmp_path / "a" / "text.json").read_text())
    assert [r["train_tokens"] for r in record["runs"]] == pytest.approx([8000], rel=0.05)
    assert all(0 < r["epochs"] < 0.1 and set(r["overall"]) == {"folded", "local_only", "full_equal_tokens",
                                                               "full_equal_flops"} for r in record["runs"])
    assert (tmp_path / "a" / "text.png").read_bytes()[:4] == b"\x89PNG"
    again = session(tmp_path / "b")
    assert "tiny:8000: done earlier" in again and "est_minutes" not in again
    assert json.loads((tmp_path / "b" / "text.json").read_text())["runs"] == record["runs"]
    # a recipe row: its own folded and local-only models, the plain row's full attention at equal tokens
    # (at equal FLOPs it is trained anew: the gate costs FLOPs)
    recipe = session(tmp_path / "c", ROWS="tiny:8000 tiny+hard:8000")
    assert "tiny+hard:8000: finished" in recipe
    linked = next(line for line in (tmp_path / "c" / "tiny+hard_8000.log").read_text().splitlines() if "linked in" in line)
    assert "full_4l (from" in linked and "full_4l_flops" not in linked and "folded" not in linked
    folded = json.loads((tmp_path / "w" / "tiny+hard_8000" / "folded" / "model.json").read_text())
    assert folded["state_gate_hard"] and folded["state_gate"] and folded["state_norm"]
    runs = json.loads((tmp_path / "c" / "text.json").read_text())["runs"]
    assert [text_table.name(r) for r in runs] == ["tiny bptt_segments=1",
                                                  "tiny bptt_segments=1 state_norm=true state_gate=true state_gate_hard=true"]
    plain, hard = (r["overall"] for r in runs)
    assert hard["full_equal_tokens"] == plain["full_equal_tokens"] and hard["folded"] != plain["folded"]
