#!/usr/bin/env bash
# Issue 28's first question in one device command: why does a plain GPT lose ~10 MFU points through
# foldscale's Trainer + DeepSpeed? On one H100 or H200, about 8 minutes, every row in one table:
#   1. the anchor: a nanoGPT-style GPT 350m (16 x 1024), plain loop, compiled (bench_anchor)
#   2. foldscale's 350m folded and its full-attention baseline (window 2l), compiled, 32k x 4 tokens,
#      each through Trainer + DeepSpeed (ZeRO-2, bf16) and through a plain PyTorch loop (bench_throughput
#      --plain: fp32 weights under bf16 autocast, fused AdamW, as the anchor trains)
#   3. each row profiled for 2 more steps: Chrome traces (traces.tar), the top 20 kernels and CPU ops
#      in perf.log, gpu_busy and host syncs per step in the table
# vs_anchor is a row's MFU over the anchor's; perf_session.json holds every row and the headline
# figures this run measures, under issue 28's keys. All rows use kernels=torch (--plain refuses liger).
#
#   bash benchmarks/perf_session.sh OUT              # on the GPU; OUT gets perf.log, *.json, traces.tar
#   bash benchmarks/perf_session.sh OUT --quick      # toy sizes on the CPU (tests/test_benchmarks.py)
#
# BUDGET_S (default 540) bounds the whole run: a benchmark still going at the deadline is stopped, and
# the rows it finished are still in the table.
set -euo pipefail
out=${1:?usage: bash benchmarks/perf_session.sh OUT_DIR [--quick]}
python=${PYTHON:-python3}
deadline=$((SECONDS + ${BUDGET_S:-540}))
mkdir -p "$out/traces"
out=$(cd "$out" && pwd)
cd "$(dirname "$0")/.."  # the benchmarks run as modules from the repository root
export PYTHONUNBUFFERED=1
if [[ ${2:-} == --quick ]]; then
    anchor=(--quick)
    folded=(--quick --profile-steps 1)
else
    anchor=(--sizes 350m --compile --steps 20 --warmup 5)
    folded=(--presets 350m --compile --tokens-per-rank 32768 --grad-accum 4 --steps 6 --warmup 3)
fi

run() {  # run NAME ARGS...: one benchmark, stopped at the deadline; the session goes on either way
    local left=$((deadline - SECONDS))
    if ((left <= 10)); then echo "$1: skipped, no time left" | tee -a "$out/perf.log"; return; fi
    timeout "$left" "$python" -m "benchmarks.$1" "${@:2}" 2>&1 | tee -a "$out/perf.log" \
        || echo "$1: stopped (status ${PIPESTATUS[0]}); its finished rows are kept" | tee -a "$out/perf.log"
}
run bench_anchor "${anchor[@]}" --profile "$out/traces" --json "$out/anchor.json"
run bench_throughput "${folded[@]}" --kernels torch --plain --profile "$out/traces" --json "$out/throughput.json"
# foldscale's attention never runs on cuDNN (NaN in its backward, BENCHMARKS.md session 7): what that costs
run bench_throughput "${folded[@]}" --kernels torch --no-baseline --attention cudnn --json "$out/throughput_cudnn.json"

"$python" - "$out" <<'EOF' 2>&1 | tee -a "$out/perf.log"
import json, sys
from pathlib import Path
from tools.benchlib import print_table, write_json
out = Path(sys.argv[1])
records = [json.loads((out / f).read_text()) for f in ("anchor.json", "throughput.json", "throughput_cudnn.json") if (out / f).is_file()]
rows = [r for record in records for r in record["rows"]]
anchor = next((r for r in rows if r["model"].startswith("anchor")), None)
for r in rows:
    if anchor is not None:  # the ratio of MFUs, whatever the peak: TFLOP/s over TFLOP/s
        r["vs_anchor"] = r["tflops_per_gpu"] / anchor["tflops_per_gpu"]
def mfu(prefix, loop="trainer", attention="flash"):
    return next((r.get("mfu") for r in rows if r["model"].startswith(prefix) and r["loop"] == loop
                 and r.get("attention", "flash") == attention), None)
headline = {"anchor_mfu_350m": mfu("anchor 350m", "plain"), "mfu_350m": mfu("350m folded"),
            "baseline_mfu_350m": mfu("350m baseline"), "mfu_350m_cudnn_attention": mfu("350m folded", attention="cudnn")}
print(f"\nissue 28, one session: {records[0]['device'] if records else '?'}; MFU in foldscale's convention "
      f"(ModelConfig.flops_per_token) against {records[0]['peak_tflops'] if records else '?'} TFLOP/s")
print_table(rows, ["model", "loop", "kernels", "attention", "tokens_per_micro_step", "grad_accum", "tokens_per_s",
                   "tflops_per_gpu", "mfu", "vs_anchor", "vs_trainer", "step_ms", "peak_mem_gib", "gpu_busy", "host_syncs_per_step", "loss"])
print("headline:", json.dumps(headline))
write_json(out / "perf_session.json", rows, headline=headline, sources=[r["command"] for r in records])
EOF
tar -C "$out" -cf "$out/traces.tar" traces && rm -r "$out/traces"
