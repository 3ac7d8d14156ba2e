"""Every benchmark runs at toy size on the CPU (--quick; scaling_model is analytic), as
`python -m benchmarks.NAME`, and writes a table whose figures are present and sane: a benchmark
that breaks fails here, not on the GPU."""
import gzip
import json
import math
import os
import subprocess
import sys
import tarfile
import time
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
    clipped = tmp_path / "clipped.json"  # a second DeepSpeed config: a row each
    clipped.write_text(json.dumps({**json.loads((ROOT / "ds_configs/cpu.json").read_text()), "gradient_clipping": 0.5}))
    rows, record, _ = run_quick("benchmarks.bench_throughput", tmp_path, "--grad-accum", "1,2",
                                "--ds-config", f"ds_configs/cpu.json,{clipped}")
    assert [(r["model"].split()[1], r["ds_config"] == str(clipped), r["grad_accum"]) for r in rows] == [
        (model, second, accum) for second in (False, True) for accum in (1, 2) for model in ("folded", "baseline")]
    assert all(("vs_first_config" in r) == (r["ds_config"] == str(clipped)) for r in rows)
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
    assert positive(row["checkpoint_GB"], row["sigterm_to_exit_s"], row["resume_process_s"], row["sha256_GB_per_s"],
                    row["blake3_GB_per_s"])
    assert 0 <= row["save_s"] < row["sigterm_to_exit_s"] and 0 <= row["verify_s"] + row["load_s"] < row["resume_process_s"]
    assert "stopped by signal" in stdout and "resumed from" in stdout


def test_bench_checkpoint_kills_a_silent_run_at_its_timeout():
    """A run that prints nothing (the 3b's start) cannot hold the benchmark past --timeout."""
    from benchmarks.bench_checkpoint import lines_of, read_until
    p = subprocess.Popen([sys.executable, "-c", "print('starting', flush=True); import time; time.sleep(60)"],
                         stdout=subprocess.PIPE, text=True)
    with pytest.raises(SystemExit, match="logged no step within --timeout"):
        read_until(p, lines_of(p), time.perf_counter() + 2, first_step=True)
    assert p.wait(timeout=10) != 0  # killed, not left running


def test_bench_generate(tmp_path):
    rows, _, stdout = run_quick("benchmarks.bench_generate", tmp_path, "--hf", "--profile")
    assert [(r["prompt_tokens"], r["path"]) for r in rows] == [
        (n, path) for n in (100, 1000) for path in ("cached", "uncached", "hf generate")]
    assert all(positive(r["prompt_tok_s"], r["new_tok_s"]) for r in rows)
    assert "Self CPU time total" in stdout  # --profile's table of one token's ops


def test_bench_data(tmp_path):
    rows, _, _ = run_quick("benchmarks.bench_data", tmp_path)
    assert [r["unit"] for r in rows] == ["s", "s", "tokens/s", "tokens/s"]
    assert all(positive(r["value"]) for r in rows)


def test_multi_gpu_scaling(tmp_path):
    rows, _, _ = run_quick("benchmarks.multi_gpu", tmp_path)
    assert [(r["preset"], r["zero"], r["gpus"]) for r in rows] == [("tiny", 2, 1), ("tiny", 2, 2)]
    assert all(positive(r["tok_s"], r["per_gpu_efficiency"]) for r in rows) and rows[0]["per_gpu_efficiency"] == 1
    assert rows[1]["per_gpu_efficiency"] == pytest.approx(rows[1]["tok_s"] / (2 * rows[0]["tok_s"]))


def test_bench_anchor(tmp_path):
    rows, record, _ = run_quick("benchmarks.bench_anchor", tmp_path, "--profile", str(tmp_path / "traces"))
    assert [(r["model"], r["loop"], r["l"], r["streams"]) for r in rows] == [
        ("anchor tiny (nanoGPT-style)", "plain", 64, 4)]
    row = rows[0]
    assert positive(row["tokens_per_s"], row["tflops_per_gpu"], row["step_ms"], row["loss"], row["profiled_step_ms"])
    assert row["host_syncs_per_step"] == 0  # no GPU, nothing to wait for
    trace = json.loads(gzip.decompress((tmp_path / "traces" / "anchor_tiny_nanoGPT_style.json.gz").read_bytes()))
    assert any(e.get("name") == "aten::mm" for e in trace["traceEvents"])
    assert record["peak_tflops"] == 800 and record["vocab"] == 512


def test_anchor_flops_follow_foldscale_convention():
    """6 x (block parameters + V x d) + 12 x d x n_layer x T/2, as ModelConfig.flops_per_token counts a
    plain GPT (DESIGN.md §1): here a block is 12 d^2 weights and two LayerNorm scales."""
    from benchmarks.bench_anchor import GPT, GPTConfig
    L, h, d, T, V = 3, 4, 64, 32, 100
    model = GPT(GPTConfig(n_layer=L, n_head=h, d_model=d, seq_len=T, vocab_size=V))
    assert model.flops_per_token() == 6 * (L * (12 * d * d + 2 * d) + V * d) + 12 * d * L * T / 2


def test_perf_session(tmp_path):
    """The issue-28 device command at toy size: every row in one table, the plain loop beside the trainer."""
    env = {**os.environ, "FOLDSCALE_CACHE": str(tmp_path / "cache"), "OMP_NUM_THREADS": "1", "PYTHON": sys.executable}
    proc = subprocess.run(["bash", "benchmarks/perf_session.sh", str(tmp_path / "out"), "--quick"], cwd=ROOT,
                          env=env, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    record = json.loads((tmp_path / "out" / "perf_session.json").read_text())
    rows = record["rows"]
    assert [(r["model"].split(" (")[0], r["loop"]) for r in rows] == [
        ("anchor tiny", "plain"), ("tiny folded", "trainer"), ("tiny folded", "plain"),
        ("tiny baseline", "trainer"), ("tiny baseline", "plain"), ("tiny folded", "trainer")]
    assert [r["attention"] for r in rows[1:]] == ["flash"] * 4 + ["cudnn"]
    assert rows[0]["vs_anchor"] == 1 and all(positive(r["vs_anchor"], r["tokens_per_s"]) for r in rows)
    for trainer, plain in (rows[1:3], rows[3:5]):
        assert plain["vs_trainer"] == pytest.approx(plain["tokens_per_s"] / trainer["tokens_per_s"])
        assert plain["flops_per_token"] == trainer["flops_per_token"]  # the same model, the same FLOPs
    assert set(record["headline"]) == {"anchor_mfu_350m", "mfu_350m", "baseline_mfu_350m", "mfu_350m_cudnn_attention"}
    with tarfile.open(tmp_path / "out" / "traces.tar") as tar:
        assert len([n for n in tar.getnames() if n.endswith(".json.gz")]) == 5
    log = (tmp_path / "out" / "perf.log").read_text()
    assert log.count("Self CPU time total") == 5 and "headline:" in log


def multigpu_session(out, *args, **env):
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHON": sys.executable, **env}
    proc = subprocess.run(["bash", "benchmarks/multigpu_session.sh", str(out), *args], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return json.loads((out / "multigpu.json").read_text()), proc.stdout


def test_multigpu_session(tmp_path):
    """The issue-29 device command at toy size, 2 gloo ranks: parity and elastic, one table (the
    scaling piece's module is test_multi_gpu_scaling's, its keys the next test's)."""
    table, stdout = multigpu_session(tmp_path / "out", "--quick", "parity", "elastic", FOLDSCALE_CACHE=str(tmp_path / "cache"))
    for key in ("parity_deepspeed_zero2_2gpu", "elastic_deepspeed_zero2_2_1_2gpu"):
        assert f"{key}_ok" in table, stdout[-4000:]  # the piece's own output says why it gave no row
        assert table[f"{key}_ok"] and table[f"{key}_same_segments"] and table[f"{key}_max_rel_diff"] < 1e-6, key
    assert len(table["commands"]) == 2 and table["device"].startswith("CPU")


def test_multigpu_session_table_merges_over_the_earlier_one(tmp_path):
    """`summary` turns the JSON files in OUT into keys merged over TARGET's, each measured efficiency
    beside the scaling model's prediction at that configuration's own 1-GPU MFU."""
    from tools import scaling_model
    out, target = tmp_path / "out", tmp_path / "targets" / "multigpu.json"
    out.mkdir()
    target.parent.mkdir()
    target.write_text(json.dumps({"commands": ["earlier"], "zero3_1b_8gpu_efficiency": 0.9}))
    rows = [{"preset": "350m", "zero": 2, "gpus": g, "accum": 4, "tokens_per_gpu_step": 4 * 32768, "tok_s": t,
             "mfu": m, "per_gpu_efficiency": t / (g * 100.0)} for g, t, m in ((1, 100.0, 0.5), (8, 780.0, 0.49))]
    (out / "scaling_350m_z2.json").write_text(json.dumps(
        {"date": "2030-01-01", "device": "NVIDIA H200", "command": "python -m benchmarks.multi_gpu", "mode": "scaling",
         "rows": rows}))
    table, stdout = multigpu_session(out, "summary", TARGET=str(target))
    assert json.loads(target.read_text()) == table and "zero2_350m_8gpu_efficiency" in stdout
    assert table["zero3_1b_8gpu_efficiency"] == 0.9 and table["commands"] == ["earlier", "python -m benchmarks.multi_gpu"]
    assert table["zero2_350m_8gpu_efficiency"] == 0.975 and table["zero2_350m_1gpu_mfu"] == 0.5
    predicted = scaling_model.main(["--presets", "350m", "--stages", "2", "--gpus", "8", "--mfu", "0.5"])
    assert table["zero2_350m_8gpu_predicted_efficiency"] == predicted[0]["efficiency"] < 1
    assert "zero2_350m_1gpu_efficiency" not in table and table["device"] == "NVIDIA H200"
