"""Shared helpers of the tests that train through launch/pretrain.py, and the README's code (fixtures are in conftest.py)."""
import json
import os
import re
import socket
import subprocess
import sys
from datetime import timedelta
from pathlib import Path

import torch
import torch.distributed as dist

from foldscale.data import TokenStore, prepare, train_tokenizer

ROOT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
MODEL = dict(vocab_size=64, d_model=32, n_head=4, n_local=1, n_global=1, segment_len=16)
TOKENIZED_MODEL = dict(MODEL, vocab_size=300)  # for `tokenized_store`


def run(setup, out, *args, ranks=1, launcher="python", ds="z0_b4.json", check=True, timeout=300):
    """launch/pretrain.py on SETUP's model.json, store and DeepSpeed config DS, writing OUT."""
    env = {**os.environ, "DS_ACCELERATOR": "cpu", "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    script = [str(ROOT / "launch" / "pretrain.py"), "--ds_config", str(setup / ds), "--model",
              str(setup / "model.json"), "--data", str(setup / "store"), "--out", str(out),
              "--log_every", "1", *map(str, args)]
    if launcher == "deepspeed":
        cmd = [str(BIN / "deepspeed"), "--num_accelerators", str(ranks), "--master_port", "29531", *script]
    elif launcher == "mpirun":
        cmd = [str(BIN / "mpirun"), "-n", str(ranks), sys.executable, *script]
    else:
        cmd = [sys.executable, *script]
    p = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=timeout)
    if check:
        assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    return p


def spawn_ranks(fn, world_size: int, *args, timeout_s: float = 30):
    """FN(rank, *ARGS) in WORLD_SIZE processes of one gloo process group (collectives time out
    after TIMEOUT_S), for what one rank does to the others; FN and ARGS must pickle (FN defined
    at a test module's top level). Raises when a rank raises."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    torch.multiprocessing.spawn(_rank_main, (fn, world_size, port, timeout_s, args), nprocs=world_size)


def _rank_main(rank: int, fn, world_size: int, port: int, timeout_s: float, args):
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world_size,
                            timeout=timedelta(seconds=timeout_s))
    try:
        fn(rank, *args)
    finally:
        dist.destroy_process_group()


def losses(out):
    lines = [json.loads(line) for line in (Path(out) / "metrics.jsonl").read_text().splitlines()]
    return [r["train/loss"] for r in lines if "train/loss" in r]


def tokenized_store(out: Path) -> TokenStore:
    """A token store made with its own tokenizer (vocab_size 300), so that a run's checkpoints
    carry tokenizer.model: 40 short Python-like documents of 1 to 7 segments."""
    texts = [f"def f{i}(x):\n    return x * {i} + {i * i}\n" * (1 + i % 5) for i in range(40)]
    tok = train_tokenizer(iter(texts), TOKENIZED_MODEL["vocab_size"], out.with_name(out.name + ".tokenizer.model"))
    docs = out.with_name(out.name + ".jsonl")
    docs.write_text("".join(json.dumps({"text": t}) + "\n" for t in texts))
    return prepare(str(docs), tok, out, val_fraction=0.25, num_proc=1)


README_PYTHON = re.findall(r"```python\n(.*?)```", (ROOT / "README.md").read_text(), re.S)
"""The README's Python blocks (tests/test_readme.py runs them; those that load `model-hf`, tests/test_hf.py)."""
