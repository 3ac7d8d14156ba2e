#!/usr/bin/env bash
# Issue 26 in device commands of ~9 minutes: pretrain a folded backbone with launch/pretrain.py, export it,
# fine-tune each bAbI task from it (AdamW lr 3e-4, weight decay 0.01, answer-only loss, a curriculum up to
# 32 segments, then 1,500 annealed steps there, back-propagation through every segment: ARMT's recipe
# with the rate and the last stage that made qa1 hold, BENCHMARKS.md sessions 13-15) for SEEDS side by side on
# the one GPU, beside ONE run of the same command from a random initialisation of the same shape (same
# steps) and ONE of full attention over 32 x l made of the backbone's blocks (suite --baseline-only), then score 1, 64, 1024 x l and the far row 16384 x l on 100 documents each (--quick: 1, 4, 16, 64).
#
#   bash experiments/babi_session.sh OUT            # on the GPU; OUT gets session.log, babi.json, runs.tar,
#                                                   # backbone/ (a backbone pretrained here, in bf16: 13.5 MiB)
#                                                   # and with MODELS=1 TASK_RUN.tar (a scored run's model, bf16)
#   bash experiments/babi_session.sh OUT --quick    # toy sizes on the CPU (QUICK=1 too; tests/test_babi_table.py)
#
# Stages, each skipped when its output exists in WORK (default runs/babi; it stays on a warm machine):
# pretrain (a plan with the ETA first; stopped at the deadline with SIGTERM, it saves a checkpoint and the
# same command goes on from it), export, then per task the fine-tuning runs, started only when FT_S
# seconds are left. Each run trains until EVAL_S + 60 s before the deadline (suite --resume): if its steps
# are not done by then it saves and stops, and the same command goes on from there, step for step; once
# they are done it is scored. So one call pretrains, and the next calls on the warm machine fine-tune and score.
# Settings: TASKS (qa1; e.g. qa1,qa2), SEEDS ("0 1 2"), REFERENCES ("scratch full"; empty: the seeds alone),
# STORE (.gpu_data/store, the built-in corpus), TOKENS (pretraining tokens, 40e6), RATE (tokens/s assumed for
# the plan), BACKBONE (an export to start from instead of pretraining, e.g. the backbone/ an earlier session
# brought back), FINAL_STEPS (1500: the steps at 32 segments, every seed the same; the learning rate stays at
# its peak until then and decays over them), STEPS (instead of FINAL_STEPS: all steps, the rate decaying over
# them), PATIENCE (steps after which a stage moves on even below the 0.95 gate; unset: it waits), LR (3e-4),
# WARMUP (100), WD (0.01),
# BATCH (sequences a step, the suite's 64),
# BUDGET_S (540), FT_S (480), EVAL_S (180: scoring after training; 0 for a call that only trains),
# LAST_CALL (1: score where the time ends even if its steps are not done; the record has the steps taken),
# MODELS (1: bring back each folded run scored in this call, exported in bf16 and tarred, to study on a CPU:
# the device returns at most 8 files of 16 MiB, so one task's three seeds a call), PROBE (1: the suite's
# --probe, why needles are missed, in each run's JSON; it lengthens the scoring: raise EVAL_S).
# babi.json (also experiments/results/targets/babi.json, not with --quick) is made from every task whose
# seeds have all finished, by experiments/babi_table.py.
set -euo pipefail
shopt -s nullglob
out=${1:?usage: bash experiments/babi_session.sh OUT_DIR [--quick]}
python=${PYTHON:-python3}
deadline=$((SECONDS + ${BUDGET_S:-540}))
mkdir -p "$out"
out=$(cd "$out" && pwd)
cd "$(dirname "$0")/.."
export PYTHONUNBUFFERED=1
work=${WORK:-runs/babi}
seeds=(${SEEDS:-0 1 2})
tasks=${TASKS:-qa1}
references=${REFERENCES-scratch full}  # the runs beside the seeds; REFERENCES= for the seeds alone
log=$out/session.log
mkdir -p "$work"
if [[ ${2:-} == --quick || ${QUICK:-0} == 1 ]]; then
    quick=1
    store=${STORE:-$("$python" -c "from foldscale.data import default_store; print(default_store(vocab_size=512, max_files=25, num_proc=1))" | tail -n 1)}
    ds=ds_configs/cpu.json
    shape=(d_model=32 n_head=2 n_local=1 n_global=1 segment_len=32)  # l 32: a qa1 story needs 12 segments
    tokens=${TOKENS:-10240} rate=${RATE:-2000} ft_s=${FT_S:-30} eval_s=${EVAL_S:-10} steps=${STEPS:-6}
    pretrain=(--log-every 5 --eval-every 1000 --eval-segments 2)
    suite=(--quick --eval-multiples 1,4,16 --eval-samples 4 --far-multiples 64 --far-samples 2)
    headline=16,64
else
    quick=0
    store=${STORE:-.gpu_data/store}
    ds=ds_configs/babi-pretrain.json
    shape=()
    tokens=${TOKENS:-40e6} rate=${RATE:-500000} ft_s=${FT_S:-480} eval_s=${EVAL_S:-180} steps=${STEPS:-}
    pretrain=(--compile --log-every 50 --eval-every 1000 --save-every 500)
    suite=(--eval-multiples 1,64,1024 --eval-samples 100 --far-multiples 16384 --far-samples 100)
    headline=1024,16384
fi
suite+=(--data "$store" --max-train-segments 32
        --lr "${LR:-3e-4}" --warmup-steps "${WARMUP:-100}" --weight-decay "${WD:-0.01}" ${BATCH:+--batch-size "$BATCH"}
        ${PATIENCE:+--stage-patience "$PATIENCE"})
if [[ -n ${FINAL_STEPS:-} || -z $steps ]]; then  # --quick: STEPS (6) unless FINAL_STEPS is given
    final=${FINAL_STEPS:-1500}
    suite+=(--final-steps "$final") schedule="$final steps at 32 segments"
else
    suite+=(--steps "$steps") schedule="$steps steps"
fi
if [[ ${LAST_CALL:-0} == 1 ]]; then suite+=(--last-call); fi
probe=()  # for the folded runs only: the suite refuses --probe with --baseline-only
if [[ ${PROBE:-0} == 1 ]]; then probe=(--probe); fi
say() { echo "$*" | tee -a "$log"; }
left() { echo $((deadline - SECONDS)); }

if [[ -f $work/backbone/model.safetensors ]]; then
    say "backbone: done earlier ($work/backbone)"
elif [[ -n ${BACKBONE:-} ]]; then
    mkdir -p "$work/backbone" && cp "$BACKBONE"/{config.json,model.safetensors,tokenizer.model} "$work/backbone/"
    say "backbone: from $BACKBONE"
else
    # the backbone's shape with the store's vocabulary (a model .json must match the data)
    "$python" - "$store" "$work/model.json" "${shape[@]}" <<'EOF'
import sys
from foldscale.config import ModelConfig
from foldscale.data import TokenStore
shape = {k: int(v) for k, v in (a.split("=") for a in sys.argv[3:])}
vocab = TokenStore.open(sys.argv[1]).vocab_size
ModelConfig.load("experiments/longctx/babi_backbone.json", vocab_size=vocab, **shape).to_json(sys.argv[2])
EOF
    pretrain_steps=$("$python" - "$store" "$work/model.json" "$ds" "$tokens" "$rate" <<'EOF' 2> >(tee -a "$log" >&2)
import json, math, sys
from foldscale.config import ModelConfig
from foldscale.data import TokenStore
store, cfg = TokenStore.open(sys.argv[1]), ModelConfig.from_json(sys.argv[2])
streams = json.load(open(sys.argv[3]))["train_micro_batch_size_per_gpu"]
per_step = streams * cfg.bptt_segments * cfg.segment_len
steps = math.ceil(float(sys.argv[4]) / per_step)
rate, train = float(sys.argv[5]), store.meta["splits"]["train"]["tokens"]
print(f"pretrain plan: {cfg.num_params():,} parameters (d {cfg.d_model}, {cfg.n_local} local + {cfg.n_global} global, "
      f"l {cfg.segment_len}), {streams} streams x bptt {cfg.bptt_segments} x l = {per_step:,} tokens a step, "
      f"{steps:,} steps = {steps * per_step / 1e6:.1f}M tokens, {steps * per_step / train:.1f} epochs of {store.path} "
      f"({train / 1e6:.1f}M training tokens); est_minutes {steps * per_step / rate / 60:.1f} at {rate:,.0f} tokens/s",
      file=sys.stderr)
print(steps)
EOF
)
    if [[ ! -f $work/pretrain.done ]]; then
        say "pretrain: $pretrain_steps steps, $(left) s left"
        status=0
        timeout -k 60 $(($(left) - 60)) "$python" launch/pretrain.py --ds-config "$ds" --model "$work/model.json" \
            --data "$store" --out "$work/pretrain" --steps "$pretrain_steps" --resume auto "${pretrain[@]}" \
            2>&1 | tee -a "$work/pretrain.log" | grep --line-buffered -E "step|error|stopped|done" || status=${PIPESTATUS[0]}
        if ((status == 124 || status == 130)); then  # timeout's, or the run's own after SIGTERM
            say "pretrain: stopped at the deadline: the same command goes on from its last checkpoint"
            exit 0
        elif ((status)); then
            say "pretrain: failed (status $status); see $work/pretrain.log"
            exit 1
        fi
        touch "$work/pretrain.done"
    fi
    "$python" -m foldscale.cli export "$work/pretrain" --out "$work/backbone" 2>&1 | tee -a "$log"
fi
if [[ -z ${BACKBONE:-} && ! -f $out/backbone/model.safetensors ]]; then  # bf16: small enough to come back from the device
    "$python" -m foldscale.cli export "$work/backbone" --dtype bf16 --out "$out/backbone" 2>&1 | tee -a "$log"
fi
if [[ ! -f $work/scratch/model.safetensors ]]; then  # a random initialisation of the same shape
    "$python" - "$work/backbone" "$work/scratch" <<'EOF'
import shutil, sys
import torch
from foldscale.model import FoldedLM
torch.manual_seed(0)
FoldedLM(FoldedLM.from_pretrained(sys.argv[1]).cfg).save_pretrained(sys.argv[2])
shutil.copyfile(f"{sys.argv[1]}/tokenizer.model", f"{sys.argv[2]}/tokenizer.model")
EOF
fi

for task in ${tasks//,/ }; do
    todo=()
    for name in "${seeds[@]/#/seed}" $references; do
        if [[ -f $work/${task}_$name.json ]]; then say "$task $name: done earlier"; else todo+=("$name"); fi
    done
    ((${#todo[@]})) || continue
    if (($(left) < ft_s)); then
        say "$task: not started, $(left) s left of the $ft_s s a fine-tuning stage takes: run the same command again"
        continue
    fi
    minutes=$("$python" -c "print(round(($(left) - $eval_s - 60) / 60, 2))")  # a cap: --steps ends a run first
    say "$task: ${todo[*]} side by side, $schedule, at most $minutes min of training each"
    for name in "${todo[@]}"; do
        init=$work/backbone seed=${name#seed} only=(--save "$work/models/${task}_$name" "${probe[@]}")
        [[ $name == scratch ]] && init=$work/scratch seed=${seeds[0]}
        [[ $name == full ]] && seed=${seeds[0]} only=(--baseline-only)
        ( status=0
          timeout -k 20 $(($(left) - 10)) "$python" -m experiments.suite --tasks "$task" --init "$init" --seed "$seed" "${only[@]}" \
            --minutes "$minutes" "${suite[@]}" --resume "$work/resume/${task}_$name" --json "$work/${task}_$name.json" \
            >> "$work/${task}_$name.log" 2>&1 || status=$?
          case $status in
              0) say "$task $name: finished" ;;
              75) say "$task $name: trained until the deadline and saved; the same command goes on from there" ;;
              *) say "$task $name: stopped (status $status); the same command goes on from its last save" ;;
          esac ) &
    done
    wait
    for name in "${todo[@]}"; do
        grep -E "^\[.*\] (accuracy|warning)|^$task [0-9]+ x l" "$work/${task}_$name.log" | sed "s/^/$name: /" | tee -a "$log" || true
        model=$work/models/${task}_$name
        if [[ ${MODELS:-0} == 1 && -f $model/model.safetensors ]]; then  # saved once scored
            { "$python" -m foldscale.cli export "$model" --dtype bf16 --out "$model-bf16" >> "$log" 2>&1 &&
              tar -C "$model-bf16" -cf "$out/${task}_$name.tar" config.json model.safetensors tokenizer.model; } ||
                say "$task $name: its model was not brought back (see $log); it stays in $model"
        fi
    done
done

runs=() scratch=() reference=()
for task in ${tasks//,/ }; do
    mine=()
    for s in "${seeds[@]}"; do [[ -f $work/${task}_seed$s.json ]] && mine+=("$work/${task}_seed$s.json"); done
    if ((${#mine[@]} == ${#seeds[@]})); then
        runs+=("${mine[@]}")
        [[ -f $work/${task}_scratch.json ]] && scratch+=("$work/${task}_scratch.json")
        [[ -f $work/${task}_full.json ]] && reference+=("$work/${task}_full.json")
    fi
done
logs=("$work"/*.json "$work"/*.log "$work"/pretrain/metrics.json[l])  # a glob: nullglob drops what is missing
((${#logs[@]})) && tar -C "$work" -cf "$out/runs.tar" "${logs[@]#$work/}"
if ((${#runs[@]})); then
    "$python" -m experiments.babi_table "${runs[@]}" --scratch "${scratch[@]}" --reference "${reference[@]}" --backbone "$work/backbone" \
        $([[ -d $work/pretrain ]] && echo --pretrain "$work/pretrain") --headline "$headline" --json "$out/babi.json" 2>&1 | tee -a "$log"
    if ((!quick)); then mkdir -p experiments/results/targets && cp "$out/babi.json" experiments/results/targets/babi.json; fi
else
    say "no task has all its seeds finished yet: run the same command again"
fi
