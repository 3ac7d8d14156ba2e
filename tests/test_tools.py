"""Every benchmark and evaluation tool runs at toy size on the CPU (--quick) and writes a table
whose figures are present and positive: a tool that breaks fails here, not on the GPU."""
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def run_quick(tool, tmp_path, *extra):
    out = tmp_path / "table.json"
    env = {**os.environ, "FOLDSCALE_CACHE": str(tmp_path / "cache")}
    proc = subprocess.run([sys.executable, str(ROOT / "tools" / f"{tool}.py"), "--quick", "--json", str(out), *extra],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    record = json.loads(out.read_text())
    assert record["rows"] and record["date"] and record["device"]
    return record["rows"], proc.stdout


def positive(*values):
    return all(isinstance(v, (int, float)) and math.isfinite(v) and v > 0 for v in values)


def test_bench_throughput(tmp_path):
    rows, out = run_quick("bench_throughput", tmp_path, "--grad_accum", "1,2")
    assert [(r["model"].split()[1], r["grad_accum"]) for r in rows] == [
        ("folded", 1), ("baseline", 1), ("folded", 2), ("baseline", 2)]
    assert all(positive(r["tokens_per_s"], r["tflops_per_gpu"], r["step_ms"], r["loss"]) for r in rows)
    assert rows[1]["l"] == 2 * rows[0]["l"] and rows[1]["streams"] * 2 == rows[0]["streams"]


def test_bench_context(tmp_path):
    rows, _ = run_quick("bench_context", tmp_path, "--plot", str(tmp_path / "c.png"))
    assert [r["doc_tokens"] for r in rows] == sorted(r["doc_tokens"] for r in rows) and len(rows) >= 2
    assert all(positive(r["folded_tok_s"]) for r in rows)
    assert (tmp_path / "c.png").read_bytes()[:4] == b"\x89PNG"


def test_bench_24gb(tmp_path):
    rows, _ = run_quick("bench_24gb", tmp_path)
    assert {r["system"].split()[0] for r in rows} == {"deepspeed", "plain"}
    assert all(r["status"] == "ok" and positive(r["tokens_per_s"]) for r in rows)


def test_bench_generate(tmp_path):
    rows, _ = run_quick("bench_generate", tmp_path)
    assert [r["path"] for r in rows] == ["cached", "uncached"] * 2
    assert all(positive(r["prompt_tok_s"], r["new_tok_s"]) for r in rows)


def test_bench_data(tmp_path):
    rows, _ = run_quick("bench_data", tmp_path)
    assert len(rows) == 4


def test_context_use(tmp_path):
    rows, out = run_quick("context_use", tmp_path, "--work", str(tmp_path / "runs"), "--plot", str(tmp_path / "u.png"))
    assert rows[0]["bucket"] == "0" and all(positive(r["folded"], r["local_only"], r["full_4l"], r["full_1l"]) for r in rows)
    assert sum(r["tokens"] for r in rows) > 1000
    for name in ("folded", "local_only", "full_4l", "full_1l"):
        assert (tmp_path / "runs" / name / "export" / "model.safetensors").is_file()
    assert "better than" in out and (tmp_path / "u.png").is_file()
    cuts = json.loads((tmp_path / "table.json").read_text())["context_cuts"]
    assert [c["context_tokens"] for c in cuts] == [16, 64, "all"] and cuts[-1]["worse_than_all"] == 0
    assert all(positive(c["loss_past"]) for c in cuts)
