#!/usr/bin/env bash
# Issue 29 on one host of N GPUs (8, or 4), every run through launch/pretrain.py under a launcher:
#   scaling:PRESET:STAGE  per-GPU efficiency at 1, 2, 4 .. N GPUs, compiled, 32k tokens x 4 per GPU-step
#                         (benchmarks.multi_gpu; the 1b at 16k x 4 on cards under 100 GiB, where 32k does not fit)
#   parity[:mpirun]       N GPUs x 2 streams against 1 GPU x 2N, ZeRO 2 and 3 (tools.parity; mpirun: ZeRO 2)
#   elastic[:mpirun]      N -> N/2 -> N GPUs with --resume auto, ZeRO-2 (tools.elastic)
# then the table: OUT/multigpu.json, merged into TARGET (benchmarks/results/targets/multigpu.json) over the
# keys an earlier session wrote, e.g. zero2_350m_8gpu_efficiency (a fraction), with the scaling model's
# prediction beside each measured efficiency (tools.scaling_model at that run's own 1-GPU MFU).
#
#   bash benchmarks/multigpu_session.sh OUT                      # every piece, in this order, until BUDGET_S
#   bash benchmarks/multigpu_session.sh OUT scaling:1b:3 parity  # only these
#   bash benchmarks/multigpu_session.sh OUT summary              # only the table, from OUT's JSON files (no GPU)
#   bash benchmarks/multigpu_session.sh OUT --quick              # toy sizes on the CPU, 2 gloo ranks (tests)
#
# BUDGET_S (default 540) bounds the whole run: a piece still going at the deadline is interrupted (its
# ranks killed) and the rows it finished are kept. GPUS (default: every GPU nvidia-smi lists; 2 with
# --quick) is N; a scaling piece runs 1 GPU, then N, N/2 .. 2 (SCALE_AT=8,4 leaves 2 out). Expected on
# H100s (a guess: only 2-GPU runs were timed): a compiled scaling run 1-2 min, so a scaling piece at 8
# GPUs 4-8 min; parity and elastic ~2 min each. Split the pieces over several device calls and carry
# TARGET from one call to the next: each call merges its keys into the TARGET it finds.
set -euo pipefail
out=${1:?usage: bash benchmarks/multigpu_session.sh OUT_DIR [--quick] [PIECE...]}
shift
python=${PYTHON:-python3}
deadline=$((SECONDS + ${BUDGET_S:-540}))
mkdir -p "$out"
out=$(cd "$out" && pwd)
cd "$(dirname "$0")/.."  # the benchmarks run as modules from the repository root
export PYTHONUNBUFFERED=1 OMPI_ALLOW_RUN_AS_ROOT=1 OMPI_ALLOW_RUN_AS_ROOT_CONFIRM=1
quick=()
if [[ ${1:-} == --quick ]]; then
    quick=(--quick); shift
    gpus=${GPUS:-2}
    target=$out/multigpu.json  # a toy run never touches the repository's table
    all="scaling:tiny:2 parity elastic"
else
    gpus=${GPUS:-$({ nvidia-smi -L 2>/dev/null || true; } | wc -l)}
    target=${TARGET:-benchmarks/results/targets/multigpu.json}
    all="scaling:350m:2 parity elastic scaling:1b:3 scaling:350m:3 scaling:1b:2 parity:mpirun elastic:mpirun"
fi
if (($#)); then pieces=("$@"); else read -r -a pieces <<< "$all"; fi
for piece in "${pieces[@]}"; do
    if ! [[ $piece =~ ^(scaling:[0-9a-z]+:[0-3]|parity|parity:mpirun|elastic|elastic:mpirun|summary)$ ]]; then
        echo "multigpu_session: unknown piece '$piece' (scaling:PRESET:STAGE, parity[:mpirun], elastic[:mpirun], summary)" >&2
        exit 2
    fi
done
counts=$(for ((n = gpus; n >= 2; n /= 2)); do echo -n "$n,"; done)  # N first: the target's figure
counts=${SCALE_AT:-${counts%,}}
if [[ -z $counts && ${pieces[*]} != summary ]]; then echo "multigpu_session: needs 2 GPUs or more (GPUS=$gpus)" >&2; exit 2; fi
echo "multigpu_session: N=$gpus (scaling on 1,$counts GPUs), pieces: ${pieces[*]}, budget ${BUDGET_S:-540} s" | tee -a "$out/session.log"

run() {  # run NAME MODULE ARGS...: one piece, interrupted at the deadline; the session goes on either way
    local left=$((deadline - SECONDS))
    if ((left <= 30)); then echo "$1: skipped, no time left" | tee -a "$out/session.log"; return; fi
    echo "$1: starting, $left s left" | tee -a "$out/session.log"
    timeout -s INT -k 30 "$left" "$python" -m "${@:2}" 2>&1 | tee -a "$out/session.log" \
        || echo "$1: stopped (status ${PIPESTATUS[0]}); its finished rows are kept" | tee -a "$out/session.log"
}
for piece in "${pieces[@]}"; do
    IFS=: read -r kind a b <<< "$piece"
    case $kind in
        scaling)
            if ((${#quick[@]})); then args=(--quick); else
                tokens=32768
                if [[ $a == 1b ]] && (($(nvidia-smi --query-gpu=memory.total --format=csv,noheader,nounits -i 0) < 100000)); then
                    tokens=16384
                fi
                args=(--presets "$a" --stages "$b" --compile --tokens "${TOKENS:-$tokens}" --accum 4 --steps 10 --skip 5)
            fi
            run "$piece" benchmarks.multi_gpu "${args[@]}" --gpus "$counts" --launcher deepspeed --work "/tmp/mgs_$a$b" \
                --json "$out/scaling_${a}_z$b.json" ;;
        parity)
            launcher=${a:-deepspeed}
            if ((${#quick[@]})); then args=(--quick); elif [[ $launcher == mpirun ]]; then args=(--stages 2); else args=(--stages 2,3); fi
            run "$piece" tools.parity "${args[@]}" --gpus "$gpus" --streams 2 --launcher "$launcher" \
                --json "$out/parity_$launcher.json" ;;
        elastic)
            launcher=${a:-deepspeed}
            run "$piece" tools.elastic "${quick[@]}" --gpus "$gpus" --launcher "$launcher" --json "$out/elastic_$launcher.json" ;;
        summary) ;;
    esac
done

"$python" - "$out" "$target" <<'EOF' 2>&1 | tee -a "$out/session.log"
import json, sys
from pathlib import Path
from tools import scaling_model
from tools.benchlib import print_table
out, target = Path(sys.argv[1]), Path(sys.argv[2])
table = json.loads(target.read_text()) if target.is_file() else {"commands": []}
records = [json.loads(f.read_text()) for f in sorted(out.glob("*.json")) if f.name != "multigpu.json"]
for record in records:
    table["device"], table["date"] = record["device"], record["date"]
    table["commands"] = sorted(set(table["commands"]) | {record["command"]})
    for r in record["rows"]:
        if record["mode"] == "scaling":
            key = f"zero{r['zero']}_{r['preset']}_{r['gpus']}gpu"
            table[f"{key}_tokens_per_s"], table[f"{key}_mfu"] = r["tok_s"], r["mfu"]
            if r["gpus"] == 1:
                continue
            table[f"{key}_efficiency"] = r["per_gpu_efficiency"]
            one = table[f"zero{r['zero']}_{r['preset']}_1gpu_mfu"]
            if one:  # the bandwidth model (overlap 0) at this configuration's own 1-GPU MFU
                predicted = scaling_model.main(["--presets", r["preset"], "--stages", str(r["zero"]), "--gpus", str(r["gpus"]),
                                                "--mfu", str(one), "--accum", str(r["accum"]),
                                                "--tokens", str(r["tokens_per_gpu_step"] // r["accum"])])
                table[f"{key}_predicted_efficiency"] = predicted[0]["efficiency"]
        else:  # parity: "8gpu" (8 against 1); elastic: "8_4_8gpu"
            gpus = r["ranks"].replace(" -> ", "_") if record["mode"] == "elastic" else r["gpus"]
            key = f"{record['mode']}_{r['launcher']}_zero{r['zero']}_{gpus}gpu"
            table[f"{key}_max_rel_diff"], table[f"{key}_ok"] = r["max_rel_diff"], r["ok"]
            table[f"{key}_same_segments"] = r["same_segments"]
print(f"\nissue 29, {table.get('device', '?')}: {len(records)} result file(s) in {out}, table {target}")
rows = [{"key": k, "value": v} for k, v in table.items() if k not in ("commands", "device", "date")]
if rows:
    print_table(rows, ["key", "value"])
for path in {target, out / "multigpu.json"}:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(dict(sorted(table.items())), indent=1) + "\n")
EOF
