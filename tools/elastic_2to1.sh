# Elastic resume on GPUs (issue 14): 12 steps on 2 GPUs x 4 streams, against 6 steps on 2 GPUs then 6 on
# 1 GPU x 8 streams resumed with --resume auto (ZeRO-2, bf16). Run from the repository root with DeepSpeed
# importable; writes $OUT/elastic_2to1.json (per-step losses, and whether every stream read the same segments).
set -e
W=/tmp/e; rm -rf $W/straight $W/split; mkdir -p $W
python - <<'PY'
import json
from tools.benchlib import dp_ds_config, synthetic_store
from tools.parity import PARITY_MODEL
synthetic_store("/tmp/e/store", 512, n_docs=300, doc_len=6 * 64)
json.dump(PARITY_MODEL, open("/tmp/e/model.json", "w"))
for streams in (4, 8):
    c = dp_ds_config(2, streams, 1, True)
    c["scheduler"]["params"]["total_num_steps"] = 12
    json.dump(c, open(f"/tmp/e/z2_b{streams}.json", "w"))
PY
A="--model $W/model.json --data $W/store --log-every 1 --save-every 100 --eval-every 100 --log-placement"
deepspeed --num_gpus 2 --master_port 29611 launch/pretrain.py --ds-config $W/z2_b4.json $A --out $W/straight --steps 12 > $W/a.log 2>&1
deepspeed --num_gpus 2 --master_port 29612 launch/pretrain.py --ds-config $W/z2_b4.json $A --out $W/split --steps 6 > $W/b.log 2>&1
deepspeed --num_gpus 1 --master_port 29613 launch/pretrain.py --ds-config $W/z2_b8.json $A --out $W/split --steps 12 --resume auto > $W/c.log 2>&1
grep -h "re-dealing\|resumed" $W/c.log
python - <<'PY'
import json
from pathlib import Path
from tools.benchlib import metrics
from tools.parity import placement
a, b = metrics(Path("/tmp/e/straight"), "train/loss"), metrics(Path("/tmp/e/split"), "train/loss")
pa, pb = placement(Path("/tmp/e/straight")), placement(Path("/tmp/e/split"))
rows = [{"step": s, "uninterrupted_2gpu": a[s], "2gpu_then_1gpu": b[s], "rel_diff": abs(a[s] - b[s]) / a[s]} for s in sorted(a)]
for r in rows: print(r)
print("same segments in every (step, stream):", pa == pb, len(pa), len(pb))
json.dump({"rows": rows, "same_segments": pa == pb}, open(__import__("os").environ.get("OUT", ".") + "/elastic_2to1.json", "w"), indent=1)
PY
