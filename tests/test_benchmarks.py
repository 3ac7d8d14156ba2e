"""Every benchmark runs at toy size on the CPU (--quick; scaling_model is analytic), as
`python -m benchmarks.NAME`, and writes a table whose figures are present and sane: a benchmark
that breaks fails here, not on the GPU."""
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.e2e

ROOT = Path(__file__).resolve().parents[1]


def run_quick(module, tmp_path, *extra):
    """`python -m MODULE --quick --json FILE EXTRA` from the repository root -> (rows, record, stdout)."""
    out = tmp_path / "table.json"
    env = {**os.environ, "FOLDSCALE_CACHE": str(tmp_path / "cache"), "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([sys.executable, "-m", module, "--quick", "--json", str(out), *extra],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    record = json.loads(out.read_text())
    assert record["rows"] and record["date"] and record["device"]
    assert record["command"].startswith(f"python -m {module} --quick")
    return record["rows"], record, proc.stdout


def positive(*values):
    return all(isinstance(v, (int, float)) and math.isfinite(v) and v > 0 for v in values)


def test_bench_throughput(tmp_path):
    rows, record, _ = run_quick("benchmarks.bench_throughput", tmp_path, "--grad-accum", "1,2")
    assert [(r["model"].split()[1], r["grad_accum"]) for r in rows] == [
        ("folded", 1), ("baseline", 1), ("folded", 2), ("baseline", 2)]
    assert all(positive(r["tokens_per_s"], r["tflops_per_gpu"], r["step_ms"], r["loss"]) for r in rows)
    assert rows[1]["l"] == 2 * rows[0]["l"] and rows[1]["streams"] * 2 == rows[0]["streams"]
    assert rows[1]["params_M"] < rows[0]["params_M"]  # the baseline has no S0
    assert record["peak_tflops"] == 800


def test_bench_context(tmp_path):
    rows, _, _ = run_quick("benchmarks.bench_context", tmp_path, "--plot", str(tmp_path / "c.png"))
    assert [r["doc_tokens"] for r in rows] == [32, 128]
    assert all(positive(r["folded_tok_s"], r["baseline_tok_s"]) for r in rows)
    assert (tmp_path / "c.png").read_bytes()[:4] == b"\x89PNG"


def test_bench_24gb(tmp_path):
    rows, _, _ = run_quick("benchmarks.bench_24gb", tmp_path)
    assert [r["system"] for r in rows] == ["deepspeed 24gb.json", "deepspeed 24gb-zero3.json", "plain PyTorch AdamW"]
    assert all(r["status"] == "ok" and positive(r["tokens_per_s"], r["tflops"]) for r in rows)


def test_bench_checkpoint(tmp_path):
    rows, _, stdout = run_quick("benchmarks.bench_checkpoint", tmp_path)
    assert [(r["model"], r["ds_config"]) for r in rows] == [("tiny", "cpu.json")]
    row = rows[0]
    assert positive(row["checkpoint_GB"], row["sigterm_to_exit_s"], row["resume_process_s"])
    assert 0 <= row["save_s"] < row["sigterm_to_exit_s"] and 0 <= row["verify_s"] + row["load_s"] < row["resume_process_s"]
    assert "stopped by signal" in stdout and "resumed from" in stdout


def test_bench_generate(tmp_path):
    rows, _, _ = run_quick("benchmarks.bench_generate", tmp_path)
    assert [(r["prompt_tokens"], r["path"]) for r in rows] == [(100, "cached"), (100, "uncached"),
                                                                (1000, "cached"), (1000, "uncached")]
    assert all(positive(r["prompt_tok_s"], r["new_tok_s"]) for r in rows)


def test_bench_data(tmp_path):
    rows, _, _ = run_quick("benchmarks.bench_data", tmp_path)
    assert [r["unit"] for r in rows] == ["s", "s", "tokens/s", "tokens/s"]
    assert all(positive(r["value"]) for r in rows)


def test_multi_gpu_scaling(tmp_path):
    rows, _, _ = run_quick("benchmarks.multi_gpu", tmp_path)
    assert [(r["preset"], r["zero"]) for r in rows] == [("tiny", 2)]
    assert all(positive(r["tok_s_1"], r["tok_s_2"], r["per_gpu_efficiency"]) for r in rows)
