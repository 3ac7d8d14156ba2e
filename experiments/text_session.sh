#!/usr/bin/env bash
# Issue 27's scaling table in device commands of ~9 minutes: context_use rows (one preset at one
# training budget: folded, local-only, full attention 4l at equal tokens and at equal FLOPs), PAR rows
# side by side on one GPU (each trains its 4 models at once: small models leave an H100 mostly idle).
# Before training, every row's plan is printed: steps, real tokens, epochs and minutes per run.
#
#   bash experiments/text_session.sh OUT            # on the GPU; OUT gets session.log, the rows' JSON, text.json, text.png
#   bash experiments/text_session.sh OUT --quick    # toy sizes on the CPU (tests/test_text_table.py)
#
# ROWS (default "default:10e6 paper:10e6 default:40e6 paper:max") are PRESET[+RECIPE]:TOKENS, TOKENS
# the folded model's training tokens or `max` (the most within one epoch; a row past one epoch is
# refused), RECIPE one of `recipes` below: the folded model with one recipe option changed (issue 27:
# "which part of the extra FLOPs buys nothing"). A recipe row takes the full-attention baselines
# that a finished row trained with the same plan (context_use --reuse) instead of training them.
# SEED (default 0) is the training seed; a row of another seed has its own run directories and files
# (`default_40e6_seed1.json`). STORE (default .gpu_data/prose/store, see tools/store_parts.py),
# COMPILE (default 1: every training compiled; 0: eager), BUDGET_S (default 540): at the deadline
# the trainings are stopped with SIGTERM and save a checkpoint; the same command again goes on from
# there (runs/text/ stays on a warm machine) and skips rows already done. text.json is made from
# every row finished so far.
set -euo pipefail
shopt -s nullglob
out=${1:?usage: bash experiments/text_session.sh OUT_DIR [--quick]}
python=${PYTHON:-python3}
deadline=$((SECONDS + ${BUDGET_S:-540}))
mkdir -p "$out"
out=$(cd "$out" && pwd)
cd "$(dirname "$0")/.."
export PYTHONUNBUFFERED=1
work=${WORK:-runs/text}
seed=${SEED:-0}
suffix=$( ((seed)) && echo "_seed$seed" || true)
if [[ ${2:-} == --quick ]]; then
    rows=(${ROWS:-tiny:8000 tiny:16000})
    common=(--quick --windows 4 --reach 1,4 --reuse "$work" --seed "$seed")
    declare -A opts=([tiny]="--streams 4")
else
    rows=(${ROWS:-default:10e6 paper:10e6 default:40e6 paper:max})
    common=(--data "${STORE:-.gpu_data/prose/store}" --bptt-segments 4 --windows 4 --reach 1,4,16,64 --jobs 4 --poll 60
            --reuse "$work" --seed "$seed")
    if [[ ${COMPILE:-1} == 1 ]]; then common+=(--compile); fi
    # positions/s of one training with 8 at once on an H100, for the plan's minutes: eager, default
    # measured 80k (issue 16's 600-step runs), paper a guess; compiled predicted twice that (BENCHMARKS.md,
    # session 19). The progress lines print the real rate
    declare -A opts=([default]="--streams 32 --rate ${RATE_DEFAULT:-160000}"
                     [paper]="--streams 128 --rate ${RATE_PAPER:-80000}")
fi
# one recipe option at a time (context_use's model config flags; a later flag wins over `common`'s)
# (rowsM: M carried rows, fewer than l: also fewer FLOPs, so full attention at equal FLOPs is trained anew;
#  give such a row the plain row's budget in tokens, not `max`, which would train the cheaper model longer)
declare -A recipes=([gate]="--state-gate --state-norm" [hard]="--state-gate --state-gate-hard --state-norm"
                    [bptt1]="--bptt-segments 1" [bptt8]="--bptt-segments 8"
                    [rows32]="--state-rows 32" [rows3]="--state-rows 3")
mkdir -p "$work"
log=$out/session.log

args() {  # args ROW: the row's context_use arguments
    local name=${1%%:*} tokens=${1#*:} preset=${1%%[+:]*} recipe=
    if [[ $name == *+* ]]; then
        recipe=${name#*+}
        [[ -v recipes[$recipe] ]] || { echo "row $1: no recipe '$recipe' (known: ${!recipes[*]})" >&2; return 1; }
        recipe=${recipes[$recipe]}
    fi
    [[ -v opts[$preset] ]] || { echo "row $1: no preset '$preset' here (known: ${!opts[*]})" >&2; return 1; }
    echo "--model $preset --train-tokens $tokens ${opts[$preset]} $recipe --work $work/${name}_$tokens$suffix --json $work/${name}_$tokens$suffix.json"
}
todo=()
declare -A row_args
for row in "${rows[@]}"; do
    a=$(args "$row")
    row_args[$row]=$a
    if [[ -f $work/${row/:/_}$suffix.json ]]; then echo "$row: done earlier" | tee -a "$log"; continue; fi
    echo "== $row" | tee -a "$log"
    "$python" -m experiments.context_use "${common[@]}" $a --plan 2>&1 | tee -a "$log"
    todo+=("$row")
done

pids=()
for row in "${todo[@]}"; do
    while (( $(jobs -rp | wc -l) >= ${PAR:-2} )); do sleep 5; done
    left=$((deadline - SECONDS - 30))  # 30 s for the trainings to save their checkpoints
    if ((left <= 60)); then echo "$row: not started, no time left" | tee -a "$log"; continue; fi
    ( timeout -k 25 "$left" "$python" -m experiments.context_use "${common[@]}" ${row_args[$row]} \
        > "$out/${row/:/_}$suffix.log" 2>&1 \
        && echo "$row: finished" || echo "$row: stopped (status $?); the same command goes on with it" ) | tee -a "$log" &
    pids+=($!)
    sleep 20  # the row's first trainings pick their ports before the next row starts
done
for pid in "${pids[@]}"; do wait "$pid" || true; done
for f in "$out"/*_*.log; do grep -E "^\[|overall loss|better than" "$f" | tail -8 || true; done | tee -a "$log"

done_rows=("$work"/*.json)
if ((${#done_rows[@]})); then
    cp "${done_rows[@]}" "$out/"
    "$python" -m experiments.text_table "${done_rows[@]}" --json "$out/text.json" --plot "$out/text.png" 2>&1 | tee -a "$log"
else
    echo "no row finished yet: run the same command again" | tee -a "$log"
fi
